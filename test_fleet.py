"""Fleet statistics (issue 15): FleetStats, ``mqbtt top`` driven in a real tmux,
``mqbtt exporter`` scraped by a real Prometheus and checked by ``promtool``.

Every network test runs a private Mosquitto on a free loopback port; tmux runs
on a private socket; Prometheus gets a temporary configuration and data
directory.  Waits poll a condition (a tmux capture, an HTTP answer); nothing
sleeps blindly to synchronise.
"""
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.parse
import urllib.request

import pytest

import mqbtt
from local_broker import LocalBroker, free_port
from testlib import ROOT, Tmux, http_get, start_echo, wait_until

MQBTT = os.path.join(ROOT, "mqbtt.py")
DASHBOARD = os.path.join(ROOT, "examples", "grafana-dashboard.json")


# ---------------------------------------------------------------------------
# FleetStats, without a network
# ---------------------------------------------------------------------------

T0 = 1_800_000_000.0


def fleet(**kw):
    stats = mqbtt.FleetStats("mqtt://127.0.0.1:1", **kw)
    stats._t0 = T0      # what start() sets: the moment watching began
    return stats


def req(rid=0):
    return types.SimpleNamespace(request_id=rid)


class TestFleetStats:
    def test_counts_rates_and_last_seen(self):
        s = fleet()
        for k in range(30):                                   # 1 request and 1 reply per second
            s.feed("gamma", "srv", mqbtt.Request(timestamp_min=k).to_bytes(), T0 + k)
            s.feed("gamma", "esp", mqbtt.Reply(num_shares=k).to_bytes(), T0 + k + 0.002)
        for k in range(60):                                   # 2 log lines per second
            s.feed("gamma", "log", f"line {k}\n".encode(), T0 + k / 2)
        (p,) = s.pairs(now=T0 + 30)
        assert p.messages == {"srv": 30, "esp": 30, "shr": 0, "log": 60}
        assert p.requests_per_min == pytest.approx(60, rel=0.05)
        assert p.replies_per_min == pytest.approx(60, rel=0.05)
        assert p.logs_per_min == pytest.approx(120, rel=0.05)
        assert p.shares_per_min == 0
        assert p.last_log == "line 59" and p.last_log_time == T0 + 29.5
        assert p.rtt_count == 30 and p.rtt_p50 == pytest.approx(0.002, abs=1e-6)
        assert p.last_seen == T0 + 29.5 and p.age == pytest.approx(0.5)
        assert not p.stale
        # a minute later the window is empty: rates fall to 0, the pair turns stale
        (p,) = s.pairs(now=T0 + 95)
        assert (p.requests_per_min, p.replies_per_min, p.logs_per_min) == (0, 0, 0)
        assert p.stale and p.messages["log"] == 60

    def test_rate_of_a_burst_just_after_start_is_not_inflated(self):
        s = fleet()
        for k in range(10):
            s.feed("burst", "srv", b"", T0 + 0.5 + k / 100)
        (p,) = s.pairs(now=T0 + 1)          # watched for 1 s: counted over at least 10 s
        assert p.requests_per_min == pytest.approx(60)
        (p,) = s.pairs(now=T0 + 30)         # watched for 30 s: 10 in 30 s
        assert p.requests_per_min == pytest.approx(20)

    def test_round_trips_paired_by_request_id_then_by_order(self):
        s = fleet()
        acc = s._account        # decoded messages: ids work before and after Request/Reply carry them
        acc("p", 0, T0, req(7), True)
        acc("p", 0, T0 + 1, req(8), True)
        acc("p", 1, T0 + 1.5, req(7), True)          # answers 7, not the latest (8)
        (p,) = s.pairs(now=T0 + 2)
        assert p.rtt_last == pytest.approx(1.5)
        acc("p", 1, T0 + 1.75, req(8), True)
        (p,) = s.pairs(now=T0 + 2)
        assert p.rtt_last == pytest.approx(0.75) and p.rtt_count == 2
        acc("p", 1, T0 + 3, req(99), True)           # a reply to a request never seen: no RTT
        acc("p", 1, T0 + 3, req(7), True)            # a duplicate reply: no RTT
        (p,) = s.pairs(now=T0 + 3)
        assert p.rtt_count == 2
        # without ids (old firmware): each reply answers the latest unanswered request
        acc("p", 0, T0 + 4, req(0), True)
        acc("p", 1, T0 + 4.25, req(0), True)
        acc("p", 1, T0 + 4.5, req(0), True)          # no request pending: no RTT
        (p,) = s.pairs(now=T0 + 5)
        assert p.rtt_count == 3 and p.rtt_last == pytest.approx(0.25)
        assert p.rtt_p50 == pytest.approx(0.75)
        assert p.rtt_sum == pytest.approx(2.5)
        # histogram: 0.25 <= 0.25, 0.75 <= 1.0, 1.5 <= 2.5
        buckets = dict(zip(mqbtt.RTT_BUCKETS + (math.inf,), p.rtt_buckets))
        assert (buckets[0.1], buckets[0.25], buckets[0.5], buckets[1.0], buckets[2.5]) == (0, 1, 1, 2, 3)
        assert buckets[math.inf] == 3

    def test_reply_id_wire_compatible(self):
        """A Request/Reply payload with request_id (fields 6 and 4, issue 10) still decodes."""
        s = fleet()
        s.feed("w", "srv", mqbtt.Request(timestamp_min=1).to_bytes() + b"\x30\x05", T0)
        s.feed("w", "esp", mqbtt.Reply().to_bytes() + b"\x20\x05", T0 + 0.25)
        (p,) = s.pairs(now=T0 + 1)
        assert p.undecodable == {"srv": 0, "esp": 0, "shr": 0, "log": 0}
        assert p.rtt_last == pytest.approx(0.25)

    def test_shares_best_difficulty_and_histogram(self):
        s = fleet()
        for k, d in enumerate([512.0, 4096.0, 2.5e9, 100.0, float("nan"), float("inf"), 3e15]):
            s.feed("s", "shr", mqbtt.Share(diff=d).to_bytes(), T0 + k)
        (p,) = s.pairs(now=T0 + 10)
        assert p.messages["shr"] == 7 and p.best_share_difficulty == 3e15
        assert p.share_count == 5                     # NaN and infinity are not difficulties
        assert p.share_sum == pytest.approx(512 + 4096 + 2.5e9 + 100 + 3e15)
        buckets = dict(zip(mqbtt.DIFF_BUCKETS + (math.inf,), p.share_buckets))
        assert (buckets[100.0], buckets[1000.0], buckets[1e4], buckets[1e10], buckets[1e13]) == (1, 2, 3, 4, 4)
        assert buckets[math.inf] == 5

    def test_undecodable_payloads_are_counted_never_raise(self):
        s = fleet()
        bad = [b"\xff", b"\x08", b"\x0a\x05ab", b"\x80" * 12, bytearray(b"\x12\x01")]
        for k, payload in enumerate(bad):
            for sub in ("srv", "esp", "shr"):
                assert s.feed("u", sub, payload, T0 + k)
        assert s.feed("u", "log", b"\xff\xfe not utf-8 \x00", T0 + 9)
        assert s.feed("u", "esp", mqbtt.Reply().to_bytes()[:0] + b"\x08\x09", T0 + 9)   # kind 9
        assert s.feed("u", "srv", None, T0 + 9)       # not bytes at all
        (p,) = s.pairs(now=T0 + 10)
        assert p.undecodable == {"srv": 6, "esp": 6, "shr": 5, "log": 0}
        assert p.messages == {"srv": 6, "esp": 6, "shr": 5, "log": 1}
        assert p.rtt_count == 0 and p.best_share_difficulty is None
        assert p.last_log == "\ufffd\ufffd not utf-8 \\x00"

    def test_control_characters_neutralised(self):
        s = fleet()
        hostile = "I (1) \x1b[2J\x1b]0;owned\x07 \u202eevil\u2066 \x9b31m \r\nX\ttab \x7f"
        s.feed("c", "log", hostile.encode(), T0)
        (p,) = s.pairs(now=T0 + 1)
        assert p.last_log == mqbtt.safe_text(hostile)      # the shared sanitiser (tab kept)
        assert p.last_log == "I (1)  \\u202eevil\\u2066  \\r\\nX\ttab \\x7f"
        # a hostile pair id is shown neutralised too (the exporter keeps it as it is)
        s.feed("\x1b[31mred\u202e", "log", b"x", T0)
        table = mqbtt.format_fleet_table(s.pairs(now=T0 + 1))
        assert all(line.isprintable() for line, _ in table)         # the table: tab as a space
        assert any(line.startswith("red\\u202e") for line, _ in table)

    def test_ignored_topics_and_over_long_pair_ids(self):
        s = fleet()
        assert not s.feed("", "log", b"x", T0)
        assert not s.feed("p", "nope", b"x", T0)
        assert not s.feed("x" * (mqbtt.FLEET_MAX_PAIR_ID + 1), "log", b"x", T0)
        assert s.feed("x" * mqbtt.FLEET_MAX_PAIR_ID, "log", b"x", T0)
        for t in ("mqbtt/a/b/log", "other/a/log", "mqbtt//log", "mqbtt/a/LOG"):
            s._on_message(None, None, types.SimpleNamespace(topic=t, payload=b"x"))
        assert s.ignored_messages == 7 and len(s) == 1

    def test_pair_filter(self):
        s = fleet(pair_ids=["a", "b"])
        assert s.subscriptions == [("mqbtt/a/+", 1), ("mqbtt/b/+", 1)]
        assert s.feed("a", "log", b"x", T0) and not s.feed("c", "log", b"x", T0)
        assert [p.pair_id for p in s.pairs(now=T0)] == ["a"]
        assert fleet(pair_ids=["a", "+"]).subscriptions == [("mqbtt/+/+", 1)]
        assert fleet().subscriptions == [("mqbtt/+/+", 1)]

    def test_cap_drops_and_counts_then_forgets_silent_pairs(self):
        s = fleet(max_pairs=3, forget_after=100)
        for i in range(3):
            assert s.feed(f"p{i}", "log", b"x", T0 + i)
        assert not s.feed("late", "log", b"x", T0 + 5)
        assert not s.feed("late", "log", b"x", T0 + 6)      # the same pair again
        assert not s.feed("later", "shr", b"", T0 + 7)
        assert (len(s), s.dropped_pairs, s.dropped_messages, s.forgotten_pairs) == (3, 2, 3, 0)
        assert s.feed("p1", "log", b"x", T0 + 8)            # tracked pairs still count
        # p0 silent for over forget_after when a new pair arrives: it makes room
        assert s.feed("late", "log", b"x", T0 + 150)
        assert [p.pair_id for p in s.pairs(now=T0 + 150)] == ["late", "p1", "p2"]
        assert (s.dropped_pairs, s.forgotten_pairs) == (2, 1)
        # the least recently seen is now p2 (at +2): silent 118 s > 100 at +120, forgotten
        assert s.feed("new", "log", b"x", T0 + 120)
        assert {p.pair_id for p in s.pairs(now=T0 + 150)} == {"late", "new", "p1"}
        assert s.forgotten_pairs == 2

    def test_dropped_pair_ids_are_bounded(self):
        s = fleet(max_pairs=10)
        for i in range(5000):
            s.feed(f"p{i}", "log", b"x", T0)
        assert len(s) == 10 and s.dropped_pairs == 4990 and s.dropped_messages == 4990
        assert len(s._dropped_ids) == 10

    @pytest.mark.parametrize("kw", [{"max_pairs": 0}, {"max_pairs": -1}, {"max_pairs": 1.5},
                                    {"max_pairs": True}, {"stale_after": 0},
                                    {"stale_after": float("nan")}, {"forget_after": -1},
                                    {"forget_after": float("inf")}, {"pair_ids": ["a/b"]},
                                    {"pair_ids": ["#"]}, {"pair_ids": [""]}])
    def test_bad_parameters(self, kw):
        with pytest.raises(ValueError):
            mqbtt.FleetStats("mqtt://127.0.0.1:1", **kw)

    def test_sort(self):
        s = fleet()
        s.feed("b", "log", b"x", T0)
        s.feed("b", "log", b"x", T0)
        s.feed("a", "log", b"x", T0 + 1)
        s.feed("c", "shr", mqbtt.Share(diff=5.0).to_bytes(), T0 + 2)
        pairs = s.pairs(now=T0 + 3)
        ids = lambda key, rev=False: [p.pair_id for p in mqbtt.sort_fleet(pairs, key, rev)]  # noqa: E731
        assert ids("p") == ["a", "b", "c"] and ids("p", True) == ["c", "b", "a"]
        assert ids("l") == ["b", "a", "c"]
        assert ids("d") == ["c", "a", "b"]                 # pairs without a value come last
        assert ids("a") == ["c", "a", "b"]                 # most recently seen first
        with pytest.raises(ValueError):
            mqbtt.sort_fleet(pairs, "z")

    def test_table_fits_the_width(self):
        s = fleet()
        s.feed("wide-名前-ペア", "log", ("ログ" * 100).encode(), T0)
        s.feed("a" * 60, "srv", b"", T0)
        for width in (40, 80, 132, 200):
            for line, _ in mqbtt.format_fleet_table(s.pairs(now=T0 + 1), width):
                assert mqbtt._cells(line) == width, (width, line)
        header = mqbtt.format_fleet_table([], 100)[0][0]
        assert header.split() == ["PAIR", "REQ/m", "REP/m", "RTT", "p50", "RTT", "last", "SHR/m",
                                  "BEST", "DIFF", "LOG/m", "SEEN", "LAST", "LOG"]

    @pytest.mark.parametrize("text,expected", [
        ("127.0.0.1:9108", ("127.0.0.1", 9108)), ("localhost:0", ("localhost", 0)),
        (":9108", ("0.0.0.0", 9108)), ("[::1]:9108", ("::1", 9108)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535))])
    def test_parse_listen(self, text, expected):
        assert mqbtt.parse_listen(text) == expected

    @pytest.mark.parametrize("text", ["", "9108", "host", "host:", "host:65536", "host:-1",
                                      "host:http", "::1:9108", "[]:9108", "a b:80", "h/x:80",
                                      "host:٣٣", None])
    def test_parse_listen_bad(self, text):
        with pytest.raises(ValueError):
            mqbtt.parse_listen(text)


