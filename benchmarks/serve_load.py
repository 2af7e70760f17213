"""Open-loop Poisson load against the Ray Serve service on loopback: continuous batching vs request-level
batching (@serve.batch) vs one request at a time, in one run, on one export.

    python benchmarks/serve_load.py --export-dir exports/digits [--rates 5,10,20,40,80] [--requests 200]

Each mode is deployed in turn on one local Ray with the same settings (ONNX Runtime, `--threads` CPU threads, up to
64 running images; one at a time runs 1); each rate sends `--requests` requests (1 image, `--steps` DDIM steps,
guidance 4, a random digit and seed) at exponential gaps, never waiting for answers; a rate stops sending at
`--max-seconds`. Before Ray starts, the forward's cost per row is timed at one request's batch and at the full
running batch on the same backend and threads: their ratio is the most any batching can gain in forward time
on this machine. Prints Markdown tables: per rate (achieved requests/s, p50/p99 latency, the engine's rows per
forward and forward time, CPU cores busy in the replica and in Serve's proxy), and the best throughput of each
mode under a p99 bound.
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

from ditexport.serving.service import build_app, shutdown, start_local_ray  # noqa: E402
from ditexport.serving.settings import ServeSettings, ServiceLimits  # noqa: E402

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


def run_rate(url: str, rate: float, requests: int, steps: list[int], max_seconds: float, seed: int) -> dict:
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
            pool.submit(one, {"class_labels": [rng.randrange(10)], "seed": rng.randrange(2**31),
                              "steps": rng.choice(steps), "sampler": "ddim", "guidance_scale": 4.0})
    elapsed = time.perf_counter() - start  # until the last answer: the pool waits for every request
    cpu = {k: round((v - cpu_before.get(k, 0.0)) / elapsed, 2) for k, v in cpu_seconds().items()}
    after = engine_stats(url)
    done = {k: after[k] - engine_before[k] for k in ("steps_run", "rows_run", "forward_s", "step_s")}
    forwards = max(1, done["steps_run"])
    ok = sorted(s for status, s in results if status == 200)
    pct = lambda q: ok[min(len(ok) - 1, int(q * len(ok)))] if ok else float("nan")  # noqa: E731
    return {"rate": rate, "sent": len(results), "ok": len(ok), "rps": len(ok) / elapsed, "p50": pct(0.5),
            "p99": pct(0.99), "errors": len(results) - len(ok), "cores_busy": cpu,
            "rows_per_forward": done["rows_run"] / forwards, "forward_ms": done["forward_s"] / forwards * 1e3,
            "step_ms": done["step_s"] / forwards * 1e3}


def forward_cost_per_row(export_dir: str, threads: int, batches: tuple[int, ...], seconds: float = 2.0) -> dict:
    """ms per row of the served backend's forward at each batch, on `threads` threads, best of three rounds."""
    import torch

    from ditexport.backends.open import open_export_backend

    torch.set_num_threads(threads)
    backend = open_export_backend(export_dir, "onnxruntime")
    c = backend.config
    gen = torch.Generator().manual_seed(0)
    cost = {}
    for rows in batches:
        x = torch.randn(rows, c.in_channels, c.input_size, c.input_size, generator=gen)
        t, y = torch.randint(0, 1000, (rows,), generator=gen), torch.randint(0, c.num_classes, (rows,), generator=gen)
        backend(x, t, y)
        best = float("inf")
        for _ in range(3):
            calls, began = 0, time.perf_counter()
            while time.perf_counter() - began < seconds / 3:
                backend(x, t, y)
                calls += 1
            best = min(best, (time.perf_counter() - began) / calls)
        cost[rows] = best / rows * 1e3
    return cost


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export-dir", default="exports/digits")
    parser.add_argument("--rates", default="5,10,20,40,80", help="arrivals per second, comma-separated")
    parser.add_argument("--requests", type=int, default=200, help="requests per rate")
    parser.add_argument("--steps", default="50", help="DDIM steps per request; a comma-separated list draws one "
                                                      "per request (e.g. 20,50)")
    parser.add_argument("--max-seconds", type=float, default=15.0, help="cap on one rate's sending time")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="CPU threads of the replica's ONNX Runtime, the same in every mode (default: the cores)")
    parser.add_argument("--max-running-images", type=int, default=64)
    parser.add_argument("--max-queue", type=int, default=1024, help="waiting requests before 503 (default: 1024, "
                                                                     "so that a saturated rate queues, not refuses)")
    parser.add_argument("--cost-seconds", type=float, default=2.0, help="time spent timing each forward batch")
    parser.add_argument("--json", default=None, help="also write the rows and the forward costs here")
    args = parser.parse_args(argv)
    steps = [int(n) for n in args.steps.split(",")]
    full_batch = 2 * args.max_running_images  # guided: two rows per image
    cost = forward_cost_per_row(args.export_dir, args.threads, (2, full_batch), args.cost_seconds)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _, serve = start_local_ray(port=port)
    rows = []
    try:
        for mode in args.modes.split(","):
            service = ServiceLimits(max_queue=args.max_queue, max_running_images=args.max_running_images)
            settings = ServeSettings(export_dir=args.export_dir, backend="onnxruntime", service=service, mode=mode,
                                     threads=args.threads)
            started = time.perf_counter()
            serve.run(build_app(settings), name="ditexport", route_prefix="/", blocking=False)
            url = f"http://127.0.0.1:{port}/v1/images"
            post(url, {"class_labels": [1], "steps": 2})  # warm-up
            print(f"{mode}: deployed in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
            for rate in (float(r) for r in args.rates.split(",")):
                row = {"mode": mode, **run_rate(url, rate, args.requests, steps, args.max_seconds, 0)}
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
            serve.delete("ditexport")
    finally:
        shutdown()
    report(rows, cost, steps, full_batch)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "forward_ms_per_row": cost, "args": vars(args)},
                                              indent=1))
    return 0


