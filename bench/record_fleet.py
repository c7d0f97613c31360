"""Benchmark: can ``mqbtt record`` keep up with a fleet?

100 simulated pairs publish at once (shares and log lines at QoS 1, requests
and replies at QoS 2) through a private Mosquitto; the recorder (a real
``mqbtt record`` subprocess) must store every message.  Prints the sustained
rate (messages stored per second, from the first publish to the last commit)
and the number lost.

    python bench/record_fleet.py [--pairs 100] [--per-pair 200] [--publishers 10]
"""
import argparse
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))
import mqbtt  # noqa: E402
from local_broker import LocalBroker  # noqa: E402

SUBS = ("shr", "log", "srv", "esp")


def count(db):
    try:
        con = sqlite3.connect(db, timeout=30)
        try:
            return con.execute("SELECT count(*) FROM messages").fetchone()[0]
        finally:
            con.close()
    except sqlite3.OperationalError:
        return 0


def publish(broker, pairs, per_pair, infos):
    c = mqbtt._paho_client(mqbtt.BrokerURI.parse(broker.uri), f"bench-{os.urandom(4).hex()}", True)
    c.max_inflight_messages_set(20)  # Mosquitto drops v3.1.1 clients with more QoS 2 in flight
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    for i in range(per_pair):
        for p in pairs:
            sub = SUBS[i % 4]
            infos.append(c.publish(f"mqbtt/{p}/{sub}", b"%s %d" % (p.encode(), i), mqbtt.SUBTOPICS[sub]))
    while not all(x._published for x in infos):
        time.sleep(0.01)
    c.disconnect()
    c.loop_stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=100)
    ap.add_argument("--per-pair", type=int, default=200)
    ap.add_argument("--publishers", type=int, default=10)
    a = ap.parse_args()
    rate, lost = run(a.pairs, a.per_pair, a.publishers, verbose=True)
    return 0 if lost == 0 else 1


def run(pairs=100, per_pair=200, publishers=10, verbose=False):
    """Run the fleet once; return (messages/s sustained, messages lost)."""
    from types import SimpleNamespace
    a = SimpleNamespace(pairs=pairs, per_pair=per_pair, publishers=publishers)
    total = a.pairs * a.per_pair
    with LocalBroker(extra="max_queued_messages 0\nmax_queued_bytes 0") as broker, \
            tempfile.TemporaryDirectory() as tmp:
        db = os.path.join(tmp, "fleet.db")
        rec = subprocess.Popen([sys.executable, os.path.join(ROOT, "mqbtt.py"), "record",
                                "--broker", broker.uri, "--db", db],
                               stderr=subprocess.PIPE, text=True)
        rec.stderr.readline()  # "mqbtt record: recording ..." once subscribed
        pairs = [f"bench{i:03d}" for i in range(a.pairs)]
        groups = [pairs[i::a.publishers] for i in range(a.publishers)]
        infos = [[] for _ in groups]
        t0 = time.monotonic()
        threads = [threading.Thread(target=publish, args=(broker, g, a.per_pair, inf))
                   for g, inf in zip(groups, infos)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        t_pub = time.monotonic() - t0
        deadline = time.monotonic() + 120
        while count(db) < total and time.monotonic() < deadline:
            time.sleep(0.05)
        t_rec = time.monotonic() - t0
        rec.send_signal(signal.SIGINT)
        rec.wait(30)
        stored = count(db)
        con = sqlite3.connect(db)
        distinct = con.execute("SELECT count(*) FROM (SELECT DISTINCT pair_id, subtopic, message "
                               "FROM messages)").fetchone()[0]
        con.close()
        if verbose:
            print(f"{a.pairs} pairs x {a.per_pair} messages = {total}: published in {t_pub:.2f} s, "
                  f"recorded in {t_rec:.2f} s -> {stored / t_rec:.0f} messages/s sustained; "
                  f"stored {stored}, distinct {distinct}, lost {total - distinct}, "
                  f"recorder exit {rec.returncode}")
        return stored / t_rec, total - distinct


if __name__ == "__main__":
    sys.exit(main())
