"""Reliability and security scenarios (issue 6) on a real Mosquitto.

Each scenario prints its figures (sent / received / lost / duplicated); run
``pytest -q -s test_reliability.py`` to see them.
"""
import gc
import os
import random
import resource
import select
import socket
import subprocess
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import mqbtt
from mqbtt import (Empty, MQbtTConnectionError, MQbtTDecodeError, MQbtTLogReceiver, MQbtTMiner,
                   MQbtTOptimizer, MQbtTSubscribeError, Reply, Request, Share)
from local_broker import LocalBroker, free_port
from testlib import raw_client, wait_for


def figures(name, sent, received, lost=None, dup=None):
    lost = sent - len(set(received)) if lost is None else lost
    dup = len(received) - len(set(received)) if dup is None else dup
    print(f"\n[{name}] sent={sent} received={len(received)} lost={lost} duplicated={dup}")
    return lost, dup


class Proxy:
    """A TCP proxy between clients and the broker that can be frozen (stop
    forwarding, like a cut cable) and cut (close every connection)."""

    def __init__(self, target_port):
        self.target = target_port
        self.srv = socket.socket()
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(16)
        self.port = self.srv.getsockname()[1]
        self.frozen = threading.Event()
        self.pairs = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            if self.frozen.is_set():
                c.close()      # the "cable" is cut: no new connection either
                continue
            try:
                u = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                c.close()
                continue
            self.pairs.append((c, u))
            threading.Thread(target=self._pump, args=(c, u), daemon=True).start()

    def _pump(self, a, b):
        socks = [a, b]
        try:
            while not self.closed:
                r, _, _ = select.select(socks, [], [], 0.05)
                if self.frozen.is_set():
                    continue   # data stays unread: nothing flows either way
                for s in r:
                    data = s.recv(65536)
                    if not data:
                        return
                    (b if s is a else a).sendall(data)
        except OSError:
            pass
        finally:
            a.close()
            b.close()

    def cut(self):
        for a, b in self.pairs:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self.pairs = []

    def close(self):
        self.closed = True
        self.cut()
        self.srv.close()


# ---------------------------------------------------------------------------
# faults
# ---------------------------------------------------------------------------

def test_broker_restart_mid_stream_loses_nothing(persistent_broker):
    """Mosquitto with persistence is restarted during a stream of shares and
    request/reply exchanges: both sides reconnect by themselves; no QoS>=1
    message is lost; QoS 2 requests/replies are handed over exactly once."""
    b = persistent_broker
    n_shares, n_req = 400, 40
    got_shares, got_req, got_rep = [], [], []
    with MQbtTOptimizer(b.uri, "brs") as opt, MQbtTMiner(b.uri, "brs") as miner:
        def miner_loop():
            for i in range(n_shares):
                miner.send_share(Share(nonce=i), blocking=False)
                if i == n_shares // 2:
                    b.restart()
            while len(got_req) < n_req:
                try:
                    r = miner.receive_request(timeout=20)
                except Empty:
                    return
                got_req.append(r.timestamp_min)
                miner.send_reply(Reply(num_shares=r.timestamp_min), timeout=30)
        t = threading.Thread(target=miner_loop)
        t.start()
        for i in range(n_req):
            if i == n_req // 2:
                b.restart()
            opt.send_request(Request(timestamp_min=i), timeout=30)
            got_rep.append(opt.receive_reply(timeout=30).num_shares)
        while len(set(got_shares)) < n_shares:   # QoS 1 duplicates do not count
            try:
                got_shares.append(opt.receive_share(timeout=10).nonce)
            except Empty:
                break
        t.join(30)
        assert miner.wait_sent(10)
        # nothing more is pending: no late duplicate either
        with pytest.raises(Empty):
            opt.receive_reply(timeout=0.5)
        while opt.has_share():
            got_shares.append(opt.receive_share().nonce)
        assert opt.connections >= 3 and miner.connections >= 3
    lost, dup = figures("broker restart, shares QoS 1", n_shares, got_shares)
    assert lost == 0
    lost2, dup2 = figures("broker restart, requests+replies QoS 2", 2 * n_req, got_req + got_rep,
                          lost=2 * n_req - len(set(got_req)) - len(set(got_rep)),
                          dup=len(got_req) - len(set(got_req)) + len(got_rep) - len(set(got_rep)))
    assert lost2 == 0 and dup2 == 0
    assert got_rep == list(range(n_req))


