"""Tests of issue 4: recording (MQbtTDataBase, MQbtTRecord, mqbtt record),
dump, replay, examples/db2logs.py and examples/Analysis.ipynb.

Everything goes through real private Mosquitto brokers (conftest.py) and real
subprocesses for the command line.
"""
import datetime
import json
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
from mqbtt import MQbtTDataBase, MQbtTDatabase, MQbtTRecord, Request, Share
from testlib import ROOT, Proc, count_rows, mqbtt_cmd, publisher, rows, session, start_recorder, wait_for

UTC = datetime.timezone.utc


# -- helpers ----------------------------------------------------------------------

def run_recorder_thread(broker, db, **kw):
    rec = mqbtt.Recorder(broker.uri, str(db), **kw)
    t = threading.Thread(target=rec.run, daemon=True)
    t.start()
    wait_for(lambda: rec._conn is not None and rec._conn.subscribed, what="recorder subscribed")
    return rec, t


def stop_recorder_thread(rec, t):
    rec.stop()
    t.join(10)
    assert not t.is_alive()


# -- MQbtTDataBase / MQbtTRecord (no broker) ------------------------------------------------

DOCUMENTED_SCHEMA = """CREATE TABLE messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    timestamp REAL NOT NULL,
    pair_id TEXT NOT NULL,
    subtopic TEXT NOT NULL CHECK (subtopic IN ('esp', 'log', 'shr', 'srv')),
    message BLOB NOT NULL
)"""


def rec(pair, sub, ts, payload):
    return MQbtTRecord(pair_id=pair, subtopic=sub, payload=payload,
                       timestamp=datetime.datetime.fromtimestamp(ts, UTC))


