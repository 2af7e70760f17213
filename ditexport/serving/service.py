"""The Ray Serve deployment: replicas of the batching engine behind a small JSON HTTP API, and the local
service: a private Ray bound to loopback with the HTTP front (`front.py`) ahead of Serve's proxy."""
import asyncio
import os
import time

from ..errors import DitexportError
from .settings import ServeSettings

HEADROOM = 16  # requests a replica takes beyond its engine's capacity: /healthz, /v1/models, quick refusals


def ray_serve():
    """(ray, serve), or one clear sentence when the extra is missing."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise DitexportError("the service needs Ray Serve: pip install 'ditexport[serve]'") from None
    return ray, serve


def build_app(settings: ServeSettings, num_replicas: int = 1):
    """The Ray Serve application: `num_replicas` engines, each on a GPU where the backend runs on CUDA. Every
    deployment option is decided here, the one place a Ray application is built."""
    _, serve = ray_serve()
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    api = FastAPI(title="ditexport")
    on_gpu = settings.backend == "tensorrt" or settings.device.startswith("cuda")
    engine_capacity = settings.service.capacity(1)  # image requests one replica holds, running or waiting

    # max_ongoing_requests: the engine's own bound (which answers 503 at once) plus headroom, so that /healthz
    # never waits behind image work; max_queued_requests: the bound of Ray's proxy ahead of the replicas.
    @serve.deployment(num_replicas=num_replicas, ray_actor_options={"num_gpus": 1 if on_gpu else 0},
                      max_ongoing_requests=engine_capacity + HEADROOM,
                      max_queued_requests=settings.service.max_queue * num_replicas,
                      backpressure_config={"status_code": 503, "retry_after_s": 1})
    @serve.ingress(api)
    class ImageService:
        def __init__(self, settings_dict: dict):
            import torch
            from ray.serve import metrics

            from ..artifacts import read_manifest
            from .api import ImageAPI, model_info, served_class_names
            from ..backends.open import open_decoder, open_export_backend
            from .engine import BatchingEngine
            from .settings import body_limit

            s = ServeSettings.from_dict(settings_dict)
            torch.set_num_threads(s.threads)  # ONNX Runtime's sessions follow torch's count
            backend = open_export_backend(s.export_dir, s.backend, s.precision, device=s.device, max_batch=s.max_batch)
            # A latent export built with --vae decodes with its decoder graph on the DiT's runtime.
            decoder = open_decoder("auto", s.export_dir, s.backend, s.precision, device=backend.device)
            self.info = model_info(s.export_dir, backend)
            names = served_class_names(read_manifest(s.export_dir), backend.config.num_classes)
            running = 1 if s.mode == "single" else s.service.max_running_images  # one request at a time
            self.engine = BatchingEngine(backend, max_queue=s.service.max_queue, max_running_images=running,
                                         limits=s.limits, decoder=decoder)
            self.api = ImageAPI(self.engine, names, s.limits, s.service, body_limit(s.service, s.limits, names))
            if s.mode == "request-batch":
                self.api.on_submitted = self.run_group
            else:
                self.engine.start()
            self.queue_depth = metrics.Gauge("ditexport_queue_depth", description="requests waiting to join")
            self.running = metrics.Gauge("ditexport_running_images", description="images in the running batch")
            self.latency = metrics.Histogram("ditexport_request_latency_s", description="POST /v1/images, seconds",
                                             boundaries=[0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60])

        def __del__(self):
            self.engine.stop()

        @serve.batch(max_batch_size=settings.service.max_running_images, batch_wait_timeout_s=0.01)
        async def run_group(self, futures: list):
            """Request-level batching: the group that arrived together runs as one batch until its last request
            is done; requests arriving meanwhile wait for the next group."""
            await asyncio.to_thread(self.engine.run_until_idle, join=False)
            return [None] * len(futures)

        @api.get("/healthz")
        def healthz(self):
            return {"status": "ok", **self.engine.stats()}

        @api.get("/v1/models")
        def models(self):
            return self.info

        @api.post("/v1/images")
        async def images(self, request: Request):
            from .api import request_id_of

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

    return ImageService.bind(settings.to_dict())


def start_local_ray(address: str | None = None, port: int = 8000, host: str = "127.0.0.1",
                    keep_alive_timeout_s: float | None = None):
    """Joins `address`, or starts a private Ray whose every listener Ray lets us bind is on loopback (no
    dashboard, no usage stats; Ray turns its token authentication on for a new local cluster unless RAY_AUTH_MODE
    says otherwise); starts Serve's HTTP proxy on host:port."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not address:
        # Ray resolves a node address of 127.0.0.1 to the machine's address unless this is 0; with the node on
        # 127.0.0.1, GCS, raylet, workers and agents listen on loopback only (docs/serve.md lists the rest).
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray, serve = ray_serve()
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False  # read at import: Ray may have been imported before the line above
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                 configure_logging=False)
    options = {"host": host, "port": port}
    if keep_alive_timeout_s is not None:
        options["keep_alive_timeout_s"] = int(keep_alive_timeout_s)
    serve.start(http_options=options)
    return ray, serve


_front = None  # the local service's HTTP front, stopped by `shutdown`


def deploy(settings: ServeSettings, num_replicas: int = 1, port: int = 8000, address: str | None = None,
           host: str = "127.0.0.1") -> float:
    """Starts (or joins) Ray and deploys the service; returns the seconds it took until it answers.

    Locally, Serve's proxy listens on a free loopback port and the HTTP front (limits, timeouts, bounded
    admission, JSON errors) on host:port ahead of it. On an existing cluster (`address`) Serve's proxy is the
    entry point; the replicas' own limits still apply (docs/serve.md)."""
    global _front
    start = time.perf_counter()
    limits = settings.service
    if address:
        _, serve = start_local_ray(address, port, host, limits.keep_alive_timeout_s)
    else:
        from .front import HttpFront, free_loopback_port

        upstream_port = free_loopback_port()
        _, serve = start_local_ray(None, upstream_port, "127.0.0.1", limits.keep_alive_timeout_s)
    serve.run(build_app(settings, num_replicas), name="ditexport", route_prefix="/", blocking=False)
    if not address:
        from .api import served_class_names
        from ..artifacts import read_manifest
        from .settings import body_limit

        manifest = read_manifest(settings.export_dir)
        names = served_class_names(manifest, manifest["config"]["num_classes"])
        _front = HttpFront(host, port, ("127.0.0.1", upstream_port), limits, capacity=limits.capacity(num_replicas),
                           body_limit=body_limit(limits, settings.limits, names))
        _front.start()
    return time.perf_counter() - start


def shutdown() -> None:
    """Stops the front, Serve and the Ray this process started or joined."""
    global _front
    if _front is not None:
        _front.stop()
        _front = None
    ray, serve = ray_serve()
    serve.shutdown()
    ray.shutdown()