def test_client_cut_off_longer_than_keepalive_gets_queued_messages(broker):
    proxy = Proxy(broker.port)
    try:
        with MQbtTOptimizer(f"mqtt://127.0.0.1:{proxy.port}", "ka", keepalive=1) as opt, \
                MQbtTMiner(broker.uri, "ka") as miner:
            proxy.frozen.set()          # the optimizer's link goes silent
            wait_for(lambda: not opt.connected, 10, "the optimizer to notice (keepalive 1 s)")
            # the broker notices after 1.5 x keepalive; the persistent session then queues
            time.sleep(2.0)  # not synchronisation: this is the outage being simulated
            for i in range(20):
                miner.send_reply(Reply(num_shares=i))
            proxy.frozen.clear()
            proxy.cut()
            got = [opt.receive_reply(timeout=20).num_shares for _ in range(20)]
            assert opt.connections >= 2
        lost, dup = figures("keepalive cut, replies queued", 20, got)
        assert lost == 0 and dup == 0 and got == list(range(20))
    finally:
        proxy.close()


def test_cli_fails_fast_when_broker_unreachable(tmp_path):
    """Documented choice: every MQTT command fails fast (one line, exit 1) when the
    first connection fails; once connected, it reconnects by itself."""
    port = free_port()
    root = os.path.dirname(os.path.abspath(__file__))
    db = str(tmp_path / "failfast.db")
    with mqbtt.MQbtTDataBase(db) as d:       # replay needs something to replay
        d.insert(mqbtt.MQbtTRecord(pair_id="x", subtopic="log", timestamp=time.time(), payload=b"l"))
    for args in (["echo", "x"], ["dump", "--pid", "x"], ["record", "--db", db],
                 ["replay", "--db", db, "--pid", "x"]):
        t = time.monotonic()
        r = subprocess.run([os.sys.executable, "mqbtt.py", *args, "--broker",
                            f"mqtt://127.0.0.1:{port}"], capture_output=True, text=True,
                           timeout=30, cwd=root)
        assert r.returncode == 1, (args, r.stderr)
        assert r.stderr.count("\n") == 1 and "Connection refused" in r.stderr, (args, r.stderr)
        assert time.monotonic() - t < 10


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz_broker():
    b = LocalBroker().start()
    yield b
    b.cleanup()


@pytest.fixture(scope="module")
def fuzz_pair(fuzz_broker):
    opt = MQbtTOptimizer(fuzz_broker.uri, "fz")
    # a random payload can decode as a Reply with a request_id this optimizer never sent
    # (b"\x20\x05": ~1 esp example in 1300): receive_reply would discard it silently and
    # the next receive would wait in vain for a second message; the fuzz is about decoding
    opt.discard_stale_replies = False
    miner = MQbtTMiner(fuzz_broker.uri, "fz")
    logs = MQbtTLogReceiver(fuzz_broker.uri, "fz")
    pub = raw_client(fuzz_broker.uri)
    yield opt, miner, logs, pub
    for h in (opt, miner, logs):
        h.stop()
    pub.disconnect()
    pub.loop_stop()


FUZZ_STATS = {"payloads": 0, "decode_errors": 0, "decoded": 0}


