"""Tests of issue 13's command bullets: dump (--pid +, --mode all, pair names,
readable shares, --duration), record (--pid, --duration, the database's total),
replay (checks before connecting, --from/--to, progress with ETA, summary on
Ctrl-C), and the recordings commands info and export.

Real private Mosquitto brokers (conftest.py), real `python3 mqbtt.py ...`
subprocesses, real recordings; a pseudo-terminal where a terminal matters.
"""
import csv
import datetime
import io
import json
import os
import pty
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

import mqbtt
from mqbtt import MQbtTDataBase, MQbtTRecord, Reply, Request, Share, Kind
from testlib import ROOT, Proc, count_rows, mqbtt_cmd, publisher, session, start_recorder, wait_for
from testlib import run_cli as run

UTC = datetime.timezone.utc
STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}[+-]\d{4}"
UNREACHABLE = "mqtt://127.0.0.1:1"


def assert_usage_error(r, *needles):
    """Exit status 2, no traceback, nothing on stdout, and the error in one
    line (argparse puts its usage line before it for option syntax errors)."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and r.stdout == ""
    lines = r.stderr.splitlines()
    assert lines and "error: " in lines[-1], r.stderr
    if len(lines) > 1:   # the usage (wrapped lines), then the error
        assert lines[0].startswith("usage: ") and all(x.startswith(" ") for x in lines[1:-1]), \
            r.stderr
    for n in needles:
        assert n in lines[-1], (n, r.stderr)


def assert_one_line_error(r, cmd, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"mqbtt {cmd}: error: "), r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


class PtyProc:
    """A subprocess whose stderr is a terminal (a pseudo-terminal we read)."""

    def __init__(self, args):
        master, slave = pty.openpty()
        self.p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=slave,
                                  stdin=subprocess.DEVNULL)
        os.close(slave)
        self.master = master
        self.chunks = []
        self.out = b""
        self._t = threading.Thread(target=self._pump, daemon=True)
        self._t.start()
        self._o = threading.Thread(target=self._pump_out, daemon=True)
        self._o.start()

    def _pump(self):
        while True:
            try:
                data = os.read(self.master, 4096)
            except OSError:   # EIO: the child closed the terminal
                break
            if not data:
                break
            self.chunks.append(data)

    def _pump_out(self):
        self.out = self.p.stdout.read()

    @property
    def err(self) -> str:
        return b"".join(self.chunks).decode("utf-8", "replace")

    def wait(self, timeout=30):
        rc = self.p.wait(timeout)
        self._t.join(30)     # the terminal drained before it is closed under the reader
        self._o.join(30)
        os.close(self.master)
        return rc

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


def make_db(path, rows):
    """A recording made of (pair_id, subtopic, timestamp, payload) rows."""
    if not rows:   # MQbtTDataBase creates the file on the first insert only (merge)
        mqbtt._sqlite_open(str(path), create=True)[0].close()
    with MQbtTDataBase(str(path)) as db:
        db._check_writable()   # an empty recording too (files are created by the first write)
        for pid, sub, ts, payload in rows:
            db.insert(MQbtTRecord(pair_id=pid, subtopic=sub, timestamp=ts, payload=payload))
    return str(path)


def hostile_db_paths(tmp_path):
    """Paths that are not recordings: (path, what the error says)."""
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    other = tmp_path / "other.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    return [(tmp_path / "missing.db", "no such database"),
            (tmp_path, "is a directory"),
            (text, "not an SQLite database"),
            (empty, "not an SQLite database"),
            (other, "no messages table")]


# -- dump ---------------------------------------------------------------------------------

def test_format_dump_readable_share_and_json_keeps_every_field():
    share = Share(version=0x20000000, prev_block=b"\x00\xab", nonce=7, job_id="4a\x1b")
    line = mqbtt.format_dump(0.0, "shr", share.to_bytes())
    assert re.fullmatch(STAMP + r" shr Share\(version=536870912, prev_block=00ab, nonce=7, "
                        r"job_id='4a\\x1b'\)", line), line
    assert mqbtt.describe_message(Share()) == "Share()"
    assert mqbtt.describe_message(Reply(kind=Kind.BYE, num_shares=3)) == "Reply(kind=BYE, num_shares=3)"
    obj = json.loads(mqbtt.format_dump(0.0, "shr", share.to_bytes(), as_json=True, pair_id="p"))
    assert obj["pair_id"] == "p" and obj["topic"] == "mqbtt/p/shr"
    assert obj["message"] == {"version": 536870912, "prev_block": "00ab", "merkle_root": "",
                              "time": 0, "pool_time": 0, "bits": 0, "nonce": 7, "pool_diff": 0.0,
                              "job_id": "4a\x1b", "extranonce2": "", "diff": 0.0, "zeroes": 0}
    # the documented reply and request lines are unchanged; a pair is named on request
    reply = Reply(kind=Kind.RESULT, num_shares=1020104).to_bytes()
    assert mqbtt.format_dump(0.0, "esp", reply, 0.0032).endswith(
        " esp Reply(kind=<Kind.RESULT: 1>, num_shares=1020104, new_block=False)  rtt=3.2 ms")
    assert mqbtt.format_dump(0.0, "esp", reply, pair_id="g1", name_pair=True).endswith(
        " g1/esp Reply(kind=<Kind.RESULT: 1>, num_shares=1020104, new_block=False)")
    assert " 'a b\\u2028'/log x" in mqbtt.format_dump(0.0, "log", b"x", pair_id="a b\u2028",
                                                       name_pair=True)


def test_dump_every_pair_all_mode(broker):
    n_all = 9
    text = Proc(mqbtt_cmd("dump", "--broker", broker.uri, "--pid", "+", "--mode", "all",
                          "--count", str(n_all)))
    js = Proc(mqbtt_cmd("dump", "--broker", broker.uri, "--pid", "+", "--mode", "all", "--json",
                        "--count", str(n_all)))
    one = Proc(mqbtt_cmd("dump", "--broker", broker.uri, "--pid", "p1", "--mode", "all",
                         "--count", "4"))
    one_js = Proc(mqbtt_cmd("dump", "--broker", broker.uri, "--pid", "p1", "--json", "--count", "2"))
    # four interpreters starting at once: a loaded machine takes its time
    for p in (text, js):
        p.wait_err(r"^mqbtt dump: listening to mqbtt/\+/srv, mqbtt/\+/esp, mqbtt/\+/shr, "
                   r"mqbtt/\+/log on ", 60)
    one.wait_err(r"^mqbtt dump: listening to mqbtt/p1/srv, ", 60)
    one_js.wait_err(r"^mqbtt dump: listening to mqbtt/p1/esp, mqbtt/p1/shr on", 60)
    sent = {"p1": session(broker, "p1", n=1, shares_per_request=1),
            "p2": session(broker, "p2", n=1, shares_per_request=1)}
    weird = "we ird\u2028x"
    pub = publisher(broker)
    pub.publish(f"mqbtt/{weird}/log", b"hello", 1).wait_for_publish(10)
    pub.disconnect()
    pub.loop_stop()
    for p in (text, js, one, one_js):
        assert p.wait() == 0, p.err
    # text: every line names its pair; srv, esp, shr and log all shown
    got = {}
    for line in text.out:
        m = re.fullmatch(STAMP + r" ('[^']*'|\S+)/(srv|esp|shr|log) (.*)", line)
        assert m, line
        got.setdefault((m.group(1), m.group(2)), []).append(m.group(3))
    assert sorted(got) == [("'we ird\\u2028x'", "log"), ("p1", "esp"), ("p1", "log"), ("p1", "shr"),
                           ("p1", "srv"), ("p2", "esp"), ("p2", "log"), ("p2", "shr"), ("p2", "srv")]
    for pid, msgs in sent.items():
        for sub, payload in msgs:
            shown = got[(pid, sub)][0]
            if sub == "shr":   # readable: no zero fields, bytes in hex
                assert shown == mqbtt.describe_message(Share.from_bytes(payload))
                assert "=0," not in shown and "=''" not in shown and "b'" not in shown
                assert f"prev_block={Share.from_bytes(payload).prev_block.hex()}" in shown
            elif sub == "esp":   # the documented Reply form, with the pair's own RTT
                assert re.fullmatch(re.escape(repr(Reply.from_bytes(payload))) + r"  rtt=\d+\.\d ms",
                                    shown), shown
            elif sub == "srv":
                assert shown == repr(Request.from_bytes(payload))
            else:
                assert shown == payload.decode()
    # JSON: pair_id and topic on every line, every field of a share
    objs = [json.loads(x) for x in js.out]
    assert len(objs) == n_all
    assert all(o["topic"] == f"mqbtt/{o['pair_id']}/{o['subtopic']}" for o in objs)
    assert {o["pair_id"] for o in objs} == {"p1", "p2", weird}
    shares = [o for o in objs if o["subtopic"] == "shr"]
    assert all(len(o["message"]) == 12 for o in shares)
    assert all("rtt" in o for o in objs if o["subtopic"] == "esp")
    # one pair: text lines as documented (no pair name), JSON still names it
    assert len(one.out) == 4
    assert all(re.fullmatch(STAMP + r" (srv Request|esp Reply|shr Share|log I )\S*.*", x)
               for x in one.out), one.out
    assert all(json.loads(x)["pair_id"] == "p1" and json.loads(x)["topic"].startswith("mqbtt/p1/")
               for x in one_js.out)


def test_dump_duration(broker):
    t0 = time.monotonic()
    r = run("dump", "--broker", broker.uri, "--pid", "quiet", "--duration", "1")
    assert r.returncode == 0 and r.stdout == "", r.stderr
    assert time.monotonic() - t0 >= 1.0
    # like mosquitto_sub -W with -C: 27 when the count is not reached in time
    r = run("dump", "--broker", broker.uri, "--pid", "quiet", "--count", "3", "--duration", "0.5")
    assert r.returncode == 27 and r.stdout == ""
    assert r.stderr.splitlines()[-1] == "mqbtt dump: timed out after 0.5 s (0 of 3 messages)"
    # the count reached first: 0, long before the duration
    d = Proc(mqbtt_cmd("dump", "--broker", broker.uri, "--pid", "busy", "--mode", "log",
                       "--count", "1", "--duration", "60"))
    d.wait_err("listening")
    t0 = time.monotonic()
    with mqbtt.MQbtTMiner(broker.uri, "busy") as miner:
        miner.send_log("one line")
    assert d.wait() == 0 and len(d.out) == 1 and d.out[0].endswith(" log one line")
    assert time.monotonic() - t0 < 30


@pytest.mark.parametrize("args,needle", [
    (["--pid", "+", "--duration", "0"], "--duration"),
    (["--pid", "+", "--duration", "-1"], "--duration"),
    (["--pid", "+", "--duration", "nan"], "--duration"),
    (["--pid", "+", "--duration", "inf"], "--duration"),
    (["--pid", "+", "--duration", "soon"], "--duration"),
    (["--pid", "++"], "invalid pair id"),
    (["--pid", "+/x"], "invalid pair id"),
    (["--pid", "#"], "invalid pair id"),
    (["--pid", "+", "--mode", "everything"], "--mode"),
    (["--mode", "all"], "--pid"),
])
def test_dump_usage_errors(args, needle):
    r = run("dump", "--broker", UNREACHABLE, *args, timeout=30)
    assert_usage_error(r, needle)


# -- record ---------------------------------------------------------------------------------

def test_record_some_pairs_for_a_duration(broker, tmp_path):
    db = make_db(tmp_path / "rec.db", [("old", "log", 1000.0 + i, b"before") for i in range(3)])
    rec = start_recorder(broker, db, "--pid", "a", "--pid", "b", "--pid", "a", "--duration", "8")
    assert "recording mqbtt/a/srv, mqbtt/a/esp, mqbtt/a/shr, mqbtt/a/log, mqbtt/b/srv" in rec.err[0]
    t0 = time.monotonic()
    sent = {p: session(broker, p, n=1, shares_per_request=1) for p in ("a", "b", "c")}
    wait_for(lambda: count_rows(db) == 3 + 8, what="pairs a and b recorded")
    assert rec.wait(30) == 0            # stops by itself
    assert time.monotonic() - t0 < 20
    assert rec.err[-1] == ("mqbtt record: stopped: 8 messages recorded (srv=2 esp=2 shr=2 log=2), "
                           "11 in the database")
    with MQbtTDataBase(db) as d:
        assert d.pair_ids() == ["a", "b", "old"]
        for p in ("a", "b"):
            assert sorted((r.subtopic, r.payload) for r in d.records(pair_id=p)) == sorted(sent[p])
    # a recorder of some pairs has its own persistent session
    ids = {mqbtt.recorder_client_id(broker.uri, db), mqbtt.recorder_client_id(broker.uri, db, ["a"]),
           mqbtt.recorder_client_id(broker.uri, db, ["a", "b"])}
    assert len(ids) == 3
    assert mqbtt.recorder_client_id(broker.uri, db, ["b", "a", "a"]) == \
        mqbtt.recorder_client_id(broker.uri, db, ["a", "b"])


def test_record_status_line_on_a_terminal(broker, tmp_path):
    db = make_db(tmp_path / "tty.db", [("old", "log", 1000.0 + i, b"x") for i in range(5)])
    rec = PtyProc(mqbtt_cmd("record", "--broker", broker.uri, "--db", db, "--pid", "t"))
    try:
        wait_for(lambda: "recording mqbtt/t/srv" in rec.err, what="the recorder to start")
        session(broker, "t", n=1, shares_per_request=1)
        wait_for(lambda: re.search(r"\r\x1b\[Kmqbtt record: 4 messages recorded, [\d.]+/s "
                                   r"\(srv=1 esp=1 shr=1 log=1\), 9 in the database", rec.err),
                 what="the live status line with the database's total")
        rec.p.send_signal(signal.SIGINT)
        assert rec.wait(30) == 0
    finally:
        rec.kill()
    assert "stopped: 4 messages recorded (srv=1 esp=1 shr=1 log=1), 9 in the database" in rec.err


def test_recorder_filters_pairs_even_in_an_old_session(broker, tmp_path):
    """A reused --client-id keeps the old session's subscriptions (mqbtt/+/...):
    the other pairs' messages are acknowledged but not stored."""
    db = str(tmp_path / "s.db")
    r1 = start_recorder(broker, db, "--client-id", "shared-rec")
    r1.p.send_signal(signal.SIGINT)
    assert r1.wait() == 0
    rec = mqbtt.Recorder(broker.uri, db, client_id="shared-rec", pair_ids=["mine"])
    t = threading.Thread(target=rec.run, daemon=True)
    t.start()
    wait_for(lambda: rec._conn is not None and rec._conn.subscribed, what="subscribed")
    session(broker, "other", n=1, shares_per_request=0)
    session(broker, "mine", n=1, shares_per_request=0)
    wait_for(lambda: rec.total == 3, what="pair mine recorded")
    rec.stop()
    t.join(60)      # its last commit: the rows are read next
    assert not t.is_alive()
    with MQbtTDataBase(db) as d:
        assert d.pair_ids() == ["mine"] and d.count() == 3


