"""Review 3 (issue 13 after the merge): regressions found in the merged code.

Real private Mosquitto brokers (conftest.py), real `python3 mqbtt.py ...`
subprocesses, real SQLite files (some written by "another tool": plain sqlite3).
"""
import json
import os
import sqlite3
import subprocess
import threading
import time

import pytest

import mqbtt
from mqbtt import Reply, Request, Kind
from testlib import ROOT, Proc, count_rows, mqbtt_cmd, publisher, wait_for
from testlib import run_cli as run


def assert_one_line(r, cmd, *needles, status=2):
    assert r.returncode == status, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"mqbtt {cmd}: error: "), r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


def foreign_db(path):
    """A recording written by another tool: no types, no NOT NULL, bad rows."""
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY, timestamp, pair_id, subtopic, message)")
    good = Request(timestamp_min=1, timestamp_max=2, nonce_start=3, nonce_size=4).to_bytes()
    rows = [(1.7e9, "p1", "srv", good), (1.7e9 + 1, "p1", "esp", b"\xff\xff"),
            ("not a time", "p1", "srv", good), (None, "p2", "log", b"x"),
            (1.7e9, None, "srv", good), (1.7e9, 5, "esp", b""), (1.7e9, "p3", "bogus", b""),
            (1.7e9, "p3", "srv", None), (1.7e9, "p3", "log", "text\x1b[31mred"),
            (1e300, "p4", "srv", good), (float("nan"), "p4", "srv", good), (-1e18, "p4", "srv", good),
            (1.7e9 + 2, "p\x1b[2Jx", "log", b"a\x1b]0;title\x07b\nc")]
    con.executemany("INSERT INTO messages (timestamp, pair_id, subtopic, message) VALUES (?, ?, ?, ?)",
                    rows)
    con.commit()
    con.close()


# -- record and copy into a new SQLite file (merge regressions) ---------------------------

def test_record_into_a_new_file(broker, tmp_path):
    """The merge made `record --db NEW.db` fail with "no such database" (the
    start-up count met the file created only by the first insert)."""
    db = tmp_path / "new.db"
    rec = Proc(mqbtt_cmd("record", "--broker", broker.uri, "--db", str(db), "--duration", "30"))
    try:
        rec.wait_err(r"^mqbtt record: recording ")
        pub = publisher(broker)
        try:
            pub.publish("mqbtt/alpha/srv", Request(nonce_size=1).to_bytes(), qos=2).wait_for_publish(10)
        finally:
            pub.loop_stop()
            pub.disconnect()
        wait_for(lambda: count_rows(str(db)) == 1, 20, "the message stored")
    finally:
        rec.p.send_signal(2)
        rec.p.wait(30)
    assert rec.p.returncode == 0, rec.err
    assert any(l.endswith("1 in the database") for l in rec.err), rec.err


def test_record_pid_with_share(broker, tmp_path):
    """`record --pid` combined with `--share`: only the named pair, via the group."""
    db = tmp_path / "s.db"
    rec = Proc(mqbtt_cmd("record", "--broker", broker.uri, "--db", str(db), "--share", "grp",
                         "--pid", "alpha", "--duration", "30"))
    try:
        line = rec.wait_err(r"^mqbtt record: recording ")
        assert "$share/grp/mqbtt/alpha/srv" in str(line) or any(
            "$share/grp/mqbtt/alpha/srv" in l for l in rec.err), rec.err
        assert not any("mqbtt/+/" in l for l in rec.err), rec.err
        pub = publisher(broker)
        try:
            for pid in ("beta", "alpha"):
                pub.publish(f"mqbtt/{pid}/srv", Request(nonce_size=2).to_bytes(), qos=2).wait_for_publish(10)
        finally:
            pub.loop_stop()
            pub.disconnect()
        wait_for(lambda: count_rows(str(db)) >= 1, 20, "alpha's message stored")
    finally:
        rec.p.send_signal(2)
        rec.p.wait(30)
    con = sqlite3.connect(db)
    assert con.execute("SELECT pair_id FROM messages").fetchall() == [("alpha",)]
    con.close()


