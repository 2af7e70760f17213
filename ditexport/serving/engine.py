"""Step-level continuous batching: one backend, a running batch that requests join and leave between steps.

Each request keeps its own sampler, step index, coefficients, noise and DPM-Solver++ state; one forward per step
serves every running request (a guided one contributes its rows twice, `[x; x]` with `[y; null]`), and the
backend splits above its max batch as always. The update after the forward runs once per group of requests with
the same sampler settings, through `sampler.denoise_step` with each sample's own coefficients as (B, 1, 1, 1)
columns: elementwise, the arithmetic of a lone `Sampler.run`, so a request's images do not depend on what it was
batched with. No Ray in here.
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
from ..limits import RequestLimits
from ..pipeline import CHUNK_IMAGES, IdentityDecoder, check_request
from ..sampler import Sampler, SamplerConfig, denoise_step, guide
from .settings import ServiceLimits, drain_rate, retry_after_s

# The library's names of a setting at fault (UsageError.field) -> the HTTP request's field names.
API_FIELDS = {"labels": "class_labels", "num_images": "class_labels", "method": "sampler", "num_steps": "steps",
              "respacing": "steps"}
API_NAMES = {"num_images": "number of class labels"}  # the words a message uses, where not the field's name


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
        k = sampler.step_coefficients(device)
        self.timesteps = k.pop("t").tolist()
        self.names = tuple(k)
        self.table = torch.stack([k[name] for name in self.names], dim=1)  # (steps, coefficients), float32
        self.labels = torch.tensor(request.labels, dtype=torch.int64, device=device)
        self.images, self.guided, self.i = len(request.labels), sampler.guided, 0
        cfg = sampler.cfg
        self.settings = (cfg.method, cfg.eta, cfg.clip_denoised, sampler.guide_channels)

    @property
    def last(self) -> bool:
        return self.i == self.sampler.num_steps - 1

    def noise(self) -> torch.Tensor | None:
        """This step's noise; None where the step adds none (the final step, or a deterministic sampler)."""
        return None if (self.last or self.step_noise is None) else self.step_noise[self.i]

    def segment_key(self) -> tuple:
        """Requests with equal keys take this step in one `denoise_step` call: guided ones first (their
        unconditional rows then follow the conditional rows in the same order), then by sampler settings."""
        return (not self.guided, *self.settings, self.noise() is None)


def _columns(segment: list[_Running]) -> dict[str, torch.Tensor]:
    """Each sample's coefficients of its request's current step, as (B, 1, 1, 1) columns (0-d tensors for a
    request alone in its group, as `Sampler.run` takes them)."""
    if len(segment) == 1:
        row = segment[0].table[segment[0].i]
        return {name: row[j] for j, name in enumerate(segment[0].names)}
    rows = torch.stack([r.table[r.i] for r in segment])
    counts = [r.images for r in segment]
    if any(c != 1 for c in counts):
        rows = rows.repeat_interleave(torch.tensor(counts, device=rows.device), dim=0)
    return {name: rows[:, j].reshape(-1, 1, 1, 1) for j, name in enumerate(segment[0].names)}


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


