"""Tests of the core library: wire format, pair classes, echo miner and examples.

Every MQTT test runs against a private Mosquitto started by the ``broker``
fixture (conftest.py) on a free loopback port; nothing is mocked.
"""
import base64
import dataclasses
import logging
import os
import random
import socket
import subprocess
import sys
import threading
import time

import pytest

import mqbtt
from mqbtt import (Empty, Kind, MQbtTConnectionError, MQbtTDecodeError, MQbtTLogReceiver,
                   MQbtTMiner, MQbtTOptimizer, MQbtTSendTimeout, Reply, Request, Share)
from local_broker import LocalBroker, free_port
from testlib import ROOT, make_ca, protoc, raw_client, wait_for

PY = sys.executable

DOC_OPTIMIZER = """\
Sent request: Request(timestamp_min=0, timestamp_max=1, nonce_start=0, nonce_size=1, reset=True)
Received reply: Reply(kind=<Kind.HELLO: 0>, num_shares=10001, new_block=True)
Sent request: Request(timestamp_min=1, timestamp_max=2, nonce_start=0, nonce_size=1, reset=False)
Received reply: Reply(kind=<Kind.RESULT: 1>, num_shares=1020001, new_block=False)
Sent request: Request(timestamp_min=2, timestamp_max=3, nonce_start=1, nonce_size=2, reset=True)
Received reply: Reply(kind=<Kind.RESET: 2>, num_shares=2030102, new_block=True)
Sent request: Request(timestamp_min=3, timestamp_max=4, nonce_start=1, nonce_size=2, reset=False)
Received reply: Reply(kind=<Kind.BYE: 3>, num_shares=3040102, new_block=False)
Sent request: Request(timestamp_min=4, timestamp_max=5, nonce_start=2, nonce_size=3, reset=True)
Received reply: Reply(kind=<Kind.HELLO: 0>, num_shares=4050203, new_block=True)
Sent request: Request(timestamp_min=5, timestamp_max=6, nonce_start=2, nonce_size=3, reset=False)
Received reply: Reply(kind=<Kind.RESULT: 1>, num_shares=5060203, new_block=False)
Sent request: Request(timestamp_min=6, timestamp_max=7, nonce_start=3, nonce_size=4, reset=True)
Received reply: Reply(kind=<Kind.RESET: 2>, num_shares=6070304, new_block=True)
Sent request: Request(timestamp_min=7, timestamp_max=8, nonce_start=3, nonce_size=4, reset=False)
Received reply: Reply(kind=<Kind.BYE: 3>, num_shares=7080304, new_block=False)
Sent request: Request(timestamp_min=8, timestamp_max=9, nonce_start=4, nonce_size=5, reset=True)
Received reply: Reply(kind=<Kind.HELLO: 0>, num_shares=8090405, new_block=True)
Sent request: Request(timestamp_min=9, timestamp_max=10, nonce_start=4, nonce_size=5, reset=False)
Received reply: Reply(kind=<Kind.RESULT: 1>, num_shares=9100405, new_block=False)
"""

DOC_ECHO = """\
Received request: Request(timestamp_min=0, timestamp_max=1, nonce_start=0, nonce_size=1, reset=True)
Sent reply: Reply(kind=<Kind.HELLO: 0>, num_shares=10001, new_block=True)
Received request: Request(timestamp_min=1, timestamp_max=2, nonce_start=0, nonce_size=1, reset=False)
Sent reply: Reply(kind=<Kind.RESULT: 1>, num_shares=1020001, new_block=False)
Received request: Request(timestamp_min=2, timestamp_max=3, nonce_start=1, nonce_size=2, reset=True)
Sent reply: Reply(kind=<Kind.RESET: 2>, num_shares=2030102, new_block=True)
Received request: Request(timestamp_min=3, timestamp_max=4, nonce_start=1, nonce_size=2, reset=False)
Sent reply: Reply(kind=<Kind.BYE: 3>, num_shares=3040102, new_block=False)
Received request: Request(timestamp_min=4, timestamp_max=5, nonce_start=2, nonce_size=3, reset=True)
Sent reply: Reply(kind=<Kind.HELLO: 0>, num_shares=4050203, new_block=True)
Received request: Request(timestamp_min=5, timestamp_max=6, nonce_start=2, nonce_size=3, reset=False)
Sent reply: Reply(kind=<Kind.RESULT: 1>, num_shares=5060203, new_block=False)
Received request: Request(timestamp_min=6, timestamp_max=7, nonce_start=3, nonce_size=4, reset=True)
Sent reply: Reply(kind=<Kind.RESET: 2>, num_shares=6070304, new_block=True)
Received request: Request(timestamp_min=7, timestamp_max=8, nonce_start=3, nonce_size=4, reset=False)
Sent reply: Reply(kind=<Kind.BYE: 3>, num_shares=7080304, new_block=False)
Received request: Request(timestamp_min=8, timestamp_max=9, nonce_start=4, nonce_size=5, reset=True)
Sent reply: Reply(kind=<Kind.HELLO: 0>, num_shares=8090405, new_block=True)
Received request: Request(timestamp_min=9, timestamp_max=10, nonce_start=4, nonce_size=5, reset=False)
Sent reply: Reply(kind=<Kind.RESULT: 1>, num_shares=9100405, new_block=False)
"""