def test_copy_into_a_new_sqlite_file(tmp_path):
    """`copy SRC NEW.db` crashed (AttributeError) after the merge."""
    src, dst = tmp_path / "src.db", tmp_path / "dst.db"
    with mqbtt.MQbtTDataBase(str(src)) as db:
        for i in range(3):
            db.insert(mqbtt.MQbtTRecord(timestamp=mqbtt._utc(1.7e9 + i), pair_id="a", subtopic="srv",
                                        payload=Request(nonce_size=i).to_bytes()))
    r = run("copy", str(src), str(dst))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "3 rows copied" in r.stderr
    assert count_rows(str(dst)) == 3
    r = run("copy", str(src), str(dst))   # idempotent
    assert r.returncode == 0 and "0 rows copied" in r.stderr, r.stderr
    assert count_rows(str(dst)) == 3


# -- hostile database paths -----------------------------------------------------------------

@pytest.mark.parametrize("cmd", [["info"], ["export"], ["export", "--format", "csv"],
                                 ["replay", "--pid", "a", "--broker", "mqtt://127.0.0.1:1"]])
def test_fifo_and_devices_are_refused_not_waited_on(tmp_path, cmd):
    """A FIFO made every reading command hang for ever (open() blocks)."""
    fifo = tmp_path / "pipe.db"
    os.mkfifo(fifo)
    for path in (str(fifo), "/dev/null", "/dev/zero"):
        r = run(*cmd, "--db", path, timeout=30)
        assert_one_line(r, cmd[0], "not a regular file")
    assert sorted(os.listdir(tmp_path)) == ["pipe.db"]


# -- databases written by another tool ------------------------------------------------------

def test_info_on_rows_of_another_tool(tmp_path):
    db = tmp_path / "other.db"
    foreign_db(db)
    before = db.read_bytes()
    r = run("info", "--db", str(db))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    lines = r.stdout.splitlines()
    assert "7 pairs, 13 messages" in lines[0]
    assert "\x1b" not in r.stdout
    p1 = next(l for l in lines if l.startswith("p1 "))
    # the text time is neither first nor last: the numeric ones are
    assert "2023-11-14T22:13:20.000000+00:00  2023-11-14T22:13:21.000000+00:00" in p1, p1
    p4 = next(l for l in lines if l.startswith("p4 "))
    assert p4.endswith("(no time)                         (no time)"), p4
    r = run("info", "--db", str(db), "--json")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    info = json.loads(r.stdout)
    assert info["messages"] == 13 and info["pairs"]["p2"]["first"] is None
    assert info["pairs"]["p1"]["last_timestamp"] == 1.7e9 + 1
    # reading changed nothing: not switched to WAL, no index added, no file left
    assert db.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["other.db"]


def test_export_on_rows_of_another_tool(tmp_path):
    db = tmp_path / "other.db"
    foreign_db(db)
    before = db.read_bytes()
    r = run("export", "--db", str(db))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    rows = [json.loads(l) for l in r.stdout.splitlines()]
    assert len(rows) == 13
    assert sum(1 for x in rows if x["time"] is None) == 5   # text, NULL, NaN, 1e300, -1e18
    assert {x["pair_id"] for x in rows} >= {None, 5, "p1"}
    assert "\x1b" not in r.stdout
    r = run("export", "--db", str(db), "--format", "csv")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    # no raw terminal escape or control character in CSV cells either
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout
    assert r"text\x1b[31mred" in r.stdout
    assert r"p\x1b[2Jx" in r.stdout
    assert len(r.stdout.splitlines()) == 14   # header + 13, the log line's \n escaped
    assert db.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["other.db"]


