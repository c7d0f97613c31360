"""Review of issues 10 (request/reply correlation), 11 (quick ACKs) and 15 (FleetStats,
``mqbtt top``, ``mqbtt exporter``): regression tests for the defects the review found,
and the hostile inputs it tried.

Everything runs on real parts: a private Mosquitto per test (conftest.py), ``mqbtt echo``
and ``mqbtt top``/``exporter`` processes, a private tmux server, a real Prometheus and
``promtool``.  Waits poll a condition; the only sleeps are the data of a test (a process
kept stopped with SIGSTOP for a while).
"""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

import pytest

import mqbtt
from mqbtt import Empty, MQbtTMiner, MQbtTOptimizer, Reply, Request
from testlib import ROOT, Tmux, http_get, start_echo, wait_until

MQBTT = os.path.join(ROOT, "mqbtt.py")


def stop_proc(p):
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# ---------------------------------------------------------------------------
# issue 10: request() in several threads, extreme ids, bounded caller ids
# ---------------------------------------------------------------------------

def test_request_from_several_threads_on_one_handle(broker):
    """Four threads calling request() on one handle against ``mqbtt echo``: each gets
    the reply to its own request (before the fix, the thread receiving a reply that
    answered another thread's request discarded it as stale: 54 of 60 timed out)."""
    echo = start_echo(broker, "thr")
    try:
        with MQbtTOptimizer(broker.uri, "thr") as opt:
            results, errors = [], []

            def worker(k):
                try:
                    for i in range(15):
                        req = Request(timestamp_min=k * 100 + i, timestamp_max=k * 100 + i + 2,
                                      nonce_size=k + 1)
                        reply = opt.request(req, timeout=30)
                        results.append((reply == mqbtt.echo_reply(req), reply.request_id != 0))
                except Exception as err:               # noqa: BLE001 - reported by the assert
                    errors.append(err)
            threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert errors == [] and len(results) == 60
            assert all(ok and has_id for ok, has_id in results)
            assert opt.stale_replies == 0 and opt._awaited == {} and not opt._receiving
    finally:
        stop_proc(echo)


def test_request_threads_out_of_order_and_a_late_reply(broker):
    """A request times out in thread A; then B and C wait at once while the miner
    answers A's request late, then C, then B: B and C each get their own reply and
    only the late one is discarded (counted once)."""
    with MQbtTOptimizer(broker.uri, "ooo") as opt, MQbtTMiner(broker.uri, "ooo") as miner:
        with pytest.raises(Empty):
            opt.request(Request(timestamp_min=1), timeout=0.3)
        late = miner.receive_request(timeout=10)
        got = {}

        def ask(name, ts):
            got[name] = opt.request(Request(timestamp_min=ts), timeout=30)
        b = threading.Thread(target=ask, args=("B", 2))
        c = threading.Thread(target=ask, args=("C", 3))
        b.start()
        c.start()
        reqs = {r.timestamp_min: r for r in (miner.receive_request(timeout=10) for _ in range(2))}
        miner.send_reply(Reply(num_shares=1, request_id=late.request_id))     # too late for A
        miner.send_reply(Reply(num_shares=3, request_id=reqs[3].request_id))
        miner.send_reply(Reply(num_shares=2, request_id=reqs[2].request_id))
        b.join(60)
        c.join(60)
        assert (got["B"].num_shares, got["B"].request_id) == (2, reqs[2].request_id)
        assert (got["C"].num_shares, got["C"].request_id) == (3, reqs[3].request_id)
        assert opt.stale_replies == 1 and opt._awaited == {}
        # a blocked request() in a waiting thread ends when the client is stopped
        errors = []

        def blocked():
            try:
                opt.request(Request(timestamp_min=9))
            except mqbtt.MQbtTConnectionError as err:
                errors.append(err)
        waiters = [threading.Thread(target=blocked) for _ in range(2)]
        for t in waiters:
            t.start()
        for _ in range(2):
            assert miner.receive_request(timeout=10).timestamp_min == 9
        # both PUBACKs in: the threads wait for their replies (stopped before the
        # PUBACK, request() raises MQbtTSendError instead: test_request_stopped_before_puback)
        deadline = time.monotonic() + 30
        while opt._waiting and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not opt._waiting
        opt.stop()
        for t in waiters:
            t.join(10)
        assert not any(t.is_alive() for t in waiters) and len(errors) == 2


