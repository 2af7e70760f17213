"""What a replica serves, how many replicas serve it and every bound of the service, declared once: `serve`'s
flags, the application builder's arguments (`serve run ditexport.serving:app key=value`, a config file's `args:`),
the HTTP front and the Ray deployment read these fields. No Ray in here."""
from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..errors import UsageError
from ..limits import RequestLimits, limit


@dataclass(frozen=True)
class ServiceLimits:
    """The service's queues, sizes and timeouts (docs/serve.md, "Limits and failure behaviour")."""
    max_queue: int = limit(32, "waiting requests per replica; beyond them a request gets 503 + Retry-After")
    max_running_images: int = limit(64, "images in each replica's running (step-level) batch")
    request_timeout_s: float = limit(60.0, "seconds a request may take from arrival to answer; then it is "
                                           "cancelled (its slots freed) and answered 503")
    # None: sized from the largest valid request (`largest_valid_body`), see `body_limit`.
    max_body_bytes: int | None = limit(None, "bytes of a request body; more is refused with 413 (derived: 4x the "
                                                   "largest valid request, at least 4 KiB)")
    # A valid request needs a Host, a Content-Type and a Content-Length; browsers and proxies send 1-4 KiB.
    max_header_bytes: int = limit(16384, "bytes of a request's line and headers; more is refused with 431")
    header_timeout_s: float = limit(10.0, "seconds a client may take to send a request's line and headers; "
                                          "then 408 and the connection is closed")
    body_timeout_s: float = limit(10.0, "seconds a client may take to send a request body; then 408 and close")
    send_timeout_s: float = limit(30.0, "seconds a client may take to read an answer once the server sends it; then "
                                        "the connection is aborted")
    keep_alive_timeout_s: float = limit(5.0, "seconds an idle keep-alive connection stays open")
    max_connections: int = limit(2048, "open client connections; beyond them 503 and close")
    # Ray restarts a killed replica in about 8 s on the development machine (docs/serve.md).
    restart_retry_after_s: int = limit(10, "Retry-After of requests whose replica died under them")

    def capacity(self, num_replicas: int) -> int:
        """Image requests the replicas hold at once: each runs up to `max_running_images` one-image requests and
        queues `max_queue` more. The HTTP front refuses beyond this instead of letting Ray's proxy queue."""
        return num_replicas * (self.max_queue + self.max_running_images)


BACKENDS = ("torch", "onnxruntime", "tensorrt")
MODES = ("continuous", "request-batch", "single")


@dataclass(frozen=True)
class ServeSettings:
    """What one replica serves and how much it holds."""
    export_dir: str
    backend: str = "onnxruntime"
    precision: str = "fp32"
    device: str = "cpu"
    max_batch: int | None = None
    # CPU threads of torch and ONNX Runtime in each replica (Ray's workers would take 1); None: the default for the
    # model's width (`threads.default_threads`), decided by the replica from the manifest it opens.
    threads: int | None = None
    # "continuous": requests join and leave the running batch at every step (the service);
    # "request-batch": Ray Serve's @serve.batch groups requests that arrive together and runs each group to the
    # end before the next starts; "single": one request at a time. The last two are the load benchmark's baselines.
    mode: str = "continuous"
    limits: RequestLimits = field(default_factory=RequestLimits)
    service: ServiceLimits = field(default_factory=ServiceLimits)

    def check(self) -> None:
        """Refuses a backend or mode the service does not have, naming the field (a precision the export lacks is
        refused by the replica that opens it, naming what to build)."""
        for name, allowed in (("backend", BACKENDS), ("mode", MODES)):
            if getattr(self, name) not in allowed:
                raise UsageError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}", name)

    @property
    def on_gpu(self) -> bool:
        """Whether a replica computes on CUDA, and so asks Ray for a GPU."""
        return self.backend == "tensorrt" or self.device.startswith("cuda")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ServeSettings:
        """The inverse of `to_dict` (Ray passes settings to replicas as plain data)."""
        return cls(**{**data, "limits": RequestLimits(**data.get("limits", {})),
                      "service": ServiceLimits(**data.get("service", {}))})


def largest_valid_body(limits: RequestLimits, names: list[str]) -> bytes:
    """The longest request body this server accepts, pretty-printed: every label the longest class name (or the
    widest index), every number at its longest spelling."""
    longest = max(names + [str(len(names) - 1)], key=lambda n: len(json.dumps(n)))
    body = {"class_labels": [longest] * limits.max_images, "steps": limits.max_steps, "sampler": "dpmpp-2m",
            "guidance_scale": -1.2345678901234567e-300, "seed": -(2**63), "eta": 1.2345678901234567e-300}
    return json.dumps(body, indent=4).encode()


