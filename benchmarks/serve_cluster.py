"""`python -m ditexport serve` on a real two-node Ray cluster, as an operator of a shared cluster runs one.

    python benchmarks/serve_cluster.py --export-dir exports/digits [--json cluster.json]

Runs inside a private network and PID namespace (`unshare --net --pid --fork --mount-proc`, loopback only, so every
node talks over 127.0.0.1 and nothing outside is touched; when the namespace's first process ends, every process
started in it ends too). Writes {"skipped": reason} where namespaces are not allowed. In order:
1. cluster: `ray start --head` and a second `ray start --address` (two raylets, 3 logical CPUs each), with Ray's
   token authentication on (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH: what a user of such a cluster sets);
2. config: `serve deploy` of docs/serve_config.yaml's `digits` entry (as `digits-config`, this export's path) beside
   an unrelated application, `bystander`, with Serve's proxy on the head only (two proxies cannot share a port in
   one network namespace); `serve status` lists them;
3. deploy: `serve --address HOST:6379 --num-replicas 2 --detach` (application `digits`, replicas on both nodes),
   then `serve --address ray://HOST:10001` in the foreground, autoscaled (application `digits-b`, a copy of the
   export); deploy times and replicas per node;
4. answers: GET /v1/models lists every ditexport application; images from each application, and through another
   one by `model`, equal `sample`'s pixels; the OpenAPI schema's defaults;
5. autoscaling: a load ramp on `digits-b` (replicas go up) then idle (they come back down), a timeline;
6. refusals, meanwhile: no GPU, too many replicas, a name taken, an export missing on the nodes, resources that
   never free up (--deploy-timeout-s), no token: each exit 2, one line, in bounded time, with the cluster's
   applications unchanged (an unreachable address needs no cluster: tests/test_serving_builder.py);
7. stop: SIGTERM to the foreground `serve` (exit 0, only its application removed), `serve run
   ditexport.serving:app ... --non-blocking`, `serve --stop` of the detached one and of the `serve run` one, and
   of someone else's (refused); `bystander` answers throughout.
Prints a report; `--json` writes every number.
"""
from __future__ import annotations

import argparse
import base64
import fcntl
import io
import json
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HOST = "127.0.0.1"
GCS_PORT, CLIENT_PORT, HTTP_PORT, DASHBOARD_PORT = 6379, 10001, 8000, 8265
# The two deploys run at once beside two raylets: on a busy 2-core CI machine a join took over 15 s.
JOIN_TIMEOUT_S = 90
NAMESPACE = ["unshare", "--net", "--pid", "--fork", "--mount-proc"]
BODY = {"class_labels": [3, 1], "steps": 6, "sampler": "dpmpp-2m", "seed": 7}
BYSTANDER = '''from ray import serve


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Bystander:
    def __call__(self, request):
        return "still here"


app = Bystander.bind()
'''


# -- outside: enter the namespaces -----------------------------------------------------------------

def namespace_command() -> tuple[list[str] | None, str]:
    """The unshare command that works here (as root, else in a user namespace), or None and why not."""
    if shutil.which("unshare") is None:
        return None, "unshare (util-linux) is not installed"
    why = ""
    for command in (NAMESPACE, NAMESPACE[:1] + ["--user", "--map-root-user"] + NAMESPACE[1:]):
        probe = subprocess.run(command + ["true"], capture_output=True, text=True)
        if probe.returncode == 0:
            return command, ""
        why = probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else f"exit {probe.returncode}"
    return None, f"network namespaces are not allowed here ({why})"


def outside(args, argv: list[str]) -> int:
    command, why = namespace_command()
    if command is None:
        print(f"skipped: {why}")
        if args.json:
            Path(args.json).write_text(json.dumps({"skipped": why}))
        return 0
    return subprocess.run(command + [sys.executable, str(Path(__file__).resolve()), "--inside", *argv]).returncode


