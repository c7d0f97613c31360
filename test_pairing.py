"""Tests of issue 10: exact request <-> reply pairing with correlation ids.

Everything runs on real private Mosquitto brokers (conftest.py), with the real
``protoc``, ``mosquitto_pub``/``mosquitto_sub``, ``mqbtt echo`` and optimizer
processes killed with SIGKILL; nothing is mocked.
"""
import dataclasses
import datetime
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import time

import pytest

import mqbtt
from mqbtt import (Empty, Kind, MQbtTDecodeError, MQbtTMiner, MQbtTOptimizer, MQbtTRecord,
                   MQbtTSendError, Reply, Request)
from test_mqbtt import DOC_ECHO, DOC_OPTIMIZER
from testlib import ROOT, Proc, protoc, wait_for

PY = sys.executable
UTC = datetime.timezone.utc


# -- helpers ----------------------------------------------------------------------

def start_echo(broker, pid, *extra):
    echo = Proc([PY, "mqbtt.py", "echo", "--broker", broker.uri, "--pid", pid, *extra])
    echo.wait_line(echo.err, lambda x: "answering" in x, "mqbtt echo listening")
    return echo


def protoc_fields(name, payload) -> dict:
    """``protoc --decode`` of *payload*, as {field: text value}."""
    text = protoc([f"--decode=mqbtt.{name}"], payload).decode()
    return dict(line.split(": ", 1) for line in text.splitlines() if line)


def mosquitto_pub(broker, topic, payload: bytes, tmp_path, qos=2):
    f = tmp_path / f"payload-{os.urandom(4).hex()}"
    f.write_bytes(payload)
    r = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", str(qos),
                        "-t", topic, "-f", str(f)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


class Sniffer:
    """``mosquitto_sub`` on the pair's srv and esp topics: (subtopic, payload) in order."""

    def __init__(self, broker, pid, count):
        # stdbuf: mosquitto_sub's -d lines (the SUBACK) are block-buffered in a pipe
        self.proc = Proc(["stdbuf", "-oL", "mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "2",
                          "-t", f"mqbtt/{pid}/srv", "-t", f"mqbtt/{pid}/esp", "-C", str(count),
                          "-F", "%t %x", "-d"])
        self.proc.wait_line(self.proc.out, lambda x: "SUBACK" in x, "mosquitto_sub subscribed")

    def messages(self, timeout=30):
        assert self.proc.wait(timeout) == 0, self.proc.err
        got = []
        for line in self.proc.out:
            parts = line.split(" ")
            if len(parts) in (1, 2) and parts[0].startswith("mqbtt/"):
                got.append((parts[0].rsplit("/", 1)[1], bytes.fromhex(parts[1] if len(parts) > 1 else "")))
        return got


VICTIM = """
import sys, time, mqbtt
opt = mqbtt.MQbtTOptimizer(sys.argv[1], sys.argv[2])
sent = opt.send_request(mqbtt.Request(timestamp_min=91, timestamp_max=92, nonce_start=93, nonce_size=94))
print(sent.request_id, flush=True)
time.sleep(600)      # SIGKILLed here: between send_request and receive_reply
"""

SURVIVOR = """
import json, sys, mqbtt
api = sys.argv[3]
opt = mqbtt.MQbtTOptimizer(sys.argv[1], sys.argv[2])
first_id = opt._next_id
got = []
for i in range(51):
    req = mqbtt.Request(timestamp_min=i, timestamp_max=i + 1, nonce_start=i % 7, nonce_size=3)
    if api == "request":
        reply = opt.request(req, timeout=30)
        sent_id = first_id + i
    else:
        sent_id = opt.send_request(req).request_id
        reply = opt.receive_reply(timeout=30)
    got.append([sent_id, reply.request_id, reply.num_shares, mqbtt.echo_reply(req).num_shares])
print(json.dumps({"stale": opt.stale_replies, "got": got}), flush=True)
"""


# -- messages: the field, repr, equality, wire -----------------------------------------

