"""Serving on a Ray cluster that is not ours, as a good neighbour: join it within a bound; before deploying, check
the name, the route, the resources and the export on the nodes that could host a replica; deploy one named
application and wait for it within a bound (removing it when it does not start); remove exactly that application.
Never `serve.shutdown()` (every application on the cluster) nor the cluster's Ray."""
from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import threading
import time

from ..errors import DitexportError, one_line
from ..logs import get_logger
from .settings import Replicas, ServeSettings

log = get_logger("serving")

# Ray Client's answer when the proxier's per-client server died while starting, a known intermittent Ray bug
# (ray-project/ray#63202, a gRPC poller race at fork): another attempt gets a new server.
CLIENT_SERVER_DIED = "Initialization failure from server"
DEPLOYMENT = "ImageService"  # the ingress deployment of every ditexport application: how ours are told apart
POLL_S = 0.25


class ClusterError(DitexportError):
    """The cluster cannot take what was asked, or did not answer in time; nothing of ours is left deployed."""


def ray_serve():
    """(ray, serve), or one clear sentence when the extra is missing."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise DitexportError("the service needs Ray Serve: pip install 'ditexport[serve]'") from None
    return ray, serve


# -- joining ---------------------------------------------------------------------------------------

def bootstrap_endpoint(address: str) -> tuple[str, int] | None:
    """The (host, port) that `address` connects to first: Ray Client's (ray://HOST[:10001]) or the GCS's
    (HOST[:6379]); None for "auto" and "local", which Ray resolves on this machine."""
    if address in ("auto", "local"):
        return None
    rest = address.removeprefix("ray://").rstrip("/")
    host, colon, port = rest.rpartition(":")
    if not colon:
        host, port = rest, ""
    if not host or not (port.isdigit() or port == ""):
        raise ClusterError(f"--address {address!r} is not HOST:PORT or ray://HOST:PORT")
    return host, int(port) if port else (10001 if address.startswith("ray://") else 6379)


def join(address: str, timeout_s: float) -> None:
    """Connects this process to the Ray cluster at `address` as a driver, or raises one line within `timeout_s`:
    unreachable, refused (Ray's token authentication: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token),
    or no answer."""
    ray, _ = ray_serve()
    if ray.is_initialized():
        return
    endpoint = bootstrap_endpoint(address)
    if endpoint is not None:
        try:
            socket.create_connection(endpoint, timeout=timeout_s).close()
        except OSError as e:
            raise ClusterError(f"cannot reach the Ray cluster at {address}: {one_line(e)}") from None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    outcome: list = []
    deadline = time.monotonic() + timeout_s

    def connect():
        while True:
            try:
                # On this thread ray.init leaves the process's SIGTERM handler alone (the command's), and says so.
                with quiet("ray._private.worker", "SIGTERM handler is not set"):
                    ray.init(address=address, log_to_driver=False, configure_logging=False)
                outcome.append(None)
                return
            except BaseException as e:  # noqa: BLE001 - reported below, as one line
                if CLIENT_SERVER_DIED in str(e) and time.monotonic() + 1 + POLL_S < deadline:
                    log.warning(f"Ray Client's server for this process died while starting; joining again "
                                f"({one_line(e)[:200]})")
                    time.sleep(1)
                    continue
                outcome.append(e)
                return

    thread = threading.Thread(target=connect, name="ditexport-ray-join", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        raise ClusterError(f"the Ray cluster at {address} did not let this process join within {timeout_s:g} s "
                           "(--connect-timeout-s); if it uses token authentication, set RAY_AUTH_MODE=token and "
                           "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (docs/serve.md)")
    if outcome[0] is not None:
        raise ClusterError(f"cannot join the Ray cluster at {address}: {one_line(outcome[0])}")


# -- what is there ---------------------------------------------------------------------------------

def serve_details() -> dict:
    """Serve's own description of the cluster (what `serve status` and the dashboard show): its HTTP options
    and every application with its route, status, message and replicas; {} where Serve is not running."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    return {} if client is None else client.get_serve_details()


def applications() -> dict[str, dict]:
    return serve_details().get("applications", {})


def is_ditexport(app: dict) -> bool:
    return DEPLOYMENT in app.get("deployments", {})


def ditexport_applications() -> dict[str, str | None]:
    """Every running ditexport application on the cluster -> its route prefix."""
    return {name: app.get("route_prefix") for name, app in applications().items()
            if is_ditexport(app) and state_of(app) == "RUNNING"}


def state_of(item: dict) -> str:
    """An application's `status` or a replica's `state` as a plain string (Ray gives enums)."""
    value = item.get("status", item.get("state"))
    return str(getattr(value, "value", value))


def replicas_of(app: dict) -> list[dict]:
    return [r for d in app.get("deployments", {}).values() for r in d.get("replicas", [])]


def replicas_per_node(name: str) -> dict[str, int]:
    """Running replicas of application `name` per node ("<ip> <node id prefix>")."""
    counts: dict[str, int] = {}
    for replica in replicas_of(applications().get(name, {})):
        if state_of(replica) == "RUNNING":
            node = f"{replica.get('node_ip')} {str(replica.get('node_id'))[:8]}"
            counts[node] = counts.get(node, 0) + 1
    return counts


def url_of(route_prefix: str) -> str:
    """Where Serve's proxies answer `route_prefix` (the host and port of the cluster's Serve)."""
    http = serve_details().get("http_options") or {}
    return f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}{route_prefix.rstrip('/')}"


