"""mqbtt benchmarks against the raw building blocks, in the same run.

    python3 bench/run.py [--quick] [--only NAME[,NAME...]] [--repeat N] [--no-stock]

Starts its own Mosquitto (loopback, ``set_tcp_nodelay true``), runs every
comparison ``--repeat`` times, prints a table of medians with min-max and the
ratio to the raw building block, and exits 1 if a target is missed.
Benchmarks: codec, rtt, shares, record, fleet, query, startup.  rtt, shares and
record also run on a second, *stock* Mosquitto (only ``listener``,
``allow_anonymous`` and ``max_queued_messages 0``: no ``set_tcp_nodelay``), in
the same run.
"""
import argparse
import os
import platform
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))

import mqbtt  # noqa: E402
from local_broker import LocalBroker  # noqa: E402

PY = sys.executable
RESULTS = []   # (name, unit, mqbtt runs, raw runs, target description, ok, higher_is_better)


def med(xs):
    return statistics.median(xs)


def span(xs):
    return f"{min(xs):.4g}–{max(xs):.4g}"


def report(name, unit, ours, raw, target, higher_is_better, limit, raw_name="raw", pooled=None):
    """Record one comparison; *limit* is the allowed ratio ours/raw.  *pooled*
    ``(ours, raw)`` replaces the medians of the runs (e.g. a percentile of all
    samples pooled); the min–max still show the spread of the runs."""
    if pooled is not None:
        ours, raw = [pooled[0]] + list(ours), [pooled[1]] + list(raw)
        ours_c, raw_c = pooled
    else:
        ours_c, raw_c = med(ours), med(raw)
    ratio = ours_c / raw_c if raw else float("nan")
    ok = ratio >= limit if higher_is_better else ratio <= limit
    RESULTS.append((name, unit, ours, raw, ratio, target, ok, raw_name, ours_c, raw_c))
    print(f"  {name}: mqbtt {ours_c:.4g} {unit} [{span(ours)}], {raw_name} {raw_c:.4g} {unit} "
          f"[{span(raw)}], ratio {ratio:.3f} (target {target}) {'OK' if ok else 'MISSED'}",
          flush=True)


def info(name, unit, values, note=""):
    RESULTS.append((name, unit, values, None, None, note, True, "", med(values), None))
    print(f"  {name}: {med(values):.4g} {unit} [{span(values)}] {note}", flush=True)


def broker_conf():
    return "max_queued_messages 0\nmax_inflight_messages 20\n"


#: the stock broker: Mosquitto as it ships (no set_tcp_nodelay), plus the queue
#: limit the share and record comparisons need (100,000 queued messages)
STOCK_CONF = "max_queued_messages 0\n"
#: the benchmarks that also run on the stock broker
ON_STOCK = {"rtt", "shares", "record"}


# ---------------------------------------------------------------------------
# codec: Share.to_bytes / from_bytes vs raw protobuf
# ---------------------------------------------------------------------------

def bench_codec(repeat, quick):
    from mqbtt import Share
    pb = mqbtt._pb()["Share"]
    fields = dict(version=0x20024000, prev_block=bytes(range(32)), merkle_root=bytes(range(32, 64)),
                  time=1747905346, pool_time=1747905300, bits=0x17028C61, nonce=0xC5E6FC28,
                  pool_diff=32768.0, job_id="1c5b2a", extranonce2="0100000000000000",
                  diff=1636.25, zeroes=42)
    share = Share(**fields)
    data = share.to_bytes()
    n = 20000 if quick else 100000

    def timeit(fn):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t) / n * 1e6

    enc_ours, enc_raw, dec_ours, dec_raw = [], [], [], []
    for _ in range(repeat):
        enc_ours.append(timeit(share.to_bytes))
        enc_raw.append(timeit(lambda: pb(**fields).SerializeToString()))
        dec_ours.append(timeit(lambda: Share.from_bytes(data)))
        dec_raw.append(timeit(lambda: pb.FromString(data)))
    from google.protobuf.internal import api_implementation
    print(f"  (protobuf backend: {api_implementation.Type()})")
    report("Share.to_bytes", "µs", enc_ours, enc_raw, "≤ 2×", False, 2.0, "raw protobuf")
    report("Share.from_bytes", "µs", dec_ours, dec_raw, "≤ 2×", False, 2.0, "raw protobuf")


