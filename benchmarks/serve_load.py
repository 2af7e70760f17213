"""Open-loop Poisson load against the Ray Serve service on loopback: continuous batching vs request-level
batching (@serve.batch) vs one request at a time, in one run, on one export.

    python benchmarks/serve_load.py --export-dir exports/digits [--rates 5,10,20,40] [--requests 60]

Each mode is deployed in turn on one local Ray; each rate sends `--requests` requests (1 image, `--steps` DDIM
steps, guidance 4, a random digit and seed) at exponential gaps, never waiting for answers; a rate stops
early at `--max-seconds`. Prints a Markdown table: achieved requests/s, p50 and p99 latency, errors.
"""
import argparse
import json
import random
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ditexport.serving.service import ServeSettings, build_app, shutdown, start_local_ray  # noqa: E402

MODES = ("continuous", "request-batch", "single")


def post(url: str, body: dict) -> tuple[int, float]:
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, json.dumps(body).encode()), timeout=120) as r:
            r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    except OSError:
        status = 0
    return status, time.perf_counter() - start


def run_rate(url: str, rate: float, requests: int, steps: int, max_seconds: float, seed: int) -> dict:
    rng = random.Random(seed)
    results, lock = [], threading.Lock()

    def one(body):
        answer = post(url, body)
        with lock:
            results.append(answer)

    start = time.perf_counter()
    next_at = start
    with ThreadPoolExecutor(max_workers=256) as pool:
        for _ in range(requests):
            next_at += rng.expovariate(rate)
            if next_at - start > max_seconds:
                break
            time.sleep(max(0.0, next_at - time.perf_counter()))
            pool.submit(one, {"class_labels": [rng.randrange(10)], "seed": rng.randrange(2**31), "steps": steps,
                              "sampler": "ddim", "guidance_scale": 4.0})
    elapsed = time.perf_counter() - start
    ok = sorted(s for status, s in results if status == 200)
    pct = lambda q: ok[min(len(ok) - 1, int(q * len(ok)))] if ok else float("nan")
    return {"rate": rate, "sent": len(results), "ok": len(ok), "rps": len(ok) / elapsed, "p50": pct(0.5),
            "p99": pct(0.99), "errors": len(results) - len(ok)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export-dir", default="exports/digits")
    parser.add_argument("--rates", default="5,10,20,40,80", help="arrivals per second, comma-separated")
    parser.add_argument("--requests", type=int, default=60, help="requests per rate")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--max-seconds", type=float, default=20.0, help="cap on one rate's sending time")
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _, serve = start_local_ray(port=port)
    rows = []
    try:
        for mode in args.modes.split(","):
            settings = ServeSettings(export_dir=args.export_dir, backend="onnxruntime", max_queue=256,
                                     max_running_images=64, mode=mode)
            started = time.perf_counter()
            serve.run(build_app(settings), name="ditexport", route_prefix="/", blocking=False)
            url = f"http://127.0.0.1:{port}/v1/images"
            post(url, {"class_labels": [1], "steps": 2})  # warm-up
            print(f"{mode}: deployed in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
            for rate in (float(r) for r in args.rates.split(",")):
                row = {"mode": mode, **run_rate(url, rate, args.requests, args.steps, args.max_seconds, 0)}
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
            serve.delete("ditexport")
    finally:
        shutdown()
    print("| mode | offered req/s | sent | ok | achieved req/s | p50 s | p99 s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['rate']:g} | {r['sent']} | {r['ok']} | {r['rps']:.1f} | {r['p50']:.2f} | "
              f"{r['p99']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
