"""Issue 12, items 1-6: hostile topics, signals, transient refusals, databases
that are not files, rows written by other tools, and values.

Real parts throughout: a real Mosquitto (``broker`` fixture), real processes
of every installed CPython 3.10-3.13 receiving real SIGINT/SIGTERM, a real
unprivileged user reading a database in a read-only directory.  Run with
``-s`` to see the figures (runs, signals, hangs) quoted in the README.
"""
import json
import math
import os
import random
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import mqbtt
from mqbtt import (MQbtTConnectionError, MQbtTDataBase, MQbtTError, MQbtTMiner, MQbtTOptimizer,
                   MQbtTRecord, MQbtTSendError, MQbtTSendTimeout, Reply, Request, Share)
from testlib import raw_client, wait_for

ROOT = os.path.dirname(os.path.abspath(__file__))
MQBTT = os.path.join(ROOT, "mqbtt.py")


@pytest.fixture(autouse=True)
def _restore_mqbtt_logger():
    # mqbtt.main() in-process installs a stderr handler (bound to this test's capture) and stops
    # propagation: undo it, so later tests' caplog still sees the mqbtt logger
    log = mqbtt.log
    saved = (list(log.handlers), log.propagate, log.level)
    yield
    log.handlers[:] = saved[0]
    log.propagate, log.level = saved[1], saved[2]


def pythons():
    """Every supported CPython installed here (pyenv 3.10-3.13, with paho), this one first."""
    found = [sys.executable]
    base = "/root/.pyenv/versions"
    if os.path.isdir(base):
        for v in sorted(os.listdir(base)):
            exe = os.path.join(base, v, "bin", "python")
            if v.split(".")[:2] in (["3", "10"], ["3", "11"], ["3", "12"], ["3", "13"]) \
                    and os.path.exists(exe) and os.path.realpath(exe) != os.path.realpath(sys.executable) \
                    and subprocess.run([exe, "-c", "import paho.mqtt, google.protobuf"],
                                       capture_output=True).returncode == 0:
                found.append(exe)
    return found


def _version(exe):
    return subprocess.run([exe, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                          capture_output=True, text=True).stdout.strip()


# --------------------------------------------------------------------------------------------
# 6. values
# --------------------------------------------------------------------------------------------

HOSTILE_VALUES = [
    (Request, "timestamp_min", None, TypeError),
    (Request, "timestamp_max", 1.0, TypeError),
    (Request, "nonce_start", "1", TypeError),
    (Request, "nonce_size", -1, ValueError),
    (Request, "nonce_size", 2 ** 32, ValueError),
    (Request, "timestamp_min", True, TypeError),
    (Request, "reset", 1, TypeError),
    (Request, "reset", None, TypeError),
    (Request, "reset", "yes", TypeError),
    (Reply, "kind", 1.0, TypeError),
    (Reply, "kind", None, TypeError),
    (Reply, "kind", "RESULT", TypeError),
    (Reply, "kind", True, TypeError),
    (Reply, "kind", 7, ValueError),
    (Reply, "kind", -1, ValueError),
    (Reply, "num_shares", -1, ValueError),
    (Reply, "num_shares", 2 ** 64, ValueError),
    (Reply, "num_shares", 3.0, TypeError),
    (Reply, "new_block", 0, TypeError),
    (Share, "diff", 10 ** 400, ValueError),
    (Share, "pool_diff", -(10 ** 400), ValueError),
    (Share, "diff", "1", TypeError),
    (Share, "diff", None, TypeError),
    (Share, "diff", True, TypeError),
    (Share, "nonce", 2 ** 32, ValueError),
    (Share, "version", -5, ValueError),
    (Share, "time", 1.5, TypeError),
    (Share, "zeroes", None, TypeError),
    (Share, "prev_block", "00" * 32, TypeError),
    (Share, "merkle_root", None, TypeError),
    (Share, "job_id", 5, TypeError),
    (Share, "extranonce2", b"ab", TypeError),
]


@pytest.mark.parametrize("cls,field,value,exc", HOSTILE_VALUES,
                         ids=[f"{c.__name__}.{f}={v!r}"[:40] for c, f, v, e in HOSTILE_VALUES])
def test_wrong_types_and_out_of_range_values_raise_in_the_constructor(cls, field, value, exc):
    with pytest.raises(exc) as info:
        cls(**{field: value})
    assert field in str(info.value)
    assert len(str(info.value)) <= 300   # one readable line even for a 10**400


def test_valid_values_still_accepted_and_round_trip():
    r = Request(timestamp_min=2 ** 32 - 1, timestamp_max=0, nonce_start=7, nonce_size=1, reset=True)
    assert Request.from_bytes(r.to_bytes()) == r
    rep = Reply(kind=2, num_shares=2 ** 64 - 1, new_block=True)
    assert rep.kind is mqbtt.Kind.RESET          # an int kind becomes a Kind
    assert Reply.from_bytes(rep.to_bytes()) == rep
    s = Share(diff=5, pool_diff=float("nan"), nonce=2 ** 32 - 1, prev_block=bytes(32), job_id="ab")
    back = Share.from_bytes(s.to_bytes())
    assert back.diff == 5.0 and back.nonce == 2 ** 32 - 1 and math.isnan(back.pool_diff)
    assert Share(diff=float("inf")).to_bytes()   # a protobuf double takes infinities
    # wrong types are also ValueErrors, as documented before (except ValueError keeps working)
    with pytest.raises(ValueError):
        Request(timestamp_min=None)


@pytest.mark.parametrize("argv", [
    ["replay", "--db", "x.db", "--pid", "p", "--speed", "1e-320"],
    ["replay", "--db", "x.db", "--pid", "p", "--speed", "nan"],
    ["replay", "--db", "x.db", "--pid", "p", "--speed", "inf"],
    ["replay", "--db", "x.db", "--pid", "p", "--speed", "-1"],
    ["restart", "--timeout", "1e300"],
    ["restart", "--timeout", "nan"],
    ["restart", "--timeout", "-1"],
    ["restart", "--wait", "inf"],
    ["wslog", "--file", "x.log", "--duration", "1e300"],
    ["echo", "--count", "0", "p"],
    ["echo", "--count", "-1", "p"],
    ["echo", "--count", "1e3", "p"],
    ["dump", "--pid", "p", "--count", "0"],
    ["record", "--db", ""],
    ["record", "--db", ":memory:"],
    ["record", "--db", "  "],
    ["replay", "--db", ":memory:", "--pid", "p"],
])
def test_cli_numbers_and_paths_are_usage_errors(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert mqbtt.main(argv, prog="mqbtt") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"mqbtt {argv[0]}: error: argument ")
    assert os.listdir(tmp_path) == []   # nothing created


def test_library_refuses_the_same_values():
    for speed in (1e-320, float("nan"), float("inf"), -1):
        with pytest.raises(ValueError):
            mqbtt.replay("x.db", "mqtt://127.0.0.1:1", "p", speed=speed)
    with pytest.raises(TypeError):
        mqbtt.replay("x.db", "mqtt://127.0.0.1:1", "p", speed="fast")
    for path in ("", ":memory:"):
        with pytest.raises(ValueError):
            MQbtTDataBase(path)
        with pytest.raises(ValueError):
            mqbtt.Recorder("mqtt://127.0.0.1:1", path)


# --------------------------------------------------------------------------------------------
# 4. databases that are not files, mistyped paths, read-only media
# --------------------------------------------------------------------------------------------

def test_readers_never_create_a_missing_database(tmp_path, capsys):
    path = tmp_path / "trafic.db"    # mistyped
    db = MQbtTDataBase(path)
    for read in (lambda: list(db.records()), lambda: list(db.logs()), lambda: db.count(),
                 lambda: db.pair_ids()):
        with pytest.raises(MQbtTError, match="no such database"):
            read()
    db.close()
    assert mqbtt.main(["replay", "--db", str(path), "--pid", "p", "--broker",
                       "mqtt://127.0.0.1:1"], prog="mqbtt") == 2   # a usage error, as in test_cli
    assert "no such database" in capsys.readouterr().err
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "db2logs.py"), str(path),
                          "p"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "no such database" in out.stderr
    assert os.listdir(tmp_path) == []
    # a writer creates it on the first insert, and a reader opened before sees it then
    reader = MQbtTDataBase(path)
    with MQbtTDataBase(path) as w:
        w.insert(MQbtTRecord(pair_id="p", subtopic="log", timestamp=1.0, payload=b"hi"))
    assert [r.message for r in reader.logs()] == ["hi"]
    reader.close()