# ---------------------------------------------------------------------------
# request -> reply round trip vs raw paho at the same QoS
# ---------------------------------------------------------------------------

def raw_subscriber(uri, client_id, topic, qos, nodelay=True):
    """A plain paho-mqtt client subscribed to *topic* (returned once the
    SUBACK came), feeding the payloads to a :class:`queue.Queue`: the raw
    building block the pair classes are compared with."""
    import queue
    import socket
    import paho.mqtt.client as mqtt
    b = mqbtt.BrokerURI.parse(uri)
    q = queue.Queue()
    ready = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    if nodelay:
        c.on_socket_open = lambda c, u, s: s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos)
    c.on_subscribe = lambda *a: ready.set()
    c.on_message = lambda c, u, msg: q.put(msg.payload)
    c.connect(b.host, b.port)
    c.loop_start()
    ready.wait(10)
    return c, q


MINER_SRC = r"""
import sys
sys.path.insert(0, sys.argv[4])
sys.path.insert(0, sys.argv[4] + "/bench")
kind, uri, pid = sys.argv[1:4]
import mqbtt
if kind == "mqbtt":
    m = mqbtt.MQbtTMiner(uri, pid)
    print("ready", flush=True)
    while True:
        r = m.receive_request()
        if r.reset:
            break
        m.send_reply(mqbtt.Reply(num_shares=r.timestamp_min))
    m.stop()
else:
    from run import raw_subscriber
    c, q = raw_subscriber(uri, "raw-miner-" + pid, f"mqbtt/{pid}/srv", 2, sys.argv[5] == "1")
    print("ready", flush=True)
    Req, Rep = mqbtt._pb()["Request"], mqbtt._pb()["Reply"]
    while True:
        r = Req.FromString(q.get())
        if r.reset:
            break
        c.publish(f"mqbtt/{pid}/esp", Rep(kind=1, num_shares=r.timestamp_min).SerializeToString(), 2).wait_for_publish()
    c.disconnect(); c.loop_stop()
"""


def _rtt_ours(uri, pid, n):
    miner = subprocess.Popen([PY, "-c", MINER_SRC, "mqbtt", uri, pid, ROOT, "1"], stdout=subprocess.PIPE,
                             text=True)
    assert miner.stdout.readline().strip() == "ready"
    lat = []
    with mqbtt.MQbtTOptimizer(uri, pid) as opt:
        for i in range(n + 20):
            t = time.perf_counter()
            opt.send_request(mqbtt.Request(timestamp_min=i))
            rep = opt.receive_reply(timeout=10)
            dt = time.perf_counter() - t
            assert rep.num_shares == i
            if i >= 20:
                lat.append(dt * 1000)
        opt.send_request(mqbtt.Request(reset=True))
    miner.wait(10)
    return lat


