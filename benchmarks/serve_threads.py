"""How many CPU threads a `serve` replica should use: requests/s of `python -m ditexport serve --torch-threads N`
for each N, at several numbers of closed-loop clients and images per request, side by side in one run.

    python benchmarks/serve_threads.py --export-dir exports/digits [--threads 1,2] [--clients 1,8,32]
        [--images 1,2] [--seconds 8] [--steps 50]

Each client sends its next request (DDIM, guidance 4, a random digit and seed) when it has its answer; a 503 is
retried after its Retry-After. Prints one Markdown table: requests/s and images/s answered 200, p50 and p99.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_soak import closed_loop, http, image_body, start_serve, stop_serve  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export-dir", default="exports/digits")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--images", default="1,2")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each measurement")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        proc, port, _ = start_serve(args.export_dir, threads, [])
        try:
            import random

            asyncio.run(http(port, "POST", "/v1/images", image_body(random.Random(0), 2, 5)))  # warm-up
            for clients in (int(c) for c in args.clients.split(",")):
                for images in (int(i) for i in args.images.split(",")):
                    row = asyncio.run(closed_loop(port, clients, args.seconds, images, args.steps, retry=True))
                    row["threads"] = threads
                    print(json.dumps(row), file=sys.stderr, flush=True)
                    rows.append(row)
        finally:
            stop_serve(proc)
    print("| threads | clients | images/request | requests/s | images/s | p50 s | p99 s | statuses |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['threads']} | {r['clients']} | {r['images']} | {r['ok_per_s']:.1f} | "
              f"{r['ok_per_s'] * r['images']:.1f} | {r['p50_s']:.3f} | {r['p99_s']:.3f} | {r['statuses']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
