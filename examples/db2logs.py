"""Print the log lines a pair sent, from a recording made by ``mqbtt record``.

    python examples/db2logs.py traffic.db gamma01

Each line is the receive time in local time with its UTC offset, then the log
text, e.g. ``2025-05-22 11:15:46+0200 I (4398308) mqbtt_mqtt: ...``.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mqbtt import MQbtTDataBase, MQbtTError, safe_text  # noqa: E402


def main(argv):
    if len(argv) != 3:
        print(f"usage: {os.path.basename(argv[0])} DB PAIR_ID", file=sys.stderr)
        return 2
    path, pair_id = argv[1], argv[2]
    if not os.path.exists(path):
        print(f"db2logs: no such database: {path}", file=sys.stderr)
        return 1
    try:
        db = MQbtTDataBase(path)
        records = db.logs(pair_id=pair_id)
    except (MQbtTError, ValueError) as err:  # not a database, unreadable, ...
        print(f"db2logs: {err}", file=sys.stderr)
        return 1
    with db:
        for record in records:
            if record.timestamp is None:  # a row written by another tool without a usable time
                print(f"{'(no time)':<24} {safe_text(record.message or '')}")
                continue
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