# ---------------------------------------------------------------------------
# live traffic: echo miners, examples/optimizer.py, shares and log lines
# ---------------------------------------------------------------------------

def run_optimizer(broker, pid):
    env = dict(os.environ, MQBTT_BROKER=broker.uri)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "optimizer.py"), pid],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.count("Received reply") == 10, r.stderr


class Generator:
    """Publish shares and log lines for pairs at fixed rates (per second) from a thread,
    as a miner would (MQbtTMiner.send_share / send_log), under its own client id."""

    def __init__(self, broker, pid, logs=0.0, shares=0.0, diffs=(1000.0,), first_log=None):
        self.miner = mqbtt.MQbtTMiner(broker.uri, pid, client_id=f"gen-{pid}", clean_session=True)
        self.logs, self.shares, self.diffs, self.first_log = logs, shares, diffs, first_log
        self.sent = {"log": 0, "shr": 0}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        t0 = time.monotonic()
        if self.first_log:
            self.miner.send_log(self.first_log)
            self.sent["log"] += 1
        while not self.stopped.is_set():
            now = time.monotonic() - t0
            while self.logs and self.sent["log"] < now * self.logs:
                self.miner.send_log(f"I ({self.sent['log']}) asic_result: nonce found")
                self.sent["log"] += 1
            while self.shares and self.sent["shr"] < now * self.shares:
                diff = self.diffs[self.sent["shr"] % len(self.diffs)]
                self.miner.send_share(mqbtt.Share(diff=diff, nonce=self.sent["shr"]))
                self.sent["shr"] += 1
            self.stopped.wait(0.05)

    def stop(self):
        self.stopped.set()
        self.thread.join(10)
        self.miner.stop()


