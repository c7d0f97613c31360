"""Review of issue 14 merged with 12 and 13: PostgreSQL recordings under info,
export, replay and copy; bad rows written by other tools; passwords.

Real parts only: the private PostgreSQL of conftest (initdb/pg_ctl),
a private Mosquitto (conftest), real ``python3 mqbtt.py`` subprocesses.
"""
import json
import os
import time

import psycopg
import pytest

import mqbtt
from mqbtt import MQbtTDataBase, MQbtTError, Request
from testlib import run_cli

SECRET = "Zq9SecretWord"


def bad_rows(url):
    """A recording with rows another tool wrote: NaN/infinite/huge times,
    an unknown subtopic, empty and garbage payloads, odd pair ids."""
    with MQbtTDataBase(url) as db:      # creates the table; closing must not raise
        assert db.backend == "postgresql"
    t = time.time()
    good = Request(timestamp_min=1, timestamp_max=2, nonce_start=1, nonce_size=4).to_bytes()
    rows = [(t, "p1", "srv", good), (t + 0.1, "p1", "esp", b"garbage\xff"),
            (t + 0.2, "p1", "log", b""), (t + 0.3, "p1", "shr", b"\xff\xfe"),
            (t, "p2", "xyz", b"hello"), (t, "", "shr", b"\x00\x01"),
            (t, "we ird\u202e\x1b[31m", "srv", b""),
            (float("nan"), "p3", "srv", good), (float("inf"), "p3", "esp", b"x"),
            (1e300, "p3", "log", b"x"), (-1e300, "p3", "shr", b"x"),
            (float("-inf"), "p3", "srv", b"x")]
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("ALTER TABLE messages DROP CONSTRAINT messages_subtopic_check")
        with c.cursor() as cur:
            cur.executemany("INSERT INTO messages (timestamp, pair_id, subtopic, message) "
                            "VALUES (%s, %s, %s, %s)", rows)
    return rows


def test_close_commit_and_bad_rows_on_postgresql(pg_url):
    rows = bad_rows(pg_url)
    db = MQbtTDataBase(pg_url)
    try:
        assert db.commit() == 0                  # was AttributeError: in_transaction
        recs = list(db.records())
        assert len(recs) == len(rows)
        assert sum(r.timestamp is None for r in recs) == 5
        assert list(db.records(pair_id="p3", desc=True))[0].timestamp is None
        assert len(list(db.logs())) == 2
        pairs = list(mqbtt.request_reply_pairs(db.records(pair_id="p3")))
        assert all(lat is None for _, _, lat in pairs)
        s = db.summary()
        assert s["p3"]["messages"] == 5 and s["p3"]["first"] is None and s["p3"]["last"] is None
        assert s["p1"]["first"] is not None
    finally:
        db.close()
    db.close()
    plan = mqbtt.replay_plan(pg_url, "p3")
    assert plan["messages"] == 5
    with pytest.raises(mqbtt.MQbtTNotFound) as e:
        mqbtt.replay_plan(pg_url, "p1", min_timestamp=1.0, max_timestamp=2.0)
    assert SECRET not in str(e.value) and "its messages go from" in str(e.value)


def test_info_and_export_cli_on_bad_postgresql_rows(pg_url):
    bad_rows(pg_url)
    r = run_cli("info", "--db", pg_url)
    assert r.returncode == 0, r.stderr
    assert "(no time)" in r.stdout and "12 messages" in r.stdout
    r = run_cli("info", "--json", "--db", pg_url)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)                 # strict JSON: no bare NaN
    assert info["pairs"]["p3"]["first"] is None and info["messages"] == 12
    r = run_cli("export", "--db", pg_url)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(lines) == 12 and sum(x["time"] is None for x in lines) == 5
    r = run_cli("export", "--format", "csv", "--db", pg_url)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 13, r.stderr
    assert pg_url.split(":")[2].split("@")[0] not in r.stdout + r.stderr   # the password


def test_replay_cli_of_rows_without_time(broker, pg_url):
    bad_rows(pg_url)
    got = []
    with mqbtt.MQbtTMiner(broker.uri, "p3") as miner:
        r = run_cli("replay", "--broker", broker.uri, "--db", pg_url, "--pid", "p3", timeout=120)
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not got:
            try:
                got.append(miner.receive_request(timeout=1))
            except Exception:
                pass
    assert got, "the request of p3 (NaN time) was not replayed"
    assert "***" in r.stdout + r.stderr and pg_url.split(":")[2].split("@")[0] not in r.stdout + r.stderr


