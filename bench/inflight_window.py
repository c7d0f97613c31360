#!/usr/bin/env python3
"""How many unacknowledged QoS 1 messages Mosquitto sends one subscriber.

    python3 bench/inflight_window.py

``max_inflight_messages`` (20 by default) is meant to bound the messages a
broker sends a client before it acknowledges them.  A subscriber with
``manual_ack`` receives a backlog of 200 messages and first acknowledges none:
it gets 20.  Then it acknowledges the first N of them *late* (after the stream
stalled), from another thread, as ``mqbtt record`` does after a commit: on
Mosquitto 2.0.11 each late PUBACK lets up to 20 more messages through, not 1.
Acknowledged at once, in the message callback, one PUBACK lets one through.
This is why duplicates after a SIGKILL of the recorder can exceed 20 (see the
README, *Recording*).  Starts its own broker (examples/local_broker.py).
"""
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
from local_broker import LocalBroker  # noqa: E402


def measure(broker, nacks, late):
    import paho.mqtt.client as mqtt
    mids = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sub-{nacks}-{late}",
                      clean_session=False, manual_ack=True)

    def on_message(client, userdata, msg):
        mids.append(msg.mid)
        if not late and len(mids) <= nacks:
            client.ack(msg.mid, 1)
    sub.on_message = on_message
    sub.connect("127.0.0.1", broker.port)
    sub.loop_start()
    sub.subscribe("mqbtt/+/log", 1)
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{nacks}-{late}")
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    time.sleep(0.5)
    for i in range(200):
        pub.publish("mqbtt/x/log", b"m%d" % i, 1).wait_for_publish(10)
    time.sleep(1.0)
    before = len(mids)
    if late:
        for mid in mids[:nacks]:
            sub.ack(mid, 1)
    time.sleep(1.0)
    after = len(mids)
    for c in (sub, pub):
        c.disconnect()
        c.loop_stop()
    return before, after


def main():
    import subprocess
    from local_broker import mosquitto_path
    head = subprocess.run([mosquitto_path(), "-h"], capture_output=True, text=True).stdout
    with LocalBroker() as broker:
        print(f"{head.splitlines()[0] if head else 'mosquitto'}, stock configuration "
              "(max_inflight_messages 20), a backlog of 200 QoS 1 messages:")
        for nacks, late in ((0, True), (1, False), (1, True), (5, True)):
            before, after = measure(broker, nacks, late)
            how = "late, from another thread" if late else "at once, in the callback"
            print(f"  {nacks} PUBACK(s) {how}: {after} received in all")


if __name__ == "__main__":
    main()