@pytest.fixture
def procs():
    started = []
    yield started
    for p in started:
        if isinstance(p, Generator):
            p.stop()
        elif p.poll() is None:
            p.kill()
            p.wait()


# ---------------------------------------------------------------------------
# mqbtt top in tmux
# ---------------------------------------------------------------------------

@pytest.fixture
def tmux(tmp_path):
    t = Tmux(tmp_path)
    yield t
    t.kill()


def rows(screen):
    """{pair id: the words of its row} of a top screen."""
    out = {}
    for line in screen.splitlines():
        words = line.split()
        if len(words) >= 9 and words[0] in ("alpha", "bravo", "charlie"):
            out[words[0]] = words
    return out


def order(screen):
    return [line.split()[0] for line in screen.splitlines()
            if line.split() and line.split()[0] in ("alpha", "bravo", "charlie")]


def num(text):
    units = {"k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)


HOSTILE = "E (1) \x1b[31mRED\x07 \u202eevil"


def test_top_in_tmux_three_pairs(broker, tmux, procs):
    """Three pairs of real traffic; the live table shows them with plausible rates,
    sort keys reorder them, one that stops turns stale (and dim), q quits."""
    tmux.run(["top", "--broker", broker.uri, "--stale", "3"])
    tmux.wait_screen(lambda s: "mqbtt top" in s and "(connected)" in s and "REQ/m" in s,
                     what="top connected")
    # alpha: 2 logs/s, 1 share/s; bravo: 4 logs/s; charlie: 2 shares/s and one hostile log line
    for pid in ("alpha", "bravo", "charlie"):
        procs.append(start_echo(broker, pid))
    gens = {"alpha": Generator(broker, "alpha", logs=2, shares=1, diffs=(1000.0, 5000.0, 3000.0)),
            "bravo": Generator(broker, "bravo", logs=4),
            "charlie": Generator(broker, "charlie", shares=2, diffs=(2.5e9, 1e6), first_log=HOSTILE)}
    procs.extend(gens.values())
    for pid in ("alpha", "bravo", "charlie"):
        run_optimizer(broker, pid)                # 10 requests and 10 replies each

    def plausible(screen):
        r = rows(screen)
        if set(r) != {"alpha", "bravo", "charlie"}:
            return False
        req = {p: num(w[1]) for p, w in r.items()}
        rep = {p: num(w[2]) for p, w in r.items()}
        log = {p: num(w[7]) for p, w in r.items()}
        shr = {p: num(w[5]) for p, w in r.items()}
        return (all(req[p] == rep[p] and 10 <= req[p] <= 60 for p in r)   # 10 in >= 10 s
                and all(w[3] != "-" and w[3].endswith(("ms", "s")) for w in r.values())
                and 0.6 * 120 <= log["alpha"] <= 1.2 * 120
                and 0.6 * 240 <= log["bravo"] <= 1.2 * 240
                and 0.6 * 60 <= shr["alpha"] <= 1.2 * 60
                and 0.6 * 120 <= shr["charlie"] <= 1.2 * 120
                and shr["bravo"] == 0 and log["charlie"] < 10
                and r["alpha"][6] == "5.00k" and r["charlie"][6] == "2.50G" and r["bravo"][6] == "-"
                and not any("stale" in w for w in r.values()))

    screen = tmux.wait_screen(plausible, timeout=60, what="three pairs with plausible rates")
    print(screen)
    # the hostile log line is shown escaped, and nothing on screen is red
    assert "E (1) RED\\x07 \\u202eevil" in screen
    assert "\x1b[31m" not in tmux.screen(escapes=True)
    assert order(screen) == ["alpha", "bravo", "charlie"]          # default: by pair id
    tmux.keys("l")                                                 # by log lines per minute
    tmux.wait_screen(lambda s: order(s) == ["bravo", "alpha", "charlie"] and "sort: log/m" in s,
                     what="sorted by log/m")
    tmux.keys("p")
    tmux.wait_screen(lambda s: order(s) == ["alpha", "bravo", "charlie"], what="sorted by pair")
    tmux.keys("p")                                                 # same key again: reversed
    tmux.wait_screen(lambda s: order(s) == ["charlie", "bravo", "alpha"] and "(reversed)" in s,
                     what="reversed")
    tmux.keys("s")                                                 # by shares per minute
    tmux.wait_screen(lambda s: order(s) == ["charlie", "alpha", "bravo"], what="sorted by shr/m")
    # a narrower window: top redraws at the new width (the footer is cut to fit)
    assert tmux.tmux("resize-window", "-t", "t", "-x", "100", "-y", "20").returncode == 0
    tmux.wait_screen(lambda s: any(x.startswith("sort: shr/m") and x.rstrip().endswith("…")
                                   and len(x.rstrip()) == 99 for x in s.splitlines())
                     and len(rows(s)) == 3, what="redrawn at 100 columns")

    gens["charlie"].stop()                                         # charlie goes silent
    screen = tmux.wait_screen(lambda s: "stale" in " ".join(rows(s).get("charlie", [])),
                              what="charlie stale")
    r = rows(screen)
    assert "stale" not in " ".join(r["alpha"] + r["bravo"])
    # the stale row is dimmed (SGR 2), the live ones are not
    colored = tmux.screen(escapes=True)
    line = next(x for x in colored.splitlines() if "charlie" in x and "stale" in x)
    assert re.search(r"\x1b\[[0-9;]*\b2m", line.split("charlie")[0] + "charlie"), repr(line)
    for pid in ("alpha", "bravo"):
        live = next(x for x in colored.splitlines() if pid in x and "asic_result" in x)
        assert not re.search(r"\x1b\[[0-9;]*\b2m", live.split(pid)[0]), repr(live)

    # the broker goes away: the title says so, and no log line scribbles over the screen
    for gen in gens.values():
        gen.stop()
    broker.stop()
    screen = tmux.wait_screen(lambda s: "(DISCONNECTED: disconnected from" in s,
                              what="disconnected title")
    assert "mqbtt top: " not in screen and len(rows(screen)) == 3

    tmux.keys("q")
    assert tmux.exit_status() == 0
    # the terminal is given back: the table is gone from the pane
    tmux.wait_screen(lambda s: "REQ/m" not in s, what="screen restored")


@pytest.mark.parametrize("how", ["SIGTERM", "C-c", "SIGTERM while connecting"])
def test_top_stops_on_signals(broker, tmux, how):
    if how == "SIGTERM while connecting":
        silent = socket.socket()            # accepts the TCP connection, never answers CONNECT
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent.settimeout(20)
        uri = f"mqtt://127.0.0.1:{silent.getsockname()[1]}"
    else:
        uri = broker.uri
    tmux.run(["top", "--broker", uri])
    if how == "SIGTERM while connecting":
        wait_until(lambda: silent.accept(), 20, what="the connection attempt")
    else:
        tmux.wait_screen(lambda s: "(connected)" in s, what="top connected")
    t0 = time.monotonic()
    if how == "C-c":
        tmux.keys("C-c")
    else:
        os.kill(tmux.pid, signal.SIGTERM)
    assert tmux.exit_status() == 0
    took = time.monotonic() - t0
    print(f"top stopped {took:.2f} s after {how}")
    assert took < 8          # the connect timeout is 10 s: this is no timeout expiring
    screen = tmux.screen()
    assert "Traceback" not in screen and "REQ/m" not in screen


def test_top_plain_on_a_dumb_terminal(broker, tmux, procs):
    tmux.run(["top", "--broker", broker.uri, "--interval", "1"], env="env TERM=dumb")
    gen = Generator(broker, "alpha", logs=5)
    procs.append(gen)
    screen = tmux.wait_screen(lambda s: "a table every 1 s" in s and re.search(r"^alpha ", s, re.M),
                              what="plain tables")
    assert screen.count("mqbtt top ") >= 1 and "PAIR" in screen
    tmux.keys("C-c")
    assert tmux.exit_status() == 0


def test_top_piped_prints_tables(broker, procs):
    p = subprocess.Popen([sys.executable, MQBTT, "top", "--broker", broker.uri, "--interval", "0.5",
                          "--pid", "alpha", "--pid", "charlie"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=ROOT)
    procs.append(p)
    line = p.stderr.readline()
    assert line.startswith("mqbtt top: watching mqbtt/alpha/+, mqbtt/charlie/+ on mqtt://127.0.0.1:")
    procs.append(Generator(broker, "alpha", logs=5, first_log="\x1b[2Jboot"))
    procs.append(Generator(broker, "bravo", logs=5))              # not watched
    seen = []
    for text in p.stdout:
        seen.append(text)
        if text.startswith("alpha ") and "asic_result" in text:
            break
    out = "".join(seen)
    assert "PAIR" in out and "bravo" not in out and "\x1b" not in out
    assert "(connected)" in out
    for gen in procs[-2:]:
        gen.stop()
    broker.stop()                                # the title says so; top keeps going
    for text in p.stdout:
        if text.startswith("mqbtt top ") and "(DISCONNECTED)" in text:
            break
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    rest, err = p.communicate(timeout=10)
    assert p.returncode == 0 and time.monotonic() - t0 < 8
    assert "bravo" not in rest and "Traceback" not in err
    # stderr: the connection events, one line each (stdout holds only tables)
    assert err.startswith("mqbtt top: disconnected from mqtt://127.0.0.1:"), err
    assert all(line.startswith("mqbtt top: ") for line in err.splitlines())


@pytest.fixture
def cli():
    """``mqbtt.main`` in this process, leaving the ``mqbtt`` logger as it found it
    (main() sets up its CLI handler, which other tests' caplog must not inherit)."""
    log = mqbtt.log
    saved = (list(log.handlers), log.propagate, log.level)
    yield mqbtt.main
    log.handlers[:], log.propagate = saved[0], saved[1]
    log.setLevel(saved[2])


@pytest.mark.parametrize("args,fragment", [
    (["--stale", "0"], "--stale"), (["--stale", "abc"], "--stale"), (["--stale", "inf"], "--stale"),
    (["--interval", "-1"], "--interval"), (["--interval", "nan"], "--interval"),
    (["--pid", "a/b"], "invalid pair id"), (["--pid", "#"], "invalid pair id"), (["--pid"], "--pid"),
    (["--broker", "foo://x"], "unknown scheme"), (["--broker", "mqtt://h:0"], "port"),
    (["--max-pairs", "0"], "--max-pairs"), (["--max-pairs", "1e9"], "--max-pairs"),
    (["--sort", "z"], "--sort"), (["--bogus"], "unrecognized"),
])
def test_top_usage_errors(args, fragment, capsys, cli):
    assert cli(["top", *args]) == 2
    out, err = capsys.readouterr()
    assert err.strip().splitlines()[-1].startswith("mqbtt top: error:") and fragment in err
    assert "Traceback" not in err and out == ""


def test_top_unreachable_broker_one_line():
    r = subprocess.run([sys.executable, MQBTT, "top", "--broker", f"mqtt://127.0.0.1:{free_port()}"],
                       capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("mqbtt top: error: cannot connect")


# ---------------------------------------------------------------------------
# mqbtt exporter, promtool and a real Prometheus
# ---------------------------------------------------------------------------

class Exporter:
    def __init__(self, broker_uri, *args):
        self.proc = subprocess.Popen([sys.executable, MQBTT, "exporter", "--broker", broker_uri,
                                      "--listen", "127.0.0.1:0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     cwd=ROOT)
        line = self.proc.stderr.readline()
        m = re.match(r"mqbtt exporter: serving http://127\.0\.0\.1:(\d+)/metrics for ", line)
        assert m, line + self.proc.stderr.read()
        self.port = int(m.group(1))
        self.url = f"http://127.0.0.1:{self.port}/metrics"

    def metrics(self):
        return http_get(self.url)

    def all_samples(self):
        """{(metric name, labels tuple): value} of one scrape."""
        from prometheus_client.parser import text_string_to_metric_families
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(self.metrics()) for s in fam.samples}

    def samples(self, name):
        """{labels tuple: value} of the samples of metric *name*."""
        return {labels: v for (n, labels), v in self.all_samples().items() if n == name}

    def stop(self, sig=signal.SIGTERM):
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=15)
        return self.proc.returncode, time.monotonic() - t0, out, err


@pytest.fixture
def exporters():
    started = []
    yield started
    for e in started:
        if e.proc.poll() is None:
            e.proc.kill()
            e.proc.wait()


class Prometheus:
    def __init__(self, tmp_path, target_port):
        self.port = free_port()
        cfg = tmp_path / "prometheus.yml"
        cfg.write_text("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                       "scrape_configs:\n  - job_name: mqbtt\n    static_configs:\n"
                       f"      - targets: ['127.0.0.1:{target_port}']\n")
        self.log = open(tmp_path / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            ["/usr/bin/prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"], stdout=self.log, stderr=self.log)
        self.base = f"http://127.0.0.1:{self.port}"
        wait_until(lambda: self.proc.poll() is None and "Ready" in http_get(self.base + "/-/ready"),
                   60, 0.2, "Prometheus ready")

    def query(self, expr):
        answer = json.loads(http_get(self.base + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})))
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def publish(broker, topic_name, payload, qos=1, retain=False):
    r = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", str(qos),
                        "-t", topic_name, "-s", *(["-r"] if retain else [])], input=payload,
                       capture_output=True, timeout=20)
    assert r.returncode == 0, r.stderr