def loopback_up() -> None:
    """`ip link set lo up`, without iproute2: the interface flags through ioctl."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), siocgifflags, request))[1]
        fcntl.ioctl(s.fileno(), siocsifflags, struct.pack("16sH14x", b"lo", flags | iff_up))


# -- inside: small tools ---------------------------------------------------------------------------

class Scenario:
    def __init__(self, args):
        self.args = args
        self.dir = Path(tempfile.mkdtemp(prefix="dxc", dir="/tmp"))
        (self.dir / "home").mkdir()
        (self.dir / "apps").mkdir()
        (self.dir / "apps" / "bystander_app.py").write_text(BYSTANDER)
        self.token = self.dir / "auth_token"
        self.token.write_text(secrets.token_hex(32))
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("RAY_") and k not in ("OMP_NUM_THREADS", "PYTHONPATH")}
        # What a user of a cluster with token authentication sets, for `ray start` and for every client.
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token), HOME=str(self.dir / "home"),
                        RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(self.dir / "apps"))
        self.report: dict = {}
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        return round(time.perf_counter() - self.started, 1)

    def run(self, command: list[str], timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env or self.env,
                              cwd=self.dir)

    def ditexport(self, *flags: str, timeout: float = 120, env: dict | None = None) -> dict:
        """`python -m ditexport serve FLAGS` to the end: exit code, seconds, last line of stderr, stdout."""
        start = time.perf_counter()
        done = self.run([sys.executable, "-m", "ditexport", "serve", *flags], timeout, env)
        err = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
        return {"code": done.returncode, "seconds": round(time.perf_counter() - start, 1),
                "error": err[-1] if err else None, "stdout": done.stdout.strip().splitlines()[-3:],
                "stderr_tail": done.stderr.strip().splitlines()[-3:] if done.returncode not in (0, 2) else []}


def http(method: str, path: str, body=None, timeout: float = 60) -> tuple[int, object]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(f"http://{HOST}:{HTTP_PORT}{path}", data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
            status = response.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    except OSError as e:
        return 0, str(e)
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def pixels(answer: dict):
    import numpy as np
    from PIL import Image

    return np.stack([np.array(Image.open(io.BytesIO(base64.b64decode(p)))) for p in answer["images"]])


class ForegroundServe:
    """`serve` running in the foreground, as a user leaves it in a terminal: its lines, stopped with SIGTERM."""

    def __init__(self, scenario: Scenario, *flags: str):
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.process = subprocess.Popen([sys.executable, "-m", "ditexport", "serve", *flags], stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, env=scenario.env, cwd=scenario.dir)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:  # type: ignore[union-attr]
            self.lines.append(line.rstrip())
            if "ready in" in line or line.startswith("error:"):
                self.ready.set()
        self.ready.set()

    def stop(self) -> tuple[int, float]:
        start = time.perf_counter()
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=120)
        return code, round(time.perf_counter() - start, 1)


# -- the steps -------------------------------------------------------------------------------------

def start_head(sc: Scenario) -> tuple[float, dict]:
    """The head node (3 logical CPUs: Ray reserves them, the machine's cores are shared, dashboard on loopback for
    `serve deploy` and `serve status`); returns its start time and the environment of both nodes."""
    # Replicas report their load every second (Ray's default: 10 s), so the autoscaling ramp fits in CI.
    env = {**sc.env, "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1"}
    start = time.perf_counter()
    head = sc.run([tool("ray"), "start", "--head", "--node-ip-address", HOST, "--port", str(GCS_PORT), "--num-cpus",
                   "3", "--dashboard-host", HOST, "--dashboard-port", str(DASHBOARD_PORT), "--ray-client-server-port",
                   str(CLIENT_PORT), "--disable-usage-stats", "--temp-dir", str(sc.dir / "ray")], 180, env)
    if head.returncode:
        raise RuntimeError(f"ray start --head failed: {head.stderr[-2000:]}")
    from ditexport.serving.cluster import join

    os.environ.update(sc.env)
    join(f"{HOST}:{GCS_PORT}", 60)  # this script reads the applications' states and replicas as a driver
    return time.perf_counter() - start, env


def start_worker(sc: Scenario, env: dict) -> subprocess.Popen:
    """The second node, a raylet of its own joining the head (started while the head takes the config file)."""
    return subprocess.Popen([tool("ray"), "start", "--address", f"{HOST}:{GCS_PORT}", "--node-ip-address", HOST,
                             "--num-cpus", "3", "--disable-usage-stats"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=sc.dir)


def joined_cluster(sc: Scenario, head_s: float, worker: subprocess.Popen, worker_started: float) -> dict:
    _, err = worker.communicate(timeout=180)
    if worker.returncode:
        raise RuntimeError(f"ray start --address failed: {err[-2000:]}")
    worker_s = time.perf_counter() - worker_started
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"]]
    return {"head_s": round(head_s, 1), "worker_s": round(worker_s, 1), "nodes": len(nodes),
            "cpus": sum(n["Resources"].get("CPU", 0) for n in nodes), "token_auth": os.environ.get("RAY_AUTH_MODE")}


def tool(name: str) -> str:
    """`ray` or `serve`, the command-line tools beside this Python."""
    return str(Path(sys.executable).with_name(name))


def wait_for(predicate, timeout: float, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    return predicate()


def app_states() -> dict[str, str]:
    from ditexport.serving.cluster import applications

    return {name: app.get("status") for name, app in applications().items()}


def deploy_config(sc: Scenario, export_dir: str) -> dict:
    """docs/serve_config.yaml's `digits` entry (this export) and the bystander, through `serve deploy`."""
    import yaml

    config = yaml.safe_load((ROOT / "docs" / "serve_config.yaml").read_text())
    entry = next(a for a in config["applications"] if a["name"] == "digits")
    entry = {**entry, "name": "digits-config", "route_prefix": "/digits-config",
             "args": {**entry["args"], "export_dir": export_dir}}
    deployed = {"proxy_location": "HeadOnly", "http_options": {"host": HOST, "port": HTTP_PORT},
                "applications": [entry, {"name": "bystander", "route_prefix": "/bystander",
                                         "import_path": "bystander_app:app"}]}
    path = sc.dir / "config.yaml"
    path.write_text(yaml.safe_dump(deployed))
    serve = tool("serve")
    start = time.perf_counter()
    done = sc.run([serve, "deploy", "-a", f"http://{HOST}:{DASHBOARD_PORT}", str(path)])
    running = wait_for(lambda: all(app_states().get(n) == "RUNNING" for n in ("digits-config", "bystander")), 180)
    status = sc.run([serve, "status", "-a", f"http://{HOST}:{DASHBOARD_PORT}"])
    return {"code": done.returncode, "error": done.stderr[-500:] if done.returncode else None, "running": running,
            "seconds": round(time.perf_counter() - start, 1), "status_code": status.returncode,
            "status_lists": [n for n in ("digits-config", "bystander") if f"{n}:" in status.stdout]}