def test_request_stopped_before_puback(broker):
    """request() blocked on the broker's PUBACK (broker hung with SIGSTOP) ends at stop()
    with MQbtTSendError (the request may or may not have been delivered), not a hang."""
    opt = MQbtTOptimizer(broker.uri, "nopuback")
    errors = []

    def ask():
        try:
            opt.request(Request(timestamp_min=1), timeout=60)
        except mqbtt.MQbtTError as err:
            errors.append(err)
    os.kill(broker.proc.pid, signal.SIGSTOP)
    try:
        t = threading.Thread(target=ask)
        t.start()
        wait_until(lambda: opt._waiting, what="request() to wait for the PUBACK")
        opt.stop()
        t.join(10)
        assert not t.is_alive()
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)
    assert len(errors) == 1 and type(errors[0]) is mqbtt.MQbtTSendError, errors
    assert "may or may not have been delivered" in str(errors[0])
    assert opt._awaited == {}


def test_request_with_extreme_and_colliding_ids(broker):
    """request() with the largest id, id 1, an id out of range, and one id used by
    two requests in a row: each reply matches, nothing leaks in the handle."""
    echo = start_echo(broker, "ids")
    try:
        with MQbtTOptimizer(broker.uri, "ids") as opt:
            for rid in (2 ** 64 - 1, 1):
                reply = opt.request(Request(timestamp_min=5, request_id=rid), timeout=30)
                assert reply.request_id == rid and reply == mqbtt.echo_reply(Request(timestamp_min=5))
            for bad in (2 ** 64, -1):
                with pytest.raises(ValueError):
                    opt.request(Request(request_id=bad), timeout=5)
            # the same id twice (a retry with the Request that send_request returned):
            # each call is answered, the next one with a fresh id too
            sent = Request(timestamp_min=7, request_id=4242)
            assert opt.request(sent, timeout=30).request_id == 4242
            assert opt.request(sent, timeout=30).request_id == 4242
            reply = opt.request(Request(timestamp_min=8), timeout=30)
            assert reply == mqbtt.echo_reply(Request(timestamp_min=8)) and reply.request_id > 4242
            assert opt.stale_replies == 0 and opt._awaited == {}
            assert set(opt._given_ids) == {2 ** 64 - 1, 1, 4242}
    finally:
        stop_proc(echo)


def test_caller_given_ids_are_remembered_within_a_bound(broker):
    """Ids the caller sets itself are remembered (to tell a reply to them from a stray
    one) in a bounded memory: the newest are recognised, the oldest forgotten."""
    with MQbtTOptimizer(broker.uri, "own") as opt, MQbtTMiner(broker.uri, "own") as miner:
        opt._given_ids_kept = 50
        for rid in range(1, 121):
            opt.send_request(Request(timestamp_min=rid, request_id=rid), blocking=False)
        assert opt.wait_sent(30)
        assert len(opt._given_ids) == 50 and min(opt._given_ids) == 71
        miner.send_reply(Reply(num_shares=3, request_id=3))        # forgotten: a stray now
        miner.send_reply(Reply(num_shares=120, request_id=120))    # remembered: returned
        got = opt.receive_reply(timeout=10)
        assert (got.num_shares, got.request_id) == (120, 120) and opt.stale_replies == 1


# ---------------------------------------------------------------------------
# issue 15: top shows miners' text through safe_text; huge difficulties; no burst
# ---------------------------------------------------------------------------

HOSTILE_LOG = "I (5) \x1b[0;32mgreen\x1b[0m\tafter-tab \x1b]0;pwned\x07end \x1b[2J\u202eX"
SHOWN_LOG = "I (5) green after-tab end \\u202eX"     # safe_text, then the tab as a space


@pytest.fixture
def tmux(tmp_path):
    t = Tmux(tmp_path, height=12)
    yield t
    t.kill()


