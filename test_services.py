"""Tests of the external services: AxeOS (ESP-Miner) and OpenObserve APIs,
and the ``restart`` and ``wslog`` commands.

Every test talks to local servers on 127.0.0.1 that speak the shapes of the
real ones:

* :class:`FakeAxeOS` -- ESP-Miner's ``GET /api/system/info`` (a ``SystemInfo``
  object as in ESP-Miner's ``main/http_server/openapi.yaml``) and
  ``POST /api/system/restart`` answering ``text/plain`` (firmware <= v2.12) or
  JSON ``{"message": ...}`` (later), then rebooting: unreachable for a while,
  back with a reset ``uptimeSeconds``; failures 401 (client not on a private
  network), 500, no answer, a connection closed without an answer;
* :class:`FakeO2` -- OpenObserve's ``POST /api/{org}/{stream}/_json`` with
  basic auth, answering ``{"code": 200, "status": [{"name", "successful",
  "failed"[, "error"]}]}`` (200 even when records are dropped), 401
  ``Unauthorized Access`` in plain text, ``{"code": 500, "message": ...}``;
* :class:`testlib.FakeWS` -- the ``/api/ws`` log websocket (the ``websockets``
  library): plain-text frames with ANSI colours that split and join lines,
  connections dropped mid-line, handshakes refused with 401 or 429.
"""
import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "examples"))
import mqbtt  # noqa: E402
from local_broker import free_port  # noqa: E402
from testlib import CLOSE, DROP, HOLD, wait_for  # noqa: E402

SECRET = "s3cr3t-Pa55-9f2c7e"
O2_USER = "ops@example.org"


# ---------------------------------------------------------------------------
# Fake AxeOS (ESP-Miner HTTP API)
# ---------------------------------------------------------------------------

def system_info(uptime: int) -> dict:
    """A SystemInfo answer as ESP-Miner sends it (openapi.yaml field names)."""
    return {
        "ASICModel": "BM1370", "apEnabled": 0, "autofanspeed": 1, "bestDiff": "1.27M",
        "bestSessionDiff": "331k", "boardVersion": "601", "coreVoltage": 1150,
        "coreVoltageActual": 1143, "current": 10812.5, "fanrpm": 4285, "fanspeed": 62,
        "temptarget": 60, "freeHeap": 8245700, "frequency": 525, "hashRate": 1062.3,
        "expectedHashrate": 1100, "hostname": "bitaxe", "idfVersion": "v5.4",
        "isPSRAMAvailable": 1, "isUsingFallbackStratum": 0, "macAddr": "AA:BB:CC:DD:EE:FF",
        "maxPower": 40, "nominalVoltage": 5, "overheat_mode": 0, "poolDifficulty": 4096,
        "power": 19.4, "power_fault": "", "runningPartition": "ota_0",
        "sharesAccepted": 1520, "sharesRejected": 3,
        "sharesRejectedReasons": [{"message": "Job not found", "count": 3}],
        "smallCoreCount": 2040, "ssid": "lab", "stratumPort": 3333,
        "stratumURL": "public-pool.io", "stratumUser": "bc1qexample.bitaxe",
        "temp": 58.2, "tempMax": 61, "uptimeSeconds": uptime, "version": "v2.9.0",
        "axeOSVersion": "v2.9.0", "voltage": 5112.5, "vrTemp": 47, "wifiStatus": "Connected!",
        "wifiRSSI": -61, "displayTimeout": -1, "statsFrequency": 0,
    }