def body_limit(service: ServiceLimits, limits: RequestLimits, names: list[str]) -> int:
    """`max_body_bytes`, else 4x the largest valid request (room for any spacing), at least 4 KiB."""
    if service.max_body_bytes is not None:
        return service.max_body_bytes
    return max(4096, 1024 * math.ceil(4 * len(largest_valid_body(limits, names)) / 1024))


def request_id_of(header: str | None) -> str:
    """The X-Request-ID a proxy gave (kept when it is a plain token), else a new one."""
    if header and len(header) <= 64 and re.fullmatch(r"[A-Za-z0-9._-]+", header):
        return header
    return uuid.uuid4().hex


DRAIN_WINDOW_S = 30.0  # the drain rate behind Retry-After is measured over the last this many seconds


def drain_rate(finished_at, now: float) -> float | None:
    """Requests finished per second over the DRAIN_WINDOW_S before `now` (the clock of `finished_at`, the times
    requests finished); None before two have finished in it."""
    recent = [t for t in finished_at if now - t <= DRAIN_WINDOW_S]
    return None if len(recent) < 2 else (len(recent) - 1) / max(recent[-1] - recent[0], 1e-3)


def retry_after_s(backlog: int, drain_per_s: float | None, low: int = 1, high: int = 60) -> int:
    """Whole seconds until `backlog` requests ahead have drained at the measured rate (`low` before any
    request finished), clamped to [low, high]."""
    if not drain_per_s:
        return low
    return int(min(high, max(low, math.ceil(backlog / drain_per_s))))


# The autoscaling policy Ray Serve's controller imports: replicas from the engines' images waiting or running.
AUTOSCALING_POLICY = "ditexport.serving.autoscaling:engine_load_policy"