def test_a_failed_insert_never_leaves_a_transaction_open(tmp_path):
    db = MQbtTDataBase(tmp_path / "t.db", batch_size=1000)
    for bad in [(1.0, "p", "zzz", b"x"), (1.0, None, "log", b"x"), (None, "p", "log", b"x")]:
        with pytest.raises(sqlite3.IntegrityError):
            db._insert(*bad)
        assert not db._conn.in_transaction
    db._insert_many([])          # the recorder's path with nothing storable
    assert not db._conn.in_transaction
    db.insert(MQbtTRecord(pair_id="p", subtopic="log", timestamp=2.0, payload=b"ok"))
    with pytest.raises(sqlite3.IntegrityError):
        db._insert(1.0, "p", "zzz", b"x")   # fails inside a pending batch: the batch survives
    assert db.commit() == 1
    with pytest.raises(sqlite3.IntegrityError):
        db._insert_many([(3.0, "p", "log", b"a"), (3.0, "p", "bad", b"b")])
    assert not db._conn.in_transaction
    db._insert_many([(4.0, "p", "log", b"c")])
    assert [r.message for r in db.logs()] == ["ok", "c"]
    db.close()


def _make_db(path, rows=(("p", "log", b"line"),)):
    with MQbtTDataBase(path) as db:
        for i, (pid, sub, payload) in enumerate(rows):
            db.insert(MQbtTRecord(pair_id=pid, subtopic=sub, timestamp=1000.0 + i, payload=payload))