def test_request_id_is_a_plain_attribute_outside_repr_and_equality():
    a = Request(timestamp_min=1, nonce_size=2, request_id=5)
    b = Request(timestamp_min=1, nonce_size=2)
    assert a.request_id == 5 and b.request_id == 0
    assert a == b and hash(a) == hash(b) and repr(a) == repr(b)
    assert repr(a) == "Request(timestamp_min=1, timestamp_max=0, nonce_start=0, nonce_size=2, reset=False)"
    r = Reply(kind=Kind.BYE, num_shares=3, request_id=2 ** 64 - 1)
    assert r == Reply(kind=Kind.BYE, num_shares=3)
    assert repr(r) == "Reply(kind=<Kind.BYE: 3>, num_shares=3, new_block=False)"
    # decoded messages carry it as a plain attribute (in __dict__, no property, no lazy lookup)
    for msg, cls in ((a, Request), (r, Reply)):
        d = cls.from_bytes(msg.to_bytes())
        assert d.request_id == msg.request_id and d.__dict__["request_id"] == msg.request_id
        assert pickle.loads(pickle.dumps(d)).request_id == msg.request_id
        assert dataclasses.replace(d, request_id=9).request_id == 9
        assert dataclasses.asdict(d)["request_id"] == msg.request_id
    with pytest.raises(TypeError):
        Request(1, 2, 3, 4, False, 5)          # keyword only, like the other fields
    # id 0 is not on the wire: the bytes are those of a firmware without the field
    assert Request(timestamp_min=1).to_bytes() == bytes.fromhex("0801")
    assert Reply(num_shares=1).to_bytes() == bytes.fromhex("08011001")


@pytest.mark.parametrize("bad", [-1, 2 ** 64, 1.5, "7", b"1"])
def test_bad_request_ids_do_not_serialize(bad):
    for msg in (Request(request_id=bad), Reply(request_id=bad)):
        with pytest.raises(ValueError):
            msg.to_bytes()


def test_protoc_agrees_on_the_new_fields():
    """Field 6 of Request and 4 of Reply, uint64, both ways through the real protoc."""
    req = Request(timestamp_min=4, reset=True, request_id=2 ** 63 + 11)
    assert protoc_fields("Request", req.to_bytes()) == {
        "timestamp_min": "4", "reset": "true", "request_id": str(2 ** 63 + 11)}
    # the tag bytes: field 6 varint = 0x30, field 4 varint = 0x20
    assert b"\x30" in Request(request_id=1).to_bytes() and Request(request_id=1).to_bytes() == b"\x30\x01"
    assert Reply(kind=Kind.HELLO, request_id=1).to_bytes() == b"\x20\x01"
    enc = protoc(["--encode=mqbtt.Reply"], b"kind: RESET num_shares: 5 request_id: 18446744073709551615")
    got = Reply.from_bytes(enc)
    assert (got.kind, got.num_shares, got.request_id) == (Kind.RESET, 5, 2 ** 64 - 1)
    # a Reply without the field (old firmware) decodes with request_id 0
    old = protoc(["--encode=mqbtt.Reply"], b"kind: RESULT num_shares: 77 new_block: true")
    assert Reply.from_bytes(old).request_id == 0


# -- ids on the wire ----------------------------------------------------------------

def test_send_request_ids_fresh_nonzero_and_returned(broker):
    with MQbtTOptimizer(broker.uri, "ids") as opt, MQbtTMiner(broker.uri, "ids") as miner:
        req = Request(timestamp_min=1)
        sent = [opt.send_request(req) for _ in range(5)]
        assert req.request_id == 0                             # the caller's object is untouched
        ids = [s.request_id for s in sent]
        assert all(0 < i < 2 ** 64 for i in ids)
        assert ids == list(range(ids[0], ids[0] + 5))          # then +1
        assert all(s == req for s in sent)
        got = [miner.receive_request(timeout=10).request_id for _ in range(5)]
        assert got == ids
        # a caller's own non-zero id is sent as is
        mine = opt.send_request(Request(timestamp_min=2, request_id=424242))
        assert mine.request_id == 424242 and miner.receive_request(timeout=10).request_id == 424242
        # a bad id raises before anything is published
        with pytest.raises(ValueError):
            opt.send_request(Request(request_id=-3))
        with pytest.raises(Empty):
            miner.receive_request(timeout=0.3)
        # not a Request: a TypeError, nothing published
        for bad in (mqbtt.Share(), Reply(), b"\x08\x01", None):
            with pytest.raises(TypeError):
                opt.send_request(bad)
            with pytest.raises(TypeError):
                miner.send_reply(bad if not isinstance(bad, Reply) else Request())
        with pytest.raises(Empty):
            miner.receive_request(timeout=0.2)
        # non-blocking sends get ids too
        nb = opt.send_request(Request(), blocking=False)
        assert nb.request_id == ids[-1] + 1
        assert opt.wait_sent(10) and miner.receive_request(timeout=10).request_id == nb.request_id
    # another handle (another process, a restart) starts somewhere else in 63 bits
    starts = set()
    for _ in range(3):
        with MQbtTOptimizer(broker.uri, "ids") as o:
            starts.add(o.send_request(Request()).request_id)
    assert len(starts) == 3 and ids[0] not in starts


