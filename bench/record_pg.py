#!/usr/bin/env python3
"""Benchmark: ``mqbtt record`` into PostgreSQL with 1, 2 and 3 recorders in
one ``--share`` group (and, for reference, one recorder into SQLite).

For each configuration: a private Mosquitto (``max_queued_messages 0``) and a
private PostgreSQL (examples/local_postgres.py, fsync on); the recorders
subscribe once and stop, so that their persistent sessions exist; N QoS 1
messages from 100 pairs are published while they are away (the broker deals
them out among the members' queues); then the recorders start together and
drain.  The rate is N divided by the span between the first and the last
receive time stored in the database (what the recorders sustained, without
the publishers competing for the CPU).  Every run also checks that nothing
was lost.

    python3 bench/record_pg.py [--messages 30000] [--repeat 1] [--recorders 1,2,3]

On a 2-core machine the broker, the recorders and PostgreSQL share the cores:
report the figures, there is no target.
"""
import argparse
import os
import signal
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
from local_postgres import LocalPostgres  # noqa: E402


def _recorders(broker, db, k, env):
    procs = []
    for i in range(k):
        cmd = [sys.executable, os.path.join(ROOT, "mqbtt.py"), "record", "--broker", broker.uri,
               "--db", db, "--client-id", f"bench-rec-{i}"]
        if k > 1 or mqbtt.is_pg_url(db):
            cmd += ["--share", "bench"]
        procs.append(subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env))
    for p in procs:
        line = p.stderr.readline()       # "mqbtt record: recording ..." once subscribed
        if "recording" not in line:
            raise SystemExit(f"recorder failed: {line}{p.stderr.read()}")
    return procs


def _stop(procs):
    for p in procs:
        p.send_signal(signal.SIGINT)
    for p in procs:
        p.wait(60)
        p.stderr.close()


def _publish(broker, n, publishers=5):
    infos = []

    def one(k):
        c = mqbtt._paho_client(mqbtt.BrokerURI.parse(broker.uri), f"bench-pub-{k}", True)
        c.max_inflight_messages_set(100)
        c.connect("127.0.0.1", broker.port)
        c.loop_start()
        mine = []
        for i in range(k, n, publishers):
            sub = ("shr", "log")[i % 2]
            mine.append(c.publish(f"mqbtt/pair{i % 100:02d}/{sub}", b"bench %08d" % i, 1))
        while not all(x._published for x in mine):
            time.sleep(0.01)
        infos.extend(mine)
        c.disconnect()
        c.loop_stop()
    threads = [threading.Thread(target=one, args=(k,)) for k in range(publishers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(infos)


def run(k, n, backend="postgresql"):
    """One run: k recorders drain n queued messages; returns (rate, lost, duplicates)."""
    with LocalBroker(extra="max_queued_messages 0\nmax_queued_bytes 0") as broker, \
            tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ)
        pg = None
        if backend == "postgresql":
            pg = LocalPostgres().start()
            db = pg.create_db("bench").replace(":" + pg.password, "")
            env["PGPASSWORD"] = pg.password
        else:
            db = os.path.join(tmp, "bench.db")
        try:
            _stop(_recorders(broker, db, k, env))        # the sessions exist; now away
            assert _publish(broker, n) == n
            procs = _recorders(broker, db, k, env)
            deadline = time.monotonic() + 600
            with mqbtt.MQbtTDataBase(pg.url("bench") if pg else db) as d:
                while d.count() < n and time.monotonic() < deadline:
                    time.sleep(0.1)
                _stop(procs)
                stats = d._conn.execute("SELECT count(*), min(timestamp), max(timestamp) "
                                        "FROM messages").fetchone()
                distinct = d._conn.execute("SELECT count(*) FROM (SELECT DISTINCT message "
                                           "FROM messages) AS m").fetchone()[0]
            stored, t_first, t_last = stats
            return stored / (t_last - t_first), n - distinct, stored - distinct
        finally:
            if pg is not None:
                pg.cleanup()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=30000)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--recorders", default="1,2,3")
    ap.add_argument("--no-sqlite", action="store_true", help="skip the SQLite reference run")
    a = ap.parse_args()
    print(f"{a.messages} queued QoS 1 messages from 100 pairs, drained by k recorders "
          f"(--share group); Python {sys.version.split()[0]}, {os.cpu_count()} cores", flush=True)
    configs = [("postgresql", int(k)) for k in a.recorders.split(",")]
    if not a.no_sqlite:
        configs.insert(0, ("sqlite", 1))
    bad = 0
    for backend, k in configs:
        rates = []
        for _ in range(a.repeat):
            rate, lost, dup = run(k, a.messages, backend)
            rates.append(rate)
            bad += lost
        rates.sort()
        per = rates[len(rates) // 2] / k
        print(f"{backend:10s} {k} recorder(s): {rates[len(rates) // 2]:8.0f} messages/s "
              f"(min {rates[0]:.0f}, max {rates[-1]:.0f}; {per:.0f} per recorder); "
              f"lost {lost}, duplicates {dup}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
