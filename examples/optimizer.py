"""Example optimizer: send ten requests to the miner of a pair and print the replies.

    python examples/optimizer.py [PAIR_ID]        # default pair id: test

The broker is $MQBTT_BROKER, else the documented default host.  Run the echo
fake miner (``mqbtt echo PAIR_ID``) on the same pair to see the documented
transcript.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mqbtt import Empty, MQbtTError, MQbtTOptimizer, Request  # noqa: E402


def main(pair_id="test", broker=None):
    # broker None: $MQBTT_BROKER, else DEFAULT_BROKER (a bad $MQBTT_BROKER is a ValueError naming it)
    with MQbtTOptimizer(broker, pair_id) as handle:
        for i in range(10):
            request = Request(
                timestamp_min=i, timestamp_max=i + 1,
                nonce_start=i // 2, nonce_size=i // 2 + 1,
                reset=(i % 2 == 0),
            )
            handle.send_request(request)
            print(f"Sent request: {request!r}", flush=True)
            reply = handle.receive_reply(timeout=30)
            print(f"Received reply: {reply!r}", flush=True)


if __name__ == "__main__":
    try:
        main(*sys.argv[1:2])
    except Empty:
        sys.exit("optimizer: no reply within 30 s (is a miner, e.g. `mqbtt echo PAIR_ID`, running?)")
    except (MQbtTError, ValueError) as err:
        sys.exit(f"optimizer: {err}")
    except KeyboardInterrupt:
        pass
