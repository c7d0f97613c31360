"""Benchmark: what FleetStats (``mqbtt top`` / ``mqbtt exporter``) costs per message,
per pair and per scrape.

No broker: messages go straight to ``FleetStats.feed`` (the exporter's network
thread does the same for each PUBLISH).  Prints, for each size:

- feed: microseconds per message, per subtopic (decoding included);
- memory: bytes per tracked pair (tracemalloc), every subtopic in use;
- snapshot: ``FleetStats.pairs()`` time (top redraws, each scrape);
- scrape: one ``/metrics`` exposition by prometheus_client (size, lines, time).

    python bench/fleet_stats.py [--pairs 100,1000] [--repeat 3]
"""
import argparse
import os
import sys
import time
import tracemalloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import mqbtt  # noqa: E402


def payloads():
    return {"srv": mqbtt.Request(timestamp_min=1, timestamp_max=2, nonce_size=9).to_bytes(),
            "esp": mqbtt.Reply(num_shares=12345).to_bytes(),
            "shr": mqbtt.Share(diff=4096.5, nonce=7, job_id="1a2b", extranonce2="0001").to_bytes(),
            "log": b"I (12345) asic_result: Ver: 20000000 Nonce 1A2B3C4D diff 4096.5 of 1000."}


def fill(stats, pairs, t):
    p = payloads()
    for i in range(pairs):
        pid = f"pair{i:05d}"
        for sub in ("srv", "esp", "shr", "log"):
            stats.feed(pid, sub, p[sub], t + (0.001 if sub == "esp" else 0))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", default="100,1000")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    from prometheus_client import CollectorRegistry, generate_latest
    p = payloads()
    s = mqbtt.FleetStats("mqtt://127.0.0.1:1")
    n = 20000
    for sub in ("srv", "esp", "shr", "log"):
        best = min(_time(lambda: [s.feed("one", sub, p[sub]) for _ in range(n)]) for _ in range(a.repeat))
        print(f"feed {sub}: {best / n * 1e6:.1f} µs per message")
    for pairs in (int(x) for x in a.pairs.split(",")):
        s = mqbtt.FleetStats("mqtt://127.0.0.1:1", max_pairs=pairs)
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        fill(s, pairs, time.time())
        per_pair = (tracemalloc.get_traced_memory()[0] - before) / pairs
        tracemalloc.stop()
        snap = min(_time(s.pairs) for _ in range(a.repeat))
        registry = CollectorRegistry(auto_describe=False)
        registry.register(mqbtt._FleetCollector(s))
        text = generate_latest(registry)
        lines = text.count(b"\n")
        scrape = min(_time(lambda: generate_latest(registry)) for _ in range(a.repeat))
        print(f"{pairs} pairs: {per_pair / 1024:.1f} KiB per pair; pairs() {snap * 1000:.0f} ms; "
              f"scrape {scrape * 1000:.0f} ms, {len(text) / 1e6:.2f} MB, {lines} lines")


def _time(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