def test_top_shows_miner_text_through_safe_text_in_tmux(broker, tmux):
    """ESP-IDF colours, a window-title sequence, a screen clear, a tab and a bidi
    override in a log line; a share of difficulty 1e30: the curses screen shows the
    log text as safe_text makes it (no escape left, no tab breaking the columns), the
    pane title is untouched and the difficulty fits its column."""
    tmux.run(["top", "--broker", broker.uri])
    tmux.wait_screen(lambda s: "(connected)" in s, what="top connected")
    with MQbtTMiner(broker.uri, "hostile", client_id="gen-hostile", clean_session=True) as m:
        m.send_log(HOSTILE_LOG)
        m.send_share(mqbtt.Share(diff=1e30))
        m.send_share(mqbtt.Share(diff=-1e300))
    screen = tmux.wait_screen(lambda s: re.search(r"^hostile ", s, re.M) and "1.00e+30" in s,
                              what="the hostile pair's row")
    row = next(x for x in screen.splitlines() if x.startswith("hostile "))
    assert row.rstrip().endswith(SHOWN_LOG), row
    assert mqbtt.safe_text(HOSTILE_LOG).replace("\t", " ") == SHOWN_LOG
    # the columns are intact: BEST DIFF and SEEN stand under their titles
    head = next(x for x in screen.splitlines() if x.startswith("PAIR "))
    assert row[head.index("BEST DIFF"):head.index("BEST DIFF") + 9].strip() == "1.00e+30"
    assert row.index(SHOWN_LOG) == head.index("LAST LOG")
    assert "\\x1b" not in screen and "pwned" not in screen
    assert "pwned" not in tmux.tmux("display-message", "-p", "-t", "t", "#{pane_title}").stdout
    colored = tmux.screen(escapes=True)
    assert "\x1b[32m" not in colored and "\x1b[0;32m" not in colored    # nothing green
    tmux.tmux("send-keys", "-t", "t", "q")
    assert tmux.exit_status() == 0