def test_read_only_directory_is_readable_by_an_unprivileged_user():
    d = tempfile.mkdtemp(prefix="mqbtt-ro-")
    try:
        os.chmod(d, 0o755)
        path = os.path.join(d, "traffic.db")
        _make_db(path, [("p", "log", b"one"), ("p", "log", b"two")])
        # the recorder's WAL journal, left behind as a crash would (-wal, -shm)
        conn = sqlite3.connect(path)
        conn.execute("INSERT INTO messages (timestamp, pair_id, subtopic, message) "
                     "VALUES (3000, 'p', 'log', x'7468726565')")
        conn.commit()
        subprocess.run(["chmod", "-R", "a+r", d], check=True)
        os.chmod(d, 0o555)    # read-only directory (and the files read-only for "nobody")
        code = ("import sys; sys.path.insert(0, %r); import mqbtt\n"
                "db = mqbtt.MQbtTDataBase(%r)\n"
                "print(db.read_only, [r.message for r in db.logs()], db.count())\n"
                "try:\n"
                "    db.insert(mqbtt.MQbtTRecord(pair_id='p', subtopic='log', timestamp=1, payload=b'x'))\n"
                "except mqbtt.MQbtTError as e: print('refused:', e)\n") % (ROOT, path)
        out = subprocess.run(["runuser", "-u", "nobody", "--", "/usr/bin/python3", "-c", code],
                             capture_output=True, text=True, timeout=60, cwd="/")
        conn.close()
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0].startswith("True ['one', 'two'")
        assert lines[1].startswith("refused:") and "read-only" in lines[1]
        db2 = subprocess.run(["runuser", "-u", "nobody", "--", "/usr/bin/python3",
                              os.path.join(ROOT, "examples", "db2logs.py"), path, "p"],
                             capture_output=True, text=True, timeout=60, cwd="/")
        assert db2.returncode == 0 and db2.stdout.count("\n") >= 2, db2.stderr
        assert sorted(os.listdir(d)) == sorted(set(os.listdir(d)))   # nothing added by readers
    finally:
        os.chmod(d, 0o755)
        shutil.rmtree(d, ignore_errors=True)


def _run(args, timeout=60, **kw):
    return subprocess.run([sys.executable, MQBTT] + args, capture_output=True, text=True,
                          timeout=timeout, **kw)


def test_record_that_fails_to_start_leaves_nothing_behind(tmp_path):
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()            # nothing listens: connection refused
    for broker_uri, db in ((f"mqtt://127.0.0.1:{port}", "new.db"),
                           (f"mqtt://127.0.0.1:{port}", "sub dir/new.db"),
                           (f"mqtts://127.0.0.1:{port}?cafile={tmp_path}/missing.pem", "tls.db")):
        out = _run(["record", "--broker", broker_uri, "--db", str(tmp_path / db)])
        assert out.returncode == 1
        assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    assert os.listdir(tmp_path) == []


def test_second_recorder_on_one_database_refuses_naming_the_first(broker, tmp_path):
    db = str(tmp_path / "r.db")
    first = subprocess.Popen([sys.executable, MQBTT, "record", "--broker", broker.uri, "--db", db],
                             stderr=subprocess.PIPE, text=True)
    try:
        assert "recording" in first.stderr.readline()
        out = _run(["record", "--broker", broker.uri, "--db", db])
        assert out.returncode == 1
        lines = out.stderr.splitlines()
        assert len(lines) == 1, out.stderr
        assert f"pid {first.pid}" in lines[0] and "another recorder" in lines[0]
        # another client id (e.g. another broker into the same file) is another recorder
        other = subprocess.Popen([sys.executable, MQBTT, "record", "--broker", broker.uri, "--db",
                                  db, "--client-id", "rec-two"], stderr=subprocess.PIPE, text=True)
        assert "recording" in other.stderr.readline()
        other.send_signal(signal.SIGINT)
        assert other.wait(20) == 0
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(20) == 0
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".lock")]   # released
    # a recorder killed with SIGKILL leaves its lock file, which does not block a restart
    killed = subprocess.Popen([sys.executable, MQBTT, "record", "--broker", broker.uri, "--db", db],
                              stderr=subprocess.PIPE, text=True)
    assert "recording" in killed.stderr.readline()
    killed.kill()
    killed.wait()
    again = subprocess.Popen([sys.executable, MQBTT, "record", "--broker", broker.uri, "--db", db],
                             stderr=subprocess.PIPE, text=True)
    assert "recording" in again.stderr.readline()
    again.send_signal(signal.SIGINT)
    assert again.wait(20) == 0


# --------------------------------------------------------------------------------------------
# 5. rows written by other tools
# --------------------------------------------------------------------------------------------

def _hostile_db(path):
    """A database made by another tool: no constraints, every kind of bad row."""
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, timestamp, "
                 "pair_id, subtopic, message)")
    good = [(10.0, "p", "srv", Request(timestamp_min=1).to_bytes()),
            (10.5, "p", "esp", Reply(kind=1, num_shares=3).to_bytes()),
            (11.0, "p", "log", b"a log line"),
            (12.0, "p", "shr", Share(diff=2.0).to_bytes())]
    bad = [("not a time", "p", "srv", b"x"), (None, "p", "esp", b""), (1e300, "p", "shr", b"y"),
           (-1e20, "p", "log", b"z"), (float("inf"), "p", "log", b"i"), (13.0, "p", "zzz", b"q"),
           (14.0, "p", None, b"q"), (15.0, "p", "log", "text, not a blob"),
           (16.0, "p", "log", 2 ** 63 - 1), (2 ** 63 - 1, "p", "log", b"h"), (17.0, "p", "log", 3.5),
           (18.0, "p", "esp", None), (b"\xff\xfe", "p", "log", b"w"),
           (19.0, "p", "srv", b"\xff" * 10), (20.0, "p", "log", 10 ** 9)]
    for row in good + bad:
        conn.execute("INSERT INTO messages (timestamp, pair_id, subtopic, message) "
                     "VALUES (?, ?, ?, ?)", row)
    conn.commit()
    conn.close()
    return len(good), len(bad)


