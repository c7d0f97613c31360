"""Tests of issue 14: recordings in PostgreSQL, shared recorders, mqbtt copy.

Real parts only: a private PostgreSQL cluster (initdb + pg_ctl in a temporary
directory, as ``nobody`` when run as root; examples/local_postgres.py), private
Mosquitto brokers (conftest.py), real subprocesses and signals.
"""
import datetime
import hashlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

import mqbtt
from local_postgres import LocalPostgres
from mqbtt import BrokerURI, MQbtTDataBase, MQbtTRecord
import testlib
from testlib import ROOT, Proc, mqbtt_cmd, pg_count, pg_rows, pyenv_python, run_cli, start_recorder, wait_for

UTC = datetime.timezone.utc


# -- helpers ----------------------------------------------------------------------

def session(broker, pair_id, n=6, shares_per_request=2):
    """testlib.session with log lines PostgreSQL must store verbatim (%, _ and ')."""
    return testlib.session(broker, pair_id, n, shares_per_request, log_line=lambda i: (
        f"I ({1000 + i}) mqbtt_protocol: Received request: 100% _done_ 'q' {i}"))


# -- the database API on PostgreSQL ----------------------------------------------------

def test_schema_is_the_documented_one(pg_url):
    with MQbtTDataBase(pg_url) as db:
        assert db.backend == "postgresql" and db.count() == 0
    cols = pg_rows(pg_url, "SELECT column_name, data_type, is_nullable, column_default "
                           "FROM information_schema.columns WHERE table_name = 'messages' "
                           "ORDER BY ordinal_position")
    assert [(c, t, n) for c, t, n, _ in cols] == [
        ("id", "bigint", "NO"), ("timestamp", "double precision", "NO"), ("pair_id", "text", "NO"),
        ("subtopic", "text", "NO"), ("message", "bytea", "NO")]
    assert cols[0][3].startswith("nextval(")                       # bigserial
    idx = {name: d for name, d in pg_rows(pg_url, "SELECT indexname, indexdef FROM pg_indexes "
                                                  "WHERE tablename = 'messages'")}
    assert idx["messages_timestamp"].endswith("(\"timestamp\")")
    assert idx["messages_pair_timestamp"].endswith("(pair_id, \"timestamp\")")
    assert idx["messages_pair_subtopic_timestamp"].endswith("(pair_id, subtopic, \"timestamp\")")
    with pytest.raises(Exception, match="check"):
        import psycopg
        with psycopg.connect(pg_url) as c:
            c.execute("INSERT INTO messages (timestamp, pair_id, subtopic, message) "
                      "VALUES (0, 'p', 'xxx', '')")
    # opening again (existing table), by several at once, is harmless
    errors = []

    def opener():
        try:
            MQbtTDataBase(pg_url).close()
        except Exception as e:  # pragma: no cover - the assertion shows it
            errors.append(e)
    ts = [threading.Thread(target=opener) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert errors == []


def test_scheme_postgres_and_secrets(pg, pg_url, tmp_path):
    url = pg_url.replace("postgresql://", "postgres://")
    with MQbtTDataBase(url) as db:
        assert pg.password not in repr(db) and pg.password not in db.path
        assert db.path == url.replace(pg.password, "***")
        rid = db.insert(MQbtTRecord(pair_id="p", subtopic="log", timestamp=1.5, payload=b"x"))
        assert rid == 1 and db.commit() == 1
    # a wrong password, a missing database, a closed port: one line, never the password
    bad = [pg_url.replace(pg.password, "not-" + pg.password),
           pg_url.rsplit("/", 1)[0] + "/no_such_db",
           f"postgresql://{pg.user}:{pg.password}@127.0.0.1:1/x",
           f"postgresql://{pg.user}:{pg.password}@127.0.0.1:{pg.port}/x?sslmode=bogus",
           f"postgresql://{pg.user}:{pg.password}@[::1/x"]
    for u in bad:
        with pytest.raises(mqbtt.MQbtTError) as e:
            MQbtTDataBase(u)
        assert pg.password not in str(e.value) and "\n" not in str(e.value), str(e.value)
        r = run_cli("copy", u, str(tmp_path / "out.db"))
        assert r.returncode == 1 and r.stdout == ""
        assert len(r.stderr.splitlines()) == 1 and pg.password not in r.stderr, r.stderr
        assert r.stderr.startswith("mqbtt copy: error: ")
    with pytest.raises(mqbtt.MQbtTError, match=r"\?password=\*\*\*"):
        MQbtTDataBase(f"postgresql://{pg.user}@127.0.0.1:1/x?password={pg.password}")


def test_password_from_pgpassword_and_pgpass(pg, pg_url, tmp_path):
    bare = pg_url.replace(":" + pg.password, "")
    src = tmp_path / "one.db"
    with MQbtTDataBase(str(src)) as db:
        db.insert(MQbtTRecord(pair_id="p", subtopic="log", timestamp=1.0, payload=b"a"))
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["HOME"] = str(home)
    r = run_cli("copy", str(src), bare, env=env)                  # no password anywhere
    assert r.returncode == 1 and "password" in r.stderr
    r = run_cli("copy", str(src), bare, env={**env, "PGPASSWORD": pg.password})
    assert r.returncode == 0, r.stderr
    assert pg.password not in r.stderr and "1 rows copied" in r.stderr
    pgpass = home / ".pgpass"
    pgpass.write_text(f"127.0.0.1:{pg.port}:*:{pg.user}:{pg.password}\n")
    pgpass.chmod(0o600)
    r = run_cli("copy", str(src), bare, env=env)
    assert r.returncode == 0 and "0 rows copied" in r.stderr and "(1 copied before)" in r.stderr
    assert pg.password not in r.stderr


def test_without_the_driver_one_line(pg_url, tmp_path):
    # a Python without site-packages: mqbtt imports, psycopg does not
    code = ("import sys; sys.path.insert(0, '.'); import mqbtt; "
            f"sys.exit(mqbtt.main(['copy', {pg_url!r}, {str(tmp_path / 'x.db')!r}]))")
    r = subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "pip install 'psycopg[binary]'" in r.stderr and "Traceback" not in r.stderr
    code = ("import sys; sys.path.insert(0, '.'); import mqbtt\n"
            f"try:\n    mqbtt.MQbtTDataBase({pg_url!r})\n"
            "except mqbtt.MQbtTError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.stdout.startswith("PostgreSQL databases need the psycopg 3 driver")
    # and import mqbtt does not load it
    r = subprocess.run([sys.executable, "-c", "import mqbtt, sys; print('psycopg' in sys.modules)"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.stdout.strip() == "False"


def test_records_and_logs_match_sqlite(broker, pg_url, tmp_path):
    """Record a real session into PostgreSQL, copy it to SQLite: every query
    returns the same records on both."""
    rec = start_recorder(broker, pg_url)
    try:
        sent = session(broker, "alpha", n=5) + session(broker, "beta", n=3)
        wait_for(lambda: pg_count(pg_url) == len(sent), 30, "the sessions recorded")
    finally:
        rec.p.send_signal(signal.SIGINT)
        assert rec.wait() == 0
    assert sorted(pg_rows(pg_url, "SELECT subtopic, message FROM messages")) == \
        sorted((s, p) for s, p in sent)
    with MQbtTDataBase(pg_url) as db:                 # rows other tools or bad miners write
        for i, (sub, payload) in enumerate([("shr", b"\xff\xfe not protobuf"), ("log", b""),
                                            ("log", "naïve \\ \t '\"%_ 100%".encode()),
                                            ("esp", b"\x08\x07"), ("log", b"\xff bad utf8")]):
            db.insert(MQbtTRecord(pair_id="gamma", subtopic=sub, timestamp=1e9 + i, payload=payload))
    lite = str(tmp_path / "same.db")
    r = run_cli("copy", pg_url, lite)
    assert r.returncode == 0, r.stderr
    with MQbtTDataBase(pg_url) as p, MQbtTDataBase(lite) as s:
        everything = list(s.records())
        t_mid = everything[len(everything) // 2].timestamp
        ts_mid = sqlite3.connect(lite).execute("SELECT timestamp FROM messages WHERE id = ?",
                                               (everything[len(everything) // 2].id,)).fetchone()[0]
        queries = [
            ("records", {}), ("records", {"desc": True}), ("records", {"pair_id": "alpha"}),
            ("records", {"pair_id": "beta", "subtopic": "esp"}), ("records", {"subtopic": "shr"}),
            ("records", {"min_timestamp": t_mid}), ("records", {"max_timestamp": t_mid}),
            ("records", {"min_timestamp": ts_mid, "max_timestamp": ts_mid}),     # exactly one
            ("records", {"min_timestamp": t_mid.timestamp(), "pair_id": "alpha", "desc": True}),
            ("records", {"max_timestamp": t_mid.astimezone().replace(tzinfo=None)}),  # local time
            ("records", {"pair_id": "nobody"}),
            ("logs", {}), ("logs", {"pair_id": "gamma"}), ("logs", {"text": "100%"}),
            ("logs", {"text": "_done_"}), ("logs", {"text": "'q'"}), ("logs", {"text": "%_"}),
            ("logs", {"text": "\\ \t"}), ("logs", {"text": "naïve"}), ("logs", {"text": "%"}),
            ("logs", {"text": ""}), ("logs", {"text": "DONE"}), ("logs", {"desc": True, "text": "Received"}),
            ("logs", {"max_timestamp": 1e9 + 2}),
        ]
        for method, kw in queries:
            a = [(r.id, r.pair_id, r.subtopic, r.timestamp, r.payload, r.message)
                 for r in getattr(p, method)(**kw)]
            b = [(r.id, r.pair_id, r.subtopic, r.timestamp, r.payload, r.message)
                 for r in getattr(s, method)(**kw)]
            assert a == b, (method, kw)
            assert a or kw in ({"pair_id": "nobody"}, {"text": "DONE"}), (method, kw)
        assert p.count() == s.count() == len(sent) + 5
        assert p.count(pair_id="alpha", subtopic="shr") == s.count(pair_id="alpha", subtopic="shr") == 10
        assert p.pair_ids() == s.pair_ids() == ["alpha", "beta", "gamma"]
        assert [x.message for x in p.logs(text="100%")][0] == "naïve \\ \t '\"%_ 100%"
        assert list(mqbtt.request_reply_pairs(p.records(pair_id="alpha"))) == \
            list(mqbtt.request_reply_pairs(s.records(pair_id="alpha")))
        # two generators at once, and an insert while one is open
        g1, g2 = p.records(), p.records(desc=True)
        first, last = next(g1), next(g2)
        p.insert(MQbtTRecord(pair_id="delta", subtopic="log", timestamp=2e9, payload=b"late"))
        p.commit()
        assert first.pair_id == "gamma" and last.pair_id in ("alpha", "beta")
        assert len(list(g1)) == len(everything) - 1             # its snapshot
        g2.close()
        assert [r.payload for r in p.logs(pair_id="delta")] == [b"late"]   # a new snapshot
        with pytest.raises(ValueError):
            list(p.records(subtopic="bogus"))
        with pytest.raises(TypeError):
            list(p.records(min_timestamp="yesterday"))


def test_generic_sql_runs_on_both(pg_url, tmp_path):
    """Methods written against sqlite3 (``db._conn.execute(sql, params)`` with
    ``?`` placeholders, explicit BEGIN/COMMIT) run unchanged on PostgreSQL."""
    lite = str(tmp_path / "g.db")
    results = []
    for where in (lite, pg_url):
        with MQbtTDataBase(where) as db:
            db._check_writable()      # a SQLite file is created by the first write
            c = db._conn
            c.execute("BEGIN")
            for i in range(6):
                cur = c.execute("INSERT INTO messages (timestamp, pair_id, subtopic, message) "
                                "VALUES (?, ?, ?, ?)", (10.0 + i, f"p{i % 2}", "log", b"a%d%%?_" % i))
                assert cur.lastrowid == i + 1
            c.execute("COMMIT")
            c.executemany("INSERT INTO messages (timestamp, pair_id, subtopic, message) VALUES (?, ?, ?, ?)",
                          [(20.0, "p9", "shr", b"")] * 3)
            out = [
                c.execute("SELECT pair_id, count(*), min(timestamp), max(timestamp) FROM messages "
                          "GROUP BY pair_id ORDER BY pair_id").fetchall(),
                c.execute("SELECT '100%', 'a?b', ?", (5,)).fetchone(),
                c.execute("SELECT '100%', 'x?'").fetchone(),
                c.execute("SELECT count(*) FROM messages WHERE pair_id LIKE 'p%'").fetchone(),
                c.execute("SELECT id FROM messages WHERE instr(message, ?) > 0 ORDER BY id",
                          (b"3%",)).fetchall(),
                [tuple(r) for r in c.execute("SELECT DISTINCT subtopic FROM messages ORDER BY subtopic")],
                c.execute("SELECT count(*) FROM messages WHERE timestamp BETWEEN ? AND ?",
                          (11, 13.5)).fetchone(),
            ]
            results.append([[tuple(x) for x in o] if isinstance(o, list) else tuple(o) for o in out])
    assert results[0] == results[1]
    assert results[0][1] == ("100%", "a?b", 5) and results[0][4] == [(4,)]


def test_streaming_is_chunked(pg_url):
    """records() on PostgreSQL uses a server-side cursor: rows arrive 1000 at
    a time, the first long before the query would have been fully fetched."""
    import psycopg
    with psycopg.connect(pg_url) as c:
        MQbtTDataBase(pg_url).close()
        c.execute("INSERT INTO messages (timestamp, pair_id, subtopic, message) "
                  "SELECT g, 'p', 'log', convert_to(g::text, 'UTF8') FROM generate_series(1, 25000) g")
    with MQbtTDataBase(pg_url) as db:
        it = db.records()
        assert next(it).payload == b"1"
        rest = sum(1 for _ in it)
        assert rest == 24999
        # the streaming transaction ended with the generator: the server holds no cursor
        active = pg_rows(pg_url, "SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                                 "'mqbtt' AND state = 'idle in transaction'")
        assert active == [(0,)]


def test_replay_from_postgresql(broker, pg_url):
    with MQbtTDataBase(pg_url) as db:
        for i in range(4):
            db.insert(MQbtTRecord(pair_id="orig", subtopic="log", timestamp=100 + i * 0.05,
                                  payload=b"line %d" % i))
    got = []
    with mqbtt.MQbtTLogReceiver(broker.uri, "copy") as lr:
        r = run_cli("replay", "--broker", broker.uri, "--db", pg_url, "--pid", "orig",
                    "--to-pid", "copy", "--speed", "0")
        assert r.returncode == 0, r.stderr
        for _ in range(4):
            got.append(lr.receive_log(timeout=10))
    assert got == [f"line {i}" for i in range(4)]
    assert pg_url.split("@")[0].split(":")[-1] not in r.stderr           # the password


# -- shared recording --------------------------------------------------------------------

def test_three_shared_recorders_sigkill(flood_broker, pg, pg_url):
    """Three recorders in one --share group on one PostgreSQL; 30,000 QoS 1
    messages from 100 pairs; one recorder SIGKILLed mid-flood and restarted
    with the same command line: every message stored, duplicates bounded by what
    the killed member had committed and not yet seen acknowledged."""
    broker = flood_broker
    n = 30000
    env = {**os.environ, "PGPASSWORD": pg.password}       # no password on the command lines
    url = pg_url.replace(":" + pg.password, "")
    MQbtTDataBase(pg_url).close()

    def cmd(i):
        return mqbtt_cmd("record", "--broker", broker.uri, "--db", url, "--share", "fleet",
                         "--client-id", f"rec-{i}")
    recs = [Proc(cmd(i), env=env) for i in range(3)]
    for r in recs:
        r.wait_err(r"^mqbtt record: recording \$share/fleet/mqbtt/\+/srv")
    pubs, infos = [], []
    for k in range(5):
        c = mqbtt._paho_client(BrokerURI.parse(broker.uri), f"pub-{k}", True)
        c.max_inflight_messages_set(200)
        c.connect("127.0.0.1", broker.port)
        c.loop_start()
        pubs.append(c)
    published = [0]

    def flood(k):
        for i in range(k, n, 5):
            sub = ("log", "shr")[i % 2]
            infos.append(pubs[k].publish(f"mqbtt/pair{i % 100:02d}/{sub}", b"m%06d" % i, 1))
            published[0] += 1
            if i % 500 < 5:
                time.sleep(0.01)
    threads = [threading.Thread(target=flood, args=(k,)) for k in range(5)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    try:
        wait_for(lambda: pg_count(pg_url) >= 4000, 60, "4000 messages stored")
        recs[0].p.send_signal(signal.SIGKILL)
        at_kill = pg_count(pg_url)
        assert recs[0].wait() == -9
        assert at_kill < n, "the kill must come during the flood"
        recs[0] = Proc(cmd(0), env=env)                      # the same command line
        recs[0].wait_err(r"^mqbtt record: recording ")
        for t in threads:
            t.join(120)
        wait_for(lambda: all(i._published for i in infos), 60, "the broker acknowledged the flood")
        want = {b"m%06d" % i for i in range(n)}
        wait_for(lambda: {m for (m,) in pg_rows(pg_url, "SELECT message FROM messages")} >= want,
                 120, "every message stored")
        elapsed = time.monotonic() - t0
        for r in recs:
            r.p.send_signal(signal.SIGINT)
        assert [r.wait() for r in recs] == [0, 0, 0]
    finally:
        for r in recs:
            r.kill()
        for c in pubs:
            c.disconnect()
            c.loop_stop()
    stored = [bytes(m) for (m,) in pg_rows(pg_url, "SELECT message FROM messages")]
    distinct = set(stored)
    duplicates = len(stored) - len(distinct)
    per_member = [int(re.search(r"stopped: (\d+) messages", "\n".join(r.err)).group(1)) for r in recs]
    print(f"\n3 shared recorders: {n} messages from 100 pairs in {elapsed:.1f} s, SIGKILL after "
          f"{at_kill} stored; stored {len(stored)} rows, {len(distinct)} distinct, "
          f"lost {len(want - distinct)}, duplicates {duplicates}; per member after the kill "
          f"{per_member}")
    assert distinct == want                                # zero lost, nothing else
    # the killed member's committed but not yet acknowledged messages: see test_record's
    # flood test (0-40 measured in 43 kills; a member acknowledging late or never: ~1,300+)
    assert duplicates <= 100
    assert all(c > 0 for c in per_member)                  # the stream was split
    pairs = pg_rows(pg_url, "SELECT count(DISTINCT pair_id), count(DISTINCT subtopic) FROM messages")
    assert pairs == [(100, 2)]
    for r in recs:
        assert not any(pg.password in line for line in r.err)


def test_one_recorder_per_client_id(broker, pg, pg_url):
    rec = start_recorder(broker, pg_url, "--share", "g", "--client-id", "same")
    try:
        r = run_cli("record", "--broker", broker.uri, "--db", pg_url, "--share", "g",
                    "--client-id", "same", timeout=60)
        assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
        assert "another recorder with client id 'same'" in r.stderr
        assert pg.password not in r.stderr
        other = start_recorder(broker, pg_url, "--share", "g", "--client-id", "other")
        other.p.send_signal(signal.SIGTERM)
        assert other.wait() == 0
    finally:
        rec.p.send_signal(signal.SIGTERM)
        assert rec.wait() == 0
    # the default client id depends on the group
    a = mqbtt.recorder_client_id(broker.uri, pg_url)
    b = mqbtt.recorder_client_id(broker.uri, pg_url, "g")
    c = mqbtt.recorder_client_id(broker.uri, pg_url.replace(pg.password, "other"))
    assert a != b and a == c                               # the password is not part of it


@pytest.mark.parametrize("group", ["", "a/b", "a+", "#", "x\ny", "tab\there"])
def test_bad_share_groups_are_usage_errors(broker, tmp_path, group):
    r = run_cli("record", "--broker", broker.uri, "--db", str(tmp_path / "x.db"), "--share", group)
    assert r.returncode == 2 and "--share" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.db").exists()
    with pytest.raises(ValueError):
        mqbtt.Recorder(broker.uri, str(tmp_path / "y.db"), share=group)


# -- copy --------------------------------------------------------------------------------

def make_sqlite(path, n, pairs=100):
    con = sqlite3.connect(path)
    con.execute(mqbtt._SCHEMA)
    subs = ("srv", "esp", "shr", "log")
    con.executemany("INSERT INTO messages (timestamp, pair_id, subtopic, message) VALUES (?, ?, ?, ?)",
                    ((1.7e9 + i / 1000.0 + (i % 7) * 1e-7, f"pair{i % pairs:02d}", subs[i % 4],
                      hashlib.blake2b(b"%d" % i, digest_size=8 + i % 24).digest())
                     for i in range(n)))
    for sql in mqbtt._INDICES:
        con.execute(sql)
    con.commit()
    con.close()


def sqlite_digest(path):
    h = hashlib.sha256()
    con = sqlite3.connect(path)
    n = 0
    for rid, ts, pid, sub, msg in con.execute("SELECT id, timestamp, pair_id, subtopic, message "
                                              "FROM messages ORDER BY id"):
        h.update(b"%d|%r|%s|%s|" % (rid, ts, pid.encode(), sub.encode()) + msg)
        n += 1
    con.close()
    return n, h.hexdigest()


def test_copy_idempotent_and_incremental(pg, pg_url, tmp_path):
    a = str(tmp_path / "a.db")
    make_sqlite(a, 1000, pairs=5)
    assert mqbtt.copy(a, pg_url) == (1000, 0)
    assert mqbtt.copy(a, pg_url) == (0, 1000)               # copying twice adds nothing
    con = sqlite3.connect(a)                                  # the recording grows
    con.execute("INSERT INTO messages (timestamp, pair_id, subtopic, message) VALUES (2e9, 'new', 'log', x'00')")
    con.commit()
    con.close()
    r = run_cli("copy", a, pg_url)
    assert r.returncode == 0 and "1 rows copied" in r.stderr and "(1000 copied before)" in r.stderr
    assert pg_count(pg_url) == 1001
    # the same recording under another name (moved file) is still recognised
    moved = str(tmp_path / "moved.db")
    os.rename(a, moved)
    assert mqbtt.copy(moved, pg_url) == (0, 1001)
    # a second source into the same database: new ids, both marks kept
    b = str(tmp_path / "b.db")
    make_sqlite(b, 10, pairs=1)
    con = sqlite3.connect(b)
    con.execute("UPDATE messages SET pair_id = 'other'")
    con.commit()
    con.close()
    assert mqbtt.copy(b, pg_url) == (10, 0)
    assert pg_rows(pg_url, "SELECT min(id), max(id) FROM messages WHERE pair_id = 'other'") == [(1002, 1011)]
    assert pg_rows(pg_url, "SELECT count(*), sum(copied) FROM mqbtt_copies") == [(2, 1011)]
    # and back: an exact replica, then nothing more
    back = str(tmp_path / "back.db")
    assert mqbtt.copy(pg_url, back) == (1011, 0)
    assert mqbtt.copy(pg_url, back) == (0, 1011)
    assert sqlite_digest(back)[0] == 1011
    # refusals: one line each
    for args, msg in [((moved, moved), "same database"),
                      ((pg_url, pg_url.replace("127.0.0.1", "localhost")), "same database"),
                      ((str(tmp_path / "missing.db"), back), "no such database"),
                      ((str(tmp_path), back), "no such database")]:
        r = run_cli("copy", *args)
        assert r.returncode == 1 and msg in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
        assert pg.password not in r.stderr
    for args in [("", back), (moved, ""), (moved,), ()]:
        r = run_cli("copy", *args)
        assert r.returncode == 2 and "Traceback" not in r.stderr
    assert not os.path.exists(str(tmp_path / "missing.db"))
    # an empty source copies nothing and leaves the destination alone
    empty = str(tmp_path / "empty.db")
    with MQbtTDataBase(empty) as db:
        db._check_writable()   # a SQLite file is created by the first write (issue 12)
    assert mqbtt.copy(empty, back) == (0, 0)


def test_copy_a_million_rows_there_and_back(pg_url, tmp_path):
    src, back = str(tmp_path / "big.db"), str(tmp_path / "back.db")
    n = 1_000_000
    make_sqlite(src, n)
    t0 = time.monotonic()
    r = run_cli("copy", src, pg_url)
    t1 = time.monotonic()
    assert r.returncode == 0, r.stderr
    r2 = run_cli("copy", pg_url, back)
    t2 = time.monotonic()
    assert r2.returncode == 0, r2.stderr
    print(f"\ncopy {n} rows: SQLite -> PostgreSQL {t1 - t0:.1f} s ({n / (t1 - t0):,.0f} rows/s), "
          f"PostgreSQL -> SQLite {t2 - t1:.1f} s ({n / (t2 - t1):,.0f} rows/s)")
    assert pg_count(pg_url) == n
    assert sqlite_digest(back) == sqlite_digest(src)                      # identical, ids included
    r3 = run_cli("copy", src, pg_url)
    assert r3.returncode == 0 and "0 rows copied" in r3.stderr and pg_count(pg_url) == n


# -- the notebook on a PostgreSQL recording -----------------------------------------------

def test_analysis_notebook_on_postgresql(broker, pg, pg_url, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient
    rec = start_recorder(broker, pg_url)
    try:
        sent = session(broker, "nb01", n=8, shares_per_request=3)
        wait_for(lambda: pg_count(pg_url) == len(sent), 30, "the session recorded")
    finally:
        rec.p.send_signal(signal.SIGINT)
        assert rec.wait() == 0
    monkeypatch.setenv("MQBTT_DB", pg_url)
    monkeypatch.setenv("MQBTT_PAIR", "nb01")
    nb = nbformat.read(os.path.join(ROOT, "examples", "Analysis.ipynb"), as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": os.path.join(ROOT, "examples")}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert len([o for o in outputs if "image/png" in o.get("data", {})]) == 4
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"pair 'nb01', {len(sent)} messages" in text and "0 undecodable" in text
    assert re.search(r"median \d+\.\d ms", text)
    assert "postgresql://" in text and pg.password not in text


# -- mqbtt.pyz on CPython 3.10-3.13 -------------------------------------------------------

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]


def test_pyz_uses_compiled_psycopg_on_each_python(pg, pg_url, tmp_path):
    """mqbtt.pyz bundles psycopg-binary for each CPython: PostgreSQL
    recordings work from the pyz alone, with the C implementation."""
    import build_zipapp
    pyz = str(tmp_path / "mqbtt.pyz")
    build_zipapp.build(pyz, quiet=True)
    script = tmp_path / "probe.py"
    script.write_text(
        "import sys, psycopg, mqbtt\n"
        "with mqbtt.MQbtTDataBase(sys.argv[1]) as db:\n"
        "    db.insert(mqbtt.MQbtTRecord(pair_id='py' + sys.version.split()[0], subtopic='log',\n"
        "                                timestamp=1.0, payload=b'x'))\n"
        "    print(psycopg.pq.__impl__, db.count(), psycopg.__file__)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(SHIV_ROOT=str(tmp_path / "shiv"), PYTHONPATH="", PYTHONNOUSERSITE="1")
    for n, version in enumerate(PYTHONS, 1):
        py = pyenv_python(version)
        r = subprocess.run([py, "-I", pyz, "run", str(script), pg_url], capture_output=True, text=True,
                           env=env, timeout=120)
        assert r.returncode == 0, (version, r.stderr)
        impl, count, where = r.stdout.split()
        assert impl == "binary" and int(count) == n and str(tmp_path / "shiv") in where, r.stdout
        out = tmp_path / f"copy{n}.db"
        r = subprocess.run([py, "-I", pyz, "copy", pg_url, str(out)], capture_output=True, text=True,
                           env=env, timeout=120)
        assert r.returncode == 0 and f"{n} rows copied" in r.stderr, (version, r.stderr)
        assert pg.password not in r.stderr
    # where the compiled part cannot load, psycopg's pure-Python mode over the system's libpq5
    r = subprocess.run([py, "-I", pyz, "run", str(script), pg_url], capture_output=True, text=True,
                       env={**env, "PSYCOPG_IMPL": "python"}, timeout=120)
    assert r.returncode == 0 and r.stdout.split()[:2] == ["python", str(len(PYTHONS) + 1)], r.stderr


def test_recorder_when_postgresql_goes_away(broker, tmp_path):
    """The server stops under a running recorder: it exits 1 with one line;
    what it had not committed was not acknowledged, so after the server and
    the recorder are back, every message is stored."""
    own = LocalPostgres().start()
    try:
        url = own.create_db("away")
        env = {**os.environ, "PGPASSWORD": own.password}
        bare = url.replace(":" + own.password, "")
        cmd = ("--share", "g", "--client-id", "away-1")
        rec = start_recorder(broker, bare, *cmd, env=env)
        pub = mqbtt._paho_client(BrokerURI.parse(broker.uri), "pub-away", True)
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()
        try:
            pub.publish("mqbtt/p1/log", b"before", 1).wait_for_publish(10)
            wait_for(lambda: pg_count(url) == 1, 20, "the first message stored")
            own.stop("immediate")
            pub.publish("mqbtt/p1/log", b"while down", 1).wait_for_publish(10)
            assert rec.wait(60) == 1
            errors = [x for x in rec.err if "error" in x]
            assert len(errors) == 1 and errors[0].startswith("mqbtt record: error: ")
            assert "Traceback" not in "\n".join(rec.err) and own.password not in "\n".join(rec.err)
            r = run_cli("record", "--broker", broker.uri, "--db", bare, *cmd, env=env, timeout=60)
            assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr   # still down
            assert "cannot open the database" in r.stderr
            own._run(["pg_ctl", "-D", own.data, "-l", own.log_path, "-w", "start"])
            own.started = True
            rec = start_recorder(broker, bare, *cmd, env=env)       # the same command line
            wait_for(lambda: [bytes(m) for (m,) in pg_rows(url, "SELECT message FROM messages")]
                     == [b"before", b"while down"], 30, "the message sent while down")
            rec.p.send_signal(signal.SIGTERM)
            assert rec.wait() == 0
        finally:
            rec.kill()
            pub.disconnect()
            pub.loop_stop()
    finally:
        own.cleanup()


def test_copy_as_a_user_who_does_not_own_the_table(pg, pg_url, tmp_path):
    """A role with only INSERT/SELECT (not the owner) cannot drop the indices
    for a bulk load: the copy goes row by row instead, and still works."""
    MQbtTDataBase(pg_url).close()
    dbname = pg_url.rsplit("/", 1)[1]
    pg.psql("DROP ROLE IF EXISTS copier; CREATE ROLE copier LOGIN PASSWORD 'c0pier-secret'", dbname)
    pg.psql("GRANT SELECT, INSERT ON messages TO copier; GRANT USAGE ON SEQUENCE messages_id_seq "
            "TO copier; GRANT CREATE ON SCHEMA public TO copier", dbname)
    src = str(tmp_path / "src.db")
    make_sqlite(src, 1000, pairs=3)
    url = f"postgresql://copier:c0pier-secret@127.0.0.1:{pg.port}/{dbname}"
    assert mqbtt.copy(src, url, chunk=100) == (1000, 0)
    assert mqbtt.copy(src, url, chunk=100) == (0, 1000)
    n, digest = sqlite_digest(src)
    back = str(tmp_path / "back.db")
    assert mqbtt.copy(url, back) == (1000, 0)
    assert sqlite_digest(back) == (n, digest)
    other = str(tmp_path / "other.db")
    with MQbtTDataBase(other) as d:
        d.insert(MQbtTRecord(pair_id="new", subtopic="log", timestamp=5.0, payload=b"n"))
    pg.psql("REVOKE INSERT ON messages FROM copier", dbname)
    r = run_cli("copy", other, url + "?application_name=x")   # a reader without INSERT
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "permission denied" in r.stderr and "c0pier-secret" not in r.stderr
    assert pg_count(pg_url) == 1000 and pg_rows(pg_url, "SELECT count(*) FROM mqbtt_copies") == [(1,)]


def test_down_member_keeps_its_share_queued(flood_broker, pg, pg_url):
    """What the README promises about a group: while one of two members is
    down, the broker keeps dealing it messages, which wait in its session;
    they are stored when it comes back, not before."""
    env = {**os.environ, "PGPASSWORD": pg.password}
    url = pg_url.replace(":" + pg.password, "")
    a = start_recorder(flood_broker, url, "--share", "duo", "--client-id", "duo-a", env=env)
    b = start_recorder(flood_broker, url, "--share", "duo", "--client-id", "duo-b", env=env)
    b.p.send_signal(signal.SIGTERM)
    assert b.wait() == 0
    pub = mqbtt._paho_client(BrokerURI.parse(flood_broker.uri), "pub-duo", True)
    pub.connect("127.0.0.1", flood_broker.port)
    pub.loop_start()
    try:
        infos = [pub.publish(f"mqbtt/p{i % 10}/shr", b"duo %03d" % i, 1) for i in range(200)]
        wait_for(lambda: all(i._published for i in infos), 30, "the broker acknowledged")
        # Mosquitto deals the group's messages round robin, to b's queued session too
        wait_for(lambda: pg_count(pg_url) == 100, 30, "member a's half")
        while_down = pg_count(pg_url)
        assert while_down == 100                           # b's half is not in the database
        b = start_recorder(flood_broker, url, "--share", "duo", "--client-id", "duo-b", env=env)
        wait_for(lambda: pg_count(pg_url) >= 200, 30, "b's queued share")
        assert sorted(bytes(m) for (m,) in pg_rows(pg_url, "SELECT message FROM messages")) == \
            [b"duo %03d" % i for i in range(200)]
        print(f"\nmember a stored {while_down} of 200 while b was down; b stored the other "
              f"{200 - while_down} when it came back")
        for r in (a, b):
            r.p.send_signal(signal.SIGINT)
        assert [r.wait() for r in (a, b)] == [0, 0]
    finally:
        for r in (a, b):
            r.kill()
        pub.disconnect()
        pub.loop_stop()
