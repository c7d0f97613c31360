"""Helpers shared by the test files (plain functions and classes; the shared
pytest fixtures are in conftest.py).

Waits poll a condition (awaiting it, never sleeping blindly) with generous
default timeouts (60 s): the suite runs on loaded machines, and a wait that
succeeds returns as soon as its condition holds.
"""
import glob
import os
import re
import shlex
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from http import HTTPStatus

import pytest

import mqbtt
from mqbtt import BrokerURI, Request, Share

ROOT = os.path.dirname(os.path.abspath(__file__))


# -- waiting ----------------------------------------------------------------------

def wait_for(cond, timeout=60.0, what="condition", *, interval=0.01, tolerate=()):
    """Poll *cond* until it returns a true value, and return that value; fail
    (AssertionError) after *timeout* s.  Exceptions of the *tolerate* types
    raised by *cond* count as a false value (kept for the failure message)."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = cond()
        except tolerate as err:
            last = err
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}; last: {last!r}")
        time.sleep(interval)


def wait_until(predicate, timeout=60.0, interval=0.1, what="condition"):
    """wait_for() polling every *interval* s, with OSError and ValueError
    counted as not yet (a server not up yet, a half-written file)."""
    return wait_for(predicate, timeout, what, interval=interval, tolerate=(OSError, ValueError))


# -- subprocesses -----------------------------------------------------------------

def mqbtt_cmd(*args):
    """The command line running ``mqbtt.py *args`` with this interpreter (from ROOT)."""
    return [sys.executable, "mqbtt.py", *args]


def run_cli(*args, timeout=300, **kw):
    """``mqbtt.py *args`` run to its end (subprocess.run keywords in *kw*),
    its output captured as text (undecodable bytes kept as surrogates)."""
    return subprocess.run(mqbtt_cmd(*args), cwd=ROOT, capture_output=True, text=True,
                          errors="surrogateescape", timeout=timeout, **kw)


class Proc:
    """A subprocess (run in ROOT) whose stdout and stderr lines are collected
    by threads into ``out`` and ``err``."""

    def __init__(self, args, env=None):
        self.args = args
        self.p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env)
        self.out, self.err = [], []
        self._threads = [threading.Thread(target=self._pump, args=(s, lines), daemon=True)
                         for s, lines in ((self.p.stdout, self.out), (self.p.stderr, self.err))]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(stream, lines):
        for line in stream:
            lines.append(line.rstrip("\n"))

    def wait_line(self, lines, predicate, what, timeout=60.0):
        """The first of *lines* (``self.out`` or ``self.err``) that satisfies
        *predicate*, awaited.  Fails at once when the process has exited
        without it (after the pump threads have read what it wrote)."""
        def found():
            hit = next((x for x in list(lines) if predicate(x)), None)
            if hit is None and self.p.poll() is not None:
                for t in self._threads:   # let the pump threads read the rest
                    t.join(10)
                hit = next((x for x in list(lines) if predicate(x)), None)
                if hit is None:
                    raise AssertionError(f"{self.args} exited {self.p.returncode} before {what}: "
                                         f"{self.out} {self.err}")
            return hit
        return wait_for(found, timeout, what)

    def wait_err(self, pattern, timeout=60.0):
        """The first stderr line matching the regular expression *pattern* (wait_line)."""
        rx = re.compile(pattern)
        return self.wait_line(self.err, rx.search, f"{pattern!r} on stderr of {self.args[2:4]}",
                              timeout)

    def wait(self, timeout=60.0):
        """Its exit status, awaited; the pump threads joined."""
        rc = self.p.wait(timeout)
        for t in self._threads:
            t.join(5)
        return rc

    def stop(self, sig=signal.SIGINT, timeout=60.0):
        """Send *sig* (if it still runs) and return its exit status."""
        if self.p.poll() is None:
            self.p.send_signal(sig)
        return self.wait(timeout)

    def kill(self):
        """SIGKILL it if it still runs, and reap it."""
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


class Tmux:
    """A private tmux server (own socket, no user configuration) with one session."""

    def __init__(self, tmp_path, width=150, height=24):
        self.sock = str(tmp_path / "tmux.sock")
        self.width, self.height = width, height
        self.exit_file = tmp_path / "exit"
        self.pid_file = tmp_path / "pid"

    def tmux(self, *args):
        """Run ``tmux ARGS`` on this server."""
        return subprocess.run(["tmux", "-S", self.sock, "-f", "/dev/null", *args],
                              capture_output=True, text=True, timeout=20)

    def run(self, args, env=""):
        """Run ``mqbtt ARGS`` in the session; its pid goes to pid_file and
        ``EXIT=<status>`` to exit_file when it ends."""
        inner = f"echo $$ > {self.pid_file}; exec {env} {shlex.quote(sys.executable)} " + \
            " ".join(shlex.quote(a) for a in [os.path.join(ROOT, "mqbtt.py"), *args])
        command = f"cd {shlex.quote(ROOT)}; sh -c {shlex.quote(inner)}; echo EXIT=$? > {self.exit_file}; sleep 120"
        r = self.tmux("new-session", "-d", "-s", "t", "-x", str(self.width), "-y", str(self.height),
                      command)
        assert r.returncode == 0, r.stderr
        self.pid = int(wait_until(lambda: self.pid_file.read_text().strip(), 20, what="pid file"))

    def screen(self, escapes=False):
        """The visible screen (with its escape sequences if *escapes*)."""
        return self.tmux("capture-pane", "-p", "-t", "t", *(["-e"] if escapes else [])).stdout

    def wait_screen(self, predicate, timeout=30.0, what="screen", escapes=False):
        """The screen, once *predicate* accepts it; a failure shows the last one."""
        try:
            return wait_until(lambda: (lambda s: s if predicate(s) else None)(self.screen(escapes)),
                              timeout, 0.2, what)
        except AssertionError:
            raise AssertionError(f"timed out waiting for {what}; screen:\n{self.screen()}") from None

    def keys(self, *keys):
        """Type *keys* (tmux send-keys names) into the session."""
        assert self.tmux("send-keys", "-t", "t", *keys).returncode == 0

    def exit_status(self, timeout=60.0):
        """The exit status of the command, awaited."""
        text = wait_until(lambda: self.exit_file.exists() and self.exit_file.read_text().strip(),
                          timeout, 0.05, "the command to exit")
        return int(text.split("=")[1])

    def kill(self):
        """Stop the tmux server (and the command)."""
        self.tmux("kill-server")


def start_recorder(broker, db, *extra, env=None):
    """``mqbtt record`` into *db* (a path or a URL) as a Proc, once it says it records."""
    rec = Proc(mqbtt_cmd("record", "--broker", broker.uri, "--db", str(db), *extra), env=env)
    rec.wait_err(r"^mqbtt record: recording ")
    return rec


def start_echo(broker, pid):
    """``mqbtt echo`` for *pid* (a Popen with stderr piped), once it has subscribed."""
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "mqbtt.py"), "echo", "--broker",
                          broker.uri, pid],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert "answering" in p.stderr.readline()      # subscribed: no request is lost
    return p


def protoc(args, data):
    """The output of the real ``protoc -I ROOT *args mqbtt.proto`` fed *data* (bytes)."""
    r = subprocess.run(["protoc", "-I", ROOT] + args + ["mqbtt.proto"], input=data,
                       capture_output=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def pyenv_python(version):
    """The interpreter of CPython *version* (pyenv layout: $PYENV_ROOT or
    ~/.pyenv), or a clear failure."""
    pyenv = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    found = sorted(glob.glob(os.path.join(pyenv, "versions", f"{version}.*", "bin", "python3")))
    if not found:
        pytest.fail(f"CPython {version} not found under {pyenv}/versions "
                    f"(install it with: pyenv install {version})")
    return found[-1]


def make_ca(tmp_path, name="ca"):
    """A CA and a server certificate for 127.0.0.1/localhost, made with
    openssl in the new directory *tmp_path*/*name* (returned)."""
    d = tmp_path / name
    d.mkdir()
    run = lambda *a: subprocess.run(a, check=True, capture_output=True, cwd=d)  # noqa: E731
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", "ca.key", "-out", "ca.crt", "-subj", f"/CN=mqbtt test {name}")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key",
        "-out", "server.csr", "-subj", "/CN=localhost")
    (d / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "ext.cnf")
    return d


def http_get(url, timeout=30):
    """The body of *url* (GET), decoded."""
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


# -- fake services -----------------------------------------------------------------

DROP, CLOSE, HOLD = "<drop>", "<close>", "<hold>"


class FakeWS:
    """``/api/ws``: session *i* (the last one repeats) is a list of frames
    (str: text frame, bytes: binary frame) and a final DROP (abrupt TCP
    close), CLOSE (websocket close) or HOLD (keep open until the end).
    *refuse(attempt)* may return an HTTP status to refuse a handshake."""

    def __init__(self, sessions, refuse=None):
        self.sessions = sessions
        self.refuse = refuse
        self.attempts = 0
        self.connections = 0
        self.paths = []
        self.release = threading.Event()
        from websockets.sync.server import serve
        self._server = serve(self._handler, "127.0.0.1", 0, compression=None,
                             process_request=self._process, ping_interval=None)
        self.port = self._server.socket.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def _process(self, connection, request):
        self.paths.append(request.path)
        attempt = self.attempts
        self.attempts += 1
        status = self.refuse(attempt) if self.refuse else None
        if status:
            return connection.respond(HTTPStatus(status), HTTPStatus(status).phrase + "\n")
        if request.path != "/api/ws":
            return connection.respond(HTTPStatus.NOT_FOUND, "Not Found\n")
        return None

    def _handler(self, conn):
        i = self.connections
        self.connections += 1
        for action in self.sessions[min(i, len(self.sessions) - 1)]:
            if action == DROP:
                conn.close_socket()
                return
            if action == CLOSE:
                conn.close()
                return
            if action == HOLD:
                self.release.wait(30)
                return
            conn.send(action)

    def close(self):
        """Release the held sessions and stop serving."""
        self.release.set()
        self._server.shutdown()


# -- MQTT traffic -------------------------------------------------------------------

def raw_client(uri, client_id=""):
    """A plain paho client connected to *uri* with its loop running."""
    import paho.mqtt.client as mqtt
    b = BrokerURI.parse(uri)
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    c.connect(b.host, b.port)
    c.loop_start()
    return c


def publisher(broker, client_id=None):
    """mqbtt's own paho client (clean session) connected to *broker*, loop running."""
    c = mqbtt._paho_client(BrokerURI.parse(broker.uri), client_id or f"pub-{os.urandom(4).hex()}", True)
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    return c


def _log_line(i):
    return f"I ({1000 + i}) mqbtt_protocol: Received request: timestamp_min={i}"


def session(broker, pair_id, n=6, shares_per_request=2, gap=0.0, log_line=_log_line):
    """An optimizer/miner exchange: n requests, each answered by shares, a log
    line (``log_line(i)``) and a reply, *gap* s after the request.  Returns the
    list of (subtopic, payload) sent, in order."""
    sent = []
    with mqbtt.MQbtTMiner(broker.uri, pair_id) as miner, \
            mqbtt.MQbtTOptimizer(broker.uri, pair_id) as opt:
        for i in range(n):
            req = Request(timestamp_min=i, timestamp_max=i + 1, nonce_start=i, nonce_size=4)
            req = opt.send_request(req)          # as sent: with its request_id
            sent.append(("srv", req.to_bytes()))
            assert miner.receive_request(timeout=10) == req
            for k in range(shares_per_request):
                share = Share(diff=10.0 ** (1 + (i + k) % 4) * (1.5 + k), nonce=i * 10 + k,
                              job_id=f"{i:02x}", prev_block=bytes([i]) * 32)
                miner.send_share(share)
                sent.append(("shr", share.to_bytes()))
            line = log_line(i)
            miner.send_log(line)
            sent.append(("log", line.encode()))
            reply = mqbtt.echo_reply(req)
            if gap:
                time.sleep(gap)  # recorded timing (data, not synchronisation)
            reply = miner.send_reply(reply)      # as sent: with the request's id
            sent.append(("esp", reply.to_bytes()))
            assert opt.receive_reply(timeout=10) == reply
            for _ in range(shares_per_request):
                opt.receive_share(timeout=10)
    return sent


# -- recordings ---------------------------------------------------------------------

def rows(db_path, where="", params=()):
    """(pair_id, subtopic, message, timestamp) of the SQLite recording, in order."""
    con = sqlite3.connect(db_path, timeout=30)
    try:
        return con.execute("SELECT pair_id, subtopic, message, timestamp FROM messages "
                           + where + " ORDER BY id", params).fetchall()
    finally:
        con.close()


def count_rows(db_path):
    """How many messages the SQLite recording holds (0 before it exists)."""
    if not os.path.exists(db_path):
        return 0
    con = sqlite3.connect(db_path, timeout=30)
    try:
        return con.execute("SELECT count(*) FROM messages").fetchone()[0]
    except sqlite3.OperationalError:  # table not created yet
        return 0
    finally:
        con.close()


def pg_rows(url, sql="SELECT pair_id, subtopic, message FROM messages ORDER BY id", params=None):
    """The rows of *sql* in the PostgreSQL database *url*."""
    import psycopg
    with psycopg.connect(url) as c:
        return c.execute(sql, params).fetchall()


def pg_count(url):
    """How many messages the PostgreSQL recording holds (0 before the table exists)."""
    import psycopg
    try:
        with psycopg.connect(url) as c:
            return c.execute("SELECT count(*) FROM messages").fetchone()[0]
    except psycopg.errors.UndefinedTable:
        return 0