def test_exporter_scraped_by_prometheus(broker, tmp_path, exporters, procs):
    exp = Exporter(broker.uri)
    exporters.append(exp)
    # p1: 10 exchanges (echo + optimizer.py) and 7 log lines; p2: 10 exchanges, 3 shares;
    # p3: 5 log lines and 2 undecodable requests, published with mosquitto_pub
    for pid in ("p1", "p2"):
        procs.append(start_echo(broker, pid))
        run_optimizer(broker, pid)
    with mqbtt.MQbtTMiner(broker.uri, "p2", client_id="gen-p2", clean_session=True) as m:
        for d in (512.0, 2.5e9, 70000.0):
            m.send_share(mqbtt.Share(diff=d))
    for k in range(7):
        publish(broker, "mqbtt/p1/log", f"I ({k}) line\n".encode())
    for k in range(5):
        publish(broker, "mqbtt/p3/log", f"I ({k}) other".encode())
    for bad in (b"\xff\xff", b"\x08"):
        publish(broker, "mqbtt/p3/srv", bad)
    weird = 'we"ird\\id} é,x="1'          # quotes, a backslash, a brace in a label value
    publish(broker, f"mqbtt/{weird}/log", b"hi")
    expected = {("p1", "srv"): 10, ("p1", "esp"): 10, ("p1", "log"): 7, ("p2", "srv"): 10,
                ("p2", "esp"): 10, ("p2", "shr"): 3, ("p3", "log"): 5, ("p3", "srv"): 2,
                (weird, "log"): 1}

    def counts():
        got = {(dict(k)["pair_id"], dict(k)["subtopic"]): v
               for k, v in exp.samples("mqbtt_messages_total").items()}
        return got if got == expected else None
    wait_until(counts, 30, what="the exporter's counts")
    text = exp.metrics()
    # promtool's linter accepts the exposition
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr
    assert exp.samples("mqbtt_undecodable_messages_total")[
        (("pair_id", "p3"), ("subtopic", "srv"))] == 2
    assert exp.samples("mqbtt_best_share_difficulty") == {(("pair_id", "p2"),): 2.5e9}
    assert exp.samples("mqbtt_reply_round_trip_seconds_count") == {  # no histogram for weird
        (("pair_id", "p1"),): 10, (("pair_id", "p2"),): 10, (("pair_id", "p3"),): 0}
    assert exp.samples("mqbtt_share_difficulty_bucket")[(("le", "1000.0"), ("pair_id", "p2"))] == 1
    assert exp.samples("mqbtt_broker_connected") == {(): 1.0}
    assert exp.samples("mqbtt_pairs") == {(): 4.0}
    last = exp.samples("mqbtt_last_message_timestamp_seconds")
    assert all(abs(v - time.time()) < 120 for v in last.values()) and len(last) == len(expected)

    prom = Prometheus(tmp_path, exp.port)
    try:
        def per_pair():
            res = prom.query("sum by (pair_id) (mqbtt_messages_total)")
            got = {x["metric"]["pair_id"]: float(x["value"][1]) for x in res}
            return got if got == {"p1": 27.0, "p2": 23.0, "p3": 7.0, weird: 1.0} else None
        wait_until(per_pair, 60, 0.5, "Prometheus to scrape the exporter")
        res = prom.query('mqbtt_messages_total{subtopic="srv"}')
        assert {x["metric"]["pair_id"]: x["value"][1] for x in res} == {"p1": "10", "p2": "10", "p3": "2"}
        assert prom.query("up")[0]["value"][1] == "1"
        # every query of the example Grafana dashboard is valid PromQL and finds its metrics
        dash = json.load(open(DASHBOARD))
        exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
        assert len(exprs) >= 10
        for expr in exprs:
            q = expr.replace("$__rate_interval", "1m").replace("$pair_id", ".*")
            prom.query(q)
        for name in ("mqbtt_messages_total", "mqbtt_reply_round_trip_seconds_bucket",
                     "mqbtt_share_difficulty_bucket", "mqbtt_best_share_difficulty",
                     "mqbtt_last_message_timestamp_seconds", "mqbtt_undecodable_messages_total",
                     "mqbtt_broker_connected", "mqbtt_dropped_pairs_total"):
            assert any(name in e for e in exprs), name
            assert prom.query(name), name
    finally:
        prom.stop()

    # the broker goes away and comes back: the gauge follows, the exporter survives
    broker.stop()
    wait_until(lambda: exp.samples("mqbtt_broker_connected") == {(): 0.0}, 20, what="connected 0")
    broker.start()
    wait_until(lambda: exp.samples("mqbtt_broker_connected") == {(): 1.0}, 40, what="connected 1")
    # retained: the gauge says connected at the CONNACK, before the exporter's SUBSCRIBE (its
    # session is clean) reaches the broker; subscribed before or after, it gets it once
    publish(broker, "mqbtt/p3/log", b"after the restart", retain=True)
    wait_until(lambda: exp.samples("mqbtt_messages_total")[(("pair_id", "p3"), ("subtopic", "log"))] == 6,
               20, what="counting after a reconnect")
    code, took, out, err = exp.stop(signal.SIGTERM)
    print(f"exporter stopped {took:.2f} s after SIGTERM")
    assert code == 0 and took < 8 and "Traceback" not in err and out == ""