def placement(name: str) -> dict[str, int]:
    from ditexport.serving.cluster import replicas_per_node

    return replicas_per_node(name)


def start_sample(sc: Scenario, export_dir: str) -> subprocess.Popen:
    """`sample` of BODY's request on the same backend and threads, whose pixels every application must give."""
    return subprocess.Popen([sys.executable, "-m", "ditexport", "-q", "sample", "--export-dir", export_dir,
                             "--backend", "onnxruntime", "--classes", "3,1", "--steps", "6", "--sampler", "dpmpp-2m",
                             "--seed", "7", "--torch-threads", "1", "--out", str(sc.dir / "lone.png"), "--npz",
                             str(sc.dir / "lone.npz")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=sc.env, cwd=sc.dir)


def answers(sc: Scenario, sample: subprocess.Popen) -> dict:
    import numpy as np

    code = sample.wait(timeout=300)
    lone = np.load(sc.dir / "lone.npz")["arr_0"] if code == 0 else None
    out: dict = {"sample_code": code}
    for label, path, body in (("digits", "/digits", BODY), ("digits-b", "/digits-b", BODY),
                              ("digits-config", "/digits-config", BODY),
                              ("digits-b via digits", "/digits", {**BODY, "model": "digits-b"}),
                              ("digits-config via digits-b", "/digits-b", {**BODY, "model": "digits-config"})):
        status, answer = http("POST", path + "/v1/images", body)
        equal = status == 200 and lone is not None and np.array_equal(pixels(answer).reshape(lone.shape), lone)
        out[label] = {"status": status, "model": answer.get("model") if isinstance(answer, dict) else None,
                      "pixel_equal": bool(equal)}
    status, answer = http("POST", "/digits/v1/images", {**BODY, "model": "nope"})
    out["unknown model"] = {"status": status, "field": answer.get("field") if isinstance(answer, dict) else None}
    status, models = http("GET", "/digits-b/v1/models")
    out["models"] = {"status": status, "listed": [(m["application"], m["route_prefix"])  # this URL's model first
                                                  for m in models.get("models", [])]
                     if isinstance(models, dict) else models}
    status, schema = http("GET", "/digits/openapi.json")
    request = schema["paths"]["/v1/images"]["post"]["requestBody"]["content"]["application/json"]["schema"] \
        if status == 200 else {}
    out["openapi"] = {"status": status, "defaults": {k: v.get("default") for k, v in
                                                     request.get("properties", {}).items()},
                      "maximum_steps": request.get("properties", {}).get("steps", {}).get("maximum"),
                      "docs_status": http("GET", "/digits/docs")[0]}
    out["bystander"] = http("GET", "/bystander")
    return out


def autoscale(clients: int, images: int, up_timeout: float, down_timeout: float) -> dict:
    """Closed-loop clients of `images`-image requests on digits-b until its replicas go up, then none until they come
    back down. With 3 clients of 4 images and a target of 4, the engines hold about 12 images (3 replicas wanted,
    2 at most): Ray's own measure, 3 requests in flight, would want 1."""
    stop, timeline, statuses = threading.Event(), [], {}
    start = time.perf_counter()
    active = [0]

    def client(k: int):
        i = 0
        while not stop.is_set():
            status, _ = http("POST", "/digits-b/v1/images", {"class_labels": [k % 10] * images, "steps": 50,
                                                                "sampler": "ddim", "seed": 1000 * k + i}, 120)
            statuses[status] = statuses.get(status, 0) + 1
            i += 1

    def record():
        from ditexport.serving.cluster import DEPLOYMENT, applications

        deployment = applications().get("digits-b", {}).get("deployments", {}).get(DEPLOYMENT, {})
        running = sum(placement("digits-b").values())
        timeline.append((round(time.perf_counter() - start, 1), running, deployment.get("target_num_replicas"),
                         active[0]))

    record()
    pool = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for thread in pool:
        thread.start()
    active[0] = clients
    up_at = None
    while time.perf_counter() - start < up_timeout:
        record()
        if timeline[-1][1] >= 2:
            up_at = timeline[-1][0]
            break
        time.sleep(0.5)
    stop.set()
    for thread in pool:
        thread.join(timeout=120)
    active[0] = 0
    idle_from = round(time.perf_counter() - start, 1)
    down_at = None
    while time.perf_counter() - start < idle_from + down_timeout:
        record()
        if timeline[-1][1] <= 1:
            down_at = timeline[-1][0]
            break
        time.sleep(0.5)
    changes = [row for i, row in enumerate(timeline) if i == 0 or row[1:] != timeline[i - 1][1:]]
    return {"clients": clients, "images_per_request": images, "columns": ["s", "running", "target", "clients"],
            "up_at_s": up_at, "idle_from_s": idle_from, "down_at_s": down_at,
            "statuses": {str(k): v for k, v in statuses.items()}, "changes": changes, "samples": len(timeline)}


def refusals(sc: Scenario, export_dir: str) -> dict:
    address = f"{HOST}:{GCS_PORT}"
    before = sorted(app_states())
    no_token = {k: v for k, v in sc.env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    cases = {
        "no GPU for a CUDA backend": (["--address", address, "--export-dir", export_dir, "--backend", "tensorrt",
                                       "--precision", "fp16", "--name", "gpu"], None),
        "more replicas than CPUs": (["--address", address, "--export-dir", export_dir, "--num-replicas", "9",
                                     "--name", "many"], None),
        "a name someone else deployed": (["--address", address, "--export-dir", export_dir, "--name", "bystander"],
                                         None),
        "export missing on the nodes": (["--address", address, "--export-dir", "/nonexistent/digits", "--name",
                                         "missing"], None),
        "resources never free (bounded wait)": (["--address", address, "--export-dir", export_dir, "--name",
                                                 "pending", "--cpus-per-replica", "3", "--deploy-timeout-s", "8"],
                                                None),
        "no token for a token cluster": (["--address", address, "--export-dir", export_dir, "--name", "tokenless",
                                          "--connect-timeout-s", "8"], no_token),
    }
    out: dict = {}

    def attempt(label: str, flags: list[str], env: dict | None):
        out[label] = sc.ditexport(*flags, timeout=120, env=env)

    # All at once, as several users might: each is refused on its own.
    pool = [threading.Thread(target=attempt, args=(label, flags, env)) for label, (flags, env) in cases.items()]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(timeout=180)
    out["applications unchanged"] = sorted(app_states()) == before
    out["bystander after"] = http("GET", "/bystander")[0]
    return out


def in_parallel(**jobs) -> dict:
    """Runs each callable on its own thread at once; their results by name ({"error": ...} for one that raised)."""
    results: dict = {}

    def run(name, job):
        try:
            results[name] = job()
        except Exception as e:  # noqa: BLE001 - recorded: the report says which step failed and how
            results[name] = {"error": f"{type(e).__name__}: {e}"[:500]}

    threads = [threading.Thread(target=run, args=(name, job)) for name, job in jobs.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    return results


def stops(sc: Scenario, foreground: ForegroundServe, export_dir: str) -> dict:
    """SIGTERM to the foreground `serve`, an attempt to `--stop` someone else's application and `serve run` of the
    builder at once; then `--stop` of the detached application and of the `serve run` one at once."""
    address = f"{HOST}:{GCS_PORT}"

    def sigterm():
        code, seconds = foreground.stop()
        return {"code": code, "seconds": seconds, "last_line": foreground.lines[-1] if foreground.lines else ""}

    def serve_run():
        start = time.perf_counter()
        run = sc.run([tool("serve"), "run", "--address", address, "--non-blocking", "--name", "digits-run",
                      "--route-prefix", "/digits-run", "ditexport.serving:app", f"export_dir={export_dir}",
                      "torch_threads=1"], 240)
        return {"code": run.returncode, "seconds": round(time.perf_counter() - start, 1),
                "error": run.stderr[-800:] if run.returncode else None}

    first = in_parallel(sigterm=sigterm, serve_run=serve_run,
                        refused=lambda: sc.ditexport("--stop", "--name", "bystander", "--address", address))
    out: dict = {"sigterm": {**first["sigterm"], "applications": sorted(app_states()),
                             "bystander": http("GET", "/bystander")[0], "digits": http("GET", "/digits/healthz")[0]},
                 "stop someone else's": first["refused"]}
    status, models = http("GET", "/digits-run/v1/models")
    listed = [m["application"] for m in models.get("models", [])] if isinstance(models, dict) else models
    out["serve run"] = {**first["serve_run"], "models": listed, "image": http("POST", "/digits-run/v1/images",
                                                                              BODY)[0]}
    second = in_parallel(detached=lambda: sc.ditexport("--stop", "--name", "digits", "--address", address),
                         run=lambda: sc.ditexport("--stop", "--name", "digits-run", "--address", address))
    out["stop detached"] = {**second["detached"], "applications": sorted(app_states()),
                            "bystander": http("GET", "/bystander")[0],
                            "digits-config": http("GET", "/digits-config/healthz")[0]}
    out["serve run"]["stop"] = second["run"]["code"]
    out["final"] = {"applications": sorted(app_states()), "bystander": http("GET", "/bystander")}
    return out


def inside(args) -> int:
    loopback_up()
    sc = Scenario(args)
    report = sc.report
    export_b = sc.dir / "digits-b"
    shutil.copytree(args.export_dir, export_b)  # a second export: the same model under another directory name
    export_dir = str(Path(args.export_dir).resolve())
    foreground = None
    try:
        sample = start_sample(sc, export_dir)
        head_s, node_env = start_head(sc)
        worker_started = time.perf_counter()
        worker = start_worker(sc, node_env)
        report["config"] = deploy_config(sc, export_dir)
        report["cluster"] = joined_cluster(sc, head_s, worker, worker_started)
        # Two users deploy at once: one detached (GCS address), one in the foreground (Ray Client), autoscaled.
        start = time.perf_counter()
        detached: dict = {}
        thread = threading.Thread(target=lambda: detached.update(sc.ditexport(
            "--address", f"{HOST}:{GCS_PORT}", "--export-dir", export_dir, "--num-replicas", "2", "--detach",
            "--connect-timeout-s", str(JOIN_TIMEOUT_S), timeout=300)))
        thread.start()
        foreground = ForegroundServe(sc, "--address", f"ray://{HOST}:{CLIENT_PORT}", "--export-dir", str(export_b),
                                     "--connect-timeout-s", str(JOIN_TIMEOUT_S),
                                     "--min-replicas", "1", "--max-replicas", "2", "--target-ongoing-requests", "4",
                                     "--upscale-delay-s", "1", "--downscale-delay-s", "6", "--look-back-period-s",
                                     "2")
        foreground.ready.wait(300)
        report["foreground"] = {"lines": foreground.lines[-3:], "seconds": round(time.perf_counter() - start, 1),
                                "replicas_per_node": placement("digits-b")}
        thread.join(timeout=300)
        report["detached"] = {**detached, "replicas_per_node": placement("digits")}
        report["answers"] = answers(sc, sample)
        # Meanwhile other users try what cannot work: each is refused on its own, the load scales digits-b.
        refused: dict = {}
        attempts = threading.Thread(target=lambda: refused.update(refusals(sc, export_dir)))
        attempts.start()
        report["autoscaling"] = autoscale(args.clients, args.images, args.up_timeout, args.down_timeout)
        attempts.join(timeout=300)
        report["refusals"] = refused
        report["stops"] = stops(sc, foreground, export_dir)
        foreground = None
    except Exception as e:  # recorded, so that the report says where it stopped; the tests then fail on it
        report["error"] = f"{type(e).__name__}: {e}"[:2000]
        raise
    finally:
        report["total_s"] = sc.elapsed()
        if foreground is not None and foreground.process.poll() is None:
            foreground.process.kill()
        import ray

        if ray.is_initialized():
            ray.shutdown()  # this script's own connection, before its cluster goes (else Ray waits 60 s for it)
        # Only this namespace's processes are visible to `ray stop` (its own /proc); its end stops the rest.
        sc.run([tool("ray"), "stop", "--force"], 120)
        if not args.keep:
            shutil.rmtree(sc.dir, ignore_errors=True)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps(report, indent=1, default=str))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export-dir", default="exports/digits")
    parser.add_argument("--clients", type=int, default=3, help="closed-loop clients of the autoscaling ramp")
    parser.add_argument("--images", type=int, default=4, help="images per request of the autoscaling ramp")
    parser.add_argument("--up-timeout", type=float, default=90.0)
    parser.add_argument("--down-timeout", type=float, default=60.0)
    parser.add_argument("--json", default=None)
    parser.add_argument("--keep", action="store_true", help="keep the scenario's directory (Ray's logs) at the end")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.inside:
        return outside(args, argv)
    return inside(args)


if __name__ == "__main__":
    sys.exit(main())