def test_export_csv_of_a_recorded_hostile_log_line(tmp_path):
    """A miner's log line with a terminal escape, recorded by mqbtt: CSV shows
    it escaped; JSON lines keep it (escaped by JSON)."""
    db = tmp_path / "rec.db"
    with mqbtt.MQbtTDataBase(str(db)) as d:
        d.insert(mqbtt.MQbtTRecord(timestamp=mqbtt._utc(1.7e9), pair_id="g1", subtopic="log",
                                   payload="boot \x1b[2J\x1b]8;;http://x\x07link\x9b1m".encode()))
    r = run("export", "--db", str(db), "--format", "csv")
    assert r.returncode == 0, r.stderr
    assert not any(c in r.stdout for c in "\x1b\x07\x9b"), repr(r.stdout)
    assert "boot " in r.stdout and "link" in r.stdout
    r = run("export", "--db", str(db))
    assert json.loads(r.stdout)["text"] == "boot \x1b[2J\x1b]8;;http://x\x07link\x9b1m"


def test_replay_on_rows_of_another_tool(broker, tmp_path):
    db = tmp_path / "other.db"
    foreign_db(db)
    before = db.read_bytes()
    # a time window on a pair with no usable time at all: one line, exit 2, before connecting
    for pid in ("p2", "p4"):
        r = run("replay", "--db", str(db), "--pid", pid, "--from", "0", "--broker", "mqtt://127.0.0.1:1")
        assert_one_line(r, "replay", "no message with a usable time")
    r = run("replay", "--db", str(db), "--pid", "p1", "--from", "2000000000",
            "--broker", "mqtt://127.0.0.1:1")
    assert_one_line(r, "replay", "its messages go from 2023-11-14T22:13:20")
    # an unknown pair lists the pairs, a NULL and a number among them
    r = run("replay", "--db", str(db), "--pid", "nope", "--broker", "mqtt://127.0.0.1:1")
    assert_one_line(r, "replay", "its pairs: None, 5, ")
    assert "\x1b" not in r.stderr
    # p1: all three published (the text-timed one without a pause); p4's three too
    got = []
    sub = publisher(broker)
    sub.on_message = lambda c, u, m: got.append(m.topic)
    subscribed = threading.Event()
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.subscribe("mqbtt/p1/#", 1)
    try:
        assert subscribed.wait(60), "no SUBACK"   # not subscribed yet: a replay would be lost
        for pid, speed in (("p1", "0"), ("p4", "1"), ("p1", "1000")):
            r = run("replay", "--db", str(db), "--pid", pid, "--to-pid", "p1", "--speed", speed,
                    "--broker", broker.uri)
            assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
            assert "3 messages published" in r.stderr.splitlines()[-1], r.stderr
        wait_for(lambda: len(got) == 9, 20, "nine messages")
    finally:
        sub.loop_stop()
        sub.disconnect()
    assert sorted(got) == ["mqbtt/p1/esp"] * 2 + ["mqbtt/p1/srv"] * 7
    assert db.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["other.db"]


def test_library_summary_and_export_rows_on_bad_rows(tmp_path):
    db = tmp_path / "other.db"
    foreign_db(db)
    with mqbtt.open_recording(str(db)) as d:
        assert d.read_only
        s = d.summary()
        assert list(s)[:1] == ["p\x1b[2Jx"] and set(s) >= {None, 5}
        assert s["p4"]["first"] is None and s["p1"]["last"].timestamp() == 1.7e9 + 1
        rows = list(d.export_rows())
        assert len(rows) == 13
    assert mqbtt.replay_plan(str(db), "p2")["messages"] == 1
    with pytest.raises(mqbtt.MQbtTNotFound, match="usable time"):
        mqbtt.replay_plan(str(db), "p2", min_timestamp=0)


# -- dump --pid + with request-id pairing ---------------------------------------------------