SHARE = Share(version=0x20024000, prev_block=bytes(range(32)), merkle_root=bytes(range(32, 64)),
              time=1747905346, pool_time=1747905300, bits=0x17028C61, nonce=0xC5E6FC28,
              pool_diff=32768.0, job_id="1c5b2a", extranonce2="0100000000000000",
              diff=1636.25, zeroes=42)


def publish_raw(uri, topic, payload, qos=1):
    c = raw_client(uri)
    try:
        c.publish(topic, payload, qos).wait_for_publish(10)
    finally:
        c.disconnect()
        c.loop_stop()


# ---------------------------------------------------------------------------
# wire format
# ---------------------------------------------------------------------------

def test_embedded_schema_is_protoc_output(tmp_path):
    """The descriptor inside mqbtt.py is exactly mqbtt.proto compiled by the real protoc."""
    from google.protobuf import descriptor_pb2
    out = tmp_path / "set.pb"
    subprocess.run(["protoc", f"--descriptor_set_out={out}", "-I", ROOT, "mqbtt.proto"],
                   check=True, cwd=ROOT)
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    compiled = fds.file[0].SerializeToString()
    embedded = base64.b64decode(mqbtt._DESCRIPTOR)
    assert embedded == compiled, (
        "mqbtt._DESCRIPTOR is stale; new value:\n" + base64.b64encode(compiled).decode())


@pytest.mark.parametrize("msg, text", [
    (Request(timestamp_min=2048, timestamp_max=3071, nonce_start=120, nonce_size=8, reset=True),
     "timestamp_min: 2048\ntimestamp_max: 3071\nnonce_start: 120\nnonce_size: 8\nreset: true\n"),
    (Reply(kind=Kind.BYE, num_shares=4294967295 * 1010101, new_block=True),
     f"kind: BYE\nnum_shares: {4294967295 * 1010101}\nnew_block: true\n"),
    (Reply(kind=Kind.HELLO, num_shares=10001, new_block=True),
     "num_shares: 10001\nnew_block: true\n"),
    (SHARE, None),
])
def test_protoc_round_trip_both_ways(msg, text):
    """Our bytes decode with `protoc --decode`, and `protoc --encode` bytes decode with us."""
    name = type(msg).__name__
    decoded = protoc([f"--decode=mqbtt.{name}"], msg.to_bytes()).decode()
    if text is not None:
        assert decoded == text
    encoded = protoc([f"--encode=mqbtt.{name}"], decoded.encode())
    assert type(msg).from_bytes(encoded) == msg
    assert encoded == msg.to_bytes()


def test_echo_maximum_fits_in_num_shares():
    m = 2**32 - 1
    big = mqbtt.echo_reply(Request(timestamp_min=m, timestamp_max=m, nonce_start=m, nonce_size=m))
    assert Reply.from_bytes(big.to_bytes()).num_shares == m * 1010101


def test_dataclasses_frozen_keyword_only_defaults_repr():
    assert Reply() == Reply(kind=Kind.RESULT, num_shares=0, new_block=False)
    assert Request() == Request(timestamp_min=0, timestamp_max=0, nonce_start=0, nonce_size=0, reset=False)
    assert Share().prev_block == b"" and Share().diff == 0.0 and Share().job_id == ""
    with pytest.raises(TypeError):
        Request(1, 2, 3, 4, False)
    with pytest.raises(TypeError):
        Reply(Kind.HELLO)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Request().reset = True
    r = Reply.from_bytes(Reply(kind=Kind.HELLO, num_shares=10001, new_block=True).to_bytes())
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.kind = Kind.BYE
    assert repr(r) == "Reply(kind=<Kind.HELLO: 0>, num_shares=10001, new_block=True)"
    assert isinstance(r.kind, Kind)
    assert hash(r) == hash(Reply(kind=Kind.HELLO, num_shares=10001, new_block=True))
    assert Share.from_bytes(SHARE.to_bytes()) == SHARE
    assert isinstance(Share.from_bytes(SHARE.to_bytes()).prev_block, bytes)


