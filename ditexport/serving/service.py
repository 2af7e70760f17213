"""The Ray Serve deployment: replicas of the batching engine behind a small JSON HTTP API."""
import asyncio
import os
import time
from dataclasses import asdict, dataclass

from ..errors import DitexportError


def ray_serve():
    """(ray, serve), or one clear sentence when the extra is missing."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise DitexportError("the service needs Ray Serve: pip install 'ditexport[serve]'") from None
    return ray, serve


@dataclass
class ServeSettings:
    """What one replica serves and how much it queues."""
    export_dir: str
    backend: str = "onnxruntime"
    precision: str = "fp32"
    device: str = "cpu"
    max_batch: int | None = None
    max_queue: int = 32
    max_running_images: int = 64
    max_images: int = 16
    max_steps: int = 1000
    max_guidance: float = 20.0
    threads: int = 1  # CPU threads of torch and ONNX Runtime in each replica (Ray's workers would take 1)
    # "continuous": requests join and leave the running batch at every step (the service);
    # "request-batch": Ray Serve's @serve.batch groups requests that arrive together and runs each group to the
    # end before the next starts; "single": one request at a time. The last two are the load benchmark's baselines.
    mode: str = "continuous"


def build_app(settings: ServeSettings, num_replicas: int = 1):
    """The Ray Serve application: `num_replicas` engines, each on a GPU where the backend runs on CUDA."""
    _, serve = ray_serve()
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    api = FastAPI(title="ditexport")
    on_gpu = settings.backend == "tensorrt" or settings.device.startswith("cuda")

    @serve.deployment(num_replicas=num_replicas, ray_actor_options={"num_gpus": 1 if on_gpu else 0},
                      max_ongoing_requests=settings.max_queue + settings.max_running_images)
    @serve.ingress(api)
    class ImageService:
        def __init__(self, settings_dict: dict):
            import torch
            from ray.serve import metrics

            from ..class_names import class_names
            from .api import model_info
            from .backend import open_served_backend
            from .engine import BatchingEngine, ServeLimits

            s = ServeSettings(**settings_dict)
            torch.set_num_threads(s.threads)  # ONNX Runtime's sessions follow torch's count
            backend = open_served_backend(s.export_dir, s.backend, s.precision, s.device, s.max_batch)
            self.info = model_info(s.export_dir, backend)
            self.names = class_names(backend.config.num_classes, self.info["models"][0]["name"])
            self.num_classes = backend.config.num_classes
            running = 1 if s.mode == "single" else s.max_running_images  # "single": one request runs at a time
            self.engine = BatchingEngine(backend, max_queue=s.max_queue, max_running_images=running,
                                         limits=ServeLimits(s.max_steps, s.max_images, s.max_guidance))
            self.mode = s.mode
            if s.mode != "request-batch":
                self.engine.start()
            self.queue_depth = metrics.Gauge("ditexport_queue_depth", description="requests waiting to join")
            self.running = metrics.Gauge("ditexport_running_images", description="images in the running batch")
            self.latency = metrics.Histogram("ditexport_request_latency_s", description="POST /v1/images, seconds",
                                             boundaries=[0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60])

        def __del__(self):
            self.engine.stop()

        @serve.batch(max_batch_size=settings.max_running_images, batch_wait_timeout_s=0.01)
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
            from .api import parse_image_request, png_base64
            from .engine import QueueFullError, RequestError

            start = time.perf_counter()
            try:
                image_request = parse_image_request(await request.body(), self.num_classes, self.names)
                future = self.engine.submit(image_request)
            except RequestError as e:
                return JSONResponse({"error": str(e), "field": e.field}, status_code=400)
            except QueueFullError as e:
                return JSONResponse({"error": str(e)}, status_code=503,
                                    headers={"Retry-After": str(e.retry_after_s)})
            self.queue_depth.set(self.engine.queue_depth)
            try:
                if self.mode == "request-batch":
                    await self.run_group(future)
                result = await asyncio.wrap_future(future)
            except asyncio.CancelledError:  # the client went away: its slots are freed at the next step
                future.cancel()
                raise
            finally:
                self.queue_depth.set(self.engine.queue_depth)
                self.running.set(self.engine.running_images)
            self.latency.observe(time.perf_counter() - start)
            cfg = image_request.sampler_cfg
            return {"images": png_base64(result.images), "seed": image_request.seed, "steps": result.steps,
                    "sampler": cfg.method, "guidance_scale": cfg.guidance_scale, "class_labels": image_request.labels,
                    "timings": {k: round(v, 4) for k, v in result.timings.items()}}

    return ImageService.bind(asdict(settings))


def start_local_ray(address: str | None = None, port: int = 8000, host: str = "127.0.0.1"):
    """Joins `address`, or starts a local Ray bound to loopback (no dashboard, no usage stats); starts Serve's
    HTTP proxy on host:port."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray, serve = ray_serve()
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                 configure_logging=False)
    serve.start(http_options={"host": host, "port": port})
    return ray, serve


def deploy(settings: ServeSettings, num_replicas: int = 1, port: int = 8000, address: str | None = None,
           host: str = "127.0.0.1") -> float:
    """Starts (or joins) Ray and deploys the service; returns the seconds it took until it answers."""
    start = time.perf_counter()
    _, serve = start_local_ray(address, port, host)
    serve.run(build_app(settings, num_replicas), name="ditexport", route_prefix="/", blocking=False)
    return time.perf_counter() - start


def shutdown() -> None:
    """Stops Serve and the Ray this process started or joined."""
    ray, serve = ray_serve()
    serve.shutdown()
    ray.shutdown()