def _rtt_raw(uri, pid, n, nodelay=True):
    miner = subprocess.Popen([PY, "-c", MINER_SRC, "raw", uri, pid, ROOT, "1" if nodelay else "0"],
                             stdout=subprocess.PIPE, text=True)
    assert miner.stdout.readline().strip() == "ready"
    c, q = raw_subscriber(uri, "raw-opt-" + pid, f"mqbtt/{pid}/esp", 2, nodelay)
    Req, Rep = mqbtt._pb()["Request"], mqbtt._pb()["Reply"]
    lat = []
    for i in range(n + 20):
        t = time.perf_counter()
        c.publish(f"mqbtt/{pid}/srv", Req(timestamp_min=i).SerializeToString(), 2).wait_for_publish()
        rep = Rep.FromString(q.get(timeout=10))
        dt = time.perf_counter() - t
        assert rep.num_shares == i
        if i >= 20:
            lat.append(dt * 1000)
    c.publish(f"mqbtt/{pid}/srv", Req(reset=True).SerializeToString(), 2).wait_for_publish()
    c.disconnect()
    c.loop_stop()
    miner.wait(10)
    return lat


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def bench_rtt(repeat, quick, broker, stock=None):
    n = 300 if quick else 2000
    p50o, p99o, p50r, p99r, all_o, all_r = [], [], [], [], [], []
    p50s, p99s, all_s = [], [], []
    for k in range(max(repeat, 6)):    # tail latencies need many samples: runs interleaved, pooled
        runs = [("ours", lambda: _rtt_ours(broker.uri, f"rtt{k}", n)),
                ("raw", lambda: _rtt_raw(broker.uri, f"rawrtt{k}", n))]
        if stock is not None:
            runs.append(("stock", lambda: _rtt_ours(stock.uri, f"stockrtt{k}", n)))
        # rotate which side runs first, so order effects cancel out
        got = dict((name, fn()) for name, fn in runs[k % len(runs):] + runs[:k % len(runs)])
        ours, raw = got["ours"], got["raw"]
        all_o += ours
        all_r += raw
        p50o.append(pct(ours, 50)); p99o.append(pct(ours, 99))
        p50r.append(pct(raw, 50)); p99r.append(pct(raw, 99))
        if stock is not None:
            all_s += got["stock"]
            p50s.append(pct(got["stock"], 50)); p99s.append(pct(got["stock"], 99))
    report(f"request→reply RTT p50 (QoS 2, {len(all_o)} exchanges)", "ms", p50o, p50r, "≤ 1.15×",
           False, 1.15, "raw paho + TCP_NODELAY", pooled=(pct(all_o, 50), pct(all_r, 50)))
    report(f"request→reply RTT p99 (QoS 2, {len(all_o)} exchanges)", "ms", p99o, p99r, "≤ 1.15×",
           False, 1.15, "raw paho + TCP_NODELAY", pooled=(pct(all_o, 99), pct(all_r, 99)))
    nagle = _rtt_raw(broker.uri, "nagle", 50, nodelay=False)
    info("raw paho RTT p50 without TCP_NODELAY", "ms", [pct(nagle, 50)],
         "(Nagle + delayed ACK: what mqbtt's sockets avoid)")
    if stock is None:
        return
    raw_name = "raw paho + TCP_NODELAY, tuned broker"
    report(f"STOCK broker: request→reply RTT p50 ({len(all_s)} exchanges)", "ms", p50s, p50r,
           "≤ 1.15×", False, 1.15, raw_name, pooled=(pct(all_s, 50), pct(all_r, 50)))
    report(f"STOCK broker: request→reply RTT p99 ({len(all_s)} exchanges)", "ms", p99s, p99r,
           "≤ 1.15×", False, 1.15, raw_name, pooled=(pct(all_s, 99), pct(all_r, 99)))
    stall = _rtt_raw(stock.uri, "stockraw", 50 if quick else 100)
    info("STOCK broker: raw paho + TCP_NODELAY RTT p50", "ms", [pct(stall, 50)],
         f"(p99 {pct(stall, 99):.4g} ms: the broker's Nagle meets paho's delayed ACKs)")


# ---------------------------------------------------------------------------
# share flood: receive_share vs raw paho -> queue.Queue vs mosquitto_sub
# ---------------------------------------------------------------------------

def _preload(uri, topic, n, payload):
    """Publish n QoS 1 messages (the receiver's persistent session queues them)."""
    _preload_many(uri, topic, [payload] * n)


def _share_payload():
    return mqbtt.Share(version=0x20024000, prev_block=bytes(32), merkle_root=bytes(range(32)),
                       nonce=1, job_id="1c5b2a", extranonce2="01000000", diff=1636.2,
                       pool_diff=4096.0, zeroes=40).to_bytes()


def _flood_ours(uri, pid, n, payload):
    mqbtt.MQbtTOptimizer(uri, pid).stop()            # create the persistent session
    _preload(uri, f"mqbtt/{pid}/shr", n, payload)
    t = time.perf_counter()
    with mqbtt.MQbtTOptimizer(uri, pid) as opt:
        for _ in range(n):
            opt.receive_share(timeout=30)
        dt = time.perf_counter() - t
    return n / dt