def test_dump_every_pair_pairs_replies_by_pair_and_request_id(broker):
    """Two pairs use the same request ids, interleaved: each reply's RTT is
    measured from its own pair's request, and each line names its pair."""
    dump = Proc(mqbtt_cmd("dump", "--broker", broker.uri, "--pid", "+", "--mode", "optimizer",
                          "--json", "--count", "4", "--duration", "60"))
    pub = publisher(broker)
    try:
        # dump says it listens once subscribed (a probe published until it showed could
        # print more probe lines afterwards, taken for the replies)
        dump.wait_err(r"^mqbtt dump: listening ", 60)
        n0 = len(dump.out)
        pub.publish("mqbtt/a/srv", Request(nonce_size=1, request_id=7).to_bytes(), qos=1).wait_for_publish(10)
        time.sleep(1.0)     # the data: a's request 1 s before b's (a margin for a loaded dump)
        pub.publish("mqbtt/b/srv", Request(nonce_size=2, request_id=7).to_bytes(), qos=1).wait_for_publish(10)
        time.sleep(0.3)
        pub.publish("mqbtt/b/esp", Reply(kind=Kind.RESULT, request_id=7).to_bytes(), qos=1).wait_for_publish(10)
        pub.publish("mqbtt/a/esp", Reply(kind=Kind.RESULT, request_id=7).to_bytes(), qos=1).wait_for_publish(10)
        wait_for(lambda: len(dump.out) >= n0 + 2, 20, "two replies")
    finally:
        pub.loop_stop()
        pub.disconnect()
        dump.p.terminate()
        dump.p.wait(30)
    lines = [json.loads(l) for l in dump.out[n0:n0 + 2]]
    assert [(x["pair_id"], x["topic"]) for x in lines] == [("b", "mqbtt/b/esp"), ("a", "mqbtt/a/esp")]
    rb, ra = lines[0]["rtt"], lines[1]["rtt"]
    # a's request went out ~1 s before b's: a's RTT is the longer one
    assert ra > rb + 0.5, (ra, rb)


def test_info_on_a_recording_in_a_read_only_directory(tmp_path):
    """`info` on a WAL recording in a directory the user cannot write said
    "is not a recording (attempt to write a readonly database)"."""
    import shutil
    import tempfile
    d = tempfile.mkdtemp(prefix="mqbtt-r3-ro-")
    try:
        path = os.path.join(d, "traffic.db")
        with mqbtt.MQbtTDataBase(path) as db:   # mqbtt's own recording: WAL mode
            db.insert(mqbtt.MQbtTRecord(timestamp=mqbtt._utc(1.7e9), pair_id="g1", subtopic="log",
                                        payload=b"hello"))
        assert sorted(os.listdir(d)) == ["traffic.db"]
        os.chmod(path, 0o644)
        os.chmod(d, 0o555)
        # /usr/bin/python3: info needs no third-party package; "nobody" cannot write d
        out = subprocess.run(["runuser", "-u", "nobody", "--", "/usr/bin/python3",
                              os.path.join(ROOT, "mqbtt.py"), "info", "--db", path],
                             capture_output=True, text=True, timeout=60, cwd="/")
        assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
        assert "1 pair, 1 message" in out.stdout and "\ng1 " in out.stdout, out.stdout
        assert sorted(os.listdir(d)) == ["traffic.db"]
    finally:
        os.chmod(d, 0o755)
        shutil.rmtree(d, ignore_errors=True)


def test_postgresql_commit_and_copy_to_a_new_sqlite_file(pg_url, tmp_path):
    """After the merge, MQbtTDataBase.commit() on PostgreSQL read
    `in_transaction`, which _PGConnection lacked: every insert/copy crashed."""
    with mqbtt.MQbtTDataBase(pg_url) as db:
        db.insert(mqbtt.MQbtTRecord(timestamp=mqbtt._utc(1.7e9), pair_id="g1", subtopic="srv",
                                    payload=Request(nonce_size=3).to_bytes()))
        assert db.commit() == 1
        assert not db._conn.in_transaction
        assert db.count() == 1
    back = tmp_path / "back.db"
    r = run("copy", pg_url, str(back))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "1 rows copied" in r.stderr and count_rows(str(back)) == 1
    r = run("info", "--db", pg_url)
    assert r.returncode == 0 and "1 pair, 1 message" in r.stdout, r.stderr
    assert pg_url.split("@")[0].split(":")[-1] not in r.stdout + r.stderr   # no password
