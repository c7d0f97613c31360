"""Quick-ACK alternatives measured for issue 11 (not part of run.py): the optimizer/miner
round trip on a STOCK Mosquitto with one mechanism applied in both processes.

    python3 bench/quickack_variants.py N VARIANT   # VARIANT: none once onlog recvwrap callbacks

none: no quick ACKs; once: TCP_QUICKACK set once when the socket opens; onlog: set from paho's
on_log on every "Received ..." line; recvwrap: set after every recv() by a wrapper replacing paho's
private socket; callbacks: what mqbtt does.  The experiment patches mqbtt (only here)."""
import sys, os, resource
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "examples"), HERE]
import mqbtt, run
from local_broker import LocalBroker

PATCH = r'''
import os, socket
def _apply(mqbtt):
    v = os.environ.get("QAVAR", "callbacks")
    if v == "callbacks":
        return
    mqbtt._QUICKACK[:] = [None]
    if v == "none":
        return
    orig = mqbtt._tcp_nodelay
    class Wrap:
        def __init__(self, s):
            self._s = s
        def recv(self, n):
            d = self._s.recv(n)
            self._s.setsockopt(6, 12, 1)
            return d
        def __getattr__(self, name):
            return getattr(self._s, name)
    def opened(client, userdata, sock, on=True):
        orig(client, userdata, sock, on)
        if v == "once":
            sock.setsockopt(6, 12, 1)
        elif v == "recvwrap":
            client._sock = Wrap(sock)
    mqbtt._tcp_nodelay = opened
    if v == "onlog":
        orig_pc = mqbtt._paho_client
        def pc(*a, **k):
            c = orig_pc(*a, **k)
            c.on_log = lambda client, u, level, buf: client.socket().setsockopt(6, 12, 1) if buf.startswith("Received") else None
            return c
        mqbtt._paho_client = pc
'''
os.environ["QAVAR"] = sys.argv[2]
exec(PATCH)
globals()["_apply"](mqbtt)   # defined by PATCH
run.MINER_SRC = run.MINER_SRC.replace("import mqbtt\n", "import mqbtt\n" + PATCH + "\n_apply(mqbtt)\n", 1)
# MQbtTBase replaces on_socket_open with its own method calling the module global _tcp_nodelay: ok
stock = LocalBroker(stock=True).start()
n = int(sys.argv[1])
try:
    for v in sys.argv[2:3]:
        r0 = resource.getrusage(resource.RUSAGE_SELF); c0 = r0.ru_utime + r0.ru_stime
        o = run._rtt_ours(stock.uri, "v" + v, n)
        r1 = resource.getrusage(resource.RUSAGE_SELF); c1 = r1.ru_utime + r1.ru_stime
        print(f"{v:10s} stock RTT p50 {run.pct(o, 50):.3f} ms p99 {run.pct(o, 99):.3f} ms; optimizer CPU {(c1 - c0) / (n + 20) * 1e6:.0f} us/exchange", flush=True)
finally:
    stock.cleanup()
