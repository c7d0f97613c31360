"""Review 5: a clean stop of the recorder leaves no duplicate after a restart.

The recorder acknowledges (PUBACK) only after committing.  On a clean stop it
used to write its last PUBACKs, then DISCONNECT, and close the socket at once:
a broker that had not read them yet (busy with a flood; Mosquitto drops a
connection it fails to write to without reading what is left) never took
them, and redelivered messages already stored to the next run.  These tests
put a slow link in front of a real Mosquitto: bytes from the recorder reach
the broker DELAY s late, and those still in transit when the recorder closes
its connection are lost, as with the busy broker."""
import socket
import sqlite3
import threading
import time

import mqbtt
from local_broker import LocalBroker
from testlib import wait_for

DELAY = 0.4


class SlowLink:
    """A TCP relay to *port*: broker to client at once; client to broker
    *delay* s late.  When the client closes, what is still in transit is
    dropped and the broker side is closed (a lost connection, no DISCONNECT)."""

    def __init__(self, port, delay=DELAY):
        self.port, self.delay = port, delay
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.listen_port = self.lsock.getsockname()[1]
        self.dropped = []    # bytes lost in transit, per connection
        self.socks = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.lsock.accept()
            except OSError:
                return
            broker = socket.create_connection(("127.0.0.1", self.port))
            self.socks += [client, broker]
            threading.Thread(target=self._down, args=(broker, client), daemon=True).start()
            threading.Thread(target=self._up, args=(client, broker), daemon=True).start()

    def _down(self, broker, client):
        try:
            while True:
                data = broker.recv(65536)
                if not data:
                    break
                client.sendall(data)
        except OSError:
            pass
        for s in (client, broker):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _up(self, client, broker):
        pending = []          # (due time, bytes)
        cond = threading.Condition()
        closed = []

        def reader():
            while True:
                try:
                    data = client.recv(65536)
                except OSError:
                    data = b""
                with cond:
                    if not data:
                        closed.append(True)
                    else:
                        pending.append((time.monotonic() + self.delay, data))
                    cond.notify_all()
                if not data:
                    return
        threading.Thread(target=reader, daemon=True).start()
        while True:
            with cond:
                while not pending and not closed:
                    cond.wait()
                if closed:
                    self.dropped.append(b"".join(d for _, d in pending))
                    break
                due, data = pending[0]
                left = due - time.monotonic()
                if left > 0:
                    cond.wait(left)
                    continue
                pending.pop(0)
            try:
                broker.sendall(data)
            except OSError:
                break
        try:
            broker.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        broker.close()

    def close(self):
        self.lsock.close()
        for s in self.socks:
            try:
                s.close()
            except OSError:
                pass


def messages(db):
    con = sqlite3.connect(db, timeout=30)
    try:
        return [m for (m,) in con.execute("SELECT message FROM messages ORDER BY id")]
    except sqlite3.OperationalError:
        return []
    finally:
        con.close()


def run_recorder(uri, db, cid):
    rec = mqbtt.Recorder(uri, db, client_id=cid, connect_timeout=30)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("n", rec.run()), daemon=True)
    t.start()
    wait_for(lambda: rec._conn is not None and rec._conn.subscribed, what="recorder subscribed")
    return rec, t, out


def test_clean_stop_acks_reach_the_broker(tmp_path):
    """Messages stored, acknowledged, then a clean stop over a slow link: the
    restarted recorder (same client id) gets no message again."""
    broker = LocalBroker(extra="max_queued_messages 0\nmax_queued_bytes 0").start()
    link = SlowLink(broker.port)
    uri = f"mqtt://127.0.0.1:{link.listen_port}"
    db, cid = str(tmp_path / "r.db"), "review5-recorder"
    pub = mqbtt._paho_client(mqbtt.BrokerURI.parse(broker.uri), "review5-pub", True)
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    try:
        rec, t, out = run_recorder(uri, db, cid)
        sent = [b"m%03d" % i for i in range(8)]
        infos = [pub.publish(f"mqbtt/p{i % 3}/shr", m, 1) for i, m in enumerate(sent)]
        wait_for(lambda: len(messages(db)) == len(sent), what="8 messages stored")
        rec.stop()                       # their PUBACKs are still on the slow link
        t.join(60)
        assert not t.is_alive() and out["n"] == len(sent)
        # the publisher's PUBACKs: read by its own network thread, independently of the recorder
        wait_for(lambda: all(info._published for info in infos), what="the publisher's PUBACKs")
        # nothing the recorder sent before closing was lost in transit, and a
        # restart with the same client id gets nothing again
        rec, t, out = run_recorder(uri, db, cid)
        more = [b"n%03d" % i for i in range(4)]
        for i, m in enumerate(more):
            pub.publish(f"mqbtt/p{i}/log", m, 1)
        wait_for(lambda: len(messages(db)) >= len(sent) + len(more), what="4 more stored")
        rec.stop()
        t.join(60)
        assert not t.is_alive()
        got = messages(db)
        assert sorted(got) == sorted(sent + more), f"duplicates or losses: {got}"
        # both connections' ends seen by the relay's threads (what was in transit then)
        wait_for(lambda: len(link.dropped) >= 2, what="the relay to see both connections end")
        assert link.dropped and all(b"\x40\x02" not in d for d in link.dropped), \
            f"PUBACKs lost in transit: {link.dropped}"
    finally:
        pub.disconnect()
        pub.loop_stop()
        link.close()
        broker.cleanup()