def test_out_of_range_fields_raise_value_error():
    with pytest.raises(ValueError):
        Request(timestamp_min=-1).to_bytes()
    with pytest.raises(ValueError):
        Request(nonce_size=2**32).to_bytes()
    with pytest.raises(ValueError):
        Share(job_id=5).to_bytes()


@pytest.mark.parametrize("cls", [Request, Reply, Share])
def test_malformed_bytes_raise_decode_error(cls):
    bad = [b"\xff", b"\x0a", b"\x0a\x05ab", b"\x08", b"\x08\x80", b"\x12\xff\xff\xff\xff\x0f",
           b"\x07", b"\x0f\x00"]
    if cls is Reply:
        bad.append(b"\x08\x07")           # kind 7 is not a Kind
    if cls is Share:
        bad.append(b"\x4a\x02\xff\xfe")   # job_id that is not UTF-8
    for b in bad:
        with pytest.raises(MQbtTDecodeError):
            cls.from_bytes(b)
    with pytest.raises(MQbtTDecodeError):
        cls.from_bytes("not bytes")
    assert issubclass(MQbtTDecodeError, ValueError)


def test_random_bytes_either_decode_fully_or_raise():
    rnd = random.Random(1234)
    for _ in range(3000):
        b = bytes(rnd.randrange(256) for _ in range(rnd.randrange(0, 40)))
        for cls in (Request, Reply, Share):
            try:
                m = cls.from_bytes(b)
            except MQbtTDecodeError:
                continue
            # a message that decodes is complete and re-serializes
            assert type(m).from_bytes(m.to_bytes()) == m


def test_truncated_share_never_half_filled():
    b = SHARE.to_bytes()
    for n in range(1, len(b)):
        try:
            m = Share.from_bytes(b[:n])
        except MQbtTDecodeError:
            continue
        assert m != SHARE  # a clean prefix of fields can be a valid, different message


# ---------------------------------------------------------------------------
# URIs, pair ids, client ids
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("uri, expect", [
    ("cudone.law.di.unimi.it", ("mqtt", "cudone.law.di.unimi.it", 1883, False, "tcp")),
    ("localhost:1884", ("mqtt", "localhost", 1884, False, "tcp")),
    ("mqtt://localhost", ("mqtt", "localhost", 1883, False, "tcp")),
    ("mqtts://broker.example", ("mqtts", "broker.example", 8883, True, "tcp")),
    ("ws://h:9001/mqtt", ("ws", "h", 9001, False, "websockets")),
    ("wss://h", ("wss", "h", 443, True, "websockets")),
    ("mqtt://[::1]:1999", ("mqtt", "::1", 1999, False, "tcp")),
])
def test_broker_uri_forms(uri, expect):
    b = mqbtt.BrokerURI.parse(uri)
    assert (b.scheme, b.host, b.port, b.tls, b.transport) == expect


@pytest.mark.parametrize("uri, password", [("mqtt://alice:s3cr/et@x@127.0.0.1:5", "s3cr/et@x"),
                                           ("mqtt://alice:pa#s3cr@127.0.0.1:5", "pa#s3cr"),
                                           ("mqtt://alice:pa?s3cr@127.0.0.1:5", "pa?s3cr")])
def test_unencoded_password_characters(uri, password):
    # issue 12: the user information ends at the last '@', as browsers read it
    b = mqbtt.BrokerURI.parse(uri)
    assert (b.username, b.password, b.host, b.port) == ("alice", password, "127.0.0.1", 5)
    assert "s3cr" not in str(b) + repr(b)


@pytest.mark.parametrize("uri", ["mqtt://alice:s3cr@h:99999", "mqtt://alice:s3cr/x@h:0",
                                 "mqtt://alice:s3cr@h?bogus=1", "mqtt://alice:s3cr@"])
def test_bad_broker_uri_never_quotes_the_password(uri):
    with pytest.raises(ValueError) as e:
        mqbtt.BrokerURI.parse(uri)
    assert "s3cr" not in str(e.value) and "alice:***@" in str(e.value)