def _check_payload(handles, sub, payload):
    opt, miner, logs, pub = handles
    receive, valid, expect = {
        "esp": (opt.receive_reply, Reply(num_shares=77).to_bytes(), Reply(num_shares=77)),
        "shr": (opt.receive_share, Share(nonce=77).to_bytes(), Share(nonce=77)),
        "srv": (miner.receive_request, Request(nonce_size=77).to_bytes(), Request(nonce_size=77)),
        "log": (logs.receive_log, b"valid 77", "valid 77"),
    }[sub]
    pub.publish(f"mqbtt/fz/{sub}", payload, 1).wait_for_publish(10)
    pub.publish(f"mqbtt/fz/{sub}", valid, 1).wait_for_publish(10)
    FUZZ_STATS["payloads"] += 1
    try:
        first = receive(timeout=10)
        FUZZ_STATS["decoded"] += 1
    except MQbtTDecodeError:
        FUZZ_STATS["decode_errors"] += 1
        first = None
    if sub == "log":
        assert isinstance(first, str)
    elif first is not None:
        # whatever decoded is a complete message that round-trips
        assert type(first).from_bytes(first.to_bytes()) == first
    assert receive(timeout=10) == expect          # the next valid message still arrives
    for h in (opt, miner, logs):
        assert h._client._thread.is_alive()


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(sub=st.sampled_from(["esp", "shr", "srv", "log"]), payload=st.binary(max_size=300))
def test_fuzz_random_payloads_hypothesis(fuzz_pair, sub, payload):
    _check_payload(fuzz_pair, sub, payload)


def test_fuzz_fixed_seed_corpus(fuzz_pair):
    rnd = random.Random(20261125)
    corpus = [b"", b"\x00" * 1000, os.urandom(0) + bytes(range(256)),
              Share(job_id="x" * 100, prev_block=b"\xff" * 32).to_bytes()[:-3],   # truncated
              Reply(num_shares=5).to_bytes() + b"\xff",
              bytes(rnd.randrange(256) for _ in range(256 * 1024))]              # oversize
    corpus += [bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 64))) for _ in range(40)]
    for i, payload in enumerate(corpus):
        _check_payload(fuzz_pair, ["esp", "shr", "srv", "log"][i % 4], payload)
    print(f"\n[fuzz] payloads={FUZZ_STATS['payloads']} decoded={FUZZ_STATS['decoded']} "
          f"decode_errors={FUZZ_STATS['decode_errors']} receiver threads alive: yes")


def _rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def test_undrained_flood_memory_and_optional_bound():
    n = 20000
    payload = Share(nonce=1, prev_block=b"\x01" * 32, merkle_root=b"\x02" * 32, job_id="abc").to_bytes()
    # no broker-side limit: a QoS 0 flood that outruns a receiver on a loaded machine
    # must not be thinned by Mosquitto's max_queued_messages (1000 by default)
    with LocalBroker(extra="max_queued_messages 0") as broker, \
            MQbtTOptimizer(broker.uri, "fl") as unbounded, \
            MQbtTOptimizer(broker.uri, "fl2", max_queue=1000) as bounded:
        gc.collect()
        before = _rss_kib()
        pub = raw_client(broker.uri)
        try:
            for i in range(n):
                pub.publish("mqbtt/fl/shr", payload, 0)
                pub.publish("mqbtt/fl2/shr", payload, 0)
            wait_for(lambda: unbounded._queues["shr"].qsize() == n, 60, "the flood to arrive")
            wait_for(lambda: bounded._queues["shr"].qsize() + bounded.dropped["shr"] == n, 60,
                     "the bounded flood to arrive")
        finally:
            pub.disconnect()
            pub.loop_stop()
        grown = _rss_kib() - before
        print(f"\n[undrained flood] {n} shares of {len(payload)} B: unbounded queue holds "
              f"{unbounded._queues['shr'].qsize()}, RSS +{grown} KiB "
              f"(~{grown * 1024 // n} B/message); bounded (max_queue=1000) holds "
              f"{bounded._queues['shr'].qsize()}, dropped {bounded.dropped['shr']}")
        assert bounded._queues["shr"].qsize() == 1000 and bounded.dropped["shr"] == n - 1000
        # the bounded receiver still works after dropping
        got = [bounded.receive_share(timeout=5) for _ in range(1000)]
        assert all(s.nonce == 1 for s in got)


# ---------------------------------------------------------------------------
# access control
# ---------------------------------------------------------------------------

@pytest.fixture
def acl_broker():
    b = LocalBroker(users={"pairA": "pw-A-secret", "pairB": "pw-B-secret"},
                    acl="pattern readwrite mqbtt/%u/#\n").start()
    yield b
    b.cleanup()