class TestDataBase:
    def test_schema_wal_alias(self, tmp_path):
        path = str(tmp_path / "t.db")
        assert MQbtTDatabase is MQbtTDataBase
        with MQbtTDatabase(path) as db:
            db.insert(rec("a", "log", 1000.0, b"x"))
        con = sqlite3.connect(path)
        sql = con.execute("SELECT sql FROM sqlite_master WHERE name='messages'").fetchone()[0]
        assert re.sub(r"\s+", " ", sql) == re.sub(r"\s+", " ", DOCUMENTED_SCHEMA)
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        indices = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='index' "
                                              "AND name LIKE 'messages_%'")}
        assert indices == {"messages_timestamp", "messages_pair_timestamp",
                           "messages_pair_subtopic_timestamp"}
        assert con.execute("SELECT timestamp, pair_id, subtopic, message FROM messages").fetchall() \
            == [(1000.0, "a", "log", b"x")]

    def test_batching_by_size_and_timeout(self, tmp_path):
        path = str(tmp_path / "t.db")
        with MQbtTDataBase(path, batch_size=3, batch_timeout=60) as db:
            db.insert(rec("a", "log", 1, b"1"))
            db.insert(rec("a", "log", 2, b"2"))
            assert count_rows(path) == 0          # another connection sees nothing yet
            db.insert(rec("a", "log", 3, b"3"))
            assert count_rows(path) == 3          # the third insert committed the batch
            db.insert(rec("a", "log", 4, b"4"))
        assert count_rows(path) == 4              # close() commits the rest
        # a batch_timeout long enough that the count right after the insert
        # cannot come after the timer on a loaded machine
        with MQbtTDataBase(path, batch_size=100, batch_timeout=3.0) as db:
            t0 = time.monotonic()
            db.insert(rec("a", "log", 5, b"5"))
            assert count_rows(path) == 4
            wait_for(lambda: count_rows(path) == 5, 60, "the batch_timeout commit")
            assert time.monotonic() - t0 >= 2.9   # committed by the timer, not at once
        with pytest.raises(ValueError):
            MQbtTDataBase(path, batch_size=0)

    def test_filters(self, tmp_path, monkeypatch):
        path = str(tmp_path / "t.db")
        t0 = 1_700_000_000.0
        with MQbtTDataBase(path) as db:
            for i in range(10):
                db.insert(rec("p1" if i % 2 == 0 else "p2", ["srv", "esp", "shr", "log"][i % 4],
                              t0 + i, f"m{i}".encode()))
        with MQbtTDataBase(path) as db:
            all_ = list(db.records())
            assert [r.payload for r in all_] == [f"m{i}".encode() for i in range(10)]
            assert [r.id for r in all_] == list(range(1, 11))
            assert all(r.timestamp.tzinfo is not None and r.timestamp.utcoffset().total_seconds() == 0
                       for r in all_)
            assert all_[3].timestamp == datetime.datetime.fromtimestamp(t0 + 3, UTC)
            assert [r.payload for r in db.records(pair_id="p1")] == [b"m0", b"m2", b"m4", b"m6", b"m8"]
            assert [r.payload for r in db.records(subtopic="shr")] == [b"m2", b"m6"]
            assert [r.payload for r in db.records(pair_id="p2", subtopic="esp")] == [b"m1", b"m5", b"m9"]
            lo = datetime.datetime.fromtimestamp(t0 + 3, UTC)
            hi = datetime.datetime.fromtimestamp(t0 + 6, UTC).astimezone(
                datetime.timezone(datetime.timedelta(hours=5)))   # any zone works
            assert [r.payload for r in db.records(min_timestamp=lo, max_timestamp=hi)] \
                == [b"m3", b"m4", b"m5", b"m6"]
            # a naive datetime is local time
            naive = datetime.datetime.fromtimestamp(t0 + 8)
            assert [r.payload for r in db.records(min_timestamp=naive)] == [b"m8", b"m9"]
            assert [r.payload for r in db.records(desc=True)][:3] == [b"m9", b"m8", b"m7"]
            gen = db.records(pair_id="p1")
            assert iter(gen) is gen                 # a generator, consumed lazily
            assert next(gen).payload == b"m0"
            gen.close()
            with pytest.raises(ValueError):
                list(db.records(subtopic="xyz"))

    def test_logs_text_is_plain_substring(self, tmp_path):
        path = str(tmp_path / "t.db")
        lines = ["100% done", "100 done", "a_b", "axb", "it's", "say \"hi\"", "Robert'); DROP TABLE messages;--",
                 "ünïcode line"]
        with MQbtTDataBase(path) as db:
            for i, line in enumerate(lines):
                db.insert(rec("p", "log", 100 + i, line.encode()))
            db.insert(rec("q", "log", 200, b"100% other pair"))
            db.insert(rec("p", "shr", 300, b"100% not a log"))
            def texts(**kw):
                return [r.message for r in db.logs(pair_id="p", **kw)]
            assert texts(text="%") == ["100% done"]
            assert texts(text="_") == ["a_b"]
            assert texts(text="'") == ["it's", "Robert'); DROP TABLE messages;--"]
            assert texts(text='"') == ['say "hi"']
            assert texts(text="ünï") == ["ünïcode line"]
            assert texts(text="done", desc=True) == ["100 done", "100% done"]
            assert texts(text="DONE") == []
            assert [r.message for r in db.logs(text="100%")] == ["100% done", "100% other pair"]
            assert len(texts()) == len(lines)
            assert texts(min_timestamp=105, max_timestamp=106) == lines[5:7]
        assert count_rows(path) == len(lines) + 2

    def test_bad_rows_yield_none(self, tmp_path):
        path = str(tmp_path / "t.db")
        good = Share(diff=3.5, job_id="ab")
        with MQbtTDataBase(path) as db:
            db.insert(rec("p", "shr", 1, b"\xff\xff\xff"))          # not protobuf
            db.insert(rec("p", "esp", 2, b"\x08\x09"))  # kind 9
            db.insert(rec("p", "srv", 3, b"\x0a"))                 # truncated
            db.insert(rec("p", "shr", 4, good.to_bytes()))
            db.insert(rec("p", "log", 5, b"caf\xe9 \xff"))          # invalid UTF-8
        con = sqlite3.connect(path)
        con.execute("INSERT INTO messages (timestamp, pair_id, subtopic, message) "
                    "VALUES (6, 'p', 'log', 'text, not a blob')")  # written by another tool
        con.commit()
        con.close()
        with MQbtTDataBase(path) as db:
            got = list(db.records())
        assert [r.message for r in got[:3]] == [None, None, None]
        assert got[0].payload == b"\xff\xff\xff"                   # byte-exact
        assert got[3].message == good
        assert got[4].message == "caf\ufffd \ufffd"                # log: replacement characters
        assert got[5].message == "text, not a blob" and got[5].payload == b"text, not a blob"
        r = MQbtTRecord(id=7, pair_id="p", subtopic="srv", timestamp=datetime.datetime.now(UTC),
                        payload=b"junk\xff")
        assert r.message is None
        with pytest.raises(dataclasses_FrozenInstanceError()):
            r.pair_id = "x"
        with pytest.raises(TypeError):
            MQbtTRecord("p", "srv")  # keyword-only

    def test_reader_while_writer_holds_a_transaction(self, tmp_path):
        path = str(tmp_path / "t.db")
        writer = MQbtTDataBase(path, batch_size=1000, batch_timeout=60)
        writer.insert(rec("p", "log", 1, b"a"))
        writer.commit()
        writer.insert(rec("p", "log", 2, b"b"))     # an open write transaction
        with MQbtTDataBase(path) as reader:        # opening and reading do not block
            assert [r.payload for r in reader.records()] == [b"a"]
        writer.close()


