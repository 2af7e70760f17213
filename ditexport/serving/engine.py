"""Step-level continuous batching: one backend, a running batch that requests join and leave between steps.

Each request keeps its own sampler, step index, coefficients, noise and DPM-Solver++ state; one forward per step
serves every running request (a guided one contributes its rows twice, `[x; x]` with `[y; null]`), and the
backend splits above its max batch as always. The update after the forward runs per request with that request's
own 0-d coefficients through `sampler.denoise_step`, on tensors of the request's own shape, so a request's
arithmetic is the arithmetic of a lone `Sampler.run` whatever it is batched with. No Ray in here.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from concurrent.futures import CancelledError, Future, InvalidStateError
from dataclasses import dataclass, field

import torch

from ..errors import DitexportError, UsageError
from ..pipeline import CHUNK_IMAGES, IdentityDecoder, check_request
from ..sampler import Sampler, SamplerConfig, apply_guidance, denoise_step

# The library's names of a setting at fault (UsageError.field) -> the HTTP request's field names.
API_FIELDS = {"labels": "class_labels", "method": "sampler", "num_steps": "steps", "respacing": "steps"}


class QueueFullError(DitexportError):
    """The engine's queue is full; the client should retry after `retry_after_s`."""

    def __init__(self, retry_after_s: int):
        super().__init__(f"the queue is full; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class RequestError(DitexportError):
    """A request this server refuses; `field` names the JSON field at fault."""

    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field = field_name


@dataclass(frozen=True)
class ServeLimits:
    """Server-side bounds on one request, as the demo's `DemoLimits`."""
    max_steps: int = 1000
    max_images: int = 16
    max_guidance: float = 20.0

    def check(self, num_images: int, steps: int, guidance: float) -> None:
        for name, value, low, high in (("class_labels", num_images, 1, min(self.max_images, CHUNK_IMAGES)),
                                       ("steps", steps, 1, self.max_steps),
                                       ("guidance_scale", guidance, 1.0, self.max_guidance)):
            if not low <= value <= high:
                what = "number of class labels" if name == "class_labels" else name
                raise RequestError(name, f"{what} must be between {low} and {high} on this server, got {value}")


@dataclass
class ImageRequest:
    """What one client asked for: images of `labels`, noised from `seed` as `sample --seed` does."""
    labels: list[int]
    seed: int = 0
    sampler_cfg: SamplerConfig = field(default_factory=SamplerConfig)


@dataclass
class ImageResult:
    """Images in [0, 1] on the CPU (as `Pipeline`'s), with the request's timings."""
    images: torch.Tensor
    steps: int
    timings: dict


class _Running:
    """One admitted request: its sampler state between steps."""

    def __init__(self, request: ImageRequest, sampler: Sampler, shape, device, future: Future, queued_at: float):
        self.request, self.sampler, self.future, self.queued_at = request, sampler, future, queued_at
        self.started_at = time.perf_counter()
        x_T, step_noise = sampler.make_noise(shape, request.seed)  # exactly as Sampler.sample draws it
        self.x = x_T.to(device)
        self.step_noise = None if step_noise is None else step_noise.to(device)
        self.x0_prev = torch.zeros_like(self.x)
        self.k = sampler.step_coefficients(device)
        y = torch.tensor(request.labels, dtype=torch.int64, device=device)
        self.y = torch.cat([y, torch.full_like(y, sampler.null_class)]) if sampler.guided else y
        self.i = 0

    @property
    def rows(self) -> int:
        return self.y.shape[0]

    def model_input(self):
        x_in = torch.cat([self.x, self.x]) if self.sampler.guided else self.x
        return x_in, self.k["t"][self.i].expand(self.rows), self.y

    def advance(self, out: torch.Tensor) -> bool:
        """Applies this request's step to its slice of the forward's output; True when its chain is done."""
        s = self.sampler
        out = out.float()
        if s.guided:
            out = apply_guidance(out, s.cfg.guidance_scale, s.guide_channels)
        last = self.i == s.num_steps - 1
        noise = None if (last or self.step_noise is None) else self.step_noise[self.i]
        self.x, self.x0_prev = denoise_step(s, {n: v[self.i] for n, v in self.k.items()}, self.x, out,
                                            self.x0_prev, noise)
        self.i += 1
        return last


class BatchingEngine:
    """Owns one backend; `submit` queues a request, `step` (or the `start`ed thread) runs the running batch."""

    def __init__(self, backend, *, max_queue: int = 32, max_running_images: int = 64,
                 limits: ServeLimits | None = None, decoder=None, retry_after_s: int = 1):
        self.backend, self.config = backend, backend.config
        self.decoder = decoder or IdentityDecoder()
        self.max_queue, self.max_running_images = max_queue, max_running_images
        self.limits, self.retry_after_s = limits or ServeLimits(), retry_after_s
        self._waiting: deque[tuple[ImageRequest, Future, float]] = deque()
        self._running: list[_Running] = []
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.steps_run = 0  # forwards so far (each serving every running request)
        self.max_batch_seen = 0  # the most rows one step has forwarded

    # -- admission ---------------------------------------------------------------------------------

    def check(self, request: ImageRequest) -> None:
        """Refuses a request before it is queued, naming the field at fault."""
        cfg = request.sampler_cfg
        self.limits.check(len(request.labels), cfg.num_steps, cfg.guidance_scale)
        try:
            check_request(self.config, request.labels, request.seed, cfg)
        except UsageError as e:
            raise RequestError(API_FIELDS.get(e.field or "", e.field or "body"), str(e)) from None

    def submit(self, request: ImageRequest) -> Future:
        """Queues a checked request; its Future gets an ImageResult. Cancel the Future to free its slot."""
        self.check(request)
        future: Future = Future()
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(self.retry_after_s)
            self._waiting.append((request, future, time.perf_counter()))
            self._lock.notify_all()
        return future

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running_images(self) -> int:
        return sum(len(r.request.labels) for r in self._running)

    def _admit(self) -> None:
        """At a step boundary: drops cancelled requests, lets waiting ones join while the batch has room."""
        self._running = [r for r in self._running if not r.future.cancelled()]
        c = self.config
        while self._waiting:
            request, future, queued_at = self._waiting[0]
            if future.cancelled():
                self._waiting.popleft()
                continue
            if self._running and self.running_images + len(request.labels) > self.max_running_images:
                break
            self._waiting.popleft()
            sampler = Sampler(request.sampler_cfg, c.in_channels, c.num_classes, c.learn_sigma)
            shape = (len(request.labels), c.in_channels, c.input_size, c.input_size)
            self._running.append(_Running(request, sampler, shape, self.backend.device, future, queued_at))

    # -- running -----------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, admit: bool = True) -> int:
        """One step boundary (waiting requests join unless `admit` is False) and one forward for every running
        request; returns how many are still running."""
        with self._lock:
            if admit:
                self._admit()
            else:
                self._running = [r for r in self._running if not r.future.cancelled()]
            running = list(self._running)
        if not running:
            return 0
        inputs = [r.model_input() for r in running]
        x, t, y = (torch.cat(parts) for parts in zip(*inputs))
        try:
            out = self.backend(x, t, y)
        except Exception as e:  # a failing backend fails the requests it was serving, not the engine
            with self._lock:
                for r in running:
                    if r in self._running:
                        self._running.remove(r)
                    if not r.future.cancelled():
                        r.future.set_exception(e)
            return len(self._running)
        self.steps_run += 1
        self.max_batch_seen = max(self.max_batch_seen, x.shape[0])
        bounds = list(itertools.accumulate(r.rows for r in running))
        finished = []
        for r, end in zip(running, bounds):
            if r.advance(out[end - r.rows:end]):
                finished.append(r)
        with self._lock:
            for r in finished:
                self._running.remove(r)
        for r in finished:
            self._finish(r)
        return len(self._running)

    def _finish(self, r: _Running) -> None:
        sampled = time.perf_counter()
        images = self.decoder(r.x).float()
        images = ((torch.where(torch.isfinite(images), images.clamp(-1, 1), images) + 1) / 2).cpu()
        done = time.perf_counter()
        timings = {"queued_s": r.started_at - r.queued_at, "sampling_s": sampled - r.started_at,
                   "decode_s": done - sampled, "total_s": done - r.queued_at}
        try:  # the future stays pending while it runs, so a client can cancel it until here
            r.future.set_result(ImageResult(images=images, steps=r.sampler.num_steps, timings=timings))
        except InvalidStateError:
            pass

    def run_until_idle(self, join: bool = True) -> None:
        """Steps until nothing waits or runs (without the thread). With `join` False, requests join only when
        the batch is empty: request-level batching, each group run to its end before the next is admitted."""
        while self.step(admit=join or not self._running) or self._waiting:
            pass

    def start(self) -> None:
        """Runs the batch on a daemon thread that sleeps while idle."""
        def loop():
            while True:
                with self._lock:
                    while not self._stop and not self._waiting and not self._running:
                        self._lock.wait()
                    if self._stop:
                        return
                self.step()

        self._thread = threading.Thread(target=loop, name="ditexport-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops the thread; requests not finished are cancelled."""
        with self._lock:
            self._stop = True
            for _, future, _ in self._waiting:
                future.cancel()
            for r in self._running:
                r.future.cancel()
            self._waiting.clear()
            self._running.clear()
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)


__all__ = ["BatchingEngine", "CancelledError", "ImageRequest", "ImageResult", "QueueFullError", "RequestError",
           "ServeLimits"]
