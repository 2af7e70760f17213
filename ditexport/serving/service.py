"""The Ray Serve application: `build_app`, the one place it is built, and `app`, the builder Ray's own tools name
(`serve run ditexport.serving:app export_dir=...`, a config file's `import_path`). Where it runs: the local service
(a private Ray on loopback, the HTTP front of `front.py` ahead of Serve's proxy) or a named application on an
existing cluster (`cluster.py` checks, deploys and removes it). No `from __future__ import annotations`: FastAPI
reads the route handlers' annotations (`request: Request`) at runtime."""
import asyncio
import os
import time
from dataclasses import dataclass

from ..logs import get_logger
from .autoscaling import ENGINE_IMAGES
from .cluster import (DEPLOYMENT, check_export_on_nodes, check_name_and_route, check_resources, deploy_and_wait,
                      ditexport_applications, join, ray_serve, remove_application, replica_demand, replicas_per_node,
                      start_serve_if_needed, url_of)
from .settings import (ClusterLimits, Replicas, ServeSettings, default_app_name, default_route_prefix,
                       settings_from_arguments)

log = get_logger("serving")

HEADROOM = 16  # requests a replica takes beyond its engine's capacity: /healthz, /v1/models, quick refusals
DESCRIBE_TIMEOUT_S = 5.0  # another application's description for /v1/models; longer means it is going away


def app(args: dict):
    """Ray Serve's application builder: the arguments are `serve`'s flags, underscored (`export_dir`, `backend`,
    `torch_threads`, `num_replicas`, `min_replicas`, ...), as strings from `serve run` or typed from a config file."""
    return build_app(*settings_from_arguments(dict(args)))


