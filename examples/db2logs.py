"""Print the log lines a pair sent, from a recording made by ``mqbtt record``.

    python examples/db2logs.py traffic.db gamma01

Each line is the receive time in local time with its UTC offset, then the log
text, e.g. ``2025-05-22 11:15:46+0200 I (4398308) mqbtt_mqtt: ...``.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mqbtt import MQbtTDataBase, safe_text  # noqa: E402


def main(argv):
    if len(argv) != 3:
        print(f"usage: {os.path.basename(argv[0])} DB PAIR_ID", file=sys.stderr)
        return 2
    path, pair_id = argv[1], argv[2]
    if not os.path.exists(path):
        print(f"db2logs: no such database: {path}", file=sys.stderr)
        return 1
    with MQbtTDataBase(path) as db:
        for record in db.logs(pair_id=pair_id):
            when = record.timestamp.astimezone()  # local time
            # a log line is the miner's text: no terminal escapes or line breaks
            print(f"{when:%Y-%m-%d %H:%M:%S%z} {safe_text(record.message or '')}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except BrokenPipeError:  # e.g. piped into head
        sys.stdout = open(os.devnull, "w")
        sys.exit(0)
