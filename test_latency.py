"""Issue 11: no delayed-ACK stalls on a stock Mosquitto (no ``set_tcp_nodelay``).

Every test runs a real Mosquitto configured as it ships (``LocalBroker(stock=True)``:
only listeners and ``allow_anonymous``).  There, the broker's Nagle algorithm holds
each small packet until the previous one is acknowledged, and without TCP_QUICKACK
the client's kernel delays that ACK by up to 40 ms: every request -> reply took
~44 ms.  Speed itself is measured in bench/run.py; these tests check that the
mechanism is active on the socket (TCP, TLS, websockets, secure websockets) and
that exchanges are far from the 40 ms stall.
"""
import os
import socket
import statistics
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import mqbtt  # noqa: E402
from local_broker import LocalBroker, free_port  # noqa: E402
from mqbtt import MQbtTMiner, MQbtTOptimizer, Reply, Request, Share  # noqa: E402
from testlib import make_ca  # noqa: E402

@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    """A stock Mosquitto with four listeners: TCP, TLS, websockets, secure
    websockets; ``stock.uris`` maps each transport to its URI."""
    ca = make_ca(tmp_path_factory.mktemp("latency"))
    tls = f"cafile {ca}/ca.crt\ncertfile {ca}/server.crt\nkeyfile {ca}/server.key\n"
    ports = {name: free_port() for name in ("tls", "ws", "wss")}
    b = LocalBroker(stock=True, listeners=(
        f"listener {ports['tls']} 127.0.0.1\n{tls}"
        f"listener {ports['ws']} 127.0.0.1\nprotocol websockets\n"
        f"listener {ports['wss']} 127.0.0.1\nprotocol websockets\n{tls}")).start()
    assert "set_tcp_nodelay" not in b.config()
    b.uris = {"tcp": b.uri,
              "tls": f"mqtts://127.0.0.1:{ports['tls']}?cafile={ca}/ca.crt",
              "ws": f"ws://127.0.0.1:{ports['ws']}/mqtt",
              "wss": f"wss://127.0.0.1:{ports['wss']}/mqtt?cafile={ca}/ca.crt"}
    yield b
    b.cleanup()


def _quickack_state(handle) -> int:
    """TCP_QUICKACK as the kernel reports it for *handle*'s socket: 1 while it
    acknowledges at once, 0 in its delayed-ACK ("pingpong") mode."""
    sock = handle._client.socket()
    sock = getattr(sock, "_socket", sock)      # paho's websocket wrapper
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK)


def _exchange(opt, miner, i):
    opt.send_request(Request(timestamp_min=i))
    assert miner.receive_request(timeout=30) == Request(timestamp_min=i)
    miner.send_reply(Reply(num_shares=i))
    assert opt.receive_reply(timeout=30) == Reply(num_shares=i)


@pytest.mark.parametrize("transport", ["tcp", "tls", "ws", "wss"])
def test_quick_ack_is_active_after_acknowledged_publishes(stock, transport):
    # The miner's socket is put in delayed-ACK mode (as an exchange leaves it:
    # the kernel sees an interactive connection); then the broker's PUBACK for
    # a share gets no answer from us.  The kernel acknowledges it at once, and
    # reports 1, only if TCP_QUICKACK was set after reading it.  Without the
    # fix the state stays 0 (until a delayed-ACK timer fires, 40 ms later).
    uri = stock.uris[transport]
    pid = f"qa{transport}"
    with MQbtTOptimizer(stock.uri, pid) as opt, MQbtTMiner(uri, pid) as miner:
        sock = miner._client.socket()
        sock = getattr(sock, "_socket", sock)
        states = []
        for i in range(5):
            _exchange(opt, miner, i)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)   # delayed-ACK mode
            assert _quickack_state(miner) == 0
            miner.send_share(Share(nonce=i))       # blocking: returns after the PUBACK
            states.append(_quickack_state(miner))
        assert states == [1] * 5


def test_stock_broker_exchanges_and_recorded_latencies_do_not_stall(stock, tmp_path):
    # 20 request -> reply exchanges through a stock broker, recorded by the
    # recorder (which acknowledges only after its commits).  Without quick
    # ACKs each takes ~44 ms (the kernel's delayed ACK is at least 40 ms); with
    # them ~1-2 ms.  The bound is a generous 30 ms on the median, so a loaded
    # machine (GIL hand-offs between the four clients' threads in this process)
    # does not make it flaky, and still below the 40 ms stall.
    db = tmp_path / "rec.db"
    started = threading.Event()

    class Status:
        def write(self, text):
            if "recording" in text:
                started.set()

        def flush(self):
            pass
    rec = mqbtt.Recorder(stock.uri, str(db), exclude="shr,log", status=Status(), batch_timeout=1)
    t = threading.Thread(target=rec.run, daemon=True)
    t.start()
    try:
        assert started.wait(30)
        with MQbtTOptimizer(stock.uri, "lat") as opt, MQbtTMiner(stock.uri, "lat") as miner:
            _exchange(opt, miner, 1000)                # warm up
            times = []
            for i in range(20):
                t0 = time.perf_counter()
                _exchange(opt, miner, i)
                times.append((time.perf_counter() - t0) * 1000)
        deadline = time.monotonic() + 60
        while rec.total < 42 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rec.total == 42
    finally:
        rec.stop()
        t.join(30)
    assert not t.is_alive()
    assert statistics.median(times) < 30, times
    with mqbtt.MQbtTDataBase(str(db)) as d:
        pairs = list(mqbtt.request_reply_pairs(d.records(pair_id="lat")))
    latencies = [lat * 1000 for _, reply, lat in pairs[1:] if reply is not None]
    assert len(latencies) == 20
    assert statistics.median(latencies) < 30, latencies


def test_without_the_option_nothing_is_set(stock, monkeypatch):
    # Where the platform has no TCP_QUICKACK (macOS, Windows), mqbtt works as
    # before: no hook installed, nothing raised.
    monkeypatch.setattr(mqbtt, "_QUICKACK", [None])
    with MQbtTOptimizer(stock.uri, "noqa") as opt, MQbtTMiner(stock.uri, "noqa") as miner:
        assert opt._client.on_publish is None
        _exchange(opt, miner, 1)
        miner.send_share(Share(nonce=1))
        assert opt.receive_share(timeout=30) == Share(nonce=1)
    monkeypatch.undo()
    mqbtt._quickack(opt._client)               # with the option but no socket any more: harmless
    assert opt._client.socket() is None