def test_bad_rows_never_raise_in_any_reader(tmp_path):
    path = str(tmp_path / "other-tool.db")
    n_good, n_bad = _hostile_db(path)
    with MQbtTDataBase(path) as db:
        recs = list(db.records())
        assert len(recs) == n_good + n_bad
        for r in recs:   # every attribute readable, none raises
            r.timestamp, r.message, r.payload, r.pair_id, r.subtopic, repr(r)
            assert r.timestamp is None or r.timestamp.tzinfo is not None
            assert isinstance(r.payload, bytes)
        assert sum(r.timestamp is None for r in recs) >= 6
        assert {r.message for r in recs if r.subtopic == "log" and r.timestamp} >= {
            "a log line", "text, not a blob", "9223372036854775807", "3.5", "1000000000"}
        assert len(list(db.records(desc=True))) == n_good + n_bad
        assert len(list(db.logs(text="log"))) >= 1
        for r in db.logs():
            r.timestamp, r.message
        pairs = list(mqbtt.request_reply_pairs(db.records(pair_id="p")))
        assert any(lat is not None and abs(lat - 0.5) < 1e-6 for _, _, lat in pairs)
        assert all(lat is None or isinstance(lat, float) for _, _, lat in pairs)
        assert db.count() == n_good + n_bad and db.pair_ids() == ["p"]
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "db2logs.py"), path, "p"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "a log line" in out.stdout, out.stderr


def test_replay_skips_bad_rows_and_publishes_the_rest(broker, tmp_path):
    path = str(tmp_path / "other-tool.db")
    _hostile_db(path)
    got = []
    sub = raw_client(broker.uri)
    sub.on_message = lambda c, u, m: got.append((m.topic, m.payload))
    subscribed = threading.Event()
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.subscribe("mqbtt/q/#", 2)
    assert subscribed.wait(10)
    out = _run(["replay", "--broker", broker.uri, "--db", path, "--pid", "p", "--to-pid", "q",
                "--speed", "0"])
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    # 2 rows with a subtopic that is not one of the four are skipped and said so
    assert "2 row(s)" in out.stderr and "17 messages published" in out.stderr
    wait_for(lambda: len(got) == 17, what="the replayed messages")
    assert ("mqbtt/q/log", b"a log line") in got and ("mqbtt/q/log", b"text, not a blob") in got
    sub.disconnect()


def test_notebook_runs_on_a_database_with_bad_rows(tmp_path):
    import nbformat
    from nbclient import NotebookClient
    path = str(tmp_path / "other-tool.db")
    _hostile_db(path)
    nb = nbformat.read(os.path.join(ROOT, "examples", "Analysis.ipynb"), as_version=4)
    os.environ["MQBTT_DB"], old = path, os.environ.get("MQBTT_DB")
    try:
        NotebookClient(nb, timeout=120, kernel_name="python3",
                       resources={"metadata": {"path": os.path.join(ROOT, "examples")}}).execute()
    finally:
        if old is None:
            del os.environ["MQBTT_DB"]
        else:
            os.environ["MQBTT_DB"] = old
    text = json.dumps(nb)
    assert "rows without a usable timestamp left out" in text
    assert '"output_type": "error"' not in text


# --------------------------------------------------------------------------------------------
# 1. no topic, payload or pair id the broker delivers stops the recorder
# --------------------------------------------------------------------------------------------

def _rl(n):
    out = b""
    while True:
        n, digit = divmod(n, 128)
        out += bytes([digit | (0x80 if n else 0)])
        if not n:
            return out