class BatchingEngine:
    """Owns one backend; `submit` queues a request, `step` (or the `start`ed thread) runs the running batch."""

    def __init__(self, backend, *, max_queue: int = ServiceLimits.max_queue,
                 max_running_images: int = ServiceLimits.max_running_images, limits: RequestLimits | None = None,
                 decoder=None):
        self.backend, self.config = backend, backend.config
        self.decoder = decoder or IdentityDecoder()
        self.max_queue, self.max_running_images = max_queue, max_running_images
        self.limits = limits or RequestLimits()
        self._finished_at: deque[float] = deque(maxlen=1024)  # when requests finished, for the drain rate
        self._waiting: deque[tuple[ImageRequest, Future, float]] = deque()
        self._running: list[_Running] = []
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.steps_run = 0  # forwards so far (each serving every running request)
        self.rows_run = 0  # rows forwarded so far
        self.max_batch_seen = 0  # the most rows one step has forwarded
        self.forward_s = self.step_s = 0.0  # seconds in the backend's forwards, and in whole steps

    # -- admission ---------------------------------------------------------------------------------

    def check(self, request: ImageRequest) -> None:
        """Refuses a request before it is queued, naming the field at fault."""
        cfg = request.sampler_cfg
        try:
            # A batch above CHUNK_IMAGES would draw its noise per chunk, not from the seed itself.
            RequestLimits(self.limits.max_steps, min(self.limits.max_images, CHUNK_IMAGES), self.limits.max_guidance
                          ).check(len(request.labels), cfg.num_steps, cfg.guidance_scale, names=API_NAMES)
            check_request(self.config, request.labels, request.seed, cfg)
        except UsageError as e:
            raise RequestError(API_FIELDS.get(e.field or "", e.field or "body"), str(e)) from None

    def submit(self, request: ImageRequest) -> Future:
        """Queues a checked request; its Future gets an ImageResult. Cancel the Future to free its slot."""
        self.check(request)
        future: Future = Future()
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(self.retry_after_s())
            self._waiting.append((request, future, time.perf_counter()))
            self._lock.notify_all()
        return future

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    def drain_per_s(self) -> float | None:
        """Requests finished per second (settings.drain_rate)."""
        return drain_rate(self._finished_at, time.perf_counter())

    def retry_after_s(self) -> int:
        """Seconds until the queue a refused client saw has drained at the measured rate (Retry-After)."""
        return retry_after_s(len(self._waiting), self.drain_per_s())

    @property
    def running_images(self) -> int:
        return sum(len(r.request.labels) for r in self._running)

    def load_images(self) -> int:
        """Images waiting or running: what the autoscaler's target per replica is measured on."""
        with self._lock:
            return sum(len(request.labels) for request, _, _ in self._waiting) + self.running_images

    def stats(self) -> dict:
        """Counters since the start: steps, rows forwarded, seconds in forwards and in whole steps; the drain rate."""
        return {"queue_depth": self.queue_depth, "running_images": self.running_images, "steps_run": self.steps_run,
                "rows_run": self.rows_run, "forward_s": round(self.forward_s, 4), "step_s": round(self.step_s, 4),
                "drain_per_s": round(self.drain_per_s() or 0.0, 3)}

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
        began = time.perf_counter()
        running.sort(key=_Running.segment_key)
        segments = [list(group) for _, group in itertools.groupby(running, key=_Running.segment_key)]
        x, n, guided = _cat([r.x for r in running]), 0, 0
        for r in running:
            n += r.images
            guided += r.images if r.guided else 0
        device = x.device
        t = torch.tensor([r.timesteps[r.i] for r in running for _ in range(r.images)], dtype=torch.int64,
                         device=device)
        y = _cat([r.labels for r in running])
        null = torch.full((guided,), self.config.num_classes, dtype=torch.int64, device=device)
        forward_began = time.perf_counter()
        try:  # guided rows [x; x] with [y; null], as a lone guided forward: the unconditional rows follow
            out = self.backend(torch.cat([x, x[:guided]]), torch.cat([t, t[:guided]]), torch.cat([y, null]))
        except Exception as e:  # a failing backend fails the requests it was serving, not the engine
            with self._lock:
                for r in running:
                    if r in self._running:
                        self._running.remove(r)
                    if not r.future.cancelled():
                        r.future.set_exception(e)
            return len(self._running)
        self.forward_s += time.perf_counter() - forward_began
        self.steps_run += 1
        self.rows_run += n + guided
        self.max_batch_seen = max(self.max_batch_seen, n + guided)
        out = out.float()
        finished, start = [], 0
        for segment in segments:
            end = start + sum(r.images for r in segment)
            first = segment[0]
            seg_out = out[start:end]
            if first.guided:
                scale = first.request.sampler_cfg.guidance_scale if len(segment) == 1 else torch.tensor(
                    [r.request.sampler_cfg.guidance_scale for r in segment for _ in range(r.images)],
                    dtype=seg_out.dtype, device=device).reshape(-1, 1, 1, 1)
                seg_out = guide(seg_out, out[n + start:n + end], scale, first.sampler.guide_channels)
            noises = [z for r in segment if (z := r.noise()) is not None]  # all or none: it is in the key
            noise = _cat(noises) if noises else None
            x_next, x0 = denoise_step(first.sampler, _columns(segment), x[start:end], seg_out,
                                      _cat([r.x0_prev for r in segment]), noise)
            counts = [r.images for r in segment]
            for r, r_x, r_x0 in zip(segment, x_next.split(counts), x0.split(counts)):
                r.x, r.x0_prev = r_x, r_x0
                if r.last:
                    finished.append(r)
                r.i += 1
            start = end
        with self._lock:
            for r in finished:
                self._running.remove(r)
        for r in finished:
            self._finish(r)
        self.step_s += time.perf_counter() - began
        return len(self._running)

    def _finish(self, r: _Running) -> None:
        sampled = time.perf_counter()
        images = self.decoder(r.x).float()
        images = ((torch.where(torch.isfinite(images), images.clamp(-1, 1), images) + 1) / 2).cpu()
        done = time.perf_counter()
        timings = {"queued_s": r.started_at - r.queued_at, "sampling_s": sampled - r.started_at,
                   "decode_s": done - sampled, "total_s": done - r.queued_at}
        self._finished_at.append(done)
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


__all__ = ["BatchingEngine", "CancelledError", "ImageRequest", "ImageResult", "QueueFullError", "RequestError"]