@dataclass(frozen=True)
class Replicas:
    """How many engines serve one application: a fixed count, or Ray Serve's autoscaler between a minimum and a
    maximum, aiming at a number of images waiting or running in each replica's engine (`autoscaling.py`)."""
    num_replicas: int = limit(1, "engine replicas, a fixed count (one per GPU with a CUDA backend)")
    min_replicas: int | None = limit(None, "autoscale between --min-replicas and --max-replicas (Ray Serve's "
                                           "autoscaler) instead of a fixed count")
    max_replicas: int | None = limit(None, "autoscale: the most replicas")
    # A replica whose running batch is full and whose queue is empty is exactly at this target.
    target_ongoing_requests: float | None = limit(None, "autoscale: images waiting or running per replica that the "
                                                        "autoscaler aims at (default: --max-running-images)")
    upscale_delay_s: float | None = limit(None, "autoscale: seconds the load must stay above the target before "
                                                "replicas are added (default: Ray Serve's)")
    downscale_delay_s: float | None = limit(None, "autoscale: seconds the load must stay below the target before "
                                                  "replicas are removed (default: Ray Serve's)")
    look_back_period_s: float | None = limit(None, "autoscale: seconds the load is averaged over (default: Ray "
                                                   "Serve's)")
    # Ray Serve's own default is 1 CPU per replica. Reserving the replica's threads instead would let a GPU node with
    # many cores and GPUs hold only a few replicas (a DiT-XL/2 replica's default threads are the cores less one).
    cpus_per_replica: float = limit(1.0, "CPUs Ray reserves for each replica: the cluster must have that many per "
                                         "replica; give its --torch-threads on CPU-only clusters")

    @property
    def autoscaled(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    @property
    def initial(self) -> int:
        """Replicas at deployment: the fixed count, or the autoscaler's minimum."""
        return (self.min_replicas or 1) if self.autoscaled else self.num_replicas

    @property
    def most(self) -> int:
        return max(self.max_replicas or 1, self.initial) if self.autoscaled else self.num_replicas

    def check(self) -> None:
        """Refuses a fixed count beside autoscaling bounds, and a maximum below the minimum."""
        if self.autoscaled and self.num_replicas != Replicas.num_replicas:
            raise UsageError("give a fixed --num-replicas, or --min-replicas/--max-replicas to autoscale, not both",
                             "num_replicas")
        if self.autoscaled and (self.max_replicas or 1) < self.initial:
            raise UsageError(f"--max-replicas ({self.max_replicas}) is below --min-replicas ({self.min_replicas})",
                             "max_replicas")

    def autoscaling_config(self, service: ServiceLimits) -> dict | None:
        """Ray Serve's `autoscaling_config` (None for a fixed count): our policy, the bounds, target and delays."""
        if not self.autoscaled:
            return None
        config = {"min_replicas": self.initial, "max_replicas": self.most,
                  "target_ongoing_requests": self.target_ongoing_requests or float(service.max_running_images),
                  "policy": {"policy_function": AUTOSCALING_POLICY}}
        for name in ("upscale_delay_s", "downscale_delay_s", "look_back_period_s"):
            if getattr(self, name) is not None:
                config[name] = getattr(self, name)
        return config


@dataclass(frozen=True)
class ClusterLimits:
    """How long `serve --address` may take to join a cluster and to have its application answer there; past either
    it removes what it deployed and exits 2, instead of waiting on a deployment that stays pending."""
    # Ray Client joins took 3 s on an idle 2-core machine and over 15 s while a second deploy and two raylets shared
    # its cores: 30 s still bounds a cluster that will never answer.
    connect_timeout_s: float = limit(30.0, "seconds to reach and join the Ray cluster at --address")
    deploy_timeout_s: float = limit(180.0, "seconds from joining the cluster until the application answers (the "
                                           "checks, its replicas scheduled, their backends opened); then it is "
                                           "removed and serve exits 2")


def default_app_name(export_dir: str | Path) -> str:
    """The application's name when --name is not given: the export directory's name, as Ray and a URL take it."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(export_dir).resolve().name).strip("-.")
    return name or "ditexport"


def default_route_prefix(name: str, shared: bool) -> str:
    """`/` on the private local Ray (the only application there), `/<name>` on a shared cluster."""
    return f"/{name}" if shared else "/"


def builder_arguments() -> dict[str, tuple[type, str]]:
    """The arguments of the application builder: name -> (the dataclass holding it, its field). The names are
    `serve`'s flags, underscored (`--torch-threads 2` is `torch_threads=2`)."""
    args = {f.name: (ServeSettings, f.name) for f in fields(ServeSettings) if f.name not in ("limits", "service")}
    args["torch_threads"] = args.pop("threads")
    for cls in (RequestLimits, ServiceLimits, Replicas):
        args.update({f.name: (cls, f.name) for f in fields(cls)})
    return args


def settings_from_arguments(arguments: dict) -> tuple[ServeSettings, Replicas]:
    """The builder's `key=value` arguments (strings from `serve run`, typed values from a config file's `args:` or
    from `serve`'s flags) -> what the application is built from; an unknown key or a bad value is a UsageError."""
    known = builder_arguments()
    unknown = sorted(set(arguments) - set(known))
    if unknown:
        raise UsageError(f"unknown argument {unknown[0]!r} of ditexport.serving:app; it takes: "
                         f"{', '.join(sorted(known))}", unknown[0])
    if not arguments.get("export_dir"):
        raise UsageError("ditexport.serving:app needs export_dir=<the validated export to serve>", "export_dir")
    values: dict[type, dict] = {ServeSettings: {}, RequestLimits: {}, ServiceLimits: {}, Replicas: {}}
    for key, value in arguments.items():
        cls, name = known[key]
        values[cls][name] = _coerce(next(f for f in fields(cls) if f.name == name), key, value)
    settings = ServeSettings(**values[ServeSettings], limits=RequestLimits(**values[RequestLimits]),
                             service=ServiceLimits(**values[ServiceLimits]))
    replicas = Replicas(**values[Replicas])
    settings.check()
    replicas.check()
    return settings, replicas


def _coerce(f, key: str, value):
    """A builder argument as its field's type: strings as they are, numbers above 0 ("none" where None is allowed)."""
    kind = str(f.type)
    if value is None or (isinstance(value, str) and value.lower() == "none"):
        if "None" in kind:
            return None
        raise UsageError(f"{key} needs a value", key)
    if not kind.startswith(("int", "float")):
        return str(value)
    try:
        number = float(value) if isinstance(value, str) or kind.startswith("float") else value
    except ValueError:
        raise UsageError(f"{key} must be a number, got {value!r}", key) from None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not 0 < number < math.inf:
        raise UsageError(f"{key} must be a number above 0, got {value!r}", key)
    if kind.startswith("int"):
        if number != int(number):
            raise UsageError(f"{key} must be a whole number, got {value!r}", key)
        return int(number)
    return float(number)