@pytest.mark.parametrize("args,needle", [
    (["--pid", ""], "invalid pair id"),
    (["--pid", "a/b"], "invalid pair id"),
    (["--pid", "+"], "invalid pair id"),
    (["--pid", "ok", "--pid", "#"], "invalid pair id"),
    (["--duration", "0"], "--duration"),
    (["--duration", "-3"], "--duration"),
    (["--duration", "nan"], "--duration"),
    (["--duration", "1e999"], "--duration"),
])
def test_record_usage_errors(tmp_path, args, needle):
    db = tmp_path / "never.db"
    r = run("record", "--broker", UNREACHABLE, "--db", str(db), *args, timeout=30)
    assert_usage_error(r, needle)
    assert not db.exists()


def test_recorder_library_arguments(tmp_path):
    for kw in ({"pair_ids": []}, {"pair_ids": ["a/b"]}, {"pair_ids": "+"}, {"duration": 0},
               {"duration": float("nan")}, {"duration": "5"}):
        with pytest.raises(ValueError):
            mqbtt.Recorder(UNREACHABLE, str(tmp_path / "x.db"), **kw)


# -- replay -----------------------------------------------------------------------------------

T0 = 1_796_119_200.0          # 2026-12-01T10:00:00Z


def test_replay_checks_before_connecting(tmp_path):
    db = make_db(tmp_path / "r.db", [("alpha", "log", T0, b"a"), ("beta", "log", T0 + 1, b"b"),
                                     ("we ird\u2028", "log", T0 + 2, b"w")])
    # the broker is unreachable: an error about the pair proves nothing connected
    r = run("replay", "--broker", UNREACHABLE, "--db", db, "--pid", "gamma")
    assert_one_line_error(r, "replay", f"no pair gamma in {db}; its pairs: alpha, beta, "
                          "'we ird\\u2028'")
    r = run("replay", "--broker", UNREACHABLE, "--db", db, "--pid", "alpha",
            "--from", "2026-12-01T11:00:00Z")
    assert_one_line_error(r, "replay", "pair alpha has no messages between "
                          "2026-12-01T11:00:00.000000+00:00 and the end",
                          "its messages go from 2026-12-01T10:00:00.000000+00:00 to "
                          "2026-12-01T10:00:00.000000+00:00")
    for path, what in hostile_db_paths(tmp_path):
        before = os.path.exists(path)
        r = run("replay", "--broker", UNREACHABLE, "--db", str(path), "--pid", "alpha")
        assert_one_line_error(r, "replay", what)
        assert os.path.exists(path) == before
    empty = make_db(tmp_path / "nothing.db", [])
    r = run("replay", "--broker", UNREACHABLE, "--db", empty, "--pid", "alpha")
    assert_one_line_error(r, "replay", "no pair alpha", "it holds no messages")
    # a good pair: only now does it try the broker
    r = run("replay", "--broker", UNREACHABLE, "--db", db, "--pid", "alpha")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Connection refused" in r.stderr
    with pytest.raises(mqbtt.MQbtTNotFound):
        mqbtt.replay(db, UNREACHABLE, "gamma")
    with pytest.raises(LookupError):
        mqbtt.replay(str(tmp_path / "nope.db"), UNREACHABLE, "alpha")
    assert not (tmp_path / "nope.db").exists()


