"""Soak and crash test of `python -m ditexport serve` on loopback, as a crowd and an attacker use it.

    python benchmarks/serve_soak.py --export-dir exports/digits [--clients 1000] [--json soak.json]

Starts `serve` as a user does (a subprocess on a free loopback port) and runs, in order:
1. listeners: every listening TCP socket of the processes `serve` started (Linux /proc), with its address;
2. crowd: `--clients` requests of 1 image at once, each sent once, while /healthz is polled every 0.2 s and the
   memory (RSS) of the replica, Ray's proxy and the front is sampled: the split of statuses, the slowest answer,
   /healthz latency during the burst, peak memory;
3. saturation vs overload: the rate of 200s with as many closed-loop clients as the service holds, then with
   `--clients` clients that retry each 503 after its Retry-After (throughput at overload);
4. hostile clients: malformed bodies (each must be a 400 naming a field), an oversize header (431), oversize
   bodies (413), slow headers, slow bodies and partial headers (each closed by the server's timeouts), while
   /healthz and an image request must still be answered;
5. crash: requests in flight when the replica is killed with SIGKILL: each must get 503 + Retry-After; then the
   time until Ray's new replica answers, and one more request answered 200.
Prints a Markdown report; `--json` also writes every number. Loopback only; every loop is bounded in count
and time, and the service is stopped at the end.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ditexport.serving.settings import ServiceLimits  # noqa: E402
from ditexport.serving.sockets import free_loopback_port  # noqa: E402

HOST = "127.0.0.1"


# -- a small HTTP/1.1 client on raw sockets (no library of ours between the crowd and the server) ------------

async def http(port: int, method: str, path: str, body: bytes = b"", headers: dict | None = None,
               timeout: float = 120.0) -> tuple[int, dict, bytes, float]:
    """(status, headers, body, seconds); status 0 when the connection failed or timed out."""
    start = time.perf_counter()
    try:
        return await asyncio.wait_for(_http(port, method, path, body, headers or {}, start), timeout)
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError):
        return 0, {}, b"", time.perf_counter() - start


async def _http(port, method, path, body, headers, start):
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        if method == "POST":
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        writer.write(head.encode() + b"\r\n" + body)
        await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
    status, answer_headers, answer = parse_response(raw)
    return status, answer_headers, answer, time.perf_counter() - start


def parse_response(raw: bytes) -> tuple[int, dict, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not lines[0].startswith("HTTP/1."):
        return 0, {}, b""
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def image_body(rng: random.Random, images: int = 1, steps: int = 50) -> bytes:
    return json.dumps({"class_labels": [rng.randrange(10) for _ in range(images)], "steps": steps,
                       "sampler": "ddim", "seed": rng.randrange(2**31)}).encode()


# -- the processes `serve` started -----------------------------------------------------------------------------

def descendants(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        found += frontier
    return found


def process_name(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    first = cmd[0].decode(errors="replace")
    if first.startswith("ray::"):
        return first.split()[0]
    if "ditexport" in b" ".join(cmd).decode(errors="replace") and "serve" in [c.decode() for c in cmd]:
        return "ditexport serve (HTTP front, Ray driver)"
    return Path(first).name + (" " + Path(cmd[1].decode(errors="replace")).name if len(cmd) > 2 else "")


def listening_sockets(root: int) -> list[dict]:
    """Every listening TCP socket of `root` and its descendants: process, pid, address, port."""
    listening: dict[str, tuple[str, int]] = {}
    for table, family in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 6)):
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] != "0A":  # LISTEN
                continue
            address, port = parts[1].split(":")
            listening[parts[9]] = (decode_address(address, family), int(port, 16))
    rows = []
    for pid in descendants(root):
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        for link in links:
            inode = link[8:-1] if link.startswith("socket:[") else None
            if inode in listening:
                address, port = listening[inode]
                rows.append({"process": process_name(pid), "pid": pid, "address": address, "port": port,
                             "token_auth": token_auth(pid)})
    return sorted(rows, key=lambda r: (r["process"], r["port"]))


def token_auth(pid: int) -> bool:
    """Whether the process runs with Ray's token authentication on (RAY_AUTH_MODE=token in its environment)."""
    try:
        return b"RAY_AUTH_MODE=token" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def decode_address(hex_address: str, family: int) -> str:
    raw = bytes.fromhex(hex_address)
    if family == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words)