def _flood_raw(uri, pid, n, payload):
    import queue
    import paho.mqtt.client as mqtt
    b = mqbtt.BrokerURI.parse(uri)

    def client():
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="raw-" + pid, clean_session=False)
        c.on_connect = lambda c, u, f, rc, p: c.subscribe(f"mqbtt/{pid}/shr", 1)
        return c
    ready = threading.Event()
    c = client()
    c.on_subscribe = lambda *a: ready.set()
    c.connect(b.host, b.port)
    c.loop_start()
    ready.wait(10)
    c.disconnect()
    c.loop_stop()
    _preload(uri, f"mqbtt/{pid}/shr", n, payload)
    q = queue.Queue()
    t = time.perf_counter()
    c = client()
    c.on_message = lambda c, u, msg: q.put(msg.payload)
    c.connect(b.host, b.port)
    c.loop_start()
    for _ in range(n):
        q.get(timeout=30)
    dt = time.perf_counter() - t
    c.disconnect()
    c.loop_stop()
    return n / dt


def _flood_mosquitto_sub(uri, pid, n, payload):
    b = mqbtt.BrokerURI.parse(uri)
    base = ["mosquitto_sub", "-h", b.host, "-p", str(b.port), "-q", "1", "-c", "-i", "sub-" + pid,
            "-t", f"mqbtt/{pid}/shr"]
    subprocess.run(base + ["-E"], check=True)
    _preload(uri, f"mqbtt/{pid}/shr", n, payload)
    t = time.perf_counter()
    subprocess.run(base + ["-C", str(n), "-N"], check=True, stdout=subprocess.DEVNULL)
    return n / (time.perf_counter() - t)


def bench_shares(repeat, quick, broker, stock=None):
    n = 20000 if quick else 100000
    payload = _share_payload()
    ours, raw, msub = [], [], []
    for k in range(repeat):
        ours.append(_flood_ours(broker.uri, f"fo{k}", n, payload))
        raw.append(_flood_raw(broker.uri, f"fr{k}", n, payload))
        msub.append(_flood_mosquitto_sub(broker.uri, f"fm{k}", n, payload))
    report(f"receive_share, {n} queued shares", "msg/s", ours, raw, "≥ 0.85×", True, 0.85,
           "raw paho→Queue")
    ratio = med(ours) / med(msub)
    info("mosquitto_sub -C N (C client, no decoding)", "msg/s", msub,
         f"(mqbtt/mosquitto_sub = {ratio:.2f})")
    if stock is not None:
        ours, raw = [], []
        for k in range(repeat):
            ours.append(_flood_ours(stock.uri, f"sfo{k}", n, payload))
            raw.append(_flood_raw(stock.uri, f"sfr{k}", n, payload))
        report(f"STOCK broker: receive_share, {n} queued shares", "msg/s", ours, raw, "≥ 0.85×",
               True, 0.85, "raw paho→Queue, stock broker")


# ---------------------------------------------------------------------------
# record: `mqbtt record` (ack after commit) vs a raw paho subscriber that counts
# ---------------------------------------------------------------------------

def _drain_raw_count(uri, cid, topic, n):
    """Create a persistent session, let the caller preload, then count n messages."""
    import paho.mqtt.client as mqtt
    state = {"n": 0, "first": None, "last": None}
    done = threading.Event()

    def on_message(c, u, msg):
        now = time.perf_counter()
        if state["first"] is None:
            state["first"] = now
        state["n"] += 1
        if state["n"] == n:
            state["last"] = now
            done.set()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, clean_session=False)
    c.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, 1)
    c.on_message = on_message
    return c, state, done