def test_replay_many_pairs_are_listed_briefly(tmp_path):
    db = make_db(tmp_path / "many.db", [(f"p{i:03d}", "log", T0 + i, b"x") for i in range(30)])
    r = run("replay", "--broker", UNREACHABLE, "--db", db, "--pid", "zzz")
    assert_one_line_error(r, "replay", "its pairs: p000, p001,", "p019 and 10 more")


@pytest.mark.parametrize("args,needle", [
    (["--from", "yesterday"], "--from"),
    (["--from", "2026-13-01"], "--from"),
    (["--to", "2026-12-01T25:00"], "--to"),
    (["--to", "nan"], "--to"),
    (["--from", "inf"], "--from"),
    (["--from", "1e400"], "--from"),
    (["--from", ""], "--from"),
    (["--from", "2026-12-01T10:00:00Z", "--to", "2026-12-01T09:00:00Z"], "is after --to"),
    (["--speed", "-1"], "--speed"),
])
def test_replay_usage_errors(tmp_path, args, needle):
    db = make_db(tmp_path / "u.db", [("alpha", "log", T0, b"a")])
    r = run("replay", "--broker", UNREACHABLE, "--db", db, "--pid", "alpha", *args)
    assert_usage_error(r, needle)


def test_replay_time_window(broker, tmp_path):
    rows = [("w", "shr", T0 + i, Share(nonce=i).to_bytes()) for i in range(10)]
    db = make_db(tmp_path / "w.db", rows + [("x", "shr", T0 + 3.5, Share(nonce=99).to_bytes())])
    with mqbtt.MQbtTOptimizer(broker.uri, "w2") as opt:
        # ISO 8601 with an offset, and epoch seconds; both bounds inclusive
        r = run("replay", "--broker", broker.uri, "--db", db, "--pid", "w", "--to-pid", "w2",
                "--speed", "0", "--from", "2026-12-01T11:00:03+01:00", "--to", str(T0 + 6))
        assert r.returncode == 0, r.stderr
        assert [opt.receive_share(timeout=10).nonce for _ in range(4)] == [3, 4, 5, 6]
        with pytest.raises(mqbtt.Empty):
            opt.receive_share(timeout=0.5)
    lines = r.stderr.splitlines()
    assert lines == [f"mqbtt replay: publishing 4 messages of pair w of {db} "
                     "(2026-12-01T10:00:03.000000+00:00 to 2026-12-01T10:00:06.000000+00:00) "
                     "as w2 at speed 0",
                     "mqbtt replay: 4 messages published"]      # no progress off a terminal
    assert "\r" not in r.stderr