def build_app(settings: ServeSettings, replicas: Replicas | None = None):
    """The Ray Serve application: replicas of the engine (a fixed count, or autoscaled on the engines' images),
    each on a GPU where the backend runs on CUDA. Every deployment option is decided here."""
    replicas = replicas or Replicas()
    settings.check()
    replicas.check()
    _, serve = ray_serve()
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    from .schema import images_openapi

    api = FastAPI(title="ditexport", summary="Class-conditional images from a validated DiT export",
                  description="Every model served on this Ray cluster is listed by GET /v1/models; a request names "
                              "one with `model` (default: this application's).")
    options = {"ray_actor_options": {"num_gpus": 1 if settings.on_gpu else 0,
                                     "num_cpus": replicas.cpus_per_replica},
               # The engine's own bound (which answers 503 at once) plus headroom, so /healthz never waits behind
               # image work; max_queued_requests: the bound of Ray's proxy ahead of the replicas.
               "max_ongoing_requests": settings.service.capacity(1) + HEADROOM,
               "max_queued_requests": settings.service.max_queue * replicas.most,
               "backpressure_config": {"status_code": 503, "retry_after_s": 1}}
    autoscaling = replicas.autoscaling_config(settings.service)
    if autoscaling:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = replicas.num_replicas

    @serve.deployment(name=DEPLOYMENT, **options)
    @serve.ingress(api)
    class ImageService:
        def __init__(self, settings_dict: dict):
            import torch
            from ray.serve import metrics

            from ..artifacts import read_manifest
            from ..backends.open import open_decoder, open_export_backend
            from ..threads import default_threads
            from .api import ImageAPI, model_info, served_class_names
            from .engine import BatchingEngine
            from .settings import body_limit

            s = ServeSettings.from_dict(settings_dict)
            manifest = read_manifest(s.export_dir)
            # Decided here where not given: Ray sets OMP_NUM_THREADS in its workers, so the model's width decides.
            torch.set_num_threads(s.threads or default_threads(manifest.get("config", {}).get("hidden_size")))
            backend = open_export_backend(s.export_dir, s.backend, s.precision, device=s.device, max_batch=s.max_batch)
            # A latent export built with --vae decodes with its decoder graph on the DiT's runtime.
            decoder = open_decoder("auto", s.export_dir, s.backend, s.precision, device=backend.device)
            self.name = serve.get_replica_context().app_name
            self.info = {"application": self.name, **model_info(s.export_dir, backend)}
            names = served_class_names(manifest, backend.config.num_classes)
            running = 1 if s.mode == "single" else s.service.max_running_images  # one request at a time
            self.engine = BatchingEngine(backend, max_queue=s.service.max_queue, max_running_images=running,
                                         limits=s.limits, decoder=decoder)
            self.api = ImageAPI(self.engine, names, s.limits, s.service, body_limit(s.service, s.limits, names),
                                model=self.name, route=self.route)
            if s.mode == "request-batch":
                self.api.on_submitted = self.run_group
            else:
                self.engine.start()
            self.queue_depth = metrics.Gauge("ditexport_queue_depth", description="requests waiting to join")
            self.running = metrics.Gauge("ditexport_running_images", description="images in the running batch")
            self.latency = metrics.Histogram("ditexport_request_latency_s", description="POST /v1/images, seconds",
                                             boundaries=[0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60])

        def __del__(self):
            if hasattr(self, "engine"):
                self.engine.stop()

        @serve.batch(max_batch_size=settings.service.max_running_images, batch_wait_timeout_s=0.01)
        async def run_group(self, futures: list):
            """Request-level batching: the group that arrived together runs as one batch until its last request
            is done; requests arriving meanwhile wait for the next group."""
            await asyncio.to_thread(self.engine.run_until_idle, join=False)
            return [None] * len(futures)

        def record_autoscaling_stats(self) -> dict:
            """Ray Serve's custom autoscaling metric: the images waiting and running in this replica's engine."""
            return {ENGINE_IMAGES: float(self.engine.load_images())}

        @api.get("/healthz", summary="The replica's engine counters")
        def healthz(self):
            return {"status": "ok", **self.engine.stats()}

        @api.get("/v1/models", summary="Every model served on this cluster (one per ditexport application)")
        async def models(self):
            return {"models": await self.served_models()}

        @api.post("/v1/images", **images_openapi(settings.limits))
        async def images(self, request: Request):
            from .settings import request_id_of

            start = time.perf_counter()
            try:
                status, answer, headers = await self.api.images(request.stream(), request.headers.get(
                    "content-length"), request_id_of(request.headers.get("x-request-id")))
            finally:
                self.queue_depth.set(self.engine.queue_depth)
                self.running.set(self.engine.running_images)
            if status == 200:
                self.latency.observe(time.perf_counter() - start)
            return JSONResponse(answer, status_code=status, headers=headers)

        def describe(self) -> dict:
            """This application's entry of GET /v1/models (called by the other applications' replicas)."""
            return self.info

        async def answer(self, body: bytes, request_id: str) -> tuple:
            """A POST /v1/images body another application received for this one's model."""
            async def chunks():
                yield body

            return await self.api.images(chunks(), str(len(body)), request_id, routed=True)

        async def served_models(self) -> list[dict]:
            """This application's model first (a client of this URL, such as the demo, takes the first), then
            every other ditexport application's on the cluster."""
            apps = await asyncio.to_thread(ditexport_applications)
            prefix = apps.pop(self.name, None)
            out = [{**self.info, "route_prefix": prefix}]
            for name, prefix in sorted(apps.items()):
                try:
                    handle = await asyncio.to_thread(serve.get_app_handle, name)
                    info = await asyncio.wait_for(handle.describe.remote(), DESCRIBE_TIMEOUT_S)
                except Exception:  # noqa: BLE001 - an application being removed or restarted is left out
                    continue
                out.append({**info, "route_prefix": prefix})
            return out

        async def route(self, model: str, body: bytes, request_id: str) -> tuple:
            """The answer of the application serving `model`, or a RequestError naming the models served."""
            from .engine import RequestError

            apps = await asyncio.to_thread(ditexport_applications)
            if model not in apps:
                served = ", ".join(sorted({*apps, self.name}))
                raise RequestError("model", f"unknown model {model[:80]!r}; models served here: {served} "
                                            "(GET /v1/models)")
            handle = await asyncio.to_thread(serve.get_app_handle, model)
            return tuple(await handle.answer.remote(body, request_id))

    return ImageService.bind(settings.to_dict())


# -- the local service -----------------------------------------------------------------------------