def test_exporter_memory_is_bounded_with_10000_pair_ids(tmp_path, exporters):
    """10,000 distinct pair ids: the exporter tracks its cap, counts the rest, and its
    memory does not grow with them."""
    b = LocalBroker(extra="max_queued_messages 0").start()    # the broker itself drops nothing
    try:
        cap = 1000
        exp = Exporter(b.uri, "--max-pairs", str(cap))
        exporters.append(exp)
        import paho.mqtt.client as mqtt
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="flood")
        pub.connect("127.0.0.1", b.port)
        pub.loop_start()

        def flood(first, last):
            for i in range(first, last):
                info = pub.publish(f"mqbtt/pair{i:05d}/log", f"line of pair {i}", qos=1)
                if i % 500 == 499:
                    info.wait_for_publish(30)
            info.wait_for_publish(30)

        def seen(total):
            def check():
                s = exp.all_samples()
                n = sum(v for (name, _), v in s.items() if name == "mqbtt_messages_total")
                return n + s[("mqbtt_dropped_messages_total", ())] >= total
            return check
        rss = exp.samples("process_resident_memory_bytes")[()]
        flood(0, 2000)
        wait_until(seen(2000), 60, 1.0, "2000 messages")
        rss_full = exp.samples("process_resident_memory_bytes")[()]
        flood(2000, 10000)
        wait_until(seen(10000), 120, 1.0, "10000 messages")
        rss_end = exp.samples("process_resident_memory_bytes")[()]
        tracked = exp.samples("mqbtt_messages_total")
        pair_ids = {dict(k)["pair_id"] for k in tracked}
        assert len(pair_ids) == cap == exp.samples("mqbtt_pairs")[()]
        assert pair_ids == {f"pair{i:05d}" for i in range(cap)}      # the first come stay
        assert exp.samples("mqbtt_pairs_max")[()] == cap
        assert exp.samples("mqbtt_dropped_pairs_total")[()] == 9000
        assert exp.samples("mqbtt_dropped_messages_total")[()] == 9000
        # a dropped pair speaks again: one more message dropped, not one more pair
        info = pub.publish("mqbtt/pair09999/log", "again", qos=1)
        info.wait_for_publish(30)
        wait_until(lambda: exp.samples("mqbtt_dropped_messages_total")[()] == 9001, 30)
        assert exp.samples("mqbtt_dropped_pairs_total")[()] == 9000
        pub.loop_stop()
        pub.disconnect()
        print(f"exporter RSS: {rss / 2**20:.1f} MiB at start, {rss_full / 2**20:.1f} MiB with "
              f"{cap} pairs (2000 seen), {rss_end / 2**20:.1f} MiB after 10000 pair ids")
        # the 8000 pair ids beyond the cap cost (almost) nothing
        assert rss_end - rss_full < 4 * 2**20
        assert len(exp.metrics()) < 2_000_000
        code, took, _, err = exp.stop(signal.SIGINT)
        assert code == 0 and err == ""
    finally:
        b.cleanup()