class FakeAxeOS:
    """An ESP-Miner HTTP server; see the module docstring."""

    def __init__(self):
        self.info_style = "ok"       # ok | 401 | 500 | garbage | hang
        self.restart_style = "text"  # text | json | 401 | 500 | hang | drop
        self.down_for = 0.6          # seconds unreachable after a restart; None: forever
        self.boot = time.monotonic() - 1000
        self.calls = []              # (method, path)
        self.release = threading.Event()
        self.back = threading.Event()
        self._server = None
        self.port = 0
        self._listen(0)

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    def posts(self):
        return [c for c in self.calls if c[0] == "POST"]

    def _listen(self, port):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def answer(self, status, body, ctype):
                data = body.encode() if isinstance(body, str) else body
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                self.wfile.flush()

            def refuse(self, style):
                if style == "401":  # httpd_resp_send_err(req, HTTPD_401_UNAUTHORIZED, "Unauthorized")
                    self.answer(401, "Unauthorized", "text/html")
                elif style == "500":
                    self.answer(500, "Internal Server Error", "text/html")
                elif style == "hang":
                    fake.release.wait(30)
                elif style == "drop":
                    self.connection.shutdown(socket.SHUT_RDWR)
                else:
                    return False
                return True

            def do_GET(self):
                fake.calls.append(("GET", self.path))
                if self.path != "/api/system/info":
                    return self.answer(404, json.dumps({"error": "unknown route"}), "application/json")
                if self.refuse(fake.info_style):
                    return
                if fake.info_style == "garbage":
                    return self.answer(200, "<html>captive portal</html>", "text/html")
                uptime = int(time.monotonic() - fake.boot)
                self.answer(200, json.dumps(system_info(uptime)), "application/json")

            def do_POST(self):
                fake.calls.append(("POST", self.path))
                if self.path != "/api/system/restart":
                    return self.answer(404, json.dumps({"error": "unknown route"}), "application/json")
                if self.refuse(fake.restart_style):
                    return
                if fake.restart_style == "json":
                    self.answer(200, json.dumps({"message": "System will restart shortly."}),
                                "application/json")
                else:
                    self.answer(200, "System will restart shortly.", "text/plain")
                threading.Thread(target=fake._reboot, daemon=True).start()

        srv = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        srv.daemon_threads = True
        self._server = srv
        self.port = srv.server_address[1]
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def _reboot(self):
        # the firmware answers, waits about a second, then restarts (shortened here)
        time.sleep(0.05)
        self._server.shutdown()
        self._server.server_close()
        if self.down_for is None:
            return
        time.sleep(self.down_for)
        self.boot = time.monotonic()
        self._listen(self.port)
        self.back.set()

    def close(self):
        self.release.set()
        self._server.shutdown()
        self._server.server_close()


# ---------------------------------------------------------------------------
# Fake OpenObserve (JSON ingestion)
# ---------------------------------------------------------------------------

class FakeO2:
    """OpenObserve's ``/api/{org}/{stream}/_json``; see the module docstring."""

    def __init__(self, user=O2_USER, password=SECRET):
        self.mode = "ok"  # ok | partial | error | 500 | garbage
        self.expected_auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.received = []  # (org, stream, records)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def answer(self, status, body, ctype="application/json"):
                data = (body if isinstance(body, str) else json.dumps(body)).encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                m = re.fullmatch(r"/api/([^/]+)/([^/]+)/_json", self.path)
                if not m:
                    return self.answer(404, "Not Found", "text/plain")
                if self.headers.get("Authorization") != fake.expected_auth:
                    return self.answer(401, "Unauthorized Access", "text/plain")
                records = json.loads(body)
                fake.received.append((m.group(1), m.group(2), records))
                stream, n = m.group(2), len(records)
                if fake.mode == "ok":
                    self.answer(200, {"code": 200, "status": [
                        {"name": stream, "successful": n, "failed": 0}]})
                elif fake.mode == "partial":
                    self.answer(200, {"code": 200, "status": [
                        {"name": stream, "successful": 0, "failed": n,
                         "error": "Too old data, only last 5 hours data can be ingested. "
                                  "Data discarded."}]})
                elif fake.mode == "error":
                    self.answer(200, {"code": 200, "error": "stream name is invalid"})
                elif fake.mode == "500":
                    self.answer(500, {"code": 500, "message": "internal error: disk full"})
                else:
                    self.answer(200, "OK", "text/plain")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def close(self):
        self._server.shutdown()
        self._server.server_close()


# ---------------------------------------------------------------------------
# Fake AxeOS log websocket
# ---------------------------------------------------------------------------

# ---------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------

@pytest.fixture
def axeos():
    fake = FakeAxeOS()
    yield fake
    fake.close()


@pytest.fixture
def o2():
    fake = FakeO2()
    yield fake
    fake.close()