def test_broker_uri_credentials_never_shown():
    b = mqbtt.BrokerURI.parse("mqtts://alice:s3cr%40t@h:8883?cafile=/etc/ca.pem")
    assert (b.username, b.password, b.cafile) == ("alice", "s3cr@t", "/etc/ca.pem")
    assert "s3cr" not in str(b) and "s3cr" not in repr(b)
    with pytest.raises(ValueError) as e:
        mqbtt.BrokerURI.parse("ftp://alice:s3cret@h")
    assert "s3cret" not in str(e.value)


@pytest.mark.parametrize("uri", ["", "ftp://h", "mqtt://h:notaport", "mqtt://", "mqtt://h?bogus=1"])
def test_bad_broker_uri(uri):
    with pytest.raises(ValueError):
        mqbtt.BrokerURI.parse(uri)


@pytest.mark.parametrize("pid", ["", "a/b", "a+", "#", "x\x00", None, 3, "a\nb", "\x1b[2J",
                                 "bad\udcff"])
def test_bad_pair_id_refused_before_connecting(pid):
    with pytest.raises(ValueError):
        MQbtTOptimizer("mqtt://127.0.0.1:1", pid, connect_timeout=0.1)


def test_client_ids_stable_per_pair_and_role(broker):
    with MQbtTOptimizer(broker.uri, "p1") as o, MQbtTMiner(broker.uri, "p1") as m:
        assert o.client_id == "mqbtt-opt-p1" and m.client_id == "mqbtt-esp-p1"
    with MQbtTLogReceiver(broker.uri, "p1") as a, MQbtTLogReceiver(broker.uri, "p1") as b:
        assert a.client_id != b.client_id
    with MQbtTLogReceiver(broker.uri, "p1", clean_session=False) as a:
        assert a.client_id == MQbtTLogReceiver._derive_client_id(a)


# ---------------------------------------------------------------------------
# pair classes on a real broker
# ---------------------------------------------------------------------------

def test_request_reply_share_log_exchange(broker):
    with MQbtTOptimizer(broker.uri, "ex") as opt, MQbtTMiner(broker.uri, "ex") as miner, \
            MQbtTLogReceiver(broker.uri, "ex") as logs:
        req = Request(timestamp_min=3, timestamp_max=10, nonce_start=5, nonce_size=7, reset=False)
        opt.send_request(req)
        assert miner.receive_request(timeout=10) == req
        miner.send_reply(Reply(kind=Kind.RESULT, num_shares=12, new_block=True))
        miner.send_share(SHARE)
        miner.send_log("I (4398308) mqbtt_protocol: Sent reply: kind=1 — ünïcode")
        assert opt.receive_reply(timeout=10) == Reply(kind=Kind.RESULT, num_shares=12, new_block=True)
        assert opt.receive_share(timeout=10) == SHARE
        line = logs.receive_log(timeout=10)
        assert line == "I (4398308) mqbtt_protocol: Sent reply: kind=1 — ünïcode"
        assert isinstance(line, str)


def test_receive_semantics(broker):
    with MQbtTOptimizer(broker.uri, "sem") as opt, MQbtTMiner(broker.uri, "sem") as miner:
        assert opt.has_reply() is False and opt.has_share() is False
        assert opt.receive_reply(blocking=False) is None          # never raises Empty
        t = time.monotonic()
        with pytest.raises(Empty):
            opt.receive_reply(timeout=0.2)
        assert 0.15 < time.monotonic() - t < 10
        with pytest.raises(Empty):
            opt.receive_share(blocking=False, timeout=0.05)       # timeout wins over blocking
        with pytest.raises(ValueError):
            opt.receive_reply(timeout=-1)
        miner.send_reply(Reply(num_shares=1))
        wait_for(opt.has_reply, what="a reply")
        assert opt.receive_reply(blocking=False) == Reply(num_shares=1)
        # blocking receive with no timeout returns as soon as something arrives
        threading.Timer(0.2, lambda: miner.send_reply(Reply(num_shares=2))).start()
        assert opt.receive_reply() == Reply(num_shares=2)
        assert mqbtt.Empty is __import__("queue").Empty