@pytest.mark.parametrize("args,fragment", [
    (["--listen", "nonsense"], "HOST:PORT"), (["--listen", "h:99999"], "0-65535"),
    (["--listen", ""], "empty"), (["--listen", "::1:80"], "[ADDRESS]:PORT"),
    (["--forget", "0"], "--forget"), (["--max-pairs", "-3"], "--max-pairs"),
    (["--pid", "x+y"], "invalid pair id"), (["--broker", ""], "empty"),
])
def test_exporter_usage_errors(args, fragment, capsys, cli):
    assert cli(["exporter", *args]) == 2
    out, err = capsys.readouterr()
    assert err.strip().splitlines()[-1].startswith("mqbtt exporter: error:")
    assert fragment in err and "Traceback" not in err and out == ""


def test_exporter_runtime_errors_one_line(broker):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    cases = [
        (["--broker", broker.uri, "--listen", f"127.0.0.1:{port}"],
         f"cannot listen on 127.0.0.1:{port}: Address already in use"),
        (["--broker", f"mqtt://127.0.0.1:{free_port()}"], "cannot connect"),
        (["--broker", broker.uri, "--listen", "192.0.2.1:0"], "cannot listen on 192.0.2.1:0"),
    ]
    for args, fragment in cases:
        r = subprocess.run([sys.executable, MQBTT, "exporter", *args], capture_output=True,
                           text=True, timeout=30, cwd=ROOT)
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith("mqbtt exporter: error: ") and fragment in r.stderr, r.stderr
    busy.close()