def test_replay_progress_eta_on_a_terminal(broker, tmp_path):
    n = 12
    db = make_db(tmp_path / "p.db", [("pp", "log", T0 + 0.25 * i, f"line {i}".encode())
                                     for i in range(n)])
    with mqbtt.MQbtTLogReceiver(broker.uri, "pp2") as logs:
        p = PtyProc(mqbtt_cmd("replay", "--broker", broker.uri, "--db", db, "--pid", "pp",
                              "--to-pid", "pp2", "--speed", "2"))
        try:
            assert p.wait(60) == 0, p.err
        finally:
            p.kill()
        assert [logs.receive_log(timeout=10) for _ in range(n)] == [f"line {i}" for i in range(n)]
    err = p.err
    progress = re.findall(r"\r\x1b\[Kmqbtt replay: (\d+)/12 messages \((\d+)%\), "
                          r"0:00:0(\d) elapsed, ETA 0:00:0(\d)", err)
    assert len(progress) >= 2, err
    assert progress[-1][:2] == ("12", "100") and progress[-1][3] == "0"
    assert int(progress[0][3]) >= 1          # 2.75 s of recording at speed 2: ETA ~1 s at first
    assert [int(x[0]) for x in progress] == sorted(int(x[0]) for x in progress)
    assert err.rstrip().endswith("mqbtt replay: 12 messages published")