def dataclasses_FrozenInstanceError():
    import dataclasses
    return dataclasses.FrozenInstanceError


# -- recording through a real broker --------------------------------------------------------

def test_record_query_db2logs(broker, tmp_path):
    db = tmp_path / "traffic.db"
    recorder = start_recorder(broker, db)
    sent = session(broker, "gamma01", n=4)
    session(broker, "other", n=1)
    wait_for(lambda: count_rows(str(db)) == len(sent) + 5, what="all messages recorded")
    recorder.p.send_signal(signal.SIGINT)
    assert recorder.wait() == 0
    assert recorder.err[-1].startswith("mqbtt record: stopped: 25 messages recorded")
    assert not any("Traceback" in line for line in recorder.err)

    with MQbtTDataBase(str(db)) as d:
        got = list(d.records(pair_id="gamma01"))
        logs = list(d.logs(pair_id="gamma01"))
    # per subtopic the order is the publishing order; payloads are byte-exact
    for sub in ("srv", "esp", "shr", "log"):
        assert [r.payload for r in got if r.subtopic == sub] == [p for s, p in sent if s == sub]
    assert [type(r.message).__name__ for r in got if r.subtopic != "log"] == \
        [{"srv": "Request", "esp": "Reply", "shr": "Share"}[r.subtopic] for r in got if r.subtopic != "log"]
    assert all(isinstance(r.message, str) for r in logs) and len(logs) == 4

    env = dict(os.environ, TZ="XXX-2")  # POSIX TZ: UTC+2 with no DST
    out = subprocess.run([sys.executable, "examples/db2logs.py", str(db), "gamma01"], cwd=ROOT,
                         capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 4
    for line, r in zip(lines, logs):
        local = r.timestamp.astimezone(datetime.timezone(datetime.timedelta(hours=2)))
        assert line == f"{local:%Y-%m-%d %H:%M:%S}+0200 {r.message}"
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\+0200 I \(\d+\) mqbtt_protocol: .*", line)
    print("\n".join(lines))
    bad = subprocess.run([sys.executable, "examples/db2logs.py", str(tmp_path / "nope.db"), "x"],
                         cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert bad.returncode == 1 and "no such database" in bad.stderr
    assert not (tmp_path / "nope.db").exists()


def test_exclude_and_client_id(broker, tmp_path):
    db = tmp_path / "t.db"
    recorder = start_recorder(broker, db, "--exclude", "log,shr", "--client-id", "my-recorder")
    assert "mqbtt/+/srv, mqbtt/+/esp from" in recorder.err[0]
    assert "client id my-recorder" in recorder.err[0]
    sent = session(broker, "p", n=2)
    wait_for(lambda: count_rows(str(db)) == 4, what="srv and esp recorded")
    recorder.p.send_signal(signal.SIGTERM)
    assert recorder.wait() == 0
    assert sorted({r[1] for r in rows(str(db))}) == ["esp", "srv"]
    assert len(sent) == 2 * 5
    a = mqbtt.recorder_client_id(broker.uri, str(db))
    assert a == mqbtt.recorder_client_id(broker.uri, str(db))
    assert a != mqbtt.recorder_client_id(broker.uri, str(tmp_path / "other.db"))
    assert a == mqbtt.recorder_client_id(broker.uri, os.path.relpath(str(db)))


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_flood_zero_loss(flood_broker, tmp_path, how):
    """Stop the recorder in the middle of a flood, restart it with the same
    command line: every QoS>=1 message is in the database."""
    broker, db = flood_broker, str(tmp_path / "flood.db")
    n = 4000
    recorder = start_recorder(broker, db)
    expected = set()
    published = [0]
    pub = publisher(broker)
    infos = []
    signalled = threading.Event()

    def flood():
        for i in range(n):
            if i == n // 2:
                # a slow recorder (loaded machine) must still be stopped mid-flood:
                # the second half is published only once the signal is sent
                signalled.wait(120)
            sub = ("log", "shr", "srv", "esp")[i % 4]
            payload = b"%s-%06d-\x00\xff" % (sub.encode(), i)   # undecodable bytes on purpose
            infos.append(pub.publish(f"mqbtt/pair{i % 10}/{sub}", payload, mqbtt.SUBTOPICS[sub]))
            published[0] = i + 1
            if i % 4 == 3:
                time.sleep(0.002)   # a steady stream of ~1500 messages/s
    for i in range(n):
        sub = ("log", "shr", "srv", "esp")[i % 4]
        expected.add((f"pair{i % 10}", sub, b"%s-%06d-\x00\xff" % (sub.encode(), i)))
    t = threading.Thread(target=flood)
    t.start()
    try:
        wait_for(lambda: count_rows(db) >= 600, 120, "600 messages recorded")
        recorder.p.send_signal(getattr(signal, how))
        at_signal = published[0]
        signalled.set()
        rc = recorder.wait(60)
        assert rc == (-9 if how == "SIGKILL" else 0), recorder.err
        assert at_signal < n, "the signal must arrive during the flood"
        first_run = count_rows(db)
        recorder = start_recorder(broker, db)          # the same command line
        t.join(120)
        assert not t.is_alive()
        wait_for(lambda: all(info._published for info in infos), 120,
                 "the broker to acknowledge the whole flood")
        wait_for(lambda: len({(p, s, m) for p, s, m, _ in rows(db)}) >= n, 120,
                 "every message recorded after the restart")
        recorder.p.send_signal(signal.SIGINT)
        assert recorder.wait(60) == 0
    finally:
        signalled.set()
        recorder.kill()
        pub.disconnect()
        pub.loop_stop()
    stored = [(p, s, m) for p, s, m, _ in rows(db)]
    distinct = set(stored)
    duplicates = len(stored) - len(distinct)
    print(f"\n{how}: published {n} (QoS 1 and 2), signal after {at_signal} published and "
          f"{first_run} stored by the first run; stored {len(stored)} rows, "
          f"{len(distinct)} distinct, lost {len(expected - distinct)}, duplicates {duplicates}")
    assert distinct == expected                     # zero lost, byte-exact, nothing else
    if how == "SIGKILL":
        # what the killed run had committed but the broker had not yet seen acknowledged:
        # one or two commit batches of 10 as a rule; Mosquitto 2.0 lets each late PUBACK
        # release up to 20 more messages (bench/inflight_window.py), so a kill during a
        # flood can find a few more batches in flight (0-40 in 43 kills, test_postgres). A
        # recorder that acknowledged only at its stop would duplicate all it stored.
        assert duplicates <= 100
    else:
        assert duplicates == 0                      # a clean stop acknowledges what it stored


# -- dump ---------------------------------------------------------------------------------

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}[+-]\d{4}"


def test_dump_text_json_and_rtt(broker):
    text = Proc(mqbtt_cmd("dump", "--broker", broker.uri, "--pid", "d1", "--mode", "optimizer",
                          "--count", "4"))
    js = Proc(mqbtt_cmd("dump", "--broker", broker.uri, "--pid", "d1", "--mode", "optimizer",
                        "--json", "--count", "4"))
    miner_dump = Proc(mqbtt_cmd("dump", "--broker", broker.uri, "--pid", "d1", "--mode", "miner",
                                "--count", "2"))
    log_dump = Proc(mqbtt_cmd("dump", "--broker", broker.uri, "--pid", "d1", "--mode", "log",
                              "--json", "--count", "2"))
    for p in (text, js, miner_dump, log_dump):
        p.wait_err(r"^mqbtt dump: listening to mqbtt/d1/")
    sent = session(broker, "d1", n=2, shares_per_request=1)
    assert len(sent) == 8
    for p in (text, js, miner_dump, log_dump):
        assert p.wait() == 0, p.err
    # text: receive time, subtopic, decoded message; replies carry the RTT
    # (a QoS 2 reply reaches a subscriber one round trip later than a QoS 1
    # share, so only the order within a subtopic is fixed)
    assert sorted(line.split(" ")[2] for line in text.out) == ["esp", "esp", "shr", "shr"]
    for line in text.out:
        assert re.match(STAMP + " (shr Share\\(|esp Reply\\()", line), line
    rtts = [float(m.group(1)) for m in (re.search(r"  rtt=(\d+\.\d) ms$", x) for x in text.out) if m]
    assert len(rtts) == 2 and all(0 <= r < 5000 for r in rtts)
    esp = [x for x in text.out if " esp " in x]
    assert "esp Reply(kind=<Kind.HELLO: 0>, num_shares=10004, new_block=True)  rtt=" in esp[0]
    assert "esp Reply(kind=<Kind.RESULT: 1>, num_shares=1020104, new_block=False)  rtt=" in esp[1]
    # JSON lines
    objs = [json.loads(x) for x in js.out]
    replies = [o for o in objs if o["subtopic"] == "esp"]
    shares = [o for o in objs if o["subtopic"] == "shr"]
    assert len(replies) == 2 and len(shares) == 2
    assert replies[0]["type"] == "Reply" and replies[0]["message"] == \
        {"kind": "HELLO", "num_shares": 10004, "new_block": True}
    assert all(0 < o["rtt"] < 5 for o in replies) and "rtt" not in shares[0]
    assert shares[0]["type"] == "Share" and shares[0]["message"]["prev_block"] == "00" * 32
    assert bytes.fromhex(replies[1]["payload"]) == sent[7][1]
    # the miner receives the requests, the log receiver the log lines
    assert [re.sub("^" + STAMP + " ", "", x) for x in miner_dump.out] == \
        [f"srv {Request.from_bytes(p)!r}" for s, p in sent if s == "srv"]
    assert [json.loads(x)["message"] for x in log_dump.out] == \
        [p.decode() for s, p in sent if s == "log"]


def test_dump_hex_and_quiet_ctrl_c(broker):
    d = Proc(mqbtt_cmd("dump", "--broker", broker.uri, "--pid", "d2", "--mode", "optimizer"))
    d.wait_err("listening")
    pub = publisher(broker)
    pub.publish("mqbtt/d2/shr", b"\xff\x00bad", 1).wait_for_publish(10)
    line = wait_for(lambda: d.out and d.out[0], what="the dump line")
    assert re.fullmatch(STAMP + r" shr undecodable 5 bytes: ff0062616[4]", line), line
    pub.disconnect()
    pub.loop_stop()
    d.p.send_signal(signal.SIGINT)
    assert d.wait() == 0
    assert not any("Traceback" in x for x in d.err), d.err


def test_cli_errors(broker, tmp_path):
    def run(*args):
        return subprocess.run(mqbtt_cmd(*args), cwd=ROOT, capture_output=True, text=True, timeout=30)
    r = run("record", "--broker", broker.uri, "--db", str(tmp_path / "x.db"), "--exclude", "log,foo")
    assert r.returncode == 2 and "unknown subtopic 'foo'" in r.stderr
    r = run("record", "--broker", broker.uri, "--db", str(tmp_path / "x.db"), "--exclude", "esp,log,shr,srv")
    assert r.returncode == 2 and "nothing to record" in r.stderr
    r = run("record", "--broker", broker.uri)
    assert r.returncode == 2 and "--db" in r.stderr
    r = run("dump", "--broker", broker.uri, "--pid", "x", "--mode", "boss")
    assert r.returncode == 2
    r = run("replay", "--broker", broker.uri, "--db", str(tmp_path / "none.db"), "--pid", "x")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == \
        f"mqbtt replay: error: no such database: {tmp_path / 'none.db'}"
    r = run("replay", "--broker", broker.uri, "--db", "x.db", "--pid", "x", "--speed", "-1")
    assert r.returncode == 2
    r = run("record", "--broker", "mqtt://127.0.0.1:1", "--db", str(tmp_path / "y.db"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("mqbtt record: error: cannot connect to")
    assert "replay" in mqbtt.COMMANDS


# -- replay -------------------------------------------------------------------------------

def test_replay_reproduces_sequence_and_timing(broker, tmp_path):
    db = tmp_path / "r.db"
    rec, t = run_recorder_thread(broker, db)
    try:
        sent = session(broker, "orig", n=4, shares_per_request=1, gap=0.5)
        wait_for(lambda: count_rows(str(db)) == len(sent), what="the original recorded")
        r = subprocess.run(mqbtt_cmd("replay", "--broker", broker.uri, "--db", str(db), "--pid", "orig",
                                     "--to-pid", "copy", "--speed", "2"),
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stderr.splitlines()[-1] == f"mqbtt replay: {len(sent)} messages published"
        wait_for(lambda: count_rows(str(db)) == 2 * len(sent), what="the replay recorded")
    finally:
        stop_recorder_thread(rec, t)
    with MQbtTDataBase(str(db)) as d:
        orig = list(d.records(pair_id="orig"))
        copy = list(d.records(pair_id="copy"))
    assert [(r.subtopic, r.payload) for r in copy] == [(r.subtopic, r.payload) for r in orig]
    t_o = [(r.timestamp - orig[0].timestamp).total_seconds() for r in orig]
    t_c = [(r.timestamp - copy[0].timestamp).total_seconds() for r in copy]
    assert t_o[-1] > 1.5                                    # four 0.5 s gaps
    for a, b in zip(t_o, t_c):
        assert abs(a / 2 - b) < 0.2, (a, b)                 # the same timing at speed 2


# -- the notebook -------------------------------------------------------------------------

def test_analysis_notebook_executes(broker, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient
    db = tmp_path / "nb.db"
    rec, t = run_recorder_thread(broker, db)
    try:
        sent = session(broker, "nb01", n=8, shares_per_request=3)
        wait_for(lambda: count_rows(str(db)) == len(sent), what="the session recorded")
    finally:
        stop_recorder_thread(rec, t)
    monkeypatch.setenv("MQBTT_DB", str(db))
    monkeypatch.setenv("MQBTT_PAIR", "nb01")
    nb = nbformat.read(os.path.join(ROOT, "examples", "Analysis.ipynb"), as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": os.path.join(ROOT, "examples")}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 4
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"pair 'nb01', {len(sent)} messages" in text and "0 undecodable" in text
    assert re.search(r"median \d+\.\d ms", text)
    nbformat.write(nb, str(tmp_path / "Analysis.executed.ipynb"))


# -- regressions from review ---------------------------------------------------------------

def test_dump_line_escapes_control_characters():
    line = mqbtt.format_dump(0.0, "log", b"first\nsecond\r\x1b[2Jthird")
    assert "\n" not in line and "\x1b" not in line and r"first\nsecond\r\x1b[2Jthird" in line
    obj = json.loads(mqbtt.format_dump(0.0, "shr", mqbtt.Share(diff=float("nan")).to_bytes(),
                                       as_json=True))
    assert obj["message"]["diff"] == "nan"


def test_abandoned_records_generator_after_close_is_silent(tmp_path):
    db = tmp_path / "g.db"
    with mqbtt.MQbtTDataBase(str(db)) as d:
        for i in range(3):
            d.insert(mqbtt.MQbtTRecord(pair_id="p", subtopic="log", timestamp=i, payload=b"x"))
    code = ("import mqbtt\n"
            f"with mqbtt.MQbtTDataBase({str(db)!r}) as db:\n"
            "    it = db.records()\n"
            "    for r in it:\n"
            "        break\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0 and r.stderr == ""


def test_recorder_client_id_for_a_non_utf8_path(tmp_path):
    path = os.fsdecode(os.fsencode(str(tmp_path)) + b"/\xff.db")
    cid = mqbtt.recorder_client_id("mqtt://127.0.0.1:1883", path)
    assert cid.startswith("mqbtt-rec-") and cid == mqbtt.recorder_client_id("127.0.0.1", path)


def test_replay_applies_back_pressure(broker, tmp_path, monkeypatch):
    """More QoS 1 messages than may wait for acknowledgement (paho ids are 16-bit)."""
    monkeypatch.setattr(mqbtt.MQbtTBase, "max_pending", 50)
    db = str(tmp_path / "bp.db")
    n = 600
    with mqbtt.MQbtTDataBase(db) as d:
        for i in range(n):
            d.insert(mqbtt.MQbtTRecord(pair_id="bp", subtopic="shr", timestamp=1000 + i,
                                       payload=mqbtt.Share(nonce=i).to_bytes()))
    with mqbtt.MQbtTOptimizer(broker.uri, "bp2") as opt:
        assert mqbtt.replay(db, broker.uri, "bp", "bp2", speed=0) == n
        assert [opt.receive_share(timeout=10).nonce for _ in range(n)] == list(range(n))
