"""The documented optimizer <-> echo exchange, on a private broker.

    python examples/demo.py

Starts a Mosquitto on a free loopback port, runs ``mqbtt.py echo demo`` and
``examples/optimizer.py demo`` against it, prints the optimizer's 20 lines and
then the echo miner's 20 lines on stdout (headers go to stderr), and stops
everything.
"""
import os
import signal
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from local_broker import INSTALL_HINT, LocalBroker, mosquitto_path  # noqa: E402


def main():
    root = os.path.dirname(HERE)
    if mosquitto_path() is None:  # one line that says how to install it
        sys.exit(f"demo: {INSTALL_HINT}")
    with LocalBroker() as broker:
        env = dict(os.environ, MQBTT_BROKER=broker.uri, PYTHONUNBUFFERED="1")
        echo = subprocess.Popen([sys.executable, os.path.join(root, "mqbtt.py"), "echo", "demo"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            # wait until the echo miner is subscribed ("mqbtt echo: answering ..." on its
            # stderr), or the optimizer's first request could reach nobody
            ready = echo.stderr.readline()
            if "answering" not in ready:
                sys.exit(f"demo: the echo miner did not start: {ready}{echo.stderr.read()}")
            opt = subprocess.run([sys.executable, os.path.join(HERE, "optimizer.py"), "demo"],
                                 env=env, stdout=subprocess.PIPE, text=True, timeout=120)
            lines = []
            for _ in range(20):
                line = echo.stdout.readline()
                if not line:
                    break
                lines.append(line)
        finally:
            echo.send_signal(signal.SIGINT)
            echo.wait(10)
        print("== examples/optimizer.py demo ==", file=sys.stderr, flush=True)
        sys.stdout.write(opt.stdout)
        sys.stdout.flush()
        print("== mqbtt echo demo ==", file=sys.stderr, flush=True)
        sys.stdout.write("".join(lines))
        sys.stdout.flush()
        return opt.returncode or (0 if len(lines) == 20 else 1)


if __name__ == "__main__":
    sys.exit(main())
