"""Open-loop Poisson load against the Ray Serve service on loopback: continuous batching vs request-level
batching (@serve.batch) vs one request at a time, in one run, on one export.

    python benchmarks/serve_load.py --export-dir exports/digits [--rates 5,10,20,40] [--requests 60]

Each mode is deployed in turn on one local Ray; each rate sends `--requests` requests (1 image, `--steps` DDIM
steps, guidance 4, a random digit and seed) at exponential gaps, never waiting for answers; a rate stops
early at `--max-seconds`. Prints a Markdown table: achieved requests/s, p50 and p99 latency, errors.
"""
import argparse
import json
import os
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


def cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) used so far by this process and by Ray's processes, grouped by role (Linux /proc;
    empty elsewhere). Ray names its workers in their command lines: the HTTP proxy, the replicas, the rest."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    groups: dict[str, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        pid = int(stat.parent.name)
        if pid == os.getpid():
            role = "load generator"
        elif "ProxyActor" in cmd:
            role = "Serve proxy"
        elif "ServeReplica" in cmd:
            role = "replica"
        elif "ray" in cmd:
            role = "other Ray"
        else:
            continue
        groups[role] = groups.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return groups


def engine_stats(url: str) -> dict:
    with urllib.request.urlopen(url.replace("/v1/images", "/healthz"), timeout=30) as r:
        return json.loads(r.read())


def run_rate(url: str, rate: float, requests: int, steps: int, max_seconds: float, seed: int) -> dict:
    rng = random.Random(seed)
    results, lock = [], threading.Lock()

    def one(body):
        answer = post(url, body)
        with lock:
            results.append(answer)

    cpu_before, engine_before = cpu_seconds(), engine_stats(url)
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
    cpu = {k: round((v - cpu_before.get(k, 0.0)) / elapsed, 2) for k, v in cpu_seconds().items()}
    engine = {k: v - engine_before[k] for k, v in engine_stats(url).items() if k in ("steps_run", "rows_run",
                                                                                     "forward_s", "step_s")}
    steps = max(1, engine["steps_run"])
    engine = {"rows_per_step": round(engine["rows_run"] / steps, 1), "forward_ms": round(engine["forward_s"] / steps * 1e3, 2),
              "step_ms": round(engine["step_s"] / steps * 1e3, 2), "busy": round(engine["step_s"] / elapsed, 2)}
    ok = sorted(s for status, s in results if status == 200)
    pct = lambda q: ok[min(len(ok) - 1, int(q * len(ok)))] if ok else float("nan")
    return {"rate": rate, "sent": len(results), "ok": len(ok), "rps": len(ok) / elapsed, "p50": pct(0.5),
            "p99": pct(0.99), "errors": len(results) - len(ok), "cores_busy": cpu, "engine": engine}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export-dir", default="exports/digits")
    parser.add_argument("--rates", default="5,10,20,40,80", help="arrivals per second, comma-separated")
    parser.add_argument("--requests", type=int, default=60, help="requests per rate")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--max-seconds", type=float, default=20.0, help="cap on one rate's sending time")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="CPU threads of the replica's ONNX Runtime, the same in every mode (default: the cores)")
    args = parser.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _, serve = start_local_ray(port=port)
    rows = []
    try:
        for mode in args.modes.split(","):
            settings = ServeSettings(export_dir=args.export_dir, backend="onnxruntime", max_queue=256,
                                     max_running_images=64, mode=mode, threads=args.threads)
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