def test_order_preserved_and_nothing_lost(broker):
    with MQbtTOptimizer(broker.uri, "ord") as opt, MQbtTMiner(broker.uri, "ord") as miner:
        for i in range(500):
            miner.send_share(Share(nonce=i), blocking=False)
        assert miner.wait_sent(10)
        got = [opt.receive_share(timeout=10).nonce for _ in range(500)]
        assert got == list(range(500))
        assert not opt.has_share()


def test_more_nonblocking_sends_than_message_ids():
    """paho has 65535 message ids: mqbtt applies back-pressure instead of losing messages."""
    n = 70000
    with LocalBroker(extra="max_queued_messages 0") as b, \
            MQbtTOptimizer(b.uri, "many") as opt, MQbtTMiner(b.uri, "many") as miner:
        miner.max_pending = 5000
        for i in range(n):
            miner.send_share(Share(nonce=i), blocking=False)
        assert miner.wait_sent(60)
        got = [opt.receive_share(timeout=30).nonce for _ in range(n)]
    assert len(set(got)) == n
    print(f"\n[70000 non-blocking sends] sent={n} received={len(got)} lost={n - len(set(got))}")


def test_restarted_optimizer_gets_replies_queued_while_away(broker):
    """clean_session=False + a stable client id: the broker queues replies for a stopped optimizer."""
    opt = MQbtTOptimizer(broker.uri, "rs")
    opt.stop()
    with MQbtTMiner(broker.uri, "rs") as miner:
        for i in range(5):
            miner.send_reply(Reply(num_shares=i))
        miner.send_share(Share(nonce=7))
    with MQbtTOptimizer(broker.uri, "rs") as opt2:
        got = [opt2.receive_reply(timeout=10).num_shares for _ in range(5)]
        assert got == [0, 1, 2, 3, 4]
        assert opt2.receive_share(timeout=10).nonce == 7
        assert not opt2.has_reply()
    print("restarted optimizer: 5 replies + 1 share queued while away, 5 + 1 received")


def test_clean_session_optimizer_does_not_get_old_replies(broker):
    MQbtTOptimizer(broker.uri, "cs", clean_session=True).stop()
    with MQbtTMiner(broker.uri, "cs") as miner:
        miner.send_reply(Reply(num_shares=1))
    with MQbtTOptimizer(broker.uri, "cs", clean_session=True) as opt:
        with pytest.raises(Empty):
            opt.receive_reply(timeout=0.5)


def test_several_log_receivers_do_not_kick_each_other(broker):
    receivers = [MQbtTLogReceiver(broker.uri, "lg") for _ in range(3)]
    try:
        with MQbtTMiner(broker.uri, "lg") as miner:
            for i in range(20):
                miner.send_log(f"line {i}")
        for r in receivers:
            assert [r.receive_log(timeout=10) for _ in range(20)] == [f"line {i}" for i in range(20)]
            assert r.connections == 1
    finally:
        for r in receivers:
            r.stop()


def test_log_lines_utf8_and_trailing_newline(broker):
    with MQbtTLogReceiver(broker.uri, "u8") as logs:
        publish_raw(broker.uri, "mqbtt/u8/log", "I (1) tag: héllo\n".encode())
        publish_raw(broker.uri, "mqbtt/u8/log", b"bad \xff byte\r\n")
        assert logs.receive_log(timeout=10) == "I (1) tag: héllo"
        assert logs.receive_log(timeout=10) == "bad \ufffd byte"


def test_malformed_payload_reaches_receiver_as_error_and_thread_survives(broker):
    with MQbtTOptimizer(broker.uri, "mal") as opt:
        for junk in (b"\xff\xff\xff", b"\x08\x09", b""):
            publish_raw(broker.uri, "mqbtt/mal/esp", junk)
        publish_raw(broker.uri, "mqbtt/mal/esp", Reply(num_shares=5).to_bytes())
        with pytest.raises(MQbtTDecodeError):
            opt.receive_reply(timeout=10)
        with pytest.raises(MQbtTDecodeError):
            opt.receive_reply(timeout=10)
        # an empty payload is a valid, all-default Reply in proto3 (kind HELLO)
        assert opt.receive_reply(timeout=10) == Reply(kind=Kind.HELLO)
        assert opt.receive_reply(timeout=10) == Reply(num_shares=5)
        assert opt._client._thread.is_alive()