def _record_raw(uri, n, payload):
    b = mqbtt.BrokerURI.parse(uri)
    c, state, done = _drain_raw_count(uri, "raw-rec", "mqbtt/+/+", n)
    ready = threading.Event()
    c.on_subscribe = lambda *a: ready.set()
    c.connect(b.host, b.port)
    c.loop_start()
    ready.wait(10)
    c.disconnect()
    c.loop_stop()
    _preload(uri, "mqbtt/rec/shr", n, payload)
    c, state, done = _drain_raw_count(uri, "raw-rec", "mqbtt/+/+", n)
    t = time.perf_counter()
    c.connect(b.host, b.port)
    c.loop_start()
    done.wait(120)
    c.disconnect()
    c.loop_stop()
    return n / (time.perf_counter() - t)


def bench_record(repeat, quick, broker, stock=None):
    n = 20000 if quick else 50000
    _bench_record_on(broker, repeat, n)
    if stock is not None:
        _bench_record_on(stock, repeat, n, "STOCK broker: ", ", stock broker")


def _bench_record_on(broker, repeat, n, prefix="", suffix=""):
    import tempfile
    ours, raw, lost, dups = [], [], 0, 0
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(repeat):
            # distinct payloads, so that loss and duplicates can be counted
            payloads = [mqbtt.Share(nonce=i, job_id=f"{k}").to_bytes() for i in range(n)]
            rate, lo, du = _record_ours_distinct(broker.uri, payloads, tmp)
            ours.append(rate)
            lost += lo
            dups += du
            raw.append(_record_raw(broker.uri, n, payloads[0]))
    report(f"{prefix}mqbtt record, {n} queued QoS 1 messages", "msg/s", ours, raw, "≥ 0.8×", True,
           0.8, "raw paho counting" + suffix)
    info(f"{prefix}mqbtt record: lost / duplicated", "msgs", [lost], f"(lost {lost}, duplicated {dups})")
    if lost:
        RESULTS.append((f"{prefix}mqbtt record zero loss", "msgs", [lost], [0], float("inf"), "0 lost", False, "",
                        lost, 0))


def _record_ours_distinct(uri, payloads, tmp):
    import sqlite3
    n = len(payloads)
    db = os.path.join(tmp, f"rec-{os.urandom(4).hex()}.db")
    cmd = [PY, os.path.join(ROOT, "mqbtt.py"), "record", "--broker", uri, "--db", db,
           "--client-id", "bench-rec-" + os.path.basename(db)]
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    p.stderr.readline()
    p.send_signal(2)
    p.wait(30)
    _preload_many(uri, "mqbtt/rec/shr", payloads)
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    con = sqlite3.connect(db, timeout=30)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if con.execute("SELECT count(*) FROM messages").fetchone()[0] >= n:
                break
        except sqlite3.OperationalError:
            pass
        time.sleep(0.02)
    p.send_signal(2)
    p.wait(30)
    stored, distinct = con.execute("SELECT count(*), count(DISTINCT message) FROM messages").fetchone()
    first, last = con.execute("SELECT min(timestamp), max(timestamp) FROM messages").fetchone()
    con.close()
    return n / max(last - first, 1e-9), n - distinct, stored - distinct


def _preload_many(uri, topic, payloads):
    """Publish *payloads* at QoS 1, in batches (paho's message ids are 16-bit)."""
    import paho.mqtt.client as mqtt
    b = mqbtt.BrokerURI.parse(uri)
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="")
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.connect(b.host, b.port)
    c.loop_start()
    for start in range(0, len(payloads), 20000):
        infos = [c.publish(topic, p, 1) for p in payloads[start:start + 20000]]
        for i in infos:
            i.wait_for_publish(120)
    c.disconnect()
    c.loop_stop()


def bench_fleet(repeat, quick, broker):
    sys.path.insert(0, HERE)
    import record_fleet
    rates, losts = [], []
    for _ in range(1 if quick else repeat):
        rate, lost = record_fleet.run(pairs=100, per_pair=100 if quick else 200, publishers=10)
        rates.append(rate)
        losts.append(lost)
    info("fleet: 100 pairs publishing at once → mqbtt record", "msg/s", rates,
         f"(lost: {sum(losts)})")
    if sum(losts):
        RESULTS.append(("fleet zero loss", "msgs", losts, [0], float("inf"), "0 lost", False, "",
                        sum(losts), 0))