def test_per_pair_acl_isolates_pairs(acl_broker, capfd, caplog):
    """Each pair's credentials reach only mqbtt/<pid>/#. Mosquitto 2.0 answers a
    subscription it will not serve with 'Granted QoS' (it filters at delivery) and
    drops unauthorised publishes after acknowledging them: nothing crosses pairs."""
    p = acl_broker.port
    A = f"mqtt://pairA:pw-A-secret@127.0.0.1:{p}"
    B = f"mqtt://pairB:pw-B-secret@127.0.0.1:{p}"
    with MQbtTOptimizer(A, "pairA") as optA, MQbtTMiner(A, "pairA") as minerA, \
            MQbtTOptimizer(B, "pairB") as optB, MQbtTMiner(B, "pairB") as minerB:
        spy = MQbtTOptimizer(A, "pairB", client_id="spy")   # A's credentials on B's pair
        try:
            minerB.send_reply(Reply(num_shares=1))
            assert optB.receive_reply(timeout=10) == Reply(num_shares=1)
            with pytest.raises(Empty):
                spy.receive_reply(timeout=1)                    # A cannot read B
            spy.send_request(Request(timestamp_min=666))        # A cannot write B
            optB.send_request(Request(timestamp_min=1))
            assert minerB.receive_request(timeout=10) == Request(timestamp_min=1)
            with pytest.raises(Empty):
                minerB.receive_request(timeout=1)
            optA.send_request(Request(timestamp_min=2))
            assert minerA.receive_request(timeout=10) == Request(timestamp_min=2)
        finally:
            spy.stop()
    out, err = capfd.readouterr()
    for secret in ("pw-A-secret", "pw-B-secret"):
        assert secret not in out + err + caplog.text
    print("\n[acl] pair A read B: 0 messages, A wrote B: 0 delivered, own pair traffic: delivered")