# -- before deploying ------------------------------------------------------------------------------

def check_name_and_route(name: str, route_prefix: str, replace: bool, address: str) -> None:
    """Refuses a name someone already deployed (unless `replace`) and a route another application answers."""
    apps = applications()
    if name in apps and not replace:
        kind = "a ditexport application" if is_ditexport(apps[name]) else "not a ditexport application"
        raise ClusterError(f"an application named {name!r} is already deployed on {address} ({kind}, route "
                           f"{apps[name].get('route_prefix')}); choose another --name, or --replace it")
    for other, app in apps.items():
        if other != name and app.get("route_prefix") == route_prefix:
            raise ClusterError(f"the route {route_prefix} is taken by application {other!r} on {address}; choose "
                               "another --route-prefix")


def replica_demand(settings: ServeSettings, replicas: Replicas) -> dict[str, float]:
    """The Ray resources of one replica."""
    return {"CPU": replicas.cpus_per_replica, "GPU": 1.0 if settings.on_gpu else 0.0}


def hosting_nodes(settings: ServeSettings, replicas: Replicas) -> list[dict]:
    """The cluster's live nodes, each with how many replicas its total resources hold (0 for none)."""
    ray, _ = ray_serve()
    demand = replica_demand(settings, replicas)
    nodes = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        resources = node.get("Resources", {})
        fits = min(math.floor(resources.get(kind, 0.0) / need + 1e-9) for kind, need in demand.items() if need > 0) \
            if any(need > 0 for need in demand.values()) else 10**6
        nodes.append({"id": node["NodeID"], "ip": node.get("NodeManagerAddress"), "fits": fits,
                      "resources": resources})
    return nodes