def is_loopback(address: str) -> bool:
    return address.startswith("127.") or address in ("::1", "::ffff:127.0.0.1") or address.startswith("::ffff:127.")


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def roles(root: int) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {"replica": [], "proxy": [], "front": [root]}
    for pid in descendants(root):
        name = process_name(pid)
        if "ServeReplica" in name:
            found["replica"].append(pid)
        elif "ProxyActor" in name:
            found["proxy"].append(pid)
    return found


class MemoryWatch:
    """Peak RSS (MiB) of the replica, Ray's proxy and the front, sampled every `every` seconds until stopped."""

    def __init__(self, root: int, every: float = 0.2):
        self.root, self.every, self.peak = root, every, {"replica": 0.0, "proxy": 0.0, "front": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        who = roles(self.root)
        while not self._stop.wait(self.every):
            for role, pids in who.items():
                self.peak[role] = max(self.peak[role], sum(rss_mb(p) for p in pids))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# -- serve as a user starts it ---------------------------------------------------------------------------------

def start_serve(export_dir: str, threads: int, extra: list[str], timeout: float = 240.0):
    port = free_loopback_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "OMP_NUM_THREADS")}
    proc = subprocess.Popen([sys.executable, "-m", "ditexport", "serve", "--export-dir", export_dir, "--port",
                             str(port), "--torch-threads", str(threads), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines, ready = [], threading.Event()

    def read():
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if "ready in" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(timeout):
        stop_serve(proc)
        raise SystemExit("serve did not start:\n" + "".join(lines[-40:]))
    return proc, port, lines


def stop_serve(proc) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        return -9


# -- the phases ------------------------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def poll_health(port: int, stop: asyncio.Event, out: list[tuple[int, float]], every: float = 0.2):
    while not stop.is_set():
        status, _, _, seconds = await http(port, "GET", "/healthz", timeout=30)
        out.append((status, seconds))
        await asyncio.sleep(every)


async def crowd(port: int, clients: int, steps: int, seed: int = 0) -> dict:
    """`clients` one-image requests at once, each sent once, with /healthz polled meanwhile."""
    rng = random.Random(seed)
    stop, health = asyncio.Event(), []
    poller = asyncio.ensure_future(poll_health(port, stop, health))
    began = time.perf_counter()
    answers = await asyncio.gather(*(http(port, "POST", "/v1/images", image_body(rng, 1, steps))
                                     for _ in range(clients)))
    wall = time.perf_counter() - began
    stop.set()
    await poller
    statuses: dict[str, int] = {}
    for status, *_ in answers:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    refused = [a for a in answers if a[0] == 503]
    ok = [a[3] for a in answers if a[0] == 200]
    return {"clients": clients, "statuses": statuses, "wall_s": round(wall, 2),
            "slowest_s": round(max(a[3] for a in answers), 3),
            "ok_p50_s": round(percentile(ok, 0.5), 3), "ok_max_s": round(max(ok, default=float("nan")), 3),
            "refused_max_s": round(max((a[3] for a in refused), default=0.0), 3),
            "refused_with_retry_after": sum("retry-after" in a[1] for a in refused),
            "retry_after_values": sorted({a[1].get("retry-after", "") for a in refused}),
            "json_bodies": sum(_is_json(a[2]) for a in answers),
            "health": {"polls": len(health), "ok": sum(s == 200 for s, _ in health),
                       "p50_s": round(percentile([t for _, t in health], 0.5), 4),
                       "max_s": round(max((t for _, t in health), default=float("nan")), 4)}}


def _is_json(body: bytes) -> bool:
    try:
        json.loads(body)
        return True
    except ValueError:
        return False


async def closed_loop(port: int, clients: int, seconds: float, images: int, steps: int, retry: bool,
                      seed: int = 1) -> dict:
    """`clients` clients, each sending its next request when it has an answer (after a 503: after its
    Retry-After, with jitter, when `retry`), for `seconds`; the rate of 200s over the run."""
    rng = random.Random(seed)
    deadline = time.perf_counter() + seconds
    ok_times, latencies, statuses, retry_after = [], [], {}, {}

    async def client():
        while time.perf_counter() < deadline:
            status, headers, _, took = await http(port, "POST", "/v1/images", image_body(rng, images, steps))
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            if status == 200:
                ok_times.append(time.perf_counter())
                latencies.append(took)
            elif status == 503 and retry:
                value = headers.get("retry-after", "none")
                retry_after[value] = retry_after.get(value, 0) + 1
                wait = float(headers.get("retry-after", "1"))
                await asyncio.sleep(min(wait, max(0.0, deadline - time.perf_counter())) * rng.uniform(0.5, 1.5))
            elif status != 503:
                await asyncio.sleep(0.1)

    began = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    span = (max(ok_times) - began) if ok_times else seconds
    return {"clients": clients, "images": images, "seconds": round(time.perf_counter() - began, 1),
            "ok": len(ok_times), "ok_per_s": round(len(ok_times) / span, 2), "statuses": statuses,
            "retry_after": dict(sorted(retry_after.items())),
            "p50_s": round(percentile(latencies, 0.5), 3), "p99_s": round(percentile(latencies, 0.99), 3)}


BAD_BODIES = [
    (b"{not json", "body"), (b"[1, 2]", "body"), (b"", "body"),
    (b'{"class_labels": [1], "eta": 1.5, "sampler": "ddim"}', "eta"),
    (b'{"class_labels": [1], "eta": 10}', "eta"), (b'{"class_labels": [1], "eta": -1e308}', "eta"),
    (b'{"class_labels": [1], "guidance_scale": 1' + b"0" * 400 + b"}", "guidance_scale"),
    (b'{"class_labels": [1], "eta": 1' + b"0" * 400 + b"}", "eta"),
    (b'{"class_labels": [1], "guidance_scale": 1e999}', "guidance_scale"),
    (b'{"class_labels": [1], "guidance_scale": NaN}', "guidance_scale"),
    (b'{"class_labels": [1], "seed": 1.5}', "seed"), (b'{"class_labels": [1], "steps": true}', "steps"),
    (b'{"class_labels": [1], "steps": 100000}', "steps"), (b'{"class_labels": [1], "sampler": ["ddim"]}', "sampler"),
    (b'{"class_labels": ' + b"[" * 2000 + b"]" * 2000 + b"}", "body"),
    (b'{"class_labels": [' + b",".join([b"1"] * 17) + b"]}", "class_labels"),
    (b'{"class_labels": [{"a": 1}]}', "body"), (b'{"class_labels": [-1]}', "class_labels"),
    (b'{"class_labels": [1], "nope": 1}', "nope"), (b'{"steps": 5}', "class_labels"),
    (b'{"class_labels": "1"}', "class_labels"), (b'\xff\xfe{"class_labels": [1]}', "body"),
]


async def raw_exchange(port: int, chunks: list[bytes], gap: float, limit_s: float) -> tuple[int, float]:
    """Sends `chunks` `gap` seconds apart (a slow client) while reading; (status the server sent, or 0 when it
    closed without one or never answered, seconds until the connection ended)."""
    start = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection(HOST, port)
    except OSError:
        return -1, 0.0

    async def send():
        try:
            for chunk in chunks:
                writer.write(chunk)
                await writer.drain()
                await asyncio.sleep(gap)
        except (ConnectionError, OSError):
            pass

    sender = asyncio.ensure_future(send())
    try:
        raw = await asyncio.wait_for(reader.read(), limit_s)
    except (asyncio.TimeoutError, ConnectionError, OSError):
        raw = None
    sender.cancel()
    writer.close()
    if raw is None:
        return -2, time.perf_counter() - start  # still open at the limit: the server did not time it out
    return parse_response(raw)[0], time.perf_counter() - start


async def big_body(port: int, megabytes: int, chunked: bool) -> tuple[int, float]:
    """Streams a body of `megabytes` MB of zeros as fast as the server reads it; (status, seconds)."""
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(HOST, port)
    size = megabytes * 2**20
    head = f"POST /v1/images HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
    head += "Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {size}\r\n"
    block = b"0" * 2**20
    answered = asyncio.Event()

    async def send():  # as curl does: stop sending once the server has answered
        try:
            writer.write(head.encode() + b"\r\n")
            for _ in range(megabytes):
                if answered.is_set():
                    return
                writer.write(b"100000\r\n" + block + b"\r\n" if chunked else block)
                await writer.drain()
        except (ConnectionError, OSError):
            pass

    sender = asyncio.ensure_future(send())
    raw = await read_until_closed(reader, 60, answered)
    sender.cancel()
    writer.close()
    return parse_response(raw)[0], time.perf_counter() - start


async def read_until_closed(reader: asyncio.StreamReader, limit_s: float, answered=None) -> bytes:
    """What the server sent until it closed, reset or `limit_s` passed: a server that refuses a body it is still
    being sent may reset the connection after its answer, which is kept. Sets `answered` at the first byte."""
    raw, deadline = b"", time.perf_counter() + limit_s
    try:
        while (left := deadline - time.perf_counter()) > 0:
            chunk = await asyncio.wait_for(reader.read(65536), left)
            if not chunk:
                break
            raw += chunk
            if answered is not None:
                answered.set()
    except (asyncio.TimeoutError, ConnectionError, OSError):
        pass
    return raw


async def hostile(port: int, n_slow: int, n_partial: int, n_big: int, big_mb: int, timeouts: dict) -> dict:
    rng = random.Random(2)
    out: dict = {}
    bad = await asyncio.gather(*(http(port, "POST", "/v1/images", body) for body, _ in BAD_BODIES))
    out["malformed"] = {"sent": len(BAD_BODIES), "answers": [
        {"field": field, "status": a[0], "got_field": (json.loads(a[2]).get("field") if _is_json(a[2]) else None)}
        for (_, field), a in zip(BAD_BODIES, bad)]}
    status, _, body, _ = await http(port, "GET", "/healthz", headers={"X-Big": "a" * 20000})
    out["oversize_header"] = status
    bigs = await asyncio.gather(*(big_body(port, big_mb, chunked=i % 2 == 1) for i in range(n_big)))
    out["oversize_bodies"] = [{"status": s, "seconds": round(t, 3)} for s, t in bigs]
    limit = timeouts["header"] + timeouts["body"] + 15
    head = b"POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 40\r\n\r\n"
    slow_header = [bytes([c]) for c in head]  # one byte a second
    slow_body = [head] + [b"{"] * 40
    partial = [b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: "]
    tasks = ([raw_exchange(port, slow_header, 1.0, limit) for _ in range(n_slow)]
             + [raw_exchange(port, slow_body, 1.0, limit) for _ in range(n_slow)]
             + [raw_exchange(port, partial, 1000.0, limit) for _ in range(n_partial)])
    watch = asyncio.ensure_future(asyncio.gather(*tasks))
    await asyncio.sleep(2)  # meanwhile, the service must still answer
    during = [await http(port, "GET", "/healthz", timeout=10),
              await http(port, "POST", "/v1/images", image_body(rng, 1, 10), timeout=30)]
    results = await watch
    kinds = ["slow_header"] * n_slow + ["slow_body"] * n_slow + ["partial_header"] * n_partial
    for kind in ("slow_header", "slow_body", "partial_header"):
        mine = [r for k, r in zip(kinds, results) if k == kind]
        out[kind] = {"connections": len(mine), "closed_by_server": sum(s != -2 for s, _ in mine),
                     "statuses": sorted({s for s, _ in mine}),
                     "longest_s": round(max((t for _, t in mine), default=0.0), 2)}
    out["answered_meanwhile"] = [a[0] for a in during]
    return out


async def crash(port: int, root: int, inflight: int, steps: int) -> dict:
    rng = random.Random(3)
    old = roles(root)["replica"]
    requests = [asyncio.ensure_future(http(port, "POST", "/v1/images", image_body(rng, 1, steps)))
                for _ in range(inflight)]
    deadline = time.perf_counter() + 30
    while time.perf_counter() < deadline:  # until the requests run in the replica
        status, _, body, _ = await http(port, "GET", "/healthz", timeout=10)
        if status == 200 and json.loads(body).get("running_images", 0) >= min(inflight, 8):
            break
        await asyncio.sleep(0.05)
    killed_at = time.perf_counter()
    for pid in old:
        os.kill(pid, signal.SIGKILL)
    answers = await asyncio.gather(*requests)
    in_flight = [{"status": s, "retry_after": h.get("retry-after"), "json": _is_json(b),
                  "after_kill_s": round(killed_at - time.perf_counter() + t, 2)} for s, h, b, t in answers]
    recovered = None
    while time.perf_counter() - killed_at < 120:
        status, _, _, _ = await http(port, "GET", "/healthz", timeout=10)
        if status == 200:
            recovered = time.perf_counter() - killed_at
            break
        await asyncio.sleep(0.25)
    after = await http(port, "POST", "/v1/images", image_body(rng, 1, 10), timeout=60)
    new = roles(root)["replica"]
    return {"in_flight": len(in_flight), "statuses": sorted({a["status"] for a in in_flight}),
            "with_retry_after": sum(a["retry_after"] is not None for a in in_flight),
            "json": sum(a["json"] for a in in_flight), "answers": in_flight,
            "recovered_s": None if recovered is None else round(recovered, 2), "after_status": after[0],
            "old_replica": old, "new_replica": new, "restarted": bool(new) and set(new) != set(old)}


# -- main ------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export-dir", default="exports/digits")
    parser.add_argument("--threads", type=int, default=1, help="--torch-threads of serve (default: 1)")
    parser.add_argument("--clients", type=int, default=1000, help="concurrent 1-image requests (default: 1000)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps of the crowd's requests (default: 50)")
    parser.add_argument("--saturation-seconds", type=float, default=20.0)
    parser.add_argument("--overload-seconds", type=float, default=30.0)
    parser.add_argument("--slow", type=int, default=100, help="slow-header and slow-body clients, each")
    parser.add_argument("--partial", type=int, default=1000, help="connections that send a partial header")
    parser.add_argument("--big-bodies", type=int, default=5)
    parser.add_argument("--big-mb", type=int, default=200)
    parser.add_argument("--kill-inflight", type=int, default=20, help="requests in flight when the replica dies")
    parser.add_argument("--phases", default="listeners,crowd,throughput,hostile,crash")
    parser.add_argument("--serve-args", default="", help="extra flags of serve, e.g. '--header-timeout-s 5'")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    phases = args.phases.split(",")
    extra = args.serve_args.split()
    proc, port, lines = start_serve(args.export_dir, args.threads, extra)
    report: dict = {"args": vars(args), "port": port, "ready": next(x for x in lines if "ready in" in x).strip()}
    try:
        asyncio.run(http(port, "POST", "/v1/images", image_body(random.Random(9), 1, 5)))  # warm-up
        report["capacity"] = json.loads(asyncio.run(http(port, "GET", "/healthz"))[2] or b"{}")
        if "listeners" in phases:
            report["listeners"] = listening_sockets(proc.pid)
        if "crowd" in phases:
            with MemoryWatch(proc.pid) as memory:
                report["crowd"] = asyncio.run(crowd(port, args.clients, args.steps))
            report["crowd"]["peak_rss_mb"] = {k: round(v, 1) for k, v in memory.peak.items()}
        if "throughput" in phases:
            # As many clients as the running batch holds: the saturation rate, nothing refused.
            report["saturation"] = asyncio.run(closed_loop(port, ServiceLimits.max_running_images,
                                                           args.saturation_seconds, 1, args.steps, retry=True))
            with MemoryWatch(proc.pid) as memory:
                report["overload"] = asyncio.run(closed_loop(port, args.clients, args.overload_seconds, 1,
                                                             args.steps, retry=True))
            report["overload"]["peak_rss_mb"] = {k: round(v, 1) for k, v in memory.peak.items()}
        if "hostile" in phases:
            timeouts = {"header": flag_value(extra, "--header-timeout-s", ServiceLimits.header_timeout_s),
                        "body": flag_value(extra, "--body-timeout-s", ServiceLimits.body_timeout_s)}
            with MemoryWatch(proc.pid) as memory:
                report["hostile"] = asyncio.run(hostile(port, args.slow, args.partial, args.big_bodies, args.big_mb,
                                                        timeouts))
            report["hostile"]["peak_rss_mb"] = {k: round(v, 1) for k, v in memory.peak.items()}
        if "crash" in phases:
            report["crash"] = asyncio.run(crash(port, proc.pid, args.kill_inflight, 1000))
    finally:
        report["exit_code"] = stop_serve(proc)
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


def flag_value(flags: list[str], name: str, default: float) -> float:
    return float(flags[flags.index(name) + 1]) if name in flags else default


def print_report(r: dict) -> None:
    print(f"serve: {r['ready']}")
    if "listeners" in r:
        print("\n| process | pid | address | port | loopback | Ray token auth |\n|---|---:|---|---:|---|---|")
        for row in r["listeners"]:
            print(f"| {row['process']} | {row['pid']} | {row['address']} | {row['port']} | "
                  f"{'yes' if is_loopback(row['address']) else '**no**'} | {'on' if row['token_auth'] else 'off'} |")
    if "crowd" in r:
        c = r["crowd"]
        print(f"\ncrowd: {c['clients']} one-image requests at once: statuses {c['statuses']}, slowest answer "
              f"{c['slowest_s']} s (200s: p50 {c['ok_p50_s']} s, max {c['ok_max_s']} s; 503s within "
              f"{c['refused_max_s']} s, {c['refused_with_retry_after']} with Retry-After {c['retry_after_values']}); "
              f"/healthz during it: {c['health']['ok']}/{c['health']['polls']} answered, p50 {c['health']['p50_s']} s, "
              f"max {c['health']['max_s']} s; peak RSS MiB {c['peak_rss_mb']}")
    for name in ("saturation", "overload"):
        if name in r:
            t = r[name]
            print(f"{name}: {t['clients']} closed-loop clients (503s retried after Retry-After) for {t['seconds']} s: "
                  f"{t['ok']} answered 200, {t['ok_per_s']} per s, p50 {t['p50_s']} s, p99 {t['p99_s']} s, "
                  f"statuses {t['statuses']}, Retry-After values {t['retry_after']}")
    if "hostile" in r:
        h = r["hostile"]
        wrong = [a for a in h["malformed"]["answers"] if a["status"] != 400 or a["got_field"] != a["field"]]
        print(f"\nhostile: {h['malformed']['sent']} malformed bodies, {len(wrong)} not a 400 naming the field "
              f"{wrong}; oversize header -> {h['oversize_header']}; oversize bodies -> {h['oversize_bodies']}")
        for kind in ("slow_header", "slow_body", "partial_header"):
            k = h[kind]
            print(f"  {kind}: {k['closed_by_server']}/{k['connections']} closed by the server, statuses "
                  f"{k['statuses']}, the longest after {k['longest_s']} s")
        print(f"  answered meanwhile: {h['answered_meanwhile']}; peak RSS MiB {h['peak_rss_mb']}")
    if "crash" in r:
        k = r["crash"]
        print(f"\ncrash: {k['in_flight']} requests in flight when the replica was killed (SIGKILL): statuses "
              f"{k['statuses']}, {k['with_retry_after']} with Retry-After, {k['json']} JSON; a new replica answered "
              f"{k['recovered_s']} s after the kill (restarted: {k['restarted']}); the next request: "
              f"{k['after_status']}")
    print(f"\nserve exited with {r['exit_code']}")


if __name__ == "__main__":
    sys.exit(main())