def raw_publish(port, topic: bytes, payload: bytes):
    """Publish at QoS 0 with hand-made MQTT 3.1.1 packets (paho refuses
    wildcards in a topic; a broker must see what a hostile client sends)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        cid = b"raw-" + os.urandom(4).hex().encode()
        body = b"\x00\x04MQTT\x04\x02\x00\x3c" + struct.pack("!H", len(cid)) + cid
        s.sendall(b"\x10" + _rl(len(body)) + body)
        assert s.recv(4)[:1] == b"\x20"       # CONNACK
        body = struct.pack("!H", len(topic)) + topic + payload
        s.sendall(b"\x30" + _rl(len(body)) + body + b"\xe0\x00")
        try:
            s.recv(1)      # the broker closes: after DISCONNECT, or on a protocol violation
        except OSError:
            pass
    finally:
        s.close()


HOSTILE_TOPICS = [   # (topic, qos): all delivered by Mosquitto to mqbtt/+/<subtopic>
    ("mqbtt//log", 1), ("mqbtt//srv", 2), ("mqbtt//esp", 0), ("mqbtt/ /shr", 1),
    ("mqbtt/" + "x" * 60000 + "/shr", 1), ("mqbtt/é中文😀/log", 2),
    ("mqbtt/a\u202eb\u200f/log", 1), ("mqbtt/'; DROP TABLE messages;--/log", 1),
    ("mqbtt/%s%n{0}\\/log", 0), ("mqbtt/\ufeff/esp", 2),
    ("mqbtt/..\\..\\/srv", 1), ("mqbtt/ma\u0301s/log", 1),
]
REJECTED_BY_BROKER = [b"mqbtt/+/log", b"mqbtt/#/log", b"mqbtt/a\x00b/log", b"mqbtt/\xff\xfe/log",
                      b"mqbtt/\xed\xa0\x80/log", b"#", b"mqbtt/\x01\x1b[31m\x7f/log"]
NOT_SUBSCRIBED = ["mqbtt/a/log/extra", "mqbtt/a/LOG", "mqbtt/a/lo", "MQBTT/a/log", "/mqbtt/a/log",
                  "mqbtt/a/log/"]


def test_hostile_topics_never_stop_the_recorder(broker, tmp_path):
    db = str(tmp_path / "hostile.db")
    rec = subprocess.Popen([sys.executable, MQBTT, "record", "--broker", broker.uri, "--db", db],
                           stderr=subprocess.PIPE, text=True)
    try:
        assert "recording" in rec.stderr.readline()
        pub = raw_client(broker.uri)
        infos = [pub.publish(t, f"payload {i}".encode() if i % 3 else os.urandom(50), q)
                 for i, (t, q) in enumerate(HOSTILE_TOPICS)]
        infos += [pub.publish(t, b"nobody subscribed", 1) for t in NOT_SUBSCRIBED]
        for info in infos:
            info.wait_for_publish(10)
        for t in REJECTED_BY_BROKER:
            raw_publish(broker.port, t, b"hostile")
        pub.publish("mqbtt/final/log", b"the QoS 0 message after them", 0).wait_for_publish(10)
        pub.disconnect()
        reader = MQbtTDataBase(db)
        wait_for(lambda: os.path.exists(db) and reader.count(pair_id="final") == 1,
                 what="the final QoS 0 message in the database")
        assert rec.poll() is None, "the recorder stopped"
        rows = {(r.pair_id, r.subtopic) for r in reader.records()}
        reader.close()
        expected = {tuple(t.split("/", 1)[1].rsplit("/", 1)) for t, _ in HOSTILE_TOPICS}
        assert rows == expected | {("final", "log")}
    finally:
        rec.send_signal(signal.SIGINT)
        rc = rec.wait(20)
        err = rec.stderr.read()
    assert rc == 0, err
    assert "error" not in err and "Traceback" not in err
    assert f"stopped: {len(HOSTILE_TOPICS) + 1} messages recorded" in err


class _FakeMsg:
    def __init__(self, topic, payload=b"x", qos=0, mid=0):
        self._topic, self.payload, self.qos, self.mid = topic, payload, qos, mid

    @property
    def topic(self):
        return self._topic.decode("utf-8")   # raises as paho's does


def test_topics_the_schema_cannot_take_are_skipped_counted_and_shown(broker, tmp_path):
    import io
    status = io.StringIO()
    rec = mqbtt.Recorder(broker.uri, tmp_path / "skip.db", status=status, status_interval=0.05)
    t = threading.Thread(target=rec.run)
    t.start()
    try:
        wait_for(lambda: rec._recording, what="the recorder to connect")
        for topic in (b"mqbtt/\xff/log", b"mqbtt/\xc3/srv", b"mqbtt/ok/log", b"mqbtt/\xed\xa0\x80/esp"):
            rec._on_message(None, None, _FakeMsg(topic))   # as paho's network thread would
        wait_for(lambda: rec.skipped == 3 and rec.total == 1, what="skipped and stored counts")
        wait_for(lambda: "3 skipped" in status.getvalue(), what="the status line")
    finally:
        rec.stop()
        t.join(20)
    assert not t.is_alive()
    assert "1 messages recorded (srv=0 esp=0 shr=0 log=1, 3 skipped (topic not UTF-8))" \
        in status.getvalue().splitlines()[-1]


# --------------------------------------------------------------------------------------------
# 2. signals: every long-running command stops within about a second, on every Python
# --------------------------------------------------------------------------------------------

class Blackhole:
    """Accepts TCP connections and never answers (a broker or device that
    hangs while the client is still connecting)."""

    def __init__(self):
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(64)
        self.port = self.srv.getsockname()[1]
        self.accepted = 0
        self.conns = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            self.conns.append(c)
            self.accepted += 1

    def close(self):
        self.srv.close()
        for c in self.conns:
            c.close()


class WebSocketLogServer:
    """A minimal AxeOS ``/api/ws``: the RFC 6455 handshake, then a short
    text frame every 50 ms."""

    def __init__(self):
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(64)
        self.port = self.srv.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        import base64
        import hashlib
        try:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = c.recv(4096)
                if not chunk:
                    return
                data += chunk
            key = [line.split(b":", 1)[1].strip() for line in data.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key:")][0]
            accept = base64.b64encode(hashlib.sha1(
                key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
            c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                      b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
            while True:
                msg = b"\x1b[0;32mI (123) test: tick\x1b[0m\n"
                c.sendall(b"\x81" + bytes([len(msg)]) + msg)
                time.sleep(0.05)
        except OSError:
            pass
        finally:
            c.close()

    def close(self):
        self.srv.close()


def axeos_server():
    """An HTTP server speaking the two AxeOS calls ``restart --wait`` uses;
    the device never comes back (its uptime keeps growing)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    t0 = time.monotonic()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _json(self, obj):
            body = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self._json({"uptimeSeconds": 1000 + int(time.monotonic() - t0), "hostname": "bitaxe"})

        def do_POST(self):
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.runs = self.signals = self.hangs = 0
        self.times = []
        self.failures = []