@pytest.mark.parametrize("terminal,sig", [(True, signal.SIGINT), (False, signal.SIGINT),
                                          (False, signal.SIGTERM)])
def test_replay_summary_on_ctrl_c(broker, tmp_path, terminal, sig):
    n = 40
    db = make_db(tmp_path / "c.db", [("cc", "log", T0 + 0.5 * i, b"x") for i in range(n)])
    args = mqbtt_cmd("replay", "--broker", broker.uri, "--db", db, "--pid", "cc", "--to-pid", "cc2")
    with mqbtt.MQbtTLogReceiver(broker.uri, "cc2") as logs:
        p = PtyProc(args) if terminal else Proc(args)
        try:
            for _ in range(2):
                logs.receive_log(timeout=20)   # it is publishing
            p.p.send_signal(sig)
            assert p.wait(30) == 0
            err = p.err if terminal else "\n".join(p.err)
            m = re.search(r"mqbtt replay: interrupted after 0:00:0\d: (\d+) of 40 messages "
                          r"published", err)
            assert m, err
            # what it published after those two: each one it counts arrives (a long wait,
            # as delivery may lag on a loaded machine), and no more (a short one)
            received = 2
            while received < int(m.group(1)):
                logs.receive_log(timeout=30)
                received += 1
            with pytest.raises(mqbtt.Empty):
                logs.receive_log(timeout=1.0)
        finally:
            p.kill()
    assert 2 <= int(m.group(1)) < n
    assert int(m.group(1)) == received            # exact
    assert "Traceback" not in err
    assert ("ETA" in err) == terminal


# -- info and export ------------------------------------------------------------------------