def test_exporter_without_prometheus_client(broker):
    code = ("import sys; sys.modules['prometheus_client'] = None; sys.path.insert(0, sys.argv[1]); "
            "import mqbtt; sys.exit(mqbtt.main(['exporter', '--broker', sys.argv[2]]))")
    r = subprocess.run([sys.executable, "-c", code, ROOT, broker.uri], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == ("mqbtt exporter: error: the Python package prometheus_client (needed for "
                        "mqbtt exporter) is not installed: pip install 'prometheus_client>=0.20,<1'\n")


def test_exporter_sigterm_while_connecting():
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    silent.settimeout(20)
    p = subprocess.Popen([sys.executable, MQBTT, "exporter", "--listen", "127.0.0.1:0",
                          "--broker", f"mqtt://127.0.0.1:{silent.getsockname()[1]}"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        conn, _ = silent.accept()            # connected, CONNECT sent, no CONNACK coming
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=15)
        took = time.monotonic() - t0
        print(f"exporter stopped {took:.2f} s after SIGTERM while connecting")
        assert p.returncode == 0 and took < 8 and err == "" and out == ""
        conn.close()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        silent.close()


def test_dashboard_is_valid_grafana_json():
    dash = json.load(open(DASHBOARD))
    assert dash["title"] and dash["uid"] and isinstance(dash["panels"], list)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) >= 10
    for p in dash["panels"]:
        assert p["type"] in ("stat", "table", "timeseries", "bargauge") and p["targets"]
        assert {"x", "y", "w", "h"} <= set(p["gridPos"])
        for t in p["targets"]:
            assert t["expr"].count("(") == t["expr"].count(")")
            assert re.search(r"\bmqbtt_[a-z_]+", t["expr"])
    names = {v["name"] for v in dash["templating"]["list"]}
    assert {"pair_id", "DS_PROMETHEUS"} <= names


def test_fleet_stats_live(broker, procs):
    """The library: one FleetStats on a real broker, with a pair filter."""
    with mqbtt.FleetStats(broker.uri, ["alpha"], stale_after=5) as s:
        assert s.connected and s.client_id.startswith("mqbtt-fleet-")
        procs.append(start_echo(broker, "alpha"))
        publish(broker, "mqbtt/bravo/log", b"not watched")
        run_optimizer(broker, "alpha")
        (p,) = wait_until(lambda: [p for p in s.pairs() if p.messages["esp"] == 10], 20)
        assert p.pair_id == "alpha" and p.messages["srv"] == 10 and p.rtt_count == 10
        assert 0 < p.rtt_p50 < 5 and p.requests_per_min > 0
        assert [x.pair_id for x in s.pairs()] == ["alpha"]
    assert not s.connected
    s.stop()                                    # idempotent
    assert "FleetStats" in repr(s)
    assert s.start().connected                  # and it can start again
    s.stop()
    assert [x.messages["srv"] for x in s.pairs()] == [10]   # the statistics stay


def test_exporter_comes_back_after_a_credentials_refusal(exporters):
    """The broker's password file changes under a running exporter: it keeps serving
    /metrics with mqbtt_broker_connected 0, says so once however often it retries, and
    reconnects by itself (counting again) once the password works again."""
    b = LocalBroker(users={"mon": "pw-1"}).start()
    try:
        exp = Exporter(f"mqtt://mon:pw-1@127.0.0.1:{b.port}")
        exporters.append(exp)
        wait_until(lambda: exp.samples("mqbtt_broker_connected") == {(): 1.0}, 30, what="connected")
        b.stop()
        b.set_users({"mon": "pw-2"})
        b.start()
        # refused at least twice (paho's back-off: 1 s, 2 s, ...), still serving
        wait_until(lambda: b.log().count("not authorised") >= 2, 60, what="two refused reconnects")
        assert exp.samples("mqbtt_broker_connected") == {(): 0.0} and exp.proc.poll() is None
        b.stop()
        b.set_users({"mon": "pw-1"})
        b.start()
        wait_until(lambda: exp.samples("mqbtt_broker_connected") == {(): 1.0}, 90,
                   what="reconnected once the password works again")

        def sent():
            r = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(b.port), "-u", "mon",
                                "-P", "pw-1", "-q", "1", "-t", "mqbtt/back/log", "-m", "x"],
                               capture_output=True, timeout=20)
            assert r.returncode == 0, r.stderr
            return exp.samples("mqbtt_messages_total").get((("pair_id", "back"), ("subtopic", "log")))
        wait_until(sent, 30, what="counting again")   # re-subscribed (clean session)
        code, took, out, err = exp.stop(signal.SIGTERM)
        assert code == 0 and out == "" and "Traceback" not in err
        refused = [x for x in err.splitlines() if "refused" in x]
        assert len(refused) == 1, err
        assert "Not authorized; retrying" in refused[0] and "pw-1" not in err and "pw-2" not in err
        assert "reconnected to mqtt://mon:***@" in err
    finally:
        b.cleanup()