def _signal_run(stats, exe, argv, ready, sig, delay, cwd):
    """Start ``mqbtt ARGV`` under *exe*, wait until *ready* (text in its
    output, or a callable), wait *delay*, send *sig*; record how long it took
    to exit (a run that outlives 10 s is a hang and gets SIGKILL)."""
    p = subprocess.Popen([exe, MQBTT] + argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, text=True, cwd=cwd)
    lines = []
    seen = threading.Event()

    def read():
        for line in p.stdout:
            lines.append(line)
            if isinstance(ready, str) and ready in line:
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    what = f"{os.path.basename(os.path.dirname(os.path.dirname(exe)))} {argv[0]} {sig.name}"
    try:
        if isinstance(ready, str):
            ok = seen.wait(30)
        else:
            ok = True
            try:
                wait_for(ready, 30)
            except AssertionError:
                ok = False
        if not ok or p.poll() is not None:
            with stats.lock:
                stats.failures.append(f"{what}: never ready: {''.join(lines)[-300:]}")
            return
        time.sleep(delay)    # the moment of the signal, deliberately random
        t0 = time.monotonic()
        p.send_signal(sig)
        try:
            rc = p.wait(10)
            hang = False
        except subprocess.TimeoutExpired:
            p.kill()
            rc = p.wait()
            hang = True
        elapsed = time.monotonic() - t0
        reader.join(5)
        out = "".join(lines)
        with stats.lock:
            stats.runs += 1
            stats.signals += 1
            stats.hangs += hang
            stats.times.append(elapsed)
            if hang or rc != 0 or "Traceback" in out:
                stats.failures.append(f"{what} ({argv}): rc={rc} hang={hang} "
                                      f"after {elapsed:.2f}s: {out[-400:]}")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


#: ``MQBTT_SOAK=N``: every command on every Python, and 2*N signalled recorders per
#: Python (the README's figures); default: every command on this Python, a sample on the others
SOAK = int(os.environ.get("MQBTT_SOAK", "0"))


def test_every_long_running_command_stops_on_sigint_and_sigterm(broker, tmp_path):
    exes = pythons()
    hole, ws, http = Blackhole(), WebSocketLogServer(), axeos_server()
    replay_db = str(tmp_path / "replay.db")
    with MQbtTDataBase(replay_db) as db:   # two messages 1000 s apart: replay sleeps
        for ts in (1000.0, 2000.0):
            db.insert(MQbtTRecord(pair_id="r", subtopic="log", timestamp=ts, payload=b"x"))
    dead = f"mqtt://127.0.0.1:{hole.port}"
    stats = Stats()
    jobs = []
    rnd = random.Random(12)
    for exe in exes:
        tag = _version(exe)

        commands = [
            (["record", "--broker", broker.uri, "--db", f"rec-{tag}.db"], "recording"),
            (["dump", "--broker", broker.uri, "--pid", "s"], "listening"),
            (["echo", "--broker", broker.uri, "s"], "answering"),
            (["replay", "--broker", broker.uri, "--db", replay_db, "--pid", "r", "--to-pid", "z"],
             "publishing"),
            (["wslog", "--pid", f"127.0.0.1:{ws.port}", "--file", f"ws-{tag}.log"], "connected"),
            (["restart", "--pid", f"127.0.0.1:{http.server_port}", "--no-history", "--wait", "600"],
             "waiting up to"),
            # still connecting (a broker or device that never answers)
            (["record", "--broker", dead, "--db", f"dead-{tag}.db"], None),
            (["dump", "--broker", dead, "--pid", "s"], None),
            (["echo", "--broker", dead, "s"], None),
            (["replay", "--broker", dead, "--db", replay_db, "--pid", "r"], None),
            (["wslog", "--pid", f"127.0.0.1:{hole.port}", "--file", f"dead-{tag}.log"], None),
            (["restart", "--pid", f"127.0.0.1:{hole.port}", "--no-history", "--wait", "600"], None),
        ]
        if exe != exes[0] and not SOAK:   # the other Pythons: a sample of each class
            commands = [commands[0], commands[1], commands[6], commands[8]]
        for argv, ready in commands:
            for sig in (signal.SIGINT, signal.SIGTERM):
                jobs.append((exe, argv, ready, sig, rnd.uniform(0, 0.3)))
        # the original hang: record, signalled at random moments of its loop
        for i in range(max(1, SOAK) * 2):
            jobs.append((exe, ["record", "--broker", broker.uri, "--db", f"rec-{tag}-{i}.db"],
                         "recording", rnd.choice((signal.SIGINT, signal.SIGTERM)),
                         rnd.uniform(0, 0.5)))

    def run(job):
        exe, argv, ready, sig, delay = job
        n = next(serial)   # parallel runs: own pair id, database and log file
        argv = [f"{a}{n}" if a in ("s", "z") else
                a.replace(".db", f"-{n}.db").replace(".log", f"-{n}.log")
                if a.endswith((".db", ".log")) and a != replay_db else a for a in argv]
        if ready is None:    # its own blackhole: ready once it accepted the connection
            own = Blackhole()
            argv = [a.replace(str(hole.port), str(own.port)) for a in argv]
            try:
                _signal_run(stats, exe, argv, lambda: own.accepted > 0, sig, delay, tmp_path)
            finally:
                own.close()
        else:
            _signal_run(stats, exe, argv, ready, sig, delay, tmp_path)

    import itertools
    from concurrent.futures import ThreadPoolExecutor
    serial = itertools.count()
    rnd.shuffle(jobs)
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(run, jobs))
    hole.close()
    ws.close()
    http.shutdown()
    times = sorted(stats.times)
    print(f"\n[signals] pythons={','.join(_version(e) for e in exes)} runs={stats.runs} "
          f"signals={stats.signals} hangs={stats.hangs} exit time p50={times[len(times) // 2]:.2f}s "
          f"max={times[-1]:.2f}s")
    assert not stats.failures, "\n".join(stats.failures)
    assert stats.runs == len(jobs) and stats.hangs == 0
    assert times[-1] < 8.0      # about a second each, on a loaded 2-core machine (10 s = hang)