@pytest.fixture
def config(tmp_path, monkeypatch):
    """A configuration file in a temporary XDG_CONFIG_HOME; returns a function
    writing it.  The O2 environment variables are cleared."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("MQBTT_CONFIG", raising=False)
    for key in ("URL", "ORG", "STREAM", "USER", "PASSWORD"):
        monkeypatch.delenv("MQBTT_O2_" + key, raising=False)
    for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    path = tmp_path / "xdg" / "mqbtt" / "config.ini"

    def write(text):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path
    write.path = path
    return write


def o2_section(o2, password=SECRET):
    return (f"[openobserve]\nurl = {o2.url}\norg = lab\nuser = {O2_USER}\n"
            f"password = {password}\n")


def run_cli(*args, env_extra=None, timeout=30):
    """Run ``python mqbtt.py ARGS`` with the current environment (+ *env_extra*);
    check that the secret appears nowhere in its output."""
    env = dict(os.environ)
    env.update(env_extra or {})
    p = subprocess.run([sys.executable, "mqbtt.py", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert SECRET not in p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    return p


def assert_one_line_error(p, cmd, *fragments):
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith(f"mqbtt {cmd}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------
# pid2url and the configuration file
# ---------------------------------------------------------------------------

class TestPid2url:
    def test_unknown_pid_is_an_address(self, config):
        assert mqbtt.pid2url("192.168.1.9") == "http://192.168.1.9"
        assert mqbtt.pid2url("bitaxe.local:8080") == "http://bitaxe.local:8080"
        assert mqbtt.pid2url("fe80::1") == "http://[fe80::1]"
        assert mqbtt.pid2url("test") == "http://test"

    def test_pairs_section(self, config):
        config("[pairs]\ntest = 192.168.1.50\nGamma01 = 10.0.0.7:8080\n"
               "proxied = https://miners.example.org/gamma/\n")
        assert mqbtt.pid2url("test") == "http://192.168.1.50"
        assert mqbtt.pid2url("Gamma01") == "http://10.0.0.7:8080"
        assert mqbtt.pid2url("proxied") == "https://miners.example.org/gamma"
        assert mqbtt.pid2url("gamma01") == "http://gamma01"  # pair ids are case-sensitive

    def test_mqbtt_config_overrides_the_default_path(self, config, tmp_path, monkeypatch):
        config("[pairs]\ntest = 192.168.1.50\n")
        other = tmp_path / "other.ini"
        other.write_text("[pairs]\ntest = 10.1.2.3\n")
        monkeypatch.setenv("MQBTT_CONFIG", str(other))
        assert mqbtt.config_path() == str(other)
        assert mqbtt.pid2url("test") == "http://10.1.2.3"

    def test_missing_explicit_config_file(self, config, tmp_path, monkeypatch):
        monkeypatch.setenv("MQBTT_CONFIG", str(tmp_path / "nope.ini"))
        with pytest.raises(ValueError, match="does not exist"):
            mqbtt.pid2url("test")

    def test_invalid_config_file_never_shows_its_lines(self, config):
        config(f"[openobserve]\npassword {SECRET}\n")
        with pytest.raises(ValueError) as info:
            mqbtt.pid2url("test")
        assert "line 2" in str(info.value) and SECRET not in str(info.value)

    @pytest.mark.parametrize("bad", ["", "  ", "ftp://host", "two words"])
    def test_unusable_addresses(self, config, bad):
        with pytest.raises(ValueError):
            mqbtt.pid2url(bad)


# ---------------------------------------------------------------------------
# AxeOS API
# ---------------------------------------------------------------------------

class TestAxeOS:
    def test_info(self, config, axeos):
        config(f"[pairs]\nbench = {axeos.address}\n")
        info = mqbtt.axeos_info("bench")
        assert info["ASICModel"] == "BM1370" and info["uptimeSeconds"] >= 1000
        assert axeos.calls == [("GET", "/api/system/info")]

    @pytest.mark.parametrize("style", ["text", "json"])
    def test_restart_both_answer_styles(self, config, axeos, style):
        axeos.restart_style = style
        assert mqbtt.axeos_restart(axeos.address) is None
        assert axeos.posts() == [("POST", "/api/system/restart")]

    def test_401_explains_private_networks(self, config, axeos):
        axeos.info_style = axeos.restart_style = "401"
        for call in (mqbtt.axeos_info, mqbtt.axeos_restart):
            with pytest.raises(mqbtt.APIException) as info:
                call(axeos.address)
            msg = str(info.value)
            assert "401" in msg and "10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16" in msg
            assert axeos.address in msg

    def test_500(self, config, axeos):
        axeos.info_style = axeos.restart_style = "500"
        with pytest.raises(mqbtt.APIException, match=r"AxeOS system info: GET .*HTTP 500"):
            mqbtt.axeos_info(axeos.address)
        with pytest.raises(mqbtt.APIException, match=r"AxeOS restart: POST .*HTTP 500"):
            mqbtt.axeos_restart(axeos.address)
        assert len(axeos.posts()) == 1  # never retried

    def test_unusable_info_answer(self, config, axeos):
        axeos.info_style = "garbage"
        with pytest.raises(mqbtt.APIException, match="not a JSON object"):
            mqbtt.axeos_info(axeos.address)

    def test_timeout(self, config, axeos):
        axeos.info_style = axeos.restart_style = "hang"
        with pytest.raises(mqbtt.APIException, match=r"no answer within 0\.3 s"):
            mqbtt.axeos_info(axeos.address, timeout=0.3)
        with pytest.raises(mqbtt.APIException, match="may restart anyway"):
            mqbtt.axeos_restart(axeos.address, timeout=0.3)
        assert len(axeos.posts()) == 1  # never retried

    def test_connection_closed_without_answer(self, config, axeos):
        axeos.restart_style = "drop"
        with pytest.raises(mqbtt.APIException, match="connection lost before an answer.*may restart"):
            mqbtt.axeos_restart(axeos.address)
        assert len(axeos.posts()) == 1

    def test_connection_refused(self, config):
        address = f"127.0.0.1:{free_port()}"
        with pytest.raises(mqbtt.APIException) as info:
            mqbtt.axeos_info(address)
        assert str(info.value) == (f"AxeOS system info: GET http://{address}/api/system/info: "
                                   "cannot connect (connection refused)")


# ---------------------------------------------------------------------------
# OpenObserve history
# ---------------------------------------------------------------------------

class TestO2History:
    def test_record(self, config, o2):
        config(o2_section(o2))
        before = int(time.time() * 1e6)
        mqbtt.o2_history("gamma01", "fan too loud", event="restart")
        [(org, stream, records)] = o2.received
        assert (org, stream) == ("lab", "history")
        [record] = records
        assert record["pid"] == "gamma01" and record["detail"] == "fan too loud"
        assert record["event"] == "restart" and record["source"] == "mqbtt"
        assert before <= record["_timestamp"] <= int(time.time() * 1e6)

    def test_non_latin1_password(self, config, monkeypatch):
        """Basic auth carries the password as UTF-8 (requests alone would fail on it)."""
        password = "pässwörd€secret"
        server = FakeO2(password=password)
        try:
            monkeypatch.setenv("MQBTT_O2_URL", server.url)
            monkeypatch.setenv("MQBTT_O2_USER", O2_USER)
            monkeypatch.setenv("MQBTT_O2_PASSWORD", password)
            mqbtt.o2_history("gamma01", "utf-8 password")
            assert len(server.received) == 1
        finally:
            server.close()

    def test_environment_overrides_the_file(self, config, o2, monkeypatch):
        config("[openobserve]\nurl = http://127.0.0.1:1\nuser = nobody\npassword = wrong\n")
        monkeypatch.setenv("MQBTT_O2_URL", o2.url)
        monkeypatch.setenv("MQBTT_O2_ORG", "org2")
        monkeypatch.setenv("MQBTT_O2_STREAM", "events")
        monkeypatch.setenv("MQBTT_O2_USER", O2_USER)
        monkeypatch.setenv("MQBTT_O2_PASSWORD", SECRET)
        mqbtt.o2_history("test", "x")
        assert [(org, stream) for org, stream, _ in o2.received] == [("org2", "events")]

    @pytest.mark.parametrize("mode, fragment", [
        ("partial", "dropped the record (stream 'history': 0 successful, 1 failed: Too old data"),
        ("error", "OpenObserve reports an error: stream name is invalid"),
        ("500", "HTTP 500 Internal Server Error (internal error: disk full)"),
        ("garbage", "the answer is not a JSON object"),
    ])
    def test_failures_in_answers(self, config, o2, mode, fragment):
        config(o2_section(o2))
        o2.mode = mode
        with pytest.raises(mqbtt.APIException) as info:
            mqbtt.o2_history("test", "x")
        assert fragment in str(info.value)
        assert f"POST {o2.url}/api/lab/history/_json" in str(info.value)
        assert SECRET not in str(info.value)

    def test_401(self, config, o2):
        config(o2_section(o2, password="not-the-" + SECRET))
        with pytest.raises(mqbtt.APIException) as info:
            mqbtt.o2_history("test", "x")
        msg = str(info.value)
        assert "401 Unauthorized" in msg and "MQBTT_O2_PASSWORD" in msg and SECRET not in msg

    def test_not_configured(self, config):
        with pytest.raises(mqbtt.APIException, match="OpenObserve is not configured"):
            mqbtt.o2_history("test", "x")

    def test_unreachable_and_secret_in_url(self, config, monkeypatch):
        port = free_port()
        monkeypatch.setenv("MQBTT_O2_URL", f"http://{O2_USER}:{SECRET}@127.0.0.1:{port}")
        monkeypatch.setenv("MQBTT_O2_PASSWORD", SECRET)
        with pytest.raises(mqbtt.APIException) as info:
            mqbtt.o2_history("test", "x")
        assert "cannot connect (connection refused)" in str(info.value)
        assert SECRET not in str(info.value)

    def test_settings_repr_hides_the_password(self, config, o2):
        config(o2_section(o2))
        assert SECRET not in repr(mqbtt._o2_settings())


# ---------------------------------------------------------------------------
# restart (library)
# ---------------------------------------------------------------------------

class TestRestartFunction:
    def test_restart_record_and_wait(self, config, axeos, o2):
        config(f"[pairs]\nbench = {axeos.address}\n" + o2_section(o2))
        axeos.restart_style = "json"
        steps = []
        result = mqbtt.restart("bench", "testing", wait=20, progress=steps.append)
        assert axeos.back.is_set()
        assert result["recorded"] and result["info"]["uptimeSeconds"] < 10
        assert axeos.down_for <= result["downtime"] < 15
        events = [r[0]["event"] for _, _, r in o2.received]
        assert events == ["restart", "back online"]
        assert o2.received[1][2][0]["downtime"] == pytest.approx(result["downtime"], abs=0.01)
        assert steps[0] == f"restart of bench (http://{axeos.address}) requested"
        assert "is back after" in steps[-1]

    def test_history_not_configured_fails_before_restarting(self, config, axeos):
        with pytest.raises(mqbtt.APIException, match="not configured"):
            mqbtt.restart(axeos.address, "x")
        assert axeos.calls == []

    def test_wait_gives_up(self, config, axeos):
        axeos.down_for = None
        with pytest.raises(mqbtt.APIException, match=r"did not answer again within 1\.5 s"):
            mqbtt.restart(axeos.address, wait=1.5, history=False, timeout=0.5)
        assert len(axeos.posts()) == 1


# ---------------------------------------------------------------------------
# wslog (library)
# ---------------------------------------------------------------------------

GREEN, YELLOW, RESET = "\x1b[0;32m", "\x1b[0;33m", "\x1b[0m"


def run_wslog_until(address, path, text, **kwargs):
    """Run wslog in a thread until *text* is in the file; return its result."""
    stop = threading.Event()
    result = {}

    def target():
        try:
            result["n"] = mqbtt.wslog(address, str(path), stop=stop, **kwargs)
        except BaseException as err:  # noqa: BLE001 - reported below
            result["err"] = err
    t = threading.Thread(target=target)
    t.start()
    try:
        wait_for(lambda: "err" in result or (path.exists() and text in path.read_text()),
                 what=f"{text!r} in {path}")
    finally:
        stop.set()
        t.join(10)
    assert not t.is_alive()
    if "err" in result:
        raise result["err"]
    return result["n"]


class TestWslog:
    def test_reassembles_strips_and_reconnects(self, config, ws_server, tmp_path):
        server = ws_server([
            [GREEN + "I (100) boot: first line" + RESET + "\n" + YELLOW + "W (101) wifi: second",
             " line continues" + RESET + "\n",
             "\x1b[0;3",  # an escape sequence split across frames
             "2mI (102) asic: temp 58.2",
             "I (103) ümlaut".encode()[:-2], "I (103) ümlaut".encode()[-2:] + b"\n",
             "crlf line\r\nmulti one\nmulti two\n",
             "I (104) cut mid-li", DROP],
            ["I (1) boot: after reconnect\nI (2) partial tail", HOLD],
        ])
        path = tmp_path / "sub" / "log.txt"
        path.parent.mkdir()
        path.write_text("old line\n")
        n = run_wslog_until(server.address, path, "after reconnect", backoff=(0.1, 1.0))
        assert path.read_text().splitlines() == [
            "old line",
            "I (100) boot: first line",
            "W (101) wifi: second line continues",
            "I (102) asic: temp 58.2I (103) ümlaut",
            "crlf line", "multi one", "multi two",
            "I (104) cut mid-li",
            "I (1) boot: after reconnect",
            "I (2) partial tail",
        ]
        assert n == 9
        assert server.connections == 2 and server.paths == ["/api/ws", "/api/ws"]

    def test_backoff_never_hammers(self, config, ws_server, tmp_path):
        server = ws_server([[CLOSE]])  # accepts, then closes at once, forever
        n = mqbtt.wslog(server.address, str(tmp_path / "log"), duration=1.6, backoff=(0.2, 1.0))
        assert n == 0
        assert 2 <= server.connections <= 5  # 0, 0.2, 0.6, 1.4 s

    def test_429_is_retried(self, config, ws_server, tmp_path):
        server = ws_server([["I (5) hello\n", HOLD]], refuse=lambda i: 429 if i < 2 else None)
        run_wslog_until(server.address, tmp_path / "log", "I (5) hello", backoff=(0.05, 0.2))
        assert server.attempts == 3

    def test_401(self, config, ws_server, tmp_path):
        server = ws_server([[HOLD]], refuse=lambda i: 401)
        with pytest.raises(mqbtt.APIException, match=r"401 Unauthorized: AxeOS only answers .*192\.168"):
            mqbtt.wslog(server.address, str(tmp_path / "log"))
        assert server.attempts == 1

    def test_first_connection_refused(self, config, tmp_path):
        address = f"127.0.0.1:{free_port()}"
        with pytest.raises(mqbtt.APIException) as info:
            mqbtt.wslog(address, str(tmp_path / "log"))
        assert str(info.value) == (f"AxeOS websocket log: ws://{address}/api/ws: "
                                   "cannot connect (connection refused)")


# ---------------------------------------------------------------------------
# The restart and wslog commands, as real processes
# ---------------------------------------------------------------------------

@pytest.fixture
def cli_env(config, axeos, o2):
    """Configuration file with pair ``bench`` -> the fake AxeOS and the
    OpenObserve URL; user and password in the environment."""
    config(f"[pairs]\nbench = {axeos.address}\n\n[openobserve]\nurl = {o2.url}\norg = lab\n")
    return {"MQBTT_CONFIG": str(config.path), "MQBTT_O2_USER": O2_USER,
            "MQBTT_O2_PASSWORD": SECRET}


class TestRestartCommand:
    @pytest.mark.parametrize("style", ["text", "json"])
    def test_restart(self, cli_env, axeos, o2, style):
        axeos.restart_style = style
        p = run_cli("restart", "--pid", "bench", "--detail", "hashrate dropped", env_extra=cli_env)
        assert p.returncode == 0, p.stderr
        assert p.stdout.splitlines() == [
            f"mqbtt restart: restart of bench (http://{axeos.address}) requested",
            "mqbtt restart: restart recorded in the OpenObserve history"]
        assert axeos.posts() == [("POST", "/api/system/restart")]
        [(_, _, [record])] = o2.received
        assert record["pid"] == "bench" and record["detail"] == "hashrate dropped"

    def test_restart_and_wait(self, cli_env, axeos, o2):
        p = run_cli("restart", "--pid", "bench", "--detail", "x", "--wait", "20",
                    env_extra=cli_env)
        assert p.returncode == 0, p.stderr
        assert re.search(r"^mqbtt restart: bench is back after \d+\.\d s \(uptime \d s\)$",
                         p.stdout, re.M), p.stdout
        assert [r[0]["event"] for _, _, r in o2.received] == ["restart", "back online"]

    @pytest.mark.parametrize("setup, args, fragments", [
        (lambda a, o: setattr(a, "restart_style", "401"), [],
         ["AxeOS restart: POST", "401 Unauthorized", "10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16"]),
        (lambda a, o: setattr(a, "restart_style", "500"), [], ["HTTP 500"]),
        (lambda a, o: setattr(a, "restart_style", "hang"), ["--timeout", "0.5"],
         ["no answer within 0.5 s"]),
        (lambda a, o: setattr(o, "mode", "partial"), [],
         ["the restart of bench was requested, but recording it failed", "1 failed"]),
        (lambda a, o: setattr(o, "expected_auth", "Basic other"), [],
         ["recording it failed", "401 Unauthorized"]),
        (lambda a, o: setattr(a, "info_style", "401"), ["--wait", "5"], ["401 Unauthorized"]),
    ], ids=["axeos-401", "axeos-500", "axeos-timeout", "o2-partial", "o2-401", "wait-401"])
    def test_failures(self, cli_env, axeos, o2, setup, args, fragments):
        setup(axeos, o2)
        p = run_cli("restart", "--pid", "bench", *args, env_extra=cli_env)
        assert_one_line_error(p, "restart", *fragments)
        assert len(axeos.posts()) <= 1

    def test_connection_refused(self, cli_env):
        address = f"127.0.0.1:{free_port()}"
        p = run_cli("restart", "--pid", address, env_extra=cli_env)
        assert_one_line_error(p, "restart", "cannot connect (connection refused)")

    def test_not_configured(self, config, axeos):
        p = run_cli("restart", "--pid", axeos.address)
        assert_one_line_error(p, "restart", "OpenObserve is not configured")
        assert axeos.calls == []

    def test_no_history(self, config, axeos):
        p = run_cli("restart", "--pid", axeos.address, "--no-history")
        assert p.returncode == 0 and len(axeos.posts()) == 1

    @pytest.mark.parametrize("args", [["--wait", "soon"], ["--timeout", "0"], ["--bogus"]])
    def test_usage_errors(self, config, args):
        p = run_cli("restart", *args)
        assert p.returncode == 2 and "usage: " in p.stderr and " mqbtt.py restart [-h]" in p.stderr


class TestWslogCommand:
    def test_ctrl_c_writes_the_partial_line(self, config, ws_server, tmp_path):
        server = ws_server([[GREEN + "I (7) stratum: connected" + RESET + "\nI (8) half", HOLD]])
        path = tmp_path / "ws.log"
        p = subprocess.Popen([sys.executable, "mqbtt.py", "wslog", "--pid", server.address,
                              "--file", str(path)], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            wait_for(lambda: path.exists() and "connected" in path.read_text() or p.poll() is not None,
                     what="the first line")
            p.send_signal(signal.SIGINT)
            out, err = p.communicate(timeout=10)
        finally:
            if p.poll() is None:
                p.kill()
        assert p.returncode == 0, err
        assert path.read_text() == "I (7) stratum: connected\nI (8) half\n"
        assert "no logs over MQTT" in err and "Traceback" not in err and out == ""

    def test_duration_and_reconnect(self, config, ws_server, tmp_path):
        server = ws_server([["I (1) a\nI (2) b", DROP], ["I (1) c\n", HOLD]])
        path = tmp_path / "ws.log"
        # the reconnection comes after the default 1 s back-off: a duration that leaves
        # a loaded machine several seconds for the second handshake
        p = run_cli("wslog", "--pid", server.address, "--file", str(path), "--duration", "5")
        assert p.returncode == 0, p.stderr
        assert path.read_text() == "I (1) a\nI (2) b\nI (1) c\n"
        assert "connection lost" in p.stderr and "3 lines appended" in p.stderr

    def test_failures(self, config, ws_server, tmp_path):
        server = ws_server([[HOLD]], refuse=lambda i: 401)
        p = run_cli("wslog", "--pid", server.address, "--file", str(tmp_path / "x"))
        assert_one_line_error(p, "wslog", "AxeOS websocket log: ws://", "401 Unauthorized",
                              "private networks (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16)")
        address = f"127.0.0.1:{free_port()}"
        p = run_cli("wslog", "--pid", address, "--file", str(tmp_path / "x"))
        assert_one_line_error(p, "wslog", "cannot connect (connection refused)")
        p = run_cli("wslog", "--pid", server.address, "--file", str(tmp_path / "no" / "dir" / "x"))
        assert_one_line_error(p, "wslog", "No such file or directory")

    def test_usage_errors(self, config):
        p = run_cli("wslog", "--pid", "x")
        assert p.returncode == 2 and "--file" in p.stderr


def test_import_does_not_load_network_libraries():
    code = "import sys, mqbtt; print(sorted({'requests', 'websocket', 'paho'} & set(sys.modules)))"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert p.stdout.strip() == "[]", p.stderr