@pytest.fixture
def recording(broker, tmp_path):
    """A real recording: `mqbtt record` of two pairs' sessions, plus an undecodable share."""
    db = str(tmp_path / "traffic.db")
    rec = start_recorder(broker, db, "--duration", "30")
    sent = {"g1": session(broker, "g1", n=3, shares_per_request=2),
            "g2": session(broker, "g2", n=1, shares_per_request=1)}
    pub = publisher(broker)
    pub.publish("mqbtt/g2/shr", b"\xff\x00bad", 1).wait_for_publish(10)
    pub.disconnect()
    pub.loop_stop()
    sent["g2"].append(("shr", b"\xff\x00bad"))
    wait_for(lambda: count_rows(db) == 15 + 5, what="the sessions recorded")
    rec.p.send_signal(signal.SIGINT)
    assert rec.wait() == 0
    return db, sent


def test_info(recording):
    db, sent = recording
    r = run("info", "--db", db)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    with MQbtTDataBase(db) as d:
        times = {p: [x.timestamp for x in d.records(pair_id=p)] for p in ("g1", "g2")}
    lines = r.stdout.splitlines()
    size = os.path.getsize(db)
    assert re.fullmatch(re.escape(db) + r": \d+\.\d KiB(?: \(\+ [\d.]+ \w+ of write-ahead log\))?"
                        r", 2 pairs, 20 messages", lines[0]), lines[0]
    assert f"{size / 1024:.1f} KiB" in lines[0]
    assert lines[1].split() == ["pair", "messages", "srv", "esp", "shr", "log", "first", "(UTC)",
                                "last", "(UTC)"]
    assert lines[2].split() == ["g1", "15", "3", "3", "6", "3",
                                times["g1"][0].isoformat(timespec="microseconds"),
                                times["g1"][-1].isoformat(timespec="microseconds")]
    assert lines[3].split()[:6] == ["g2", "5", "1", "1", "2", "1"]
    assert len(lines) == 4
    js = json.loads(run("info", "--db", db, "--json").stdout)
    assert js["size"] == size and js["messages"] == 20 and list(js["pairs"]) == ["g1", "g2"]
    assert js["pairs"]["g1"]["first"] == times["g1"][0].isoformat(timespec="microseconds")
    assert js["pairs"]["g2"]["shr"] == 2
    # the library behind it
    with MQbtTDataBase(db) as d:
        info = d.info()
        assert info["pairs"]["g1"]["first"] == times["g1"][0]
        assert d.summary(pair_id="g2")["g2"]["messages"] == 5
        assert d.summary(min_timestamp=times["g1"][-1] + datetime.timedelta(microseconds=1)) \
            .get("g1") is None or times["g2"][-1] > times["g1"][-1]
        assert d.summary(pair_id="nobody") == {}


def test_info_of_an_empty_recording_and_bad_paths(tmp_path):
    empty = make_db(tmp_path / "empty-rec.db", [])
    r = run("info", "--db", empty)
    assert r.returncode == 0 and re.fullmatch(re.escape(empty) + r": [\d.]+ KiB, 0 pairs, 0 messages\n",
                                              r.stdout), r.stdout
    for path, what in hostile_db_paths(tmp_path):
        before = os.path.exists(path)
        r = run("info", "--db", str(path))
        assert_one_line_error(r, "info", what)
        assert os.path.exists(path) == before
    assert_usage_error(run("info"), "--db")


def test_export_jsonl_and_csv(recording):
    db, sent = recording
    r = run("export", "--db", db)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(rows) == 20
    for row in rows:
        when = datetime.datetime.fromisoformat(row["time"])
        assert when.utcoffset() == datetime.timedelta(0) and row["time"].endswith("+00:00")
        assert abs(when.timestamp() - row["timestamp"]) < 1e-6
    by_pair = {p: [x for x in rows if x["pair_id"] == p] for p in ("g1", "g2")}
    for p, msgs in sent.items():
        for sub in ("srv", "esp", "shr", "log"):
            got = [x for x in by_pair[p] if x["subtopic"] == sub]
            want = [payload for s, payload in msgs if s == sub]
            assert len(got) == len(want)
            for g, w in zip(got, want):
                if sub == "srv":
                    assert Request(**{k: g[k] for k in mqbtt.EXPORT_FIELDS["srv"]}) == Request.from_bytes(w)
                elif sub == "esp":
                    reply = Reply.from_bytes(w)
                    assert (g["kind"], g["num_shares"], g["new_block"]) == \
                        (reply.kind.name, reply.num_shares, reply.new_block)
                elif sub == "log":
                    assert g["text"] == w.decode()
                elif w == b"\xff\x00bad":
                    assert g["payload"] == w.hex() and "cannot decode Share" in g["error"]
                    assert "nonce" not in g
                else:
                    share = Share.from_bytes(w)
                    assert g["prev_block"] == share.prev_block.hex() and g["nonce"] == share.nonce
                    assert g["share_time"] == share.time and len(g) == 4 + 12 and "payload" not in g
    # CSV: the same rows
    r = run("export", "--db", db, "--format", "csv")
    assert r.returncode == 0, r.stderr
    table = list(csv.DictReader(io.StringIO(r.stdout)))
    assert r.stdout.splitlines()[0].count("request_id") == 1   # Request's and Reply's: one column
    assert len(table) == 20
    assert [t["time"] for t in table] == [x["time"] for x in rows]
    first_srv = next(t for t in table if t["subtopic"] == "srv")
    assert first_srv["reset"] in ("true", "false") and first_srv["nonce"] == ""
    bad = next(t for t in table if t["payload"])
    assert bad["payload"] == "ff00626164" and bad["subtopic"] == "shr" and bad["nonce"] == ""
    # one subtopic: its columns only
    r = run("export", "--db", db, "--format", "csv", "--subtopic", "esp", "--pid", "g1")
    header, *body = r.stdout.splitlines()
    assert header == ("time,timestamp,pair_id,subtopic,kind,num_shares,new_block,request_id,"
                      "payload,error")
    assert len(body) == 3 and all(re.search(r",g1,esp,(HELLO|RESULT|RESET|BYE),\d+,(true|false),\d+,,$", x)
                                  for x in body), body