# --------------------------------------------------------------------------------------------
# 2. stop() wakes every thread blocked in a library call
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("send_timeout", [None, 30.0])
@pytest.mark.parametrize("method", ["send_reply", "send_share", "send_log"])
def test_stop_wakes_a_blocked_sender(broker, send_timeout, method):
    miner = MQbtTMiner(broker.uri, f"blk-{method}", send_timeout=send_timeout)
    arg = {"send_reply": Reply(kind=1), "send_share": Share(nonce=1), "send_log": "line"}[method]
    result = {}

    def send():
        try:
            getattr(miner, method)(arg)
            result["ok"] = True
        except BaseException as err:
            result["err"] = err
            result["t"] = time.monotonic()

    os.kill(broker.proc.pid, signal.SIGSTOP)     # the broker hangs: no acknowledgement comes
    try:
        t = threading.Thread(target=send)
        t.start()
        wait_for(lambda: miner._waiting, what="the send to block")
        t0 = time.monotonic()
        miner.stop()
        t.join(10)
        assert not t.is_alive(), "the sender is still blocked"
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)
    err = result["err"]
    assert type(err) is MQbtTSendError and not isinstance(err, MQbtTSendTimeout)
    assert "stopped" in str(err) and "will be delivered" not in str(err)
    assert result["t"] - t0 < 15    # no send timeout: without the wake-up it blocks for ever


def test_receiver_behind_a_full_bounded_queue_wakes_after_draining(broker):
    opt = MQbtTOptimizer(broker.uri, "fullq", max_queue=5)
    with MQbtTMiner(broker.uri, "fullq") as miner:
        for i in range(20):
            miner.send_share(Share(nonce=i))
    wait_for(lambda: opt.dropped["shr"] == 15, what="the queue to fill")
    opt.stop()
    got, outcome = [], []

    def drain():
        try:
            while True:
                got.append(opt.receive_share())   # blocking, no timeout
        except MQbtTConnectionError as err:
            outcome.append(err)

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "the receiver hangs after draining the full queue"
    assert [s.nonce for s in got] == [0, 1, 2, 3, 4] and outcome
    with pytest.raises(MQbtTConnectionError):    # and again: the wake-up stays
        opt.receive_share(timeout=5)


def test_stop_during_connect_returns_at_once_from_another_thread(tmp_path):
    hole = Blackhole()
    rec = mqbtt.Recorder(f"mqtt://127.0.0.1:{hole.port}", tmp_path / "c.db", connect_timeout=60)
    out = []
    t = threading.Thread(target=lambda: out.append(rec.run()))
    t.start()
    wait_for(lambda: hole.accepted, what="the connection attempt")
    t0 = time.monotonic()
    rec.stop()
    t.join(10)
    hole.close()
    assert not t.is_alive() and out == [0] and time.monotonic() - t0 < 20   # not the 60 s
    assert os.listdir(tmp_path) == []   # no database, no lock file


# --------------------------------------------------------------------------------------------
# 3. transient refusals are retried; bad credentials and "not authorized" are final
# --------------------------------------------------------------------------------------------

