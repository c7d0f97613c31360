"""Example logger: print every log line the miner of a pair publishes.

    python examples/logger.py [PAIR_ID]           # default pair id: test

The broker is $MQBTT_BROKER, else the documented default host.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mqbtt import MQbtTError, MQbtTLogReceiver, safe_text  # noqa: E402


def main(pair_id="test", broker=None):
    # broker None: $MQBTT_BROKER, else DEFAULT_BROKER (a bad $MQBTT_BROKER is a ValueError naming it)
    with MQbtTLogReceiver(broker, pair_id) as handle:
        print(f"logger: listening to the log lines of pair {pair_id!r} on {handle.broker}",
              file=sys.stderr, flush=True)
        while True:
            # a log line is the miner's text: no terminal escapes or line breaks
            print(safe_text(handle.receive_log()), flush=True)


if __name__ == "__main__":
    try:
        main(*sys.argv[1:2])
    except (MQbtTError, ValueError) as err:
        sys.exit(f"logger: {err}")
    except KeyboardInterrupt:
        pass