# ---------------------------------------------------------------------------
# query: MQbtTDataBase.records() vs the raw indexed sqlite3 query, 1,000,000 rows
# ---------------------------------------------------------------------------

def _make_db(path, rows):
    import sqlite3
    with mqbtt.MQbtTDataBase(path) as db:
        db._check_writable()                   # the file, schema and indices, as mqbtt makes them
    con = sqlite3.connect(path)
    share = mqbtt.Share(nonce=1, diff=1000.5, job_id="ab").to_bytes()
    t0 = 1_750_000_000.0
    subs = ("srv", "esp", "shr", "log")
    payload = {"srv": mqbtt.Request(timestamp_min=1).to_bytes(),
               "esp": mqbtt.Reply(num_shares=3).to_bytes(), "shr": share, "log": b"I (1) t: x"}
    batch = []
    for i in range(rows):
        sub = subs[i % 4]
        batch.append((t0 + i * 0.01, f"p{(i // 4) % 10}", sub, payload[sub]))
        if len(batch) == 100000:
            con.executemany("INSERT INTO messages (timestamp, pair_id, subtopic, message) "
                            "VALUES (?, ?, ?, ?)", batch)
            batch = []
    if batch:
        con.executemany("INSERT INTO messages (timestamp, pair_id, subtopic, message) "
                        "VALUES (?, ?, ?, ?)", batch)
    con.commit()
    con.execute("ANALYZE")
    con.close()
    return t0


def bench_query(repeat, quick):
    import sqlite3
    import tempfile
    import tracemalloc
    rows = 200_000 if quick else 1_000_000
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "q.db")
        t0 = _make_db(path, rows)
        lo, hi = t0 + rows * 0.01 * 0.25, t0 + rows * 0.01 * 0.75
        sql = ("SELECT id, timestamp, pair_id, subtopic, message FROM messages WHERE pair_id = ? "
               "AND subtopic = ? AND timestamp >= ? AND timestamp <= ? ORDER BY timestamp, id")
        ours, raw, decoded = [], [], []
        with mqbtt.MQbtTDataBase(path) as db:
            con = sqlite3.connect(path)
            for _ in range(repeat):
                t = time.perf_counter()
                n_raw = sum(1 for _ in con.execute(sql, ("p3", "shr", lo, hi)))
                raw.append((time.perf_counter() - t) * 1000)
                t = time.perf_counter()
                n_ours = sum(1 for _ in db.records("p3", "shr", lo, hi))
                ours.append((time.perf_counter() - t) * 1000)
                t = time.perf_counter()
                for r in db.records("p3", "shr", lo, hi):
                    r.timestamp, r.message.diff
                decoded.append((time.perf_counter() - t) * 1000)
                assert n_raw == n_ours > 0
            con.close()
            tracemalloc.start()
            n_all = 0
            for r in db.records():
                n_all += 1
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    report(f"records(pair, subtopic, time window) on {rows:,} rows ({n_ours:,} hits)", "ms",
           ours, raw, "≤ 1.5×", False, 1.5, "raw sqlite3")
    info("… reading every record's timestamp and decoded message too", "ms", decoded,
         f"({med(decoded) / med(raw):.1f}× the raw query, which decodes nothing)")
    info(f"peak Python memory iterating all {n_all:,} records", "KiB", [peak / 1024], "(flat: chunks of 1000 rows)")


# ---------------------------------------------------------------------------
# startup: mqbtt.pyz --version vs a shiv-built hello-world
# ---------------------------------------------------------------------------

HELLO = 'def main():\n    print("hello 1.0")\n'


def _time_cmd(cmd, env, n):
    out = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        out.append((time.perf_counter() - t) * 1000)
    return out