@pytest.mark.parametrize("password", ["p@ss" + SECRET, "pa/ss" + SECRET, SECRET + "@", "x/" + SECRET])
def test_unencoded_password_never_shown(pg, password):
    url = f"postgresql://mqbtt:{password}@127.0.0.1:{pg.port}/postgres"
    for cmd in (["info", "--db", url], ["export", "--db", url],
                ["replay", "--broker", "mqtt://127.0.0.1:1", "--pid", "p", "--db", url],
                ["copy", url, os.devnull + ".r4-none.db"]):
        r = run_cli(*cmd, timeout=60)
        out = r.stdout + r.stderr
        assert r.returncode in (1, 2) and len(out.strip().splitlines()) == 1, (cmd, out)
        assert SECRET not in out and "Traceback" not in out, (cmd, out)
    with pytest.raises(MQbtTError) as e:
        MQbtTDataBase(url)
    assert SECRET not in str(e.value)


def test_copy_into_a_new_sqlite_file_then_incremental(pg, pg_url, tmp_path):
    a = pg_url
    with MQbtTDataBase(a) as db:
        for i in range(10):
            db.insert(mqbtt.MQbtTRecord(pair_id="a", subtopic="log", timestamp=1e9 + i,
                                        payload=b"line %d" % i))
    dst = str(tmp_path / "new.db")
    assert mqbtt.copy(a, dst) == (10, 0)         # was AttributeError (lazy SQLite creation)
    assert mqbtt.copy(a, dst) == (0, 10)
    with MQbtTDataBase(a) as db:
        for i in range(10, 13):
            db.insert(mqbtt.MQbtTRecord(pair_id="a", subtopic="log", timestamp=1e9 + i,
                                        payload=b"line %d" % i))
    assert mqbtt.copy(a, dst) == (3, 10)
    # a destination that already holds other rows: they stay, ours are added once
    other = pg.create_db("r4other")
    with MQbtTDataBase(other) as db:
        db.insert(mqbtt.MQbtTRecord(pair_id="b", subtopic="log", timestamp=5.0, payload=b"x"))
    r = run_cli("copy", dst, other)
    assert r.returncode == 0, r.stderr
    assert run_cli("copy", dst, other).returncode == 0
    with MQbtTDataBase(other) as db:
        assert db.count() == 14 and db.count("b") == 1 and db.count("a") == 13
    # the same database under other spellings is refused, in one line
    host_port = pg_url.split("@", 1)[1]
    for same in (pg_url.replace("postgresql://", "postgres://"),
                 pg_url.replace("127.0.0.1", "localhost"), pg_url + "?sslmode=disable"):
        r = run_cli("copy", pg_url, same)
        assert r.returncode == 1 and "same database" in r.stderr and host_port.split("/")[0] in r.stderr
        assert len(r.stderr.splitlines()) == 1 and pg.password not in r.stderr
    r = run_cli("copy", dst, str(tmp_path / ".." / tmp_path.name / "new.db"))
    assert r.returncode == 1 and "same database" in r.stderr


def test_sqlite_open_close_leaves_no_wal_and_a_moved_source_copies(pg_url, tmp_path):
    """The merge opened every existing SQLite file twice (one connection
    leaked): its WAL stayed behind and a renamed source gave 'disk I/O error'."""
    from test_postgres import make_sqlite
    a = str(tmp_path / "a.db")
    make_sqlite(a, 50, pairs=2)
    db = MQbtTDataBase(a)
    assert db.count() == 50
    db.close()
    assert sorted(os.listdir(tmp_path)) == ["a.db"]
    assert mqbtt.copy(a, pg_url) == (50, 0)
    assert sorted(os.listdir(tmp_path)) == ["a.db"]
    moved = str(tmp_path / "moved.db")
    os.rename(a, moved)
    assert mqbtt.copy(moved, pg_url) == (0, 50)


def test_record_share_and_pid_together_on_postgresql(broker, pg, pg_url):
    import signal
    from test_postgres import session
    from testlib import Proc, mqbtt_cmd, pg_rows, wait_for
    rec = Proc(mqbtt_cmd("record", "--broker", broker.uri, "--db", pg_url, "--share", "grp",
                         "--pid", "p1"))
    try:
        line = rec.wait_err(r"^mqbtt record: recording ")
        assert "$share/grp/mqbtt/p1/" in line and pg.password not in line
        sent = session(broker, "p1", n=3)
        session(broker, "p2", n=2)
        wait_for(lambda: len(pg_rows(pg_url)) >= len(sent), 30, "p1's messages")
        rec.p.send_signal(signal.SIGINT)
        assert rec.wait(30) == 0
    finally:
        rec.kill()
    assert {r[0] for r in pg_rows(pg_url)} == {"p1"}
    assert len(pg_rows(pg_url)) == len(sent)
    assert all(pg.password not in x for x in rec.err + rec.out)