def test_top_plain_output_uses_safe_text_and_no_burst_after_a_stall(broker):
    """Piped top: the log line is exactly safe_text's (tab as a space); a top stopped
    with SIGSTOP for 4 s prints one table when continued, not the 8 it missed."""
    p = subprocess.Popen([sys.executable, MQBTT, "top", "--broker", broker.uri, "--interval", "0.5"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert "a table every 0.5 s" in p.stderr.readline()
        with MQbtTMiner(broker.uri, "hostile", client_id="gen-hostile", clean_session=True) as m:
            m.send_log(HOSTILE_LOG)
        titles = []        # arrival time of every table's title line
        rows = []

        def read():
            for line in p.stdout:
                if line.startswith("mqbtt top "):
                    titles.append(time.monotonic())
                elif line.startswith("hostile "):
                    rows.append(line.rstrip("\n"))
        threading.Thread(target=read, daemon=True).start()
        wait_until(lambda: rows, 30, what="the hostile row")
        assert rows[0].endswith("  " + SHOWN_LOG) and "\x1b" not in rows[0], rows[0]
        os.kill(p.pid, signal.SIGSTOP)
        time.sleep(4.0)                       # the data: 8 intervals missed
        n = len(titles)
        os.kill(p.pid, signal.SIGCONT)
        wait_until(lambda: len(titles) > n, 30, what="a table after SIGCONT")
        first = titles[n]
        # every table read in the next 0.4 s: a burst would be 8 at once; one table every
        # 0.5 s gives 1, or a few if this reader itself was held up for a while under load
        wait_until(lambda: time.monotonic() - first > 1.5, 5, what="1.5 s after the first table")
        burst = [t for t in titles[n:] if t - first < 0.4]
        assert len(burst) <= 4, titles[n:]
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        p.wait(15)
        took = time.monotonic() - t0
        assert p.returncode == 0 and took < 10, took
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


# ---------------------------------------------------------------------------
# issue 15: hostile pair ids through the exporter, promtool and Prometheus
# ---------------------------------------------------------------------------

HOSTILE_IDS = ["ls\u2028x", "bidi\u202eevil", "nbsp\u00a0x", "zw\u200bx", "sp ace",
               'q"b\\{}=,', "é" * mqbtt.FLEET_MAX_PAIR_ID, "\U0001F600" * 50, "x" * 199 + "\u2029"]


def test_exporter_hostile_pair_ids_through_prometheus(broker, tmp_path):
    """Pair ids a real Mosquitto lets through (line/paragraph separators, bidi
    overrides, invisible characters, quotes, backslash, 200 two-byte characters, 4-byte
    emoji) come out of Prometheus exactly; an over-long one is only counted; promtool
    accepts the exposition; SIGTERM stops the exporter within a second or so while
    Prometheus scrapes it."""
    import paho.mqtt.client as mqtt
    exp = subprocess.Popen([sys.executable, MQBTT, "exporter", "--broker", broker.uri,
                            "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, cwd=ROOT)
    prom = None
    try:
        m = re.match(r"mqbtt exporter: serving http://127\.0\.0\.1:(\d+)/metrics ", exp.stderr.readline())
        assert m
        url = f"http://127.0.0.1:{m.group(1)}/metrics"
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="hostile-ids")
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()
        for k, pid in enumerate(HOSTILE_IDS + ["y" * (mqbtt.FLEET_MAX_PAIR_ID + 1)]):
            for _ in range(k % 3 + 1):
                pub.publish(f"mqbtt/{pid}/log", b"hi", qos=1).wait_for_publish(20)
        pub.loop_stop()
        pub.disconnect()
        expected = {pid: float(k % 3 + 1) for k, pid in enumerate(HOSTILE_IDS)}

        from prometheus_client.parser import text_string_to_metric_families

        def exported():
            got = {}
            for fam in text_string_to_metric_families(http_get(url)):
                for s in fam.samples:
                    if s.name == "mqbtt_messages_total":
                        got[s.labels["pair_id"]] = s.value
                    elif s.name == "mqbtt_ignored_messages_total":
                        got[None] = s.value
            return got if got == {**expected, None: 1.0} else None
        wait_until(exported, 30, what="the exporter's counts")
        r = subprocess.run(["promtool", "check", "metrics"], input=http_get(url), capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr

        from local_broker import free_port
        port = free_port()
        cfg = tmp_path / "prometheus.yml"
        cfg.write_text("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                       "scrape_configs:\n  - job_name: mqbtt\n    static_configs:\n"
                       f"      - targets: ['127.0.0.1:{m.group(1)}']\n")
        log = open(tmp_path / "prometheus.log", "w")
        prom = subprocess.Popen(["/usr/bin/prometheus", f"--config.file={cfg}",
                                 f"--storage.tsdb.path={tmp_path / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=log)
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: prom.poll() is None and "Ready" in http_get(base + "/-/ready"), 60, 0.2,
                   "Prometheus ready")

        def queried():
            q = urllib.parse.urlencode({"query": "mqbtt_messages_total"})
            answer = json.loads(http_get(f"{base}/api/v1/query?{q}"))
            got = {x["metric"]["pair_id"]: float(x["value"][1]) for x in answer["data"]["result"]}
            return got if got == expected else None
        wait_until(queried, 60, 0.5, "Prometheus to store every hostile pair id")
        # stop the exporter while Prometheus keeps scraping it every second
        t0 = time.monotonic()
        exp.send_signal(signal.SIGTERM)
        out, err = exp.communicate(timeout=15)
        took = time.monotonic() - t0
        print(f"exporter stopped {took:.2f} s after SIGTERM")
        assert exp.returncode == 0 and err == "" and out == "" and took < 10
    finally:
        if prom is not None:
            prom.terminate()
            prom.wait(15)
        if exp.poll() is None:
            exp.kill()
            exp.wait()


def test_top_and_exporter_print_a_hostile_broker_uri_escaped():
    """A websocket path with a window-title sequence (from $MQBTT_BROKER, a config
    file, a pasted URI): the lines top and the exporter print show it escaped; before
    the fix the raw OSC reached the terminal (retitling it)."""
    from local_broker import LocalBroker, free_port
    ws_port = free_port()
    b = LocalBroker(listeners=f"listener {ws_port} 127.0.0.1\nprotocol websockets\n").start()
    procs = []
    try:
        uri = f"ws://127.0.0.1:{ws_port}/mq\x1b]0;pwned\x07tt"
        shown = f"ws://127.0.0.1:{ws_port}/mq\\x1b]0;pwned\\x07tt"
        top = subprocess.Popen([sys.executable, MQBTT, "top", "--broker", uri, "--interval", "0.3"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        exp = subprocess.Popen([sys.executable, MQBTT, "exporter", "--broker", uri, "--listen",
                                "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=ROOT)
        procs += [top, exp]
        ready = top.stderr.readline()
        assert ready.startswith(f"mqbtt top: watching mqbtt/+/+ on {shown}, a table"), repr(ready)
        title = top.stdout.readline()
        assert title.startswith("mqbtt top  ") and f"  {shown} (connected)  0 pairs" in title, title
        ready = exp.stderr.readline()
        assert re.match(r"mqbtt exporter: serving http://127\.0\.0\.1:\d+/metrics for mqbtt/\+/\+ on "
                        + re.escape(shown) + r" \(Ctrl-C", ready), repr(ready)
        for p in procs:
            p.send_signal(signal.SIGTERM)
            out, err = p.communicate(timeout=15)
            assert p.returncode == 0 and "\x1b" not in out + err and "\x07" not in out + err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        b.cleanup()


def test_top_survives_tiny_and_resized_windows(broker, tmux):
    """Windows of 1×1, 2×2, 5×3 and 12×4 cells, wide characters cut at the edge: top
    keeps running, and redraws the full table once the window is large again."""
    tmux.run(["top", "--broker", broker.uri])
    tmux.wait_screen(lambda s: "(connected)" in s, what="top connected")
    with MQbtTMiner(broker.uri, "ワイド", client_id="gen-wide", clean_session=True) as m:
        m.send_log("ログ" * 100)
    tmux.wait_screen(lambda s: re.search(r"^ワイド ", s, re.M), what="the wide pair's row")
    for w, h in ((1, 1), (2, 2), (5, 3), (12, 4), (151, 12)):
        assert tmux.tmux("resize-window", "-t", "t", "-x", str(w), "-y", str(h)).returncode == 0
        if w > 100:
            screen = tmux.wait_screen(lambda s: re.search(r"^ワイド .*ログログ", s, re.M) and "q quit" in s,
                                      what="the table redrawn at full size")
        else:
            # the title cut to the width (1 row: only the footer, cut to nothing)
            want = "" if h == 1 else "mqbtt top"[:min(w - 1, 9)]
            screen = tmux.wait_screen(lambda s: s.splitlines()[0].startswith(want) if s.strip()
                                      else want == "", what=f"a {w}x{h} screen")
        assert not tmux.exit_file.exists(), screen
    row = next(x for x in screen.splitlines() if x.startswith("ワイド "))
    assert row.rstrip().endswith("…") and mqbtt._cells(row.rstrip()) <= 151
    tmux.tmux("send-keys", "-t", "t", "q")
    assert tmux.exit_status() == 0


@pytest.mark.parametrize("encoding", ["ascii", "latin-1"])
def test_plain_top_on_an_output_that_cannot_encode_every_character(broker, encoding):
    """PYTHONIOENCODING=ascii (or a latin-1 terminal) and a pair id and log line outside
    it: top shows them escaped and keeps going (before: exit 1 at the first table)."""
    env = dict(os.environ, PYTHONIOENCODING=encoding)
    p = subprocess.Popen([sys.executable, MQBTT, "top", "--broker", broker.uri, "--interval", "0.3"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env)
    try:
        assert b"a table every 0.3 s" in p.stderr.readline()
        with MQbtTMiner(broker.uri, "ペア", client_id="gen-enc", clean_session=True) as m:
            m.send_log("température 25°C ✓")
        seen = []
        for line in p.stdout:
            seen.append(line)
            if line.startswith(b"\\u30da\\u30a2 "):
                break
        row = seen[-1].decode(encoding).rstrip("\n")
        assert row.endswith("temp\\xe9rature 25\\xb0C \\u2713" if encoding == "ascii"
                            else "température 25°C \\u2713"), row
        # and it keeps printing tables
        assert p.stdout.readline() == b"\n" and p.stdout.readline().startswith(b"mqbtt top ")
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=15)
        assert p.returncode == 0 and err == b""
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