def _fake_broker_refusing_subscriptions():
    """A minimal MQTT 3.1.1 server that accepts CONNECT and answers every
    SUBSCRIBE with SUBACK failure codes (0x80), as brokers with subscribe-time
    ACLs do."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)

    def read_packet(c):
        head = c.recv(1)
        if not head:
            return None, b""
        mult, length = 1, 0
        while True:
            d = c.recv(1)[0]
            length += (d & 0x7F) * mult
            mult *= 128
            if not d & 0x80:
                break
        body = b""
        while len(body) < length:
            chunk = c.recv(length - len(body))
            if not chunk:
                break
            body += chunk
        return head[0], body

    def serve():
        try:
            c, _ = srv.accept()
        except OSError:
            return
        with c:
            while True:
                kind, body = read_packet(c)
                if kind is None:
                    return
                if kind >> 4 == 1:                      # CONNECT
                    c.sendall(b"\x20\x02\x00\x00")
                elif kind >> 4 == 8:                    # SUBSCRIBE
                    pid = body[:2]
                    n, i = 0, 2
                    while i < len(body):
                        ln = int.from_bytes(body[i:i + 2], "big")
                        i += 2 + ln + 1
                        n += 1
                    c.sendall(bytes([0x90, 2 + n]) + pid + b"\x80" * n)
                elif kind >> 4 == 14:                   # DISCONNECT
                    return
    threading.Thread(target=serve, daemon=True).start()
    return srv


def test_refused_subscription_raises():
    srv = _fake_broker_refusing_subscriptions()
    try:
        with pytest.raises(MQbtTSubscribeError) as e:
            MQbtTOptimizer(f"mqtt://127.0.0.1:{srv.getsockname()[1]}", "den", connect_timeout=5)
        assert "mqbtt/den/esp" in str(e.value) and "refused" in str(e.value)
    finally:
        srv.close()


def test_passwords_never_in_output_logs_reprs_or_errors(tmp_path, capfd, caplog):
    import logging
    caplog.set_level(logging.DEBUG)
    secret = "Sup3r-S3cret-Pw"
    b = LocalBroker(users={"u": secret}).start()
    texts = []
    try:
        uri = f"mqtt://u:{secret}@127.0.0.1:{b.port}"
        with MQbtTOptimizer(uri, "pw") as opt:
            texts += [repr(opt), str(opt.broker), repr(opt.broker)]
        for bad in (f"mqtt://u:{secret}x@127.0.0.1:{b.port}", f"mqtt://u:{secret}@127.0.0.1:{free_port()}",
                    f"bogus://u:{secret}@h", f"mqtt://u:{secret}@h:99999"):
            with pytest.raises((MQbtTConnectionError, ValueError)) as e:
                MQbtTOptimizer(bad, "pw", connect_timeout=3)
            texts.append(str(e.value))
        r = subprocess.run([os.sys.executable, "mqbtt.py", "echo", "--broker",
                            f"mqtt://u:{secret}x@127.0.0.1:{b.port}", "pw"], capture_output=True,
                           text=True, timeout=30, cwd=os.path.dirname(os.path.abspath(__file__)))
        texts += [r.stdout, r.stderr]
        assert r.returncode == 1
    finally:
        b.cleanup()
    out, err = capfd.readouterr()
    texts += [out, err, caplog.text]
    leaks = [t for t in texts if secret in t]
    assert not leaks
    print(f"\n[secrets] {len(texts)} captured texts searched, 0 contain the password")


def test_cli_reports_reconnection_on_stderr_and_keeps_working(broker):
    import signal
    p = subprocess.Popen([os.sys.executable, "mqbtt.py", "echo", "--broker", broker.uri, "rcl"],
                         cwd=os.path.dirname(os.path.abspath(__file__)), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        assert "answering" in p.stderr.readline()
        broker.restart()
        lines = [p.stderr.readline() for _ in range(2)]
        assert "disconnected" in lines[0] and "reconnected" in lines[1], lines
        with MQbtTOptimizer(broker.uri, "rcl") as opt:
            opt.send_request(Request(timestamp_min=1, timestamp_max=2))
            assert opt.receive_reply(timeout=10).num_shares == 1020000
    finally:
        p.send_signal(signal.SIGINT)
        assert p.wait(10) == 0
    print("\n[cli reconnect] stderr: " + " | ".join(l.strip() for l in lines))


# ---------------------------------------------------------------------------
# the recorder under faults
# ---------------------------------------------------------------------------

from test_record import count_rows, publisher, rows, start_recorder  # noqa: E402


def _flood(broker, n, pid, payload_of, pace=0.002):
    """Publish n QoS 1 shares/logs in a thread (steady ~2000/s); return (thread, infos)."""
    pub = publisher(broker)
    infos = []

    def run():
        for i in range(n):
            sub = ("shr", "log")[i % 2]
            infos.append(pub.publish(f"mqbtt/{pid}/{sub}", payload_of(i), 1))
            if i % 4 == 3:
                time.sleep(pace)
    t = threading.Thread(target=run)
    t.start()
    return t, infos, pub


def _finish_flood(t, infos, pub, db, n):
    """Wait until the flood is published, acknowledged and entirely recorded."""
    t.join(60)
    wait_for(lambda: all(i._published for i in infos), 60, "the publisher's flood acknowledged")
    wait_for(lambda: len({m for _, _, m, _ in rows(db)}) >= n, 60, "every message recorded")
    pub.disconnect()
    pub.loop_stop()


def test_recorder_survives_broker_restart_mid_stream(tmp_path):
    b = LocalBroker(persistence=True, extra="max_queued_messages 0").start()
    db = str(tmp_path / "restart.db")
    n = 3000
    rec = start_recorder(b, db)
    try:
        payload = lambda i: b"restart-%06d" % i  # noqa: E731
        t, infos, pub = _flood(b, n, "brr", payload)
        wait_for(lambda: count_rows(db) >= n // 3, 30, "a third recorded")
        b.restart()
        _finish_flood(t, infos, pub, db, n)
        rec.wait_err(r"reconnected")
        rec.p.send_signal(__import__("signal").SIGINT)
        assert rec.wait() == 0
    finally:
        rec.kill()
        b.cleanup()
    stored = [m for _, _, m, _ in rows(db)]
    lost, dup = figures("recorder across a broker restart (QoS 1)", n, stored)
    assert lost == 0 and set(stored) == {payload(i) for i in range(n)}


def test_recorder_sigkilled_at_random_moments(tmp_path):
    import signal
    b = LocalBroker(extra="max_queued_messages 0\nmax_queued_bytes 0").start()
    db = str(tmp_path / "kills.db")
    n = 6000
    rnd = random.Random(6)
    kills = []
    rec = start_recorder(b, db)
    try:
        payload = lambda i: b"kill-%06d" % i  # noqa: E731
        t, infos, pub = _flood(b, n, "kil", payload)
        for k in range(3):
            target = rnd.randrange(300, 1500) * (k + 1)
            wait_for(lambda: count_rows(db) >= target, 60, f"{target} recorded")
            time.sleep(rnd.random() * 0.05)  # a random moment, not synchronisation
            rec.p.send_signal(signal.SIGKILL)
            assert rec.wait() == -9
            kills.append(count_rows(db))
            rec = start_recorder(b, db)                 # the same command line
        _finish_flood(t, infos, pub, db, n)
        rec.p.send_signal(signal.SIGTERM)
        assert rec.wait() == 0
    finally:
        rec.kill()
        b.cleanup()
    stored = [m for _, _, m, _ in rows(db)]
    lost, dup = figures(f"recorder SIGKILLed 3 times (rows at each kill: {kills})", n, stored)
    assert lost == 0 and set(stored) == {payload(i) for i in range(n)}
    assert dup <= 3 * 20        # documented: at most the in-flight window per kill


def test_recorder_stores_fuzz_payloads_byte_exact(broker, tmp_path):
    db = str(tmp_path / "fuzz.db")
    rnd = random.Random(99)
    payloads = [b"", b"\x00", bytes(range(256)), b"\xff" * 70000]
    payloads += [bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 200))) for _ in range(60)]
    rec = start_recorder(broker, db)
    try:
        pub = publisher(broker)
        sent = []
        for i, p in enumerate(payloads):
            sub = ("esp", "shr", "srv", "log")[i % 4]
            sent.append((sub, p))
            pub.publish(f"mqbtt/fzr/{sub}", p, 1).wait_for_publish(10)
        wait_for(lambda: count_rows(db) >= len(payloads), 30, "every fuzz payload recorded")
        rec.p.send_signal(__import__("signal").SIGINT)
        assert rec.wait() == 0
        pub.disconnect()
        pub.loop_stop()
    finally:
        rec.kill()
    stored = [(s, m) for _, s, m, _ in rows(db)]
    assert sorted(stored) == sorted(sent)
    with mqbtt.MQbtTDataBase(db) as d:
        decoded = sum(r.message is not None for r in d.records())
    print(f"\n[recorder fuzz] {len(sent)} payloads sent, {len(stored)} stored byte-exact, "
          f"{decoded} decode, {len(stored) - decoded} kept as raw bytes")


def test_upgrade_errors_never_show_url_credentials():
    url = f"http://u:SECRETTOKEN@127.0.0.1:{free_port()}"
    with pytest.raises(mqbtt.MQbtTError) as e:
        mqbtt._fetch(url + "/mqbtt.pyz.sha256", 5)
    assert "SECRETTOKEN" not in str(e.value) and "u:***@" in str(e.value)
    assert "\n" not in str(e.value)


def test_recorder_stops_when_credentials_are_revoked(tmp_path):
    b = LocalBroker(users={"rec": "rec-pw-1"}).start()
    db = str(tmp_path / "revoked.db")
    try:
        rec = start_recorder(type("B", (), {"uri": f"mqtt://rec:rec-pw-1@127.0.0.1:{b.port}"})(), db)
        b.set_users({"rec": "another"})
        b.restart()
        assert rec.wait(30) == 1
        assert any("refused the connection" in line and "Not authorized" in line for line in rec.err)
        assert not any("rec-pw-1" in line for line in rec.err)
    finally:
        rec.kill()
        b.cleanup()
    print("\n[recorder, credentials revoked] exit 1: " + rec.err[-1])