def test_ids_unique_across_threads(broker):
    with MQbtTOptimizer(broker.uri, "thr") as opt:
        out = []

        def sender():
            out.extend(opt.send_request(Request(), blocking=False).request_id for _ in range(200))
        threads = [threading.Thread(target=sender) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert opt.wait_sent(30)
    assert len(out) == 800 and len(set(out)) == 800 and 0 not in out


def test_send_reply_copies_the_last_request_id(broker):
    with MQbtTOptimizer(broker.uri, "cp") as opt, MQbtTMiner(broker.uri, "cp") as miner:
        # nothing received yet: no id to copy
        assert miner.send_reply(Reply(num_shares=1)).request_id == 0
        assert opt.receive_reply(timeout=10).request_id == 0
        s1 = opt.send_request(Request(timestamp_min=1))
        s2 = opt.send_request(Request(timestamp_min=2))
        assert miner.receive_request(timeout=10).request_id == s1.request_id
        r1 = miner.send_reply(Reply(num_shares=1))
        assert r1.request_id == s1.request_id and r1 == Reply(num_shares=1)
        assert miner.receive_request(timeout=10).request_id == s2.request_id
        # an explicit id wins (a miner answering an older request)
        assert miner.send_reply(Reply(num_shares=11), blocking=False).request_id == s2.request_id
        assert miner.send_reply(Reply(num_shares=12, request_id=s1.request_id)).request_id == s1.request_id
        got = [opt.receive_reply(timeout=10) for _ in range(3)]
        assert [(g.num_shares, g.request_id) for g in got] == [
            (1, s1.request_id), (11, s2.request_id), (12, s1.request_id)]
        assert opt.stale_replies == 0


def test_wire_protoc_shows_request_id_and_echo_copies_it(broker):
    """What send_request publishes carries request_id (protoc --decode), and
    the echo miner's reply carries the same id."""
    echo = start_echo(broker, "wire", "--count", "3")
    sniff = Sniffer(broker, "wire", 6)
    try:
        with MQbtTOptimizer(broker.uri, "wire") as opt:
            sent = []
            for i in range(3):
                s = opt.send_request(Request(timestamp_min=i, timestamp_max=i + 5, nonce_size=2))
                sent.append(s)
                reply = opt.receive_reply(timeout=30)
                assert reply.request_id == s.request_id
                assert reply == mqbtt.echo_reply(s)
        wire = sniff.messages()
    finally:
        echo.stop()
    assert [sub for sub, _ in wire] == ["srv", "esp"] * 3
    for i, s in enumerate(sent):
        req = protoc_fields("Request", wire[2 * i][1])
        rep = protoc_fields("Reply", wire[2 * i + 1][1])
        assert req["request_id"] == str(s.request_id) and req["timestamp_max"] == str(i + 5)
        assert rep["request_id"] == str(s.request_id)
        assert rep["num_shares"] == str(mqbtt.echo_reply(s).num_shares)
    print(f"\n[wire] protoc --decode of the first request: {protoc_fields('Request', wire[0][1])}")


# -- the cases of the issue --------------------------------------------------------

@pytest.mark.parametrize("api", ["request", "receive_reply"])
def test_sigkilled_optimizer_then_new_process_stays_in_step(broker, api):
    """An optimizer SIGKILLed between send_request and receive_reply leaves its
    reply queued in its persistent session; the next optimizer process
    discards it (stale_replies == 1) and every one of its 51 exchanges matches."""
    pid = "kill9"
    MQbtTMiner(broker.uri, pid).stop()        # the miner's persistent session exists
    victim = Proc([PY, "-c", VICTIM, broker.uri, pid])
    victim_id = int(victim.wait_line(victim.out, str.isdigit, "the victim's request id"))
    victim.p.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    # the echo miner answers the dead optimizer: the broker queues the reply for it
    echo = start_echo(broker, pid)
    try:
        echo.wait_line(echo.out, lambda x: x.startswith("Sent reply: Reply(kind=<Kind.BYE: 3>, "
                                                        "num_shares=91929394"), "the stale reply")
        survivor = Proc([PY, "-c", SURVIVOR, broker.uri, pid, api])
        assert survivor.wait(120) == 0, survivor.err
    finally:
        echo.stop()
    result = json.loads(survivor.out[-1])
    got = result["got"]
    assert result["stale"] == 1
    assert len(got) == 51
    # the first reply is the reply to *its* request, not the victim's 91929394
    assert got[0][2] == got[0][3] == 10003 and got[0][1] == got[0][0]
    for sent_id, reply_id, shares, expected in got:
        assert reply_id == sent_id != victim_id and shares == expected
    assert len({g[0] for g in got}) == 51
    warnings = [x for x in survivor.err if "discarded" in x]
    assert len(warnings) == 1 and f"request_id {victim_id}:" in warnings[0], survivor.err
    assert "did not send" in warnings[0] and "num_shares=91929394" in warnings[0]
    print(f"\n[SIGKILL, {api}] stale replies discarded: {result['stale']}; "
          f"51 exchanges, {sum(g[1] == g[0] for g in got)} matched")


def test_late_reply_after_timeout_is_discarded_by_the_next_request(broker, caplog):
    """A miner answers request 1 only after the optimizer gave up on it: the
    next request() gets its own reply and the late one is counted."""
    gave_up = threading.Event()
    seen = []
    with MQbtOptimizerPair(broker, "late") as (opt, miner):
        def miner_loop():
            r1 = miner.receive_request(timeout=30)
            seen.append(r1)
            gave_up.wait(30)                   # answer only after the optimizer's timeout
            miner.send_reply(mqbtt.echo_reply(r1))
            r2 = miner.receive_request(timeout=30)
            seen.append(r2)
            miner.send_reply(mqbtt.echo_reply(r2))
        t = threading.Thread(target=miner_loop)
        t.start()
        with caplog.at_level(logging.WARNING, logger="mqbtt"):
            t0 = time.monotonic()
            with pytest.raises(Empty):
                opt.request(Request(timestamp_min=1, timestamp_max=1), timeout=0.5)
            assert time.monotonic() - t0 >= 0.45
            gave_up.set()
            reply = opt.request(Request(timestamp_min=2, timestamp_max=2), timeout=30)
        t.join(30)
        assert reply == mqbtt.echo_reply(Request(timestamp_min=2, timestamp_max=2))
        assert reply.request_id == seen[1].request_id == seen[0].request_id + 1
        assert opt.stale_replies == 1
        assert not opt.has_reply()
    warnings = [r.getMessage() for r in caplog.records if "discarded" in r.getMessage()]
    assert len(warnings) == 1
    assert "late reply" in warnings[0] and f"request_id {seen[0].request_id}:" in warnings[0]


def test_late_reply_with_receive_reply_is_detectable(broker):
    """The order-based API keeps its contract (the late reply is the next
    reply) but the caller can now see it answers another request."""
    with MQbtOptimizerPair(broker, "late2") as (opt, miner):
        s1 = opt.send_request(Request(timestamp_min=1))
        with pytest.raises(Empty):
            opt.receive_reply(timeout=0.3)
        miner.receive_request(timeout=10)
        miner.send_reply(Reply(num_shares=1))              # late
        s2 = opt.send_request(Request(timestamp_min=2))
        miner.receive_request(timeout=10)
        miner.send_reply(Reply(num_shares=2))
        first = opt.receive_reply(timeout=10)
        assert first.num_shares == 1 and first.request_id == s1.request_id != s2.request_id
        assert opt.receive_reply(timeout=10).request_id == s2.request_id
        assert opt.stale_replies == 0


def test_reply_without_id_from_old_firmware(broker, tmp_path):
    """A Reply encoded by protoc without request_id, published by mosquitto_pub,
    is the reply for request() and receive_reply(), as before."""
    old = protoc(["--encode=mqbtt.Reply"], b"kind: RESULT num_shares: 77 new_block: true")
    assert b"\x20" not in old
    with MQbtOptimizerPair(broker, "fw") as (opt, miner):
        def firmware():
            req = miner.receive_request(timeout=30)
            assert req.request_id != 0                      # it ignores the id it got
            mosquitto_pub(broker, "mqbtt/fw/esp", old, tmp_path)
        t = threading.Thread(target=firmware)
        t.start()
        reply = opt.request(Request(timestamp_min=1), timeout=30)
        t.join(30)
        assert reply == Reply(kind=Kind.RESULT, num_shares=77, new_block=True)
        assert reply.request_id == 0
        opt.send_request(Request(timestamp_min=2))
        miner.receive_request(timeout=10)
        mosquitto_pub(broker, "mqbtt/fw/esp", old, tmp_path)
        got = opt.receive_reply(timeout=10)
        assert got == Reply(kind=Kind.RESULT, num_shares=77, new_block=True) and got.request_id == 0
        assert opt.stale_replies == 0


def test_stray_replies_on_esp(broker, tmp_path, caplog):
    """A stray reply with an id nobody here sent is discarded by request() and
    by receive_reply(); an undecodable one raises once and the next call works."""
    stray = protoc(["--encode=mqbtt.Reply"], b"num_shares: 666 request_id: 12345")
    with MQbtOptimizerPair(broker, "stray") as (opt, miner):
        mosquitto_pub(broker, "mqbtt/stray/esp", stray, tmp_path)
        wait_for(opt.has_reply, what="the stray reply")
        # non-blocking: only a stale reply is there, so there is no reply
        with caplog.at_level(logging.WARNING, logger="mqbtt"):
            assert opt.receive_reply(blocking=False) is None
        assert opt.stale_replies == 1
        mosquitto_pub(broker, "mqbtt/stray/esp", stray, tmp_path)
        wait_for(opt.has_reply, what="the second stray reply")
        t0 = time.monotonic()
        with pytest.raises(Empty):                          # the timeout is honoured across discards
            opt.receive_reply(timeout=0.4)
        assert 0.35 < time.monotonic() - t0 < 15 and opt.stale_replies == 2

        def answer(extra_first):
            req = miner.receive_request(timeout=30)
            for p in extra_first:
                mosquitto_pub(broker, "mqbtt/stray/esp", p, tmp_path)
            miner.send_reply(mqbtt.echo_reply(req))
        t = threading.Thread(target=answer, args=([stray, stray],))
        t.start()
        reply = opt.request(Request(timestamp_min=3, nonce_size=1), timeout=30)
        t.join(30)
        assert reply == mqbtt.echo_reply(Request(timestamp_min=3, nonce_size=1))
        assert opt.stale_replies == 4
        # garbage on esp: request() raises it (consumed), the request stays pending
        t = threading.Thread(target=answer, args=([b"\xff\xff\xff"],))
        t.start()
        with pytest.raises(MQbtTDecodeError):
            opt.request(Request(timestamp_min=4), timeout=30)
        t.join(30)
        # its reply comes next: the following request() discards it as late
        t = threading.Thread(target=answer, args=([],))
        t.start()
        reply = opt.request(Request(timestamp_min=5), timeout=30)
        t.join(30)
        assert reply.num_shares == mqbtt.echo_reply(Request(timestamp_min=5)).num_shares
        assert opt.stale_replies == 5
    assert sum("discarded" in r.getMessage() for r in caplog.records) >= 1


def test_request_argument_errors_and_stopped_client(broker):
    with MQbtOptimizerPair(broker, "args") as (opt, miner):
        with pytest.raises(ValueError):
            opt.request(Request(), timeout=-1)
        with pytest.raises(Empty):
            opt.request(Request(), timeout=0)       # not even the broker's ack can come in 0 s
        t0 = time.monotonic()
        with pytest.raises(Empty):
            opt.request(Request(), timeout=0.3)     # the miner is silent
        assert 0.25 < time.monotonic() - t0 < 15
        # both requests went out all the same (the first once acknowledged)
        assert [miner.receive_request(timeout=10).request_id for _ in range(2)] == \
            [opt._next_id - 2, opt._next_id - 1]
        with pytest.raises(ValueError):
            opt.request(Request(nonce_size=-1), timeout=1)
        # a request() blocked without timeout returns when the client is stopped
        errors = []

        def blocked():
            try:
                opt.request(Request(timestamp_min=9))
            except Exception as e:                          # noqa: BLE001 - recorded for the assert
                errors.append(e)
        t = threading.Thread(target=blocked)
        t.start()
        assert miner.receive_request(timeout=10).timestamp_min == 9
        opt.stop()
        t.join(10)
        # stopped while waiting for the reply, or (QoS 2) still for the PUBCOMP of the request
        assert not t.is_alive() and isinstance(errors[0], (mqbtt.MQbtTConnectionError, MQbtTSendError))
        with pytest.raises(MQbtTSendError):
            opt.request(Request(), timeout=1)


def test_discard_replies(broker, tmp_path):
    with MQbtOptimizerPair(broker, "disc") as (opt, miner):
        assert opt.discard_replies() == 0
        for i in range(4):
            miner.send_reply(Reply(num_shares=i))
        mosquitto_pub(broker, "mqbtt/disc/esp", b"\xff\xff", tmp_path)    # undecodable too
        wait_for(lambda: opt._queues["esp"].qsize() == 5, what="5 queued replies")
        miner.send_share(mqbtt.Share(nonce=1))
        assert opt.discard_replies() == 5
        assert not opt.has_reply() and opt.stale_replies == 0
        assert opt.receive_share(timeout=10).nonce == 1                    # shares untouched
        miner.send_reply(Reply(num_shares=8))
        wait_for(opt.has_reply, what="a reply")
        opt.stop()
        assert opt.discard_replies() == 1                                  # also after stop()
        assert opt.discard_replies() == 0


# -- analysis: request_reply_pairs and dump ----------------------------------------

def _rec(i, t, sub, msg):
    payload = msg if isinstance(msg, bytes) else msg.to_bytes()
    return MQbtTRecord(id=i, pair_id="p", subtopic=sub,
                       timestamp=datetime.datetime(2026, 1, 1, tzinfo=UTC) + datetime.timedelta(seconds=t),
                       payload=payload)


def _pairs(records):
    return [(q.id, r.id if r else None, lat) for q, r, lat in mqbtt.request_reply_pairs(records)]


def test_request_reply_pairs_by_id_with_several_in_flight():
    recs = [_rec(1, 0, "srv", Request(request_id=10)),
            _rec(2, 1, "srv", Request(request_id=11)),
            _rec(3, 1.5, "shr", mqbtt.Share()),
            _rec(4, 2, "srv", Request(request_id=12)),
            _rec(5, 5, "esp", Reply(request_id=11)),       # out of order
            _rec(6, 7, "esp", Reply(request_id=10)),
            _rec(7, 8, "esp", Reply(request_id=99)),       # answers no recorded request: ignored
            _rec(8, 9, "srv", Request(request_id=13)),
            _rec(9, 9.25, "esp", Reply(request_id=13))]
    assert _pairs(recs) == [(2, 5, 4.0), (1, 6, 7.0), (8, 9, 0.25), (4, None, None)]


def test_request_reply_pairs_by_order_without_ids():
    # the documented behaviour when nobody sends ids (old recordings, old firmware)
    recs = [_rec(1, 0, "srv", Request()),
            _rec(2, 1, "srv", Request()),
            _rec(3, 3, "esp", Reply()),
            _rec(4, 4, "esp", Reply()),                    # no request left: ignored
            _rec(5, 5, "srv", Request()),
            _rec(6, 6, "esp", b"\xff\xff"),                # undecodable: by order
            _rec(7, 7, "srv", Request())]
    assert _pairs(recs) == [(1, None, None), (2, 3, 2.0), (5, 6, 1.0), (7, None, None)]
    # requests with ids, a firmware that answers without: by order as well
    recs = [_rec(1, 0, "srv", Request(request_id=1)),
            _rec(2, 1, "esp", Reply()),
            _rec(3, 2, "srv", Request(request_id=2)),
            _rec(4, 3, "srv", Request(request_id=3)),
            _rec(5, 4, "esp", Reply()),
            _rec(6, 5, "esp", Reply(request_id=2))]        # a late id reply still finds its request
    assert _pairs(recs) == [(1, 2, 1.0), (4, 5, 1.0), (3, 6, 3.0)]
    assert _pairs([]) == []


def test_request_reply_pairs_repeated_id_loses_no_request():
    # the same id twice (a caller's own ids, a replay into the recorded pair)
    recs = [_rec(1, 0, "srv", Request(request_id=5)),
            _rec(2, 1, "srv", Request(request_id=5)),
            _rec(3, 2, "esp", Reply(request_id=5))]
    assert _pairs(recs) == [(1, None, None), (2, 3, 1.0)]


def test_request_reply_pairs_bounded_pending():
    recs = [_rec(i, i, "srv", Request(request_id=i + 1)) for i in range(10005)]
    pairing = mqbtt._Pairing(max_pending=10000)
    gone = [g for r in recs for g in pairing.request(r, r.message.request_id)]
    assert [g.id for g in gone] == [0, 1, 2, 3, 4] and len(pairing.by_id) == 10000


def test_recorded_session_pairs_exactly(broker, tmp_path):
    """Through a real recorder: two requests in flight, answered out of order."""
    db = tmp_path / "t.db"
    rec = mqbtt.Recorder(broker.uri, str(db))
    t = threading.Thread(target=rec.run, daemon=True)
    t.start()
    wait_for(lambda: rec._conn is not None and rec._conn.subscribed, what="recorder subscribed")
    with MQbtOptimizerPair(broker, "rr") as (opt, miner):
        a = opt.send_request(Request(timestamp_min=1))
        b = opt.send_request(Request(timestamp_min=2))
        miner.receive_request(timeout=10)
        miner.receive_request(timeout=10)
        miner.send_reply(Reply(num_shares=2))                          # answers b (the last one)
        miner.send_reply(Reply(num_shares=1, request_id=a.request_id))
    wait_for(lambda: rec.total >= 4, what="4 messages recorded")
    rec.stop()
    t.join(10)
    with mqbtt.MQbtTDataBase(str(db)) as d:
        pairs = list(mqbtt.request_reply_pairs(d.records(pair_id="rr")))
    assert [(q.message.request_id, r.message.num_shares) for q, r, _ in pairs] == \
        [(b.request_id, 2), (a.request_id, 1)]
    assert all(lat >= 0 for _, _, lat in pairs)


def test_dump_optimizer_pairs_rtt_by_id(broker):
    """Two requests in flight, answered newest first: dump's RTTs follow the ids."""
    dump = Proc([PY, "mqbtt.py", "dump", "--broker", broker.uri, "--pid", "dmp", "--mode",
                 "optimizer", "--json", "--count", "2"])
    dump.wait_line(dump.err, lambda x: x.startswith("mqbtt dump: listening"), "dump listening")
    with MQbtOptimizerPair(broker, "dmp") as (opt, miner):
        a = opt.send_request(Request(timestamp_min=1))
        miner.receive_request(timeout=10)
        time.sleep(3.0)               # the data: request a is 3 s older than b
        b = opt.send_request(Request(timestamp_min=2))
        miner.receive_request(timeout=10)
        miner.send_reply(Reply(num_shares=2))                          # b, id copied
        miner.send_reply(Reply(num_shares=1, request_id=a.request_id))
    assert dump.wait() == 0, dump.err
    objs = {json.loads(x)["message"]["num_shares"]: json.loads(x) for x in dump.out}
    assert objs[2]["request_id"] == b.request_id and objs[1]["request_id"] == a.request_id
    # 1.5 s either way: a stalled dump process (a's RTT shrinks) or a slow b exchange
    assert objs[2]["rtt"] < 1.5 <= objs[1]["rtt"], objs
    assert objs[1]["message"] == {"kind": "RESULT", "num_shares": 1, "new_block": False}


# -- the documented transcript -----------------------------------------------------

def test_documented_transcript_unchanged_while_ids_travel(broker):
    """examples/optimizer.py against mqbtt echo prints the documented lines byte
    for byte, while every request and reply on the wire carries a matching id."""
    echo = start_echo(broker, "demo", "--count", "10")
    sniff = Sniffer(broker, "demo", 20)
    env = dict(os.environ, MQBTT_BROKER=broker.uri, PYTHONUNBUFFERED="1")
    opt = subprocess.run([PY, os.path.join(ROOT, "examples", "optimizer.py"), "demo"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert opt.returncode == 0, opt.stderr
    assert echo.wait(30) == 0
    assert opt.stdout == DOC_OPTIMIZER
    assert "\n".join(echo.out) + "\n" == DOC_ECHO
    wire = sniff.messages()
    reqs = [Request.from_bytes(p) for s, p in wire if s == "srv"]
    reps = [Reply.from_bytes(p) for s, p in wire if s == "esp"]
    assert len(reqs) == len(reps) == 10
    assert [r.request_id for r in reps] == [r.request_id for r in reqs]
    assert all(r.request_id for r in reqs) and len({r.request_id for r in reqs}) == 10
    demo = subprocess.run([PY, os.path.join(ROOT, "examples", "demo.py")], capture_output=True,
                          text=True, timeout=180)
    assert demo.returncode == 0 and demo.stdout == DOC_OPTIMIZER + DOC_ECHO


class MQbtOptimizerPair:
    """An optimizer and a miner of one pair on *broker*, stopped on exit."""

    def __init__(self, broker, pid):
        self.broker, self.pid = broker, pid

    def __enter__(self):
        self.opt = MQbtTOptimizer(self.broker.uri, self.pid)
        self.miner = MQbtTMiner(self.broker.uri, self.pid)
        return self.opt, self.miner

    def __exit__(self, *exc):
        self.opt.stop()
        self.miner.stop()


def test_replayed_replies_need_discard_stale_replies_false(broker, tmp_path):
    """Replies republished by replay() answer requests of the recorded
    optimizer: a default optimizer discards them, one with
    discard_stale_replies = False reads them all, in order."""
    db = tmp_path / "rec.db"
    t0 = datetime.datetime(2026, 1, 1, tzinfo=UTC)
    with mqbtt.MQbtTDataBase(str(db)) as d:
        for i in range(5):
            for sub, msg in (("srv", Request(timestamp_min=i, request_id=1000 + i)),
                             ("esp", Reply(num_shares=i, request_id=1000 + i))):
                d.insert(MQbtTRecord(id=0, pair_id="orig", subtopic=sub, payload=msg.to_bytes(),
                                     timestamp=t0 + datetime.timedelta(seconds=i)))
    with MQbtTOptimizer(broker.uri, "scratch") as strict, \
            MQbtTOptimizer(broker.uri, "scratch", client_id="reader") as reader:
        reader.discard_stale_replies = False
        assert mqbtt.replay(str(db), broker.uri, "orig", to_pid="scratch", speed=0) == 10
        got = [reader.receive_reply(timeout=10) for _ in range(5)]
        assert [(g.num_shares, g.request_id) for g in got] == [(i, 1000 + i) for i in range(5)]
        assert reader.stale_replies == 0
        # the five replies have reached strict too (its own network thread): then none is a reply
        wait_for(lambda: strict._queues["esp"].qsize() >= 5, what="the replies at strict")
        with pytest.raises(Empty):
            strict.receive_reply(timeout=1)
        assert strict.stale_replies == 5