def test_hostile_urls_one_line_no_secret_no_hang(pg, broker, tmp_path):
    import socket
    silent = socket.socket()            # accepts, never answers: the connect timeout ends it
    silent.bind(("127.0.0.1", 0))
    silent.listen(5)
    p = pg.port
    urls = [f"postgresql://mqbtt:{SECRET}@127.0.0.1:1/x",
            f"postgresql://mqbtt:{SECRET}@127.0.0.1:99999/x",
            f"postgresql://mqbtt:{SECRET}@127.0.0.1:abc/x",
            f"postgresql://mqbtt:{SECRET}@127.0.0.1:{p}/postgres?sslmode=require",
            f"postgresql://mqbtt:{SECRET}@127.0.0.1:{p}/postgres?sslmode=bogus",
            f"postgresql://mqbtt:{SECRET}@%2Fnonexistent%2Fdir:{p}/x",
            f"postgresql://mqbtt@127.0.0.1:{p}/x?password={SECRET}&host=/nonexistent",
            f"postgresql://mqbtt:{SECRET}@[::1]:{p}/x",
            f"postgresql://mqbtt:{SECRET}@[::1/x",
            f"postgresql://mqbtt:%zz{SECRET}@127.0.0.1:{p}/x",
            f"postgresql://mqbtt:{SECRET[:4]}%20{SECRET[4:]}@127.0.0.1:{p}/x",
            f"postgresql://mqbtt:{SECRET} x@127.0.0.1:{p}/x",
            f"postgresql://mqbtt:{SECRET}@127.0.0.1:{p},127.0.0.1:1/x",
            f"postgresql://mqbtt:{SECRET}@127.0.0.1:{p}/x?bogus=1",
            f"postgres://mqbtt:{SECRET}@127.0.0.1:{silent.getsockname()[1]}/x"]
    try:
        for url in urls:
            cmds = [["info", "--db", url], ["export", "--db", url],
                    ["replay", "--broker", broker.uri, "--pid", "p", "--db", url],
                    ["copy", url, str(tmp_path / "c.db")],
                    ["record", "--broker", broker.uri, "--db", url]]
            if url is urls[-1]:       # 10 s each: one command is enough
                cmds = cmds[:1]
            elif url not in (urls[0], urls[9], urls[11]):   # every command on a few
                cmds = cmds[:1]       # info on the others
            for cmd in cmds:
                t0 = time.monotonic()
                r = run_cli(*cmd, timeout=60)
                out = r.stdout + r.stderr
                assert r.returncode == 1, (cmd, out)
                assert len(out.strip().splitlines()) == 1 and "Traceback" not in out, (cmd, out)
                assert SECRET not in out and SECRET[4:] not in out, (cmd, out)
                assert time.monotonic() - t0 < 40
    finally:
        silent.close()
    assert not os.path.exists(tmp_path / "c.db")


def test_uppercase_scheme_connects(pg, pg_url):
    bad_rows(pg_url)
    url = "POSTGRESQL" + pg_url[len("postgresql"):]
    r = run_cli("info", "--db", url)
    assert r.returncode == 0 and "12 messages" in r.stdout, r.stderr
    assert pg.password not in r.stdout + r.stderr


def test_readers_never_create_the_table(pg, pg_url, broker, tmp_path):
    """info/export/replay/copy SRC on a database without recording: one line,
    and the database is left as it was (like a SQLite path that does not exist)."""
    for cmd, rc in ((["info", "--db", pg_url], 2), (["export", "--db", pg_url], 2),
                    (["replay", "--broker", broker.uri, "--pid", "p", "--db", pg_url], 2),
                    (["copy", pg_url, str(tmp_path / "d.db")], 1)):
        r = run_cli(*cmd)
        assert r.returncode == rc and "is not a recording" in r.stderr, (cmd, r.stderr)
        assert len(r.stderr.splitlines()) == 1 and pg.password not in r.stderr
    with psycopg.connect(pg_url) as c:
        assert c.execute("SELECT to_regclass('messages')").fetchone()[0] is None
    assert not os.path.exists(tmp_path / "d.db")
    with pytest.raises(mqbtt.MQbtTNotFound):
        mqbtt.open_recording(pg_url)