def bench_startup(repeat, quick):
    import tempfile
    import build_zipapp
    with tempfile.TemporaryDirectory() as tmp:
        pyz = os.path.join(tmp, "mqbtt.pyz")
        build_zipapp.build(pyz, quiet=True)
        site = os.path.join(tmp, "hello-site")
        os.makedirs(site)
        with open(os.path.join(site, "hello.py"), "w") as f:
            f.write(HELLO)
        hello = os.path.join(tmp, "hello.pyz")
        subprocess.run([PY, "-m", "shiv", "--site-packages", site, "--entry-point", "hello:main",
                        "--python", "/usr/bin/env python3", "--reproducible", "-o", hello],
                       check=True, capture_output=True)
        env = dict(os.environ, SHIV_ROOT=os.path.join(tmp, "shiv-root"))
        cold = []
        for k in range(repeat):
            cenv = dict(env, SHIV_ROOT=os.path.join(tmp, f"cold-{k}"))
            cold += _time_cmd([pyz, "--version"], cenv, 1)
        n = 10 if quick else 30
        _time_cmd([pyz, "--version"], env, 2)      # extract + compile once
        _time_cmd([hello], env, 2)
        ours, raw = [], []
        for _ in range(repeat):
            ours.append(med(_time_cmd([pyz, "--version"], env, n)))
            raw.append(med(_time_cmd([hello], env, n)))
        bare = med(_time_cmd([PY, "-c", "pass"], env, n))
    report("mqbtt.pyz --version (warm)", "ms", ours, raw, "≤ 1.2×", False, 1.2, "shiv hello-world")
    info("mqbtt.pyz --version, first run (shiv extraction)", "ms", cold,
         f"(python -c pass: {bare:.1f} ms)")


# ---------------------------------------------------------------------------

BENCHES = {"codec": bench_codec, "rtt": bench_rtt, "shares": bench_shares, "record": bench_record,
           "fleet": bench_fleet, "query": bench_query, "startup": bench_startup}
NEEDS_BROKER = {"rtt", "shares", "record", "fleet"}


def machine():
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mosq = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True).stdout.splitlines()[:1]
    from importlib.metadata import version
    import google.protobuf
    from google.protobuf.internal import api_implementation
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, {cpu}; "
            f"Python {platform.python_version()}; paho-mqtt {version('paho-mqtt')}; protobuf "
            f"{google.protobuf.__version__} ({api_implementation.Type()}); {' '.join(mosq)}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", help="comma-separated benchmark names")
    ap.add_argument("--no-stock", action="store_true",
                    help="skip the runs on the stock broker (no set_tcp_nodelay)")
    a = ap.parse_args(argv)
    names = a.only.split(",") if a.only else list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        ap.error(f"unknown benchmark(s): {', '.join(unknown)}")
    print(f"machine: {machine()}", flush=True)
    broker = stock = None
    if NEEDS_BROKER & set(names):
        broker = LocalBroker(extra=broker_conf()).start()
    try:
        if ON_STOCK & set(names) and not a.no_stock:
            stock = LocalBroker(stock=True, extra=STOCK_CONF).start()
        for name in names:
            print(f"[{name}]", flush=True)
            fn = BENCHES[name]
            if name in ON_STOCK:
                fn(a.repeat, a.quick, broker, stock)
            elif name in NEEDS_BROKER:
                fn(a.repeat, a.quick, broker)
            else:
                fn(a.repeat, a.quick)
    finally:
        for b in (broker, stock):
            if b:
                b.cleanup()
    print()
    print("| benchmark | mqbtt (median, min–max) | raw building block (median, min–max) | ratio | target | met |")
    print("|---|---|---|---|---|---|")
    missed = 0
    for name, unit, ours, raw, ratio, target, ok, raw_name, ours_c, raw_c in RESULTS:
        if raw is None:
            print(f"| {name} | {ours_c:.4g} {unit} ({span(ours)}) | | | {target} | |")
            continue
        missed += not ok
        print(f"| {name} | {ours_c:.4g} {unit} ({span(ours)}) | {raw_name}: {raw_c:.4g} {unit} "
              f"({span(raw)}) | {ratio:.3f} | {target} | {'yes' if ok else '**NO**'} |")
    print(f"\n{len([r for r in RESULTS if r[3] is not None]) - missed} targets met, {missed} missed")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