def check_resources(settings: ServeSettings, replicas: Replicas, address: str) -> list[dict]:
    """Refuses what the cluster's nodes cannot hold (their total resources; nodes a Ray autoscaler would add are not
    counted): no GPU for a CUDA backend, fewer CPUs than the replicas ask. Returns the nodes that can host one."""
    nodes = hosting_nodes(settings, replicas)
    demand = replica_demand(settings, replicas)
    total = {kind: sum(n["resources"].get(kind, 0.0) for n in nodes) for kind in ("CPU", "GPU")}
    have = f"{len(nodes)} node(s): {total['CPU']:g} CPUs, {total['GPU']:g} GPUs"
    if demand["GPU"] and not total["GPU"]:
        raise ClusterError(f"the cluster at {address} has no GPU ({have}); the {settings.backend} backend"
                           f"{' on ' + settings.device if settings.backend == 'torch' else ''} needs one per replica")
    hosts = [n for n in nodes if n["fits"] > 0]
    holds = sum(n["fits"] for n in hosts)
    if holds < replicas.initial:
        each = f"{demand['CPU']:g} CPU{'s' if demand['CPU'] != 1 else ''}" + (" and 1 GPU" if demand["GPU"] else "")
        raise ClusterError(f"the cluster at {address} holds {holds} replica(s) of {each} each ({have}), fewer than "
                           f"the {replicas.initial} asked; lower --num-replicas/--min-replicas or --cpus-per-replica")
    if replicas.most > holds:
        log.warning(f"the cluster holds {holds} replica(s) today; the autoscaler may ask for {replicas.most}")
    return hosts


def check_export_on_nodes(export_dir: str, hosts: list[dict], address: str, timeout_s: float) -> None:
    """Refuses an export that is not complete at `export_dir` on every node that could host a replica (the path
    must be the same on every node), by a task on each (no CPU reserved), within `timeout_s`."""
    ray, _ = ray_serve()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0, max_retries=0)(export_problem)
    refs = {probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["id"], soft=False)).remote(export_dir):
            n for n in hosts}
    ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    for ref in pending:
        ray.cancel(ref, force=True)
    if pending:
        node = refs[pending[0]]
        raise ClusterError(f"node {node['ip']} ({node['id'][:8]}) of {address} did not run a check of the export "
                           f"within {timeout_s:g} s")
    for ref in ready:
        node = refs[ref]
        try:
            problem = ray.get(ref)
        except Exception as e:  # noqa: BLE001 - e.g. ditexport not installed there
            problem = f"the check failed there: {one_line(e).splitlines()[0][:300]}"
        if problem:
            raise ClusterError(f"on node {node['ip']} ({node['id'][:8]}) of {address}: {problem}; the export must "
                               "be at the same path on every node (a shared file system)")


def export_problem(export_dir: str) -> str | None:
    """What is wrong with the export at `export_dir` on this machine (None: a complete export)."""
    from ..artifacts import read_manifest

    try:
        read_manifest(export_dir)
    except DitexportError as e:
        return one_line(e)
    return None


# -- deploying and removing ------------------------------------------------------------------------

def start_serve_if_needed(host: str, port: int, keep_alive_timeout_s: float | None = None) -> None:
    """Starts Serve's HTTP proxies on host:port where Serve is not running yet; a running Serve keeps its own."""
    _, serve = ray_serve()
    if serve_details():
        return
    options = {"host": host, "port": port}
    if keep_alive_timeout_s is not None:
        options["keep_alive_timeout_s"] = int(keep_alive_timeout_s)
    serve.start(http_options=options)