def test_tcp_nodelay_on_client_socket(broker):
    with MQbtTOptimizer(broker.uri, "nd") as opt:
        sock = opt._client.socket()
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_nagle_follows_traffic(broker):
    """Nagle on while a share flood arrives (PUBACKs coalesce), off before publishing."""
    def nodelay(h):
        return h._client.socket().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    with MQbtTOptimizer(broker.uri, "ng") as opt, MQbtTMiner(broker.uri, "ng") as miner:
        miner.send_share(Share(nonce=1))
        opt.receive_share(timeout=10)
        # the network thread queues the share, then switches Nagle on: await the switch
        wait_for(lambda: not nodelay(opt), what="Nagle on after a share arrived")
        opt.send_request(Request(timestamp_min=1))
        assert nodelay(opt)
        assert miner.receive_request(timeout=10) == Request(timestamp_min=1)
        assert nodelay(miner)


def test_stop_wakes_blocked_receivers(broker):
    opt = MQbtTOptimizer(broker.uri, "wk")
    errors = []

    def receive():
        try:
            opt.receive_reply()
        except MQbtTConnectionError as err:
            errors.append(err)
    t = threading.Thread(target=receive, daemon=True)
    t.start()
    wait_for(lambda: (f := sys._current_frames().get(t.ident)) is not None
             and f.f_code.co_name == "_receive", what="the receiver to block in _receive")
    opt.stop()
    t.join(10)
    assert not t.is_alive() and "stopped" in str(errors[0])
    with pytest.raises(MQbtTConnectionError):
        opt.receive_reply()                      # after stop: an error, not a hang
    with pytest.raises(MQbtTConnectionError):
        opt.receive_share(timeout=5)


def test_ctrl_c_while_connecting_leaves_no_client_thread():
    import _thread
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(5)
    try:
        threading.Timer(0.5, _thread.interrupt_main).start()
        with pytest.raises(KeyboardInterrupt):
            MQbtTOptimizer(f"mqtt://127.0.0.1:{srv.getsockname()[1]}", "kb", connect_timeout=10)
        wait_for(lambda: not [t for t in threading.enumerate() if "mqbtt-opt-kb" in t.name],
                 what="the paho thread to end")
    finally:
        srv.close()


def test_reply_kind_outside_kind_is_refused_by_the_sender():
    with pytest.raises(ValueError):
        Reply(kind=7).to_bytes()
    assert Reply.from_bytes(Reply(kind=2).to_bytes()).kind is Kind.RESET


def test_context_manager_and_stop_idempotent(broker):
    with MQbtTOptimizer(broker.uri, "cm") as opt:
        assert opt.connected
        assert "cm" in repr(opt)
    assert not opt.connected
    opt.stop()
    with pytest.raises(mqbtt.MQbtTSendError):
        opt.send_request(Request())


# ---------------------------------------------------------------------------
# connection failures
# ---------------------------------------------------------------------------

def test_unreachable_broker_raises_quickly():
    port = free_port()
    t = time.monotonic()
    with pytest.raises(MQbtTConnectionError) as e:
        MQbtTOptimizer(f"mqtt://127.0.0.1:{port}", "x", connect_timeout=60)
    assert time.monotonic() - t < 20      # refused at once, not the 60 s timeout
    assert f"127.0.0.1:{port}" in str(e.value) and "refused" in str(e.value).lower()


def test_unknown_host_raises_clearly():
    with pytest.raises(MQbtTConnectionError) as e:
        MQbtTOptimizer("mqtt://no-such-host.invalid", "x", connect_timeout=5)
    assert "no-such-host.invalid" in str(e.value)