def test_export_filters(tmp_path):
    rows = [("a", ["srv", "esp", "shr", "log"][i % 4], T0 + i,
             {"srv": Request(nonce_start=i).to_bytes(), "esp": Reply(num_shares=i).to_bytes(),
              "shr": Share(nonce=i).to_bytes(), "log": f"l{i}".encode()}[["srv", "esp", "shr", "log"][i % 4]])
            for i in range(12)] + [("b", "log", T0 + 5.5, b"other")]
    db = make_db(tmp_path / "f.db", rows)

    def export(*args):
        r = run("export", "--db", db, *args)
        assert r.returncode == 0, r.stderr
        return [json.loads(x) for x in r.stdout.splitlines()]
    assert len(export()) == 13
    assert [x["pair_id"] for x in export("--pid", "b")] == ["b"]
    assert [x["nonce"] for x in export("--subtopic", "shr")] == [2, 6, 10]
    # --from/--to: inclusive; ISO with Z, with an offset, without seconds, epoch
    assert [x["timestamp"] - T0 for x in export("--from", "2026-12-01T10:00:05Z", "--to", str(T0 + 7))] \
        == [5, 5.5, 6, 7]
    assert [x["timestamp"] - T0 for x in export("--pid", "a", "--from", "2026-12-01T11:00:09+0100")] \
        == [9, 10, 11]
    assert [x["timestamp"] - T0 for x in export("--to", "2026-12-01T10:00Z")] == [0]
    env = dict(os.environ, TZ="XXX-3")      # local time, UTC+3: naive times are local
    r = run("export", "--db", db, "--from", "2026-12-01 13:00:10", env=env)
    assert [json.loads(x)["timestamp"] - T0 for x in r.stdout.splitlines()] == [10, 11]
    assert export("--pid", "nobody") == []
    # the library behind it
    out = io.StringIO()
    assert mqbtt.export(db, out, "csv", pair_id="b") == 1
    assert out.getvalue().splitlines()[1].startswith("2026-12-01T10:00:05.500000+00:00,")
    with MQbtTDataBase(db) as d:
        assert [x["num_shares"] for x in d.export_rows(subtopic="esp", max_timestamp=T0 + 5)] == [1, 5]


@pytest.mark.parametrize("args,needle", [
    (["--format", "xml"], "--format"),
    (["--format", ""], "--format"),
    (["--subtopic", "foo"], "--subtopic"),
    (["--subtopic", "SRV"], "--subtopic"),
    (["--pid", "a/b"], "invalid pair id"),
    (["--pid", "+"], "invalid pair id"),
    (["--from", "2026-12-01T10:00:00+25:00"], "--from"),
    (["--from", "12/01/2026"], "--from"),
    (["--to", "-inf"], "--to"),
    (["--from", "2026-12-02", "--to", "2026-12-01"], "is after --to"),
])
def test_export_usage_errors(tmp_path, args, needle):
    db = make_db(tmp_path / "e.db", [("a", "log", T0, b"x")])
    assert_usage_error(run("export", "--db", db, *args), needle)


def test_odd_database_file_names(tmp_path):
    for name in ("we?ird#%20 name.db", os.fsdecode(b"caf\xe9.db")):
        db = make_db(os.path.join(str(tmp_path), name), [("a", "log", T0, b"x")])
        r = run("info", "--db", db)
        assert r.returncode == 0 and "1 pair, 1 message" in r.stdout, r.stderr
        r = run("export", "--db", db)
        assert r.returncode == 0 and json.loads(r.stdout)["text"] == "x", r.stderr
        r = run("replay", "--broker", UNREACHABLE, "--db", db, "--pid", "b")
        assert_one_line_error(r, "replay", "its pairs: a")


