"""What a replica serves and every bound of the service, declared once: `serve`'s flags, the HTTP front and the
Ray deployment read these fields. No Ray in here."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

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
    keep_alive_timeout_s: float = limit(5.0, "seconds an idle keep-alive connection stays open")
    max_connections: int = limit(2048, "open client connections; beyond them 503 and close")
    # Ray restarts a killed replica in about 8 s on the development machine (docs/serve.md).
    restart_retry_after_s: int = limit(10, "Retry-After of requests whose replica died under them")

    def capacity(self, num_replicas: int) -> int:
        """Image requests the replicas hold at once: each runs up to `max_running_images` one-image requests and
        queues `max_queue` more. The HTTP front refuses beyond this instead of letting Ray's proxy queue."""
        return num_replicas * (self.max_queue + self.max_running_images)


@dataclass(frozen=True)
class ServeSettings:
    """What one replica serves and how much it holds."""
    export_dir: str
    backend: str = "onnxruntime"
    precision: str = "fp32"
    device: str = "cpu"
    max_batch: int | None = None
    threads: int = 1  # CPU threads of torch and ONNX Runtime in each replica (Ray's workers would take 1)
    # "continuous": requests join and leave the running batch at every step (the service);
    # "request-batch": Ray Serve's @serve.batch groups requests that arrive together and runs each group to the
    # end before the next starts; "single": one request at a time. The last two are the load benchmark's baselines.
    mode: str = "continuous"
    limits: RequestLimits = field(default_factory=RequestLimits)
    service: ServiceLimits = field(default_factory=ServiceLimits)

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


def retry_after_s(backlog: int, drain_per_s: float | None, low: int = 1, high: int = 60) -> int:
    """Whole seconds until `backlog` requests ahead have drained at the measured rate (`low` before any
    request finished), clamped to [low, high]."""
    if not drain_per_s:
        return low
    return int(min(high, max(low, math.ceil(backlog / drain_per_s))))