def deploy_and_wait(app, name: str, route_prefix: str, deadline: float, timeout_s: float,
                    demand: dict[str, float] | None = None) -> float:
    """Deploys `app` as application `name` at `route_prefix` and waits until it runs; returns the seconds. When it
    fails, is not running at `deadline` (perf_counter; `timeout_s`, the bound the user gave, names it), or the wait
    is interrupted, the application is removed first. `demand`: one replica's resources, for the message."""
    _, serve = ray_serve()
    start = time.perf_counter()
    try:
        # Serve says "Connecting to existing Serve app ... New http_options will not be applied": we pass none.
        with quiet("ray.serve", "Connecting to existing Serve app"):
            serve.run_many([serve.RunTarget(target=app, name=name, route_prefix=route_prefix)],
                           wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
        wait_running(name, deadline, timeout_s, demand)
    except BaseException:
        remove_quietly(name)
        raise
    return time.perf_counter() - start


def wait_running(name: str, deadline: float, timeout_s: float, demand: dict[str, float] | None = None) -> None:
    while True:
        app = applications().get(name, {})
        status = state_of(app) if app else None
        if status == "RUNNING":
            return
        if status == "DEPLOY_FAILED":
            raise ClusterError(f"application {name!r} failed to start: {reason(app)}")
        if time.perf_counter() > deadline:
            raise ClusterError(f"application {name!r} did not start within {timeout_s:g} s (--deploy-timeout-s): "
                               f"{reason(app) or waiting_for(app, demand)}; it was removed")
        time.sleep(POLL_S)


def waiting_for(app: dict, demand: dict[str, float] | None) -> str:
    """What a deployment that is not running yet waits for: its replicas' states and the cluster's free resources."""
    ray, _ = ray_serve()
    states: dict[str, int] = {}
    for replica in replicas_of(app):
        states[state_of(replica)] = states.get(state_of(replica), 0) + 1
    free = ray.available_resources()
    text = ", ".join(f"{n} {state.lower()}" for state, n in sorted(states.items())) or "no replica created"
    text += f"; free on the cluster now: {free.get('CPU', 0):g} CPUs, {free.get('GPU', 0):g} GPUs"
    if demand:
        text += f" (a replica needs {demand['CPU']:g} CPUs{' and 1 GPU' if demand.get('GPU') else ''} on one node)"
    return text


def reason(app: dict) -> str:
    """The line that says why an application is not running: its own message or its deployments', the last line
    of a traceback (the exception) where Ray gives one."""
    messages = [app.get("message") or ""] + [d.get("message") or "" for d in app.get("deployments", {}).values()]
    for message in messages:
        lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
        if not lines:
            continue
        errors = [ln for ln in lines if ln.split(":")[0].endswith(("Error", "Exception"))]
        return " ".join((errors[-1] if errors else " ".join(lines)).split())[:600]
    return ""


def remove_application(name: str, address: str) -> None:
    """Removes the ditexport application `name` (only that one, and only one of ours) and waits until it is gone."""
    _, serve = ray_serve()
    apps = applications()
    if name not in apps:
        there = ", ".join(sorted(apps)) or "none"
        raise ClusterError(f"no application named {name!r} on {address} (applications there: {there})")
    if not is_ditexport(apps[name]):
        raise ClusterError(f"{name!r} on {address} is not a ditexport application; `serve --stop` removes only those")
    serve.delete(name)


def remove_quietly(name: str, timeout_s: float = 60.0) -> None:
    """Removes application `name` (a deployment of ours that failed) if it exists, whatever its state."""
    ray, serve = ray_serve()
    try:
        if name not in applications():
            return
        serve.delete(name, _blocking=False)
        # A replica that never started (waiting for resources) never runs its graceful shutdown, which Ray waits
        # out (20 s by default) before killing it. Once the application is being deleted (its target is no replica;
        # killed before, Ray would start others in their place), its replica actors are killed now: every one,
        # those Ray started after the deadline included (a failed deployment has no requests to finish).
        prefix = f"SERVE_REPLICA::{name}#{DEPLOYMENT}#"  # Ray Serve's name of a replica actor
        deadline = time.perf_counter() + timeout_s
        while (app := applications().get(name)) is not None and time.perf_counter() < deadline:
            if state_of(app) == "DELETING":
                for actor in ray.util.list_named_actors(all_namespaces=True):
                    if actor["name"].startswith(prefix):
                        with contextlib.suppress(Exception):  # gone already
                            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
            time.sleep(POLL_S)
    except Exception as e:  # noqa: BLE001 - the error being raised says more
        log.warning(f"could not remove application {name!r}: {one_line(e)}")


@contextlib.contextmanager
def quiet(logger_name: str, prefix: str):
    """Drops the records of logger `logger_name` that start with `prefix` (Ray's lines that do not apply to us)."""
    class Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith(prefix)

    logger, drop = logging.getLogger(logger_name), Drop()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)