def test_record_into_a_new_sqlite_file(broker, tmp_path):
    """The merge made `mqbtt record --db NEW.db` fail ("no such database"):
    the recorder counted the rows of a file created only once connected."""
    import signal
    from test_postgres import session
    from testlib import Proc, mqbtt_cmd, wait_for
    path = str(tmp_path / "new.db")
    rec = Proc(mqbtt_cmd("record", "--broker", broker.uri, "--db", path))
    try:
        rec.wait_err(r"^mqbtt record: recording ")
        sent = session(broker, "n1", n=2)
        def stored():
            if not os.path.exists(path):
                return False
            with MQbtTDataBase(path) as db:
                return db.count() >= len(sent)
        wait_for(stored, 30, "the messages in the new file")
        rec.p.send_signal(signal.SIGINT)
        assert rec.wait(30) == 0
    finally:
        rec.kill()
    assert any(f", {len(sent)} in the database" in x for x in rec.err), rec.err


def test_copy_back_into_the_origin_adds_nothing(pg_url, tmp_path):
    """copy A B then copy B A used to double A (B's rows looked new to A)."""
    from test_postgres import make_sqlite
    a = str(tmp_path / "a.db")
    make_sqlite(a, 100, pairs=2)
    assert mqbtt.copy(a, pg_url) == (100, 0)
    assert mqbtt.copy(pg_url, a) == (0, 100)
    with psycopg.connect(pg_url, autocommit=True) as c:   # B grows (another recorder)
        c.execute("INSERT INTO messages (timestamp, pair_id, subtopic, message) "
                  "VALUES (2e9, 'new', 'log', '\\x00')")
    assert mqbtt.copy(pg_url, a) == (1, 100)
    assert mqbtt.copy(pg_url, a) == (0, 101)
    with MQbtTDataBase(a) as db:
        assert db.count() == 101 and db.count("new") == 1
    b = str(tmp_path / "b.db")
    assert mqbtt.copy(a, b) == (101, 0)
    assert mqbtt.copy(b, a) == (0, 101)


def unread_bytes_at(port):
    """The bytes received and not yet read by the established IPv4 TCP sockets
    listening-side on *port* (the rx_queue column of /proc/net/tcp)."""
    total = 0
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                total += int(fields[4].split(":")[1], 16)
    return total


def test_recorder_stops_when_postgresql_hangs(broker):
    """A server that stops answering (SIGSTOP) under a recorder: SIGINT used
    to wait for ever (and SIGTERM too); now the write is interrupted: one
    line, exit 1, and nothing is lost after the server and the recorder return."""
    import signal
    import subprocess
    from local_postgres import LocalPostgres
    from testlib import pg_rows, start_recorder, wait_for
    own = LocalPostgres().start()
    rec = None
    stopped = []
    try:
        url = own.create_db("hang")
        rec = start_recorder(broker, url, "--client-id", "hang-1")
        with mqbtt.MQbtTMiner(broker.uri, "h1") as m:
            m.send_log("before")
            wait_for(lambda: len(pg_rows(url)) == 1, 20, "the first message stored")
            ppid = int(open(os.path.join(own.data, "postmaster.pid")).readline())
            kids = subprocess.run(["ps", "-o", "pid=", "--ppid", str(ppid)], capture_output=True,
                                  text=True).stdout.split()
            for pid in [ppid, *map(int, kids)]:
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
            m.send_log("while stuck")
            # the recorder is now waiting for the server's answer: its write sits unread in
            # the stopped server's socket (SIGINT before that would find it idle)
            wait_for(lambda: unread_bytes_at(own.port) > 0, 60,
                     "the recorder's write to the stopped server")
        t0 = time.monotonic()
        rec.p.send_signal(signal.SIGINT)
        assert rec.wait(40) == 1
        assert time.monotonic() - t0 < 30
        err = "\n".join(rec.err)
        assert own.password not in err and "Traceback" not in err
        assert [x for x in rec.err if not x.startswith("mqbtt record: recording")] == [
            x for x in rec.err if x.startswith("mqbtt record: error: ")] and "did not answer" in err
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        stopped.clear()
        rec = start_recorder(broker, url, "--client-id", "hang-1")
        wait_for(lambda: {bytes(r[2]) for r in pg_rows(url)} == {b"before", b"while stuck"}, 30,
                 "the message sent while the server hung")
        rec.p.send_signal(signal.SIGTERM)
        assert rec.wait(30) == 0
        assert len(pg_rows(url)) <= 3     # at most the interrupted batch twice
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        if rec is not None:
            rec.kill()
        own.cleanup()