def test_export_bad_databases_and_a_closed_pipe(tmp_path):
    for path, what in hostile_db_paths(tmp_path):
        before = os.path.exists(path)
        r = run("export", "--db", str(path))
        assert_one_line_error(r, "export", what)
        assert os.path.exists(path) == before
    assert_usage_error(run("export"), "--db")
    db = make_db(tmp_path / "big.db", [("a", "log", T0 + i, b"x" * 100) for i in range(5000)])
    p = subprocess.run(f"{sys.executable} mqbtt.py export --db {db} | head -n 2; "
                       "echo status=${PIPESTATUS[0]}", shell=True, executable="/bin/bash",
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    lines = p.stdout.splitlines()
    assert len(lines) == 3 and lines[-1] == "status=0" and p.stderr == "", p.stderr


def test_export_escapes_terminal_controls_in_json(tmp_path):
    db = make_db(tmp_path / "c.db", [("p\u2028q", "log", T0, "a\x1b[2J\x9b\x7fb\u2029".encode())])
    r = run("export", "--db", db)
    assert r.returncode == 0, r.stderr
    line = r.stdout
    assert not any(c in line for c in "\x1b\x9b\x7f\u2028\u2029"), repr(line)
    row = json.loads(line)
    assert row["text"] == "a\x1b[2J\x9b\x7fb\u2029" and row["pair_id"] == "p\u2028q"


def test_parse_time():
    assert mqbtt.parse_time("2026-12-01T10:00:00Z") == T0
    assert mqbtt.parse_time("2026-12-01T10:00:00z") == T0
    assert mqbtt.parse_time("2026-12-01T11:00:00+01:00") == T0
    assert mqbtt.parse_time("2026-12-01T11:00+0100") == T0
    assert mqbtt.parse_time("2026-12-01T05:00:00-05") == T0
    assert mqbtt.parse_time("2026-12-01T10:00:00.25Z") == T0 + 0.25
    assert mqbtt.parse_time("2026-12-01T10:00:00,5Z") == T0 + 0.5
    assert mqbtt.parse_time("2026-12-01T10:00:00.123456789Z") == T0 + 0.123456
    assert mqbtt.parse_time(str(T0)) == T0 and mqbtt.parse_time("1796119200") == T0
    assert mqbtt.parse_time(" 1796119200.5 ") == T0 + 0.5
    assert mqbtt.parse_time("2026-12-01") == datetime.datetime(2026, 12, 1).timestamp()
    assert mqbtt.parse_time("2026-12-01 10:00") == datetime.datetime(2026, 12, 1, 10).timestamp()
    for bad in ("", "now", "nan", "inf", "-inf", "1e400", "2026-02-30", "2026-12-01T24:00",
                "2026-12-01T10:00:00+24:00", "2026-12-01T10", "99999999999999999",
                "2026-12-01T10:00:00ZZ", "0x10", "1_000", "2026-12-01Z", "2026-12-01+01:00"):
        with pytest.raises(ValueError):
            mqbtt.parse_time(bad)


def test_new_commands_have_help_and_links():
    for cmd in ("info", "export"):
        r = run(cmd, "--help")
        # the program as typed: the interpreter's name (python3, or python in a venv) and mqbtt.py
        prog = f"{os.path.basename(sys.executable)} mqbtt.py"
        assert r.returncode == 0 and r.stdout.startswith(f"usage: {prog} {cmd} "), r.stdout
        assert f"mqbtt_{cmd}" in mqbtt.link_names()
    r = run("dump", "--help")
    assert "+ watches every pair" in r.stdout and "{log,miner,optimizer,all}" in r.stdout
    assert "--duration SECONDS" in r.stdout
    r = run("replay", "--help")
    assert "--from TIME" in r.stdout and "--to TIME" in r.stdout
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    for text in ("mqbtt info --db traffic.db", "mqbtt export --db traffic.db [--pid ID]",
                 "### Times on the command line", "`--pid +` watches every pair",
                 "[--pid ID ...] [--duration SECONDS]", "[--from TIME] [--to TIME]",
                 "MQbtTDataBase.summary(", "MQbtTDataBase.export_rows(", "mqbtt.export("):
        assert text in readme, text


def test_replay_ctrl_c_while_connecting(tmp_path):
    """A broker that accepts TCP but never answers: Ctrl-C still ends it at once."""
    import socket
    db = make_db(tmp_path / "s.db", [("ss", "log", T0, b"x")])
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(5)
    try:
        p = Proc(mqbtt_cmd("replay", "--broker", f"mqtt://127.0.0.1:{silent.getsockname()[1]}",
                           "--db", db, "--pid", "ss"))
        conn, _ = silent.accept()        # it is connecting
        t0 = time.monotonic()
        p.p.send_signal(signal.SIGINT)
        assert p.wait(30) == 0
        assert time.monotonic() - t0 < 8      # not the 10 s connect timeout
        conn.close()
    finally:
        silent.close()
        p.kill()
    assert p.err == ["mqbtt replay: interrupted before connecting: nothing published"]