def test_silent_broker_times_out():
    """A server that accepts TCP but never answers CONNACK: bounded wait."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(5)
    try:
        t = time.monotonic()
        with pytest.raises(MQbtTConnectionError):
            MQbtTOptimizer(f"mqtt://127.0.0.1:{srv.getsockname()[1]}", "x", connect_timeout=1)
        assert time.monotonic() - t < 15      # bounded, not a hang
    finally:
        srv.close()


@pytest.fixture
def auth_broker():
    b = LocalBroker(users={"alice": "s3cret-pw"}).start()
    yield b
    b.cleanup()


def test_credentials_accepted_and_refused(auth_broker, caplog):
    port = auth_broker.port
    with MQbtTOptimizer(f"mqtt://alice:s3cret-pw@127.0.0.1:{port}", "au") as opt:
        assert opt.connected
        assert "s3cret" not in repr(opt)
    t = time.monotonic()
    with pytest.raises(MQbtTConnectionError) as e:
        MQbtTOptimizer(f"mqtt://alice:wrong-pw@127.0.0.1:{port}", "au", connect_timeout=60)
    assert time.monotonic() - t < 20, "an authentication refusal must not be retried"
    assert "refused" in str(e.value) and "wrong-pw" not in str(e.value)
    with pytest.raises(MQbtTConnectionError):
        MQbtTOptimizer(f"mqtt://127.0.0.1:{port}", "au", connect_timeout=10)
    assert "wrong-pw" not in caplog.text and "s3cret" not in caplog.text
    r = subprocess.run([PY, "mqbtt.py", "echo", "--broker", f"mqtt://alice:wrong-pw@127.0.0.1:{port}",
                        "au"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Not authorized" in r.stderr, r.stderr


# ---------------------------------------------------------------------------
# reconnection, takeover, blocking sends
# ---------------------------------------------------------------------------

def test_reconnects_and_resubscribes_after_broker_restart(broker):
    """The broker forgets every session (no persistence): subscriptions are renewed on reconnect."""
    with MQbtTOptimizer(broker.uri, "rc") as opt, MQbtTMiner(broker.uri, "rc") as miner:
        broker.restart()
        wait_for(lambda: opt.connections >= 2 and miner.connections >= 2, 60, "reconnection")
        opt.send_request(Request(timestamp_min=1))
        assert miner.receive_request(timeout=10) == Request(timestamp_min=1)
        miner.send_reply(Reply(num_shares=9))
        assert opt.receive_reply(timeout=10) == Reply(num_shares=9)


def test_blocking_send_times_out_then_delivers_once(persistent_broker):
    b = persistent_broker
    with MQbtTMiner(b.uri, "st") as miner, MQbtTOptimizer(b.uri, "st") as opt:
        b.stop()
        wait_for(lambda: not opt.connected, 10, "disconnect")
        with pytest.raises(MQbtTSendTimeout):
            opt.send_request(Request(timestamp_min=42), timeout=0.5)
        b.start()
        wait_for(lambda: opt.connections >= 2 and miner.connections >= 2, 60, "reconnection")
        assert miner.receive_request(timeout=15) == Request(timestamp_min=42)
        with pytest.raises(Empty):
            miner.receive_request(timeout=1.0)   # exactly once: no duplicate
    print("send during outage: 1 sent, 1 received, 0 duplicated")


def test_two_optimizers_on_one_pair_are_reported(broker, caplog):
    caplog.set_level(logging.WARNING, logger="mqbtt")
    a = MQbtTOptimizer(broker.uri, "dup")
    try:
        b = MQbtTOptimizer(broker.uri, "dup")
        try:
            wait_for(lambda: "another optimizer of pair 'dup'" in caplog.text, 30, "takeover warning")
        finally:
            b.stop()
    finally:
        a.stop()


def test_fatal_error_wakes_blocked_receiver(auth_broker):
    """Credentials revoked while connected: the reconnect is refused, a blocked receive raises."""
    port = auth_broker.port
    opt = MQbtTOptimizer(f"mqtt://alice:s3cret-pw@127.0.0.1:{port}", "fx")
    try:
        auth_broker.set_users({"alice": "other"})
        auth_broker.restart()
        with pytest.raises(MQbtTConnectionError):
            opt.receive_reply()          # would block forever without the wake-up
    finally:
        opt.stop()


# ---------------------------------------------------------------------------
# transports: websockets and TLS
# ---------------------------------------------------------------------------

def test_websocket_transport(tmp_path):
    port = free_port()
    b = LocalBroker(listeners=f"listener {port} 127.0.0.1\nprotocol websockets\n").start()
    try:
        uri = f"ws://127.0.0.1:{port}/mqtt"
        with MQbtTOptimizer(uri, "ws") as opt, MQbtTMiner(b.uri, "ws") as miner:
            opt.send_request(Request(nonce_size=3))
            assert miner.receive_request(timeout=10) == Request(nonce_size=3)
            miner.send_reply(Reply(num_shares=3))
            assert opt.receive_reply(timeout=10) == Reply(num_shares=3)
    finally:
        b.cleanup()


def test_tls_with_ca_file_and_wrong_ca_refused(tmp_path):
    ca = make_ca(tmp_path)
    other = make_ca(tmp_path, "other")
    port = free_port()
    b = LocalBroker(listeners=(f"listener {port} 127.0.0.1\ncafile {ca}/ca.crt\n"
                               f"certfile {ca}/server.crt\nkeyfile {ca}/server.key\n")).start()
    try:
        uri = f"mqtts://127.0.0.1:{port}?cafile={ca}/ca.crt"
        with MQbtTOptimizer(uri, "tls") as opt, MQbtTMiner(b.uri, "tls") as miner:
            miner.send_reply(Reply(num_shares=443))
            assert opt.receive_reply(timeout=10) == Reply(num_shares=443)
        with pytest.raises(MQbtTConnectionError) as e:
            MQbtTOptimizer(f"mqtts://127.0.0.1:{port}?cafile={other}/ca.crt", "tls2", connect_timeout=5)
        assert "certificate" in str(e.value).lower() or "ssl" in str(e.value).lower()
    finally:
        b.cleanup()


# ---------------------------------------------------------------------------
# echo command and examples: the documented transcripts, byte for byte
# ---------------------------------------------------------------------------

def _start_echo(broker, *args):
    env = dict(os.environ, MQBTT_BROKER=broker.uri)
    p = subprocess.Popen([PY, os.path.join(ROOT, "mqbtt.py"), "echo", *args], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready = p.stderr.readline()
    assert "answering" in ready, ready + p.stderr.read()
    return p


def test_echo_and_optimizer_example_print_documented_transcripts(broker):
    echo = _start_echo(broker, "pair_id")
    try:
        env = dict(os.environ, MQBTT_BROKER=broker.uri)
        opt = subprocess.run([PY, os.path.join(ROOT, "examples", "optimizer.py"), "pair_id"],
                             env=env, capture_output=True, text=True, timeout=60)
        assert opt.returncode == 0, opt.stderr
        assert opt.stdout == DOC_OPTIMIZER
        lines = [echo.stdout.readline() for _ in range(20)]
        assert "".join(lines) == DOC_ECHO
    finally:
        echo.send_signal(__import__("signal").SIGINT)
        assert echo.wait(10) == 0
        assert "Traceback" not in echo.stderr.read()


def test_echo_with_pid_option_and_broker_option(broker):
    env = dict(os.environ, MQBTT_BROKER="mqtt://127.0.0.1:1")
    p = subprocess.Popen([PY, "mqbtt.py", "echo", "--broker", broker.uri, "--pid", "opt2",
                          "--count", "1"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert "answering" in p.stderr.readline()
    with MQbtTOptimizer(broker.uri, "opt2") as opt:
        opt.send_request(Request(timestamp_min=2, timestamp_max=3, nonce_start=1, nonce_size=2, reset=True))
        assert opt.receive_reply(timeout=10) == Reply(kind=Kind.RESET, num_shares=2030102, new_block=True)
    out, err = p.communicate(timeout=10)
    assert p.returncode == 0 and out.count("\n") == 2


def test_echo_errors_are_one_line(broker):
    r = subprocess.run([PY, "mqbtt.py", "echo", "--broker", f"mqtt://127.0.0.1:{free_port()}", "x"],
                       cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "refused" in r.stderr
    r = subprocess.run([PY, "mqbtt.py", "echo", "--broker", broker.uri, "a/b"],
                       cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "invalid pair id" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([PY, "mqbtt.py", "echo"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "pair id is required" in r.stderr


def test_logger_example(broker):
    env = dict(os.environ, MQBTT_BROKER=broker.uri, PYTHONUNBUFFERED="1")
    p = subprocess.Popen([PY, os.path.join(ROOT, "examples", "logger.py"), "lg2"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "listening" in p.stderr.readline()
        lines = ["I (78745803) bm1368Module: Job ID: 00, Core: 1/1, Ver: 05942000",
                 "I (78745983) stratum_task: message result accepted"]
        with MQbtTMiner(broker.uri, "lg2") as miner:
            miner.send_log(lines[0])
            first = p.stdout.readline()
            assert first == lines[0] + "\n"
            miner.send_log(lines[1])
            assert p.stdout.readline() == lines[1] + "\n"
    finally:
        p.send_signal(__import__("signal").SIGINT)
        p.wait(10)


def test_demo_quick_start_command():
    r = subprocess.run([PY, os.path.join(ROOT, "examples", "demo.py")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == DOC_OPTIMIZER + DOC_ECHO


def test_documented_mqbt_spelling_imports():
    """The documentation's examples say ``from mqbt import MQbtTLogReceiver``."""
    import mqbt
    assert mqbt.MQbtTLogReceiver is MQbtTLogReceiver and mqbt.Reply is Reply
    assert mqbt.__version__ == mqbtt.__version__