class RefusingProxy:
    """A TCP proxy to a real broker that answers the n-th connection itself
    with ``CONNACK <code>`` when ``plan[n]`` says so (connections count from 1)."""

    def __init__(self, target_port, plan):
        self.target, self.plan = target_port, dict(plan)
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(16)
        self.port = self.srv.getsockname()[1]
        self.accepted = 0
        self.socks = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            self.accepted += 1
            code = self.plan.get(self.accepted)
            if code is not None:
                threading.Thread(target=self._refuse, args=(c, code), daemon=True).start()
                continue
            up = socket.create_connection(("127.0.0.1", self.target))
            self.socks += [c, up]
            for a, b in ((c, up), (up, c)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _refuse(c, code):
        try:
            c.settimeout(5)
            c.recv(65536)                             # the CONNECT
            c.sendall(bytes([0x20, 2, 0, code]))      # CONNACK: session present 0, return code
            c.recv(1)                                 # the client closes
        except OSError:
            pass
        finally:
            c.close()

    @staticmethod
    def _pump(a, b):
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        socks, self.socks = self.socks, []
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self.srv.close()
        self.cut()


def test_transient_connack_refusals_are_retried(broker):
    import logging
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: records.append(record.getMessage())
    mqbtt.log.addHandler(handler)
    level = mqbtt.log.level
    mqbtt.log.setLevel(logging.INFO)
    # 2nd connection: 3 "server unavailable"; 3rd: 2 "identifier rejected"; 4th: the broker
    proxy = RefusingProxy(broker.port, {2: 3, 3: 2})
    opt = MQbtTOptimizer(f"mqtt://127.0.0.1:{proxy.port}", "transient")
    try:
        proxy.cut()
        wait_for(lambda: opt.connections == 2, timeout=30, what="the reconnection")
        assert proxy.accepted == 4 and opt._error is None
        with MQbtTMiner(broker.uri, "transient") as miner:
            miner.send_share(Share(nonce=42))
        assert opt.receive_share(timeout=10).nonce == 42
        text = "\n".join(records)
        assert "Server unavailable); retrying" in text
        assert "Client identifier not valid); retrying" in text
    finally:
        opt.stop()
        proxy.close()
        mqbtt.log.removeHandler(handler)
        mqbtt.log.setLevel(level)


@pytest.mark.parametrize("code,reason", [(4, "Bad user name or password"), (5, "Not authorized")])
def test_credential_refusals_stay_final(broker, code, reason):
    proxy = RefusingProxy(broker.port, {2: code, 3: code, 4: code})
    opt = MQbtTOptimizer(f"mqtt://127.0.0.1:{proxy.port}", f"final{code}")
    try:
        proxy.cut()
        with pytest.raises(MQbtTConnectionError, match=f"{reason}.*not retrying"):
            opt.receive_share(timeout=30)
        assert proxy.accepted == 2
    finally:
        opt.stop()
        proxy.close()


def test_refusal_rule_covers_mqtt5_codes():
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode
    fatal = {134, 135, 140}
    seen = set()
    for value in range(128, 160):
        try:
            rc = ReasonCode(PacketTypes.CONNACK, identifier=value)
        except (KeyError, ValueError):
            continue   # not a CONNACK code
        seen.add(value)
        assert mqbtt._refusal_is_fatal(rc) == (value in fatal), rc
    assert {136, 137, 151, 159} <= seen   # server unavailable, busy, quota exceeded, rate


SLOW_HANDLER = """
import signal, sys, time
sys.path.insert(0, sys.argv[1])
import mqbtt
rec = mqbtt.Recorder(sys.argv[2], sys.argv[3], status=sys.stderr)
stop = rec.stop
def slow_stop():      # a signal handler that outlasts the 0.2 s queue wait (a loaded machine)
    time.sleep(0.3)
    stop()
signal.signal(signal.SIGTERM, lambda *a: slow_stop())
rec.run()
"""


def test_recorder_survives_a_signal_handler_slower_than_its_queue_wait(broker, tmp_path):
    # the root cause of the hang: on CPython <= 3.12, SimpleQueue.get(timeout) interrupted by a
    # signal waits again with the time left, and a negative remainder means "for ever"
    stats = Stats()
    for i, exe in enumerate(pythons()):
        script = tmp_path / "slow.py"
        script.write_text(SLOW_HANDLER)
        p = subprocess.Popen([exe, str(script), ROOT, broker.uri, str(tmp_path / f"s{i}.db")],
                             stderr=subprocess.PIPE, text=True)
        assert "recording" in p.stderr.readline()
        for delay in (0.05, 0.15):
            time.sleep(delay)     # before, and near, the end of a 0.2 s wait
            p.send_signal(signal.SIGTERM)
        try:
            p.wait(10)
            hang = False
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            hang = True
        stats.runs += 1
        stats.signals += 2
        stats.hangs += hang
        assert not hang, f"{_version(exe)}: the recorder hangs after SIGTERM"
        assert p.returncode == 0
    print(f"\n[slow handler] runs={stats.runs} signals={stats.signals} hangs={stats.hangs}")


SLOW_RECEIVE = """
import os, signal, sys, threading, time
sys.path.insert(0, sys.argv[1])
import mqbtt
opt = mqbtt.MQbtTOptimizer(sys.argv[2], "slowrecv" + str(os.getpid()))
signal.signal(signal.SIGUSR1, lambda *a: time.sleep(0.3))   # a handler that returns, slowly
for delay in (0.05, 0.15):
    threading.Timer(delay, os.kill, (os.getpid(), signal.SIGUSR1)).start()
t0 = time.monotonic()
try:
    opt.receive_share(timeout=0.2)
except mqbtt.Empty:
    print("Empty after %.2f s" % (time.monotonic() - t0))
opt.stop()
"""


def test_timed_receive_keeps_its_deadline_despite_signal_handlers(broker, tmp_path):
    script = tmp_path / "slowrecv.py"
    script.write_text(SLOW_RECEIVE)
    for exe in pythons():
        out = subprocess.run([exe, str(script), ROOT, broker.uri], capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("Empty after "), (_version(exe), out.stdout, out.stderr)
        # ~0.65 s (0.2 s plus two 0.3 s handlers); without the fix it waits for ever
        assert float(out.stdout.split()[2]) < 5.0


def test_files_that_are_not_recordings_are_refused_in_one_line_and_left_alone(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("password = not a database\n")
    other = tmp_path / "other-app.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.commit()
    conn.close()
    before = other.read_bytes()
    for path, what, replay_what in (
            (text, "file is not a database", "not a recording (not an SQLite database)"),
            (other, "not an mqbtt recording", "not a recording (no messages table)"),
            (tmp_path, "unable to open", "is a directory, not a database")):
        # replay checks the database before connecting: a usage error, exit 2 (issue 13)
        for argv, status, said in ((["replay", "--db", str(path), "--pid", "p"], 2, replay_what),
                                   (["record", "--db", str(path)], 1, what)):
            out = _run(argv + ["--broker", "mqtt://127.0.0.1:1"])
            assert out.returncode == status, out.stderr
            assert out.stderr.count("\n") == 1 and said in out.stderr, out.stderr
            assert "password" not in out.stderr
        with pytest.raises(MQbtTError, match=what):
            MQbtTDataBase(path)
    assert other.read_bytes() == before   # no table, index or journal mode added
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "other-app.db"]