def start_local_ray(port: int = 8000, host: str = "127.0.0.1", keep_alive_timeout_s: float | None = None):
    """Starts a private Ray whose every listener Ray lets us bind is on loopback (no dashboard, no usage stats; Ray
    turns its token authentication on for a new local cluster unless RAY_AUTH_MODE says otherwise) and Serve's
    HTTP proxy on host:port."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray resolves a node address of 127.0.0.1 to the machine's address unless this is 0; with the node on
    # 127.0.0.1, GCS, raylet, workers and agents listen on loopback only (docs/serve.md lists the rest).
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray, serve = ray_serve()
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # read at import: Ray may have been imported before the line above
    ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False)
    start_serve_if_needed(host, port, keep_alive_timeout_s)
    return ray, serve


_front = None  # the local service's HTTP front, stopped by `shutdown`


def deploy(settings: ServeSettings, replicas: Replicas | None = None, port: int = 8000, host: str = "127.0.0.1",
           name: str | None = None, timeout_s: float = ClusterLimits.deploy_timeout_s) -> float:
    """Starts a private Ray on loopback, deploys the application at / and the HTTP front (limits, timeouts,
    bounded admission, JSON errors) on host:port ahead of Serve's proxy, which listens on a free loopback port;
    returns the seconds until it answers."""
    global _front
    from .front import HttpFront
    from .sockets import free_loopback_port

    start = time.perf_counter()
    replicas = replicas or Replicas()
    limits = settings.service
    upstream_port = free_loopback_port()
    start_local_ray(upstream_port, "127.0.0.1", limits.keep_alive_timeout_s)
    deploy_and_wait(build_app(settings, replicas), name or default_app_name(settings.export_dir), "/",
                    start + timeout_s, timeout_s)

    from ..artifacts import read_manifest
    from .api import served_class_names
    from .settings import body_limit

    manifest = read_manifest(settings.export_dir)
    names = served_class_names(manifest, manifest["config"]["num_classes"])
    _front = HttpFront(host, port, ("127.0.0.1", upstream_port), limits, capacity=limits.capacity(replicas.most),
                       body_limit=body_limit(limits, settings.limits, names))
    _front.start()
    return time.perf_counter() - start


def shutdown() -> None:
    """Stops the front, Serve and the private Ray this process started (never a cluster it joined)."""
    global _front
    if _front is not None:
        _front.stop()
        _front = None
    ray, serve = ray_serve()
    serve.shutdown()
    ray.shutdown()


# -- an existing cluster ---------------------------------------------------------------------------

@dataclass
class ClusterDeployment:
    """A named application deployed on a cluster: where it answers, how long it took, its replicas per node."""
    name: str
    route_prefix: str
    url: str
    seconds: float
    replicas_per_node: dict[str, int]


def deploy_on_cluster(settings: ServeSettings, replicas: Replicas, address: str, name: str | None = None,
                      route_prefix: str | None = None, replace: bool = False,
                      limits: ClusterLimits | None = None, host: str = "127.0.0.1",
                      port: int = 8000) -> ClusterDeployment:
    """Joins the cluster at `address` and deploys the export as one named application (`name`, default the export
    directory's; `route_prefix`, default /<name>) beside whatever else runs there, after checking what can be
    checked first. Serve's proxies start on host:port only where Serve is not running yet."""
    limits = limits or ClusterLimits()
    name = name or default_app_name(settings.export_dir)
    route_prefix = route_prefix or default_route_prefix(name, shared=True)
    application = build_app(settings, replicas)
    start = time.perf_counter()
    join(address, limits.connect_timeout_s)
    log.info(f"joined the Ray cluster at {address} in {time.perf_counter() - start:.1f} s")
    deadline = start + limits.deploy_timeout_s
    check_name_and_route(name, route_prefix, replace, address)
    hosts = check_resources(settings, replicas, address)
    check_export_on_nodes(settings.export_dir, hosts, address, max(1.0, deadline - time.perf_counter()))
    start_serve_if_needed(host, port, settings.service.keep_alive_timeout_s)
    log.info(f"deploying application {name!r} at {route_prefix} ({replicas.initial} replica(s))")
    deploy_and_wait(application, name, route_prefix, deadline, limits.deploy_timeout_s,
                    replica_demand(settings, replicas))
    return ClusterDeployment(name, route_prefix, url_of(route_prefix), time.perf_counter() - start,
                             replicas_per_node(name))


def remove_from_cluster(name: str, address: str, limits: ClusterLimits | None = None) -> None:
    """Joins the cluster at `address` (where this process has not) and removes the ditexport application `name`."""
    join(address, (limits or ClusterLimits()).connect_timeout_s)
    remove_application(name, address)
