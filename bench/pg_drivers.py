#!/usr/bin/env python3
"""Compare PostgreSQL drivers for mqbtt's three access patterns (the measurement
behind the README's driver choice):

* recorder: commits of 10 rows (one multi-row INSERT + COMMIT per batch);
* bulk: ``COPY messages FROM STDIN`` of N rows (text format made by the caller);
* stream: reading N rows back through a server-side cursor (FETCH 1000).

    python3 bench/pg_drivers.py [--rows 200000]

Runs each driver in its own process: psycopg 3 with its C implementation
(psycopg-binary), psycopg 3 pure Python (``PSYCOPG_IMPL=python``, on the
system's libpq) and pg8000 (pure Python).  Starts a private PostgreSQL.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

DDL = """DROP TABLE IF EXISTS messages;
CREATE TABLE messages (id bigserial PRIMARY KEY, timestamp double precision NOT NULL,
  pair_id text NOT NULL, subtopic text NOT NULL, message bytea NOT NULL);
CREATE INDEX ON messages (timestamp); CREATE INDEX ON messages (pair_id, timestamp);
CREATE INDEX ON messages (pair_id, subtopic, timestamp)"""


def rows(n):
    payload = bytes(range(40))
    return [(1.7e9 + i * 0.001, f"p{i % 100:03d}", "shr", payload) for i in range(n)]


def child(driver, url, n):
    import urllib.parse
    u = urllib.parse.urlsplit(url)
    data = rows(n)
    out = {}
    if driver.startswith("psycopg"):
        import psycopg
        conn = psycopg.connect(url, autocommit=True)
        out["impl"] = psycopg.pq.__impl__
        ex = lambda sql, p=None: conn.execute(sql, p)  # noqa: E731
    else:
        import pg8000.native
        conn = pg8000.native.Connection(u.username, password=u.password, host=u.hostname,
                                        port=u.port, database=u.path[1:])
        out["impl"] = "python"
        ex = lambda sql, p=None: conn.run(sql, **{f"p{i}": v for i, v in enumerate(p or ())})  # noqa
    for stmt in DDL.split(";"):
        ex(stmt)
    # recorder: batches of 10, one multi-row INSERT each, in autocommit mode (what
    # mqbtt does) and wrapped in BEGIN/COMMIT (for comparison)
    batches = 1000
    for key, txn in (("recorder_rows_per_s", False), ("recorder_txn_rows_per_s", True)):
        ex("TRUNCATE messages")
        t = time.perf_counter()
        for b in range(batches):
            chunk = data[b * 10:(b + 1) * 10]
            flat = [v for r in chunk for v in r]
            if driver.startswith("psycopg"):
                vals = ", ".join(["(%s, %s, %s, %s)"] * len(chunk))
            else:
                vals = ", ".join(f"(:p{4 * i}, :p{4 * i + 1}, :p{4 * i + 2}, :p{4 * i + 3})"
                                 for i in range(len(chunk)))
            if txn:
                ex("BEGIN")
            ex("INSERT INTO messages (timestamp, pair_id, subtopic, message) VALUES " + vals, flat)
            if txn:
                ex("COMMIT")
        out[key] = batches * 10 / (time.perf_counter() - t)
    ex("TRUNCATE messages")
    # bulk: COPY text
    t = time.perf_counter()
    lines = "".join(f"{ts!r}\t{pid}\t{sub}\t\\\\x{msg.hex()}\n" for ts, pid, sub, msg in data).encode()
    if driver.startswith("psycopg"):
        with conn.cursor() as cur:
            with cur.copy("COPY messages (timestamp, pair_id, subtopic, message) FROM STDIN") as cp:
                for i in range(0, len(lines), 1 << 20):
                    cp.write(lines[i:i + (1 << 20)])
    else:
        import io
        conn.run("COPY messages (timestamp, pair_id, subtopic, message) FROM STDIN",
                 stream=io.BytesIO(lines))
    out["copy_rows_per_s"] = n / (time.perf_counter() - t)
    # stream
    t = time.perf_counter()
    got = 0
    ex("BEGIN")
    ex("DECLARE c NO SCROLL CURSOR FOR SELECT id, timestamp, pair_id, subtopic, message "
       "FROM messages ORDER BY timestamp, id")
    while True:
        if driver.startswith("psycopg"):
            r = conn.execute("FETCH 1000 FROM c").fetchall()
        else:
            r = conn.run("FETCH 1000 FROM c")
        if not r:
            break
        got += len(r)
    ex("CLOSE c")
    ex("COMMIT")
    assert got == n, got
    out["stream_rows_per_s"] = n / (time.perf_counter() - t)
    print(json.dumps(out))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=200000)
    p.add_argument("--child", nargs=2)
    a = p.parse_args()
    if a.child:
        return child(a.child[0], a.child[1], a.rows)
    from local_postgres import LocalPostgres
    with LocalPostgres() as pg:
        url = pg.create_db("drivers")
        for driver, env in (("psycopg (C, psycopg-binary)", {"PSYCOPG_IMPL": "binary"}),
                            ("psycopg (pure Python + libpq5)", {"PSYCOPG_IMPL": "python"}),
                            ("pg8000 (pure Python)", {})):
            r = subprocess.run([sys.executable, __file__, "--rows", str(a.rows), "--child",
                                driver, url], env={**os.environ, **env}, capture_output=True,
                               text=True)
            if r.returncode:
                print(driver, "failed:", r.stderr.strip().splitlines()[-1:])
                continue
            d = json.loads(r.stdout)
            print(f"{driver:34s} recorder {d['recorder_rows_per_s']:8.0f} rows/s (10-row commits; "
                  f"{d['recorder_txn_rows_per_s']:.0f} with BEGIN/COMMIT)  "
                  f"COPY {d['copy_rows_per_s']:8.0f} rows/s  stream {d['stream_rows_per_s']:8.0f} rows/s",
                  flush=True)


if __name__ == "__main__":
    main()