def report(rows: list[dict], cost: dict, steps: list[int], full_batch: int) -> None:
    print("| mode | offered req/s | sent | ok | achieved req/s | p50 s | p99 s | rows/forward | ms/forward | "
          "replica cores | proxy cores |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        cores = r["cores_busy"]
        print(f"| {r['mode']} | {r['rate']:g} | {r['sent']} | {r['ok']} | {r['rps']:.1f} | {r['p50']:.2f} | "
              f"{r['p99']:.2f} | {r['rows_per_forward']:.1f} | {r['forward_ms']:.2f} | "
              f"{cores.get('replica', 0):.2f} | {cores.get('Serve proxy', 0):.2f} |")
    bounds = (0.5, 1.0, 2.0, 5.0)
    print("\nBest achieved requests/s with p99 at most:\n")
    print("| mode | " + " | ".join(f"p99 <= {b:g} s" for b in bounds) + " | at saturation |")
    print("|---|" + "---:|" * (len(bounds) + 1))
    for mode in dict.fromkeys(r["mode"] for r in rows):
        mine = [r for r in rows if r["mode"] == mode and r["errors"] == 0]
        best = [max((r["rps"] for r in mine if r["p99"] <= b), default=0.0) for b in bounds]
        print(f"| {mode} | " + " | ".join(f"{v:.1f}" for v in best) + f" | {max(r['rps'] for r in mine):.1f} |")
    small, large = cost[2], cost[full_batch]
    mean_steps = sum(steps) / len(steps)
    print(f"\nForward cost per row (ONNX Runtime, same threads): {small:.3f} ms at 2 rows (one request), "
          f"{large:.3f} ms at {full_batch} rows (the full running batch): batching can cut forward time by at most "
          f"{small / large:.2f}x here. Forward-only ceilings at {mean_steps:g} steps, 2 rows per step: one at a time "
          f"{1e3 / (mean_steps * 2 * small):.1f} req/s, batched {1e3 / (mean_steps * 2 * large):.1f} req/s.")


if __name__ == "__main__":
    sys.exit(main())
