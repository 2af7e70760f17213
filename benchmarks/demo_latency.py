"""Demo latency: time until the page is up, and 8 digits at 250 steps through the served API.

    python benchmarks/demo_latency.py [--repeats 3] [--torch-threads 1 2]

Starts `python -m ditexport demo` once per torch thread setting (side by side, same machine, same run),
measures from process start to the first HTTP 200 of the page, then sends the same request through
gradio_client several times and prints the server's own sampling time and the client's round trip.
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def page_up(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the demo exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"the page did not come up in {timeout} s")


def measure(threads: int, repeats: int, steps: int, images: int) -> dict:
    from gradio_client import Client

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    cmd = [sys.executable, "-m", "ditexport", "demo", "--port", str(port), "--exports", tempfile.mkdtemp()]
    cmd += ["--torch-threads", str(threads)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    try:
        page_up(url, proc)
        up_s = time.perf_counter() - start
        client = Client(url, verbose=False, download_files=tempfile.mkdtemp(), analytics_enabled=False)
        totals, steps_ms, round_trips = [], [], []
        for i in range(repeats):
            t0 = time.perf_counter()
            _, summary = client.predict(model="digits (built-in)", backend="torch (fp32)", class_index=i % 10,
                                        blend_class=-1, blend_weight=0.5, num_images=images, guidance=4.0,
                                        sampler="ddpm", steps=steps, seed=i, api_name="/generate")
            round_trips.append(time.perf_counter() - t0)
            steps_ms.append(float(re.search(r"([\d.]+) ms per step", summary).group(1)))
            totals.append(float(re.search(r"([\d.]+) s in all", summary).group(1)))
        return {"threads": threads, "page_up_s": up_s, "total_s": statistics.median(totals),
                "step_ms": statistics.median(steps_ms), "round_trip_s": statistics.median(round_trips)}
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--torch-threads", type=int, nargs="+", default=[1, 2],
                        help="settings to compare side by side (default: 1 2)")
    args = parser.parse_args()
    rows = [measure(t, args.repeats, args.steps, args.images) for t in args.torch_threads]
    print(f"{args.images} digits x {args.steps} DDPM steps, guidance 4 (batch {2 * args.images}), "
          f"median of {args.repeats}; {os.cpu_count()} CPUs")
    print(f"{'torch threads':>13} {'page up':>9} {'sampling':>9} {'per step':>9} {'round trip':>11}")
    for r in rows:
        print(f"{r['threads']!s:>13} {r['page_up_s']:>8.2f}s {r['total_s']:>8.2f}s {r['step_ms']:>7.2f}ms "
              f"{r['round_trip_s']:>10.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
