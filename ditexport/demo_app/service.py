"""One demo request, from its fields to images and timings, in plain objects tested without a browser."""
from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..backends.base import Backend
from ..class_names import class_label
from ..sampler import SAMPLING_METHODS, SamplerConfig
from ..errors import DitexportError
from ..pipeline import IdentityDecoder, Pipeline, SampleResult
from .limits import BUILTIN_KEY, DemoBusyError, DemoInputError, DemoLimits, NO_BLEND, SEED_MAX, check_limits
from .models import builtin_entry, export_entries, ModelEntry, parse_backend_choice


#################################################################################
#                                   Generation                                  #
#################################################################################

@dataclass
class GenerateRequest:
    """One press of Generate; `blend_class` NO_BLEND means plain class sampling."""
    model: str = BUILTIN_KEY
    backend: str = "torch (fp32)"
    class_index: int = 0
    num_images: int = 8
    guidance: float = 4.0
    sampler: str = "dpmpp-2m"
    steps: int = 10
    seed: int = 0
    blend_class: int = NO_BLEND
    blend_weight: float = 0.5


@dataclass
class GenerateResponse:
    """Images as (H, W, 3) uint8 arrays for the gallery, their captions, the run's result and a summary."""
    images: list[np.ndarray]
    captions: list[str]
    result: SampleResult
    summary: str


class DemoService:
    """The demo's state: models, backends created on first use, and a concurrency limit per runtime."""

    def __init__(self, models: list[ModelEntry], limits: DemoLimits | None = None, device: str = "cpu",
                 display_size: int = 128, decoder=None):
        if not models:
            raise DitexportError("the demo has no model to serve")
        self.models = {m.key: m for m in models}
        self.limits = limits or DemoLimits()
        self.device = torch.device(device)
        self.display_size = display_size
        self.decoder = decoder
        self._decoders: dict[tuple[str, str], object] = {}
        self._backends: dict[tuple[str, str], Backend] = {}
        self._backend_lock = threading.Lock()
        # Requests for one runtime wait for each other; requests for different runtimes do not.
        self._slots = {runtime: threading.BoundedSemaphore(self.limits.concurrency)
                       for runtime in ("torch", "onnxruntime", "tensorrt")}
        self._admitted = threading.BoundedSemaphore(self.limits.max_queue)  # running or waiting, all runtimes

    def widest_hidden_size(self) -> int:
        """The largest hidden size served: it decides the default CPU threads (ditexport.threads)."""
        return max(m.config.hidden_size for m in self.models.values())

    # -- what the menus offer --------------------------------------------------------------------

    def model_keys(self) -> list[str]:
        return list(self.models)

    def entry(self, key: str) -> ModelEntry:
        if key not in self.models:
            raise DemoInputError(f"unknown model {key!r}; this server has: {', '.join(self.models)}")
        return self.models[key]

    def class_choices(self, key: str) -> list[tuple[str, int]]:
        names = self.entry(key).class_names
        return [(class_label(i, n), i) for i, n in enumerate(names)]

    # -- backends --------------------------------------------------------------------------------

    def backend(self, key: str, choice: str) -> Backend:
        """The backend for a model and a menu choice, created once and kept."""
        entry = self.entry(key)
        if choice not in entry.backend_choices():
            raise DemoInputError(f"backend {choice!r} cannot run {key} here; available: "
                                 f"{', '.join(entry.backend_choices()) or 'none'}")
        with self._backend_lock:
            if (key, choice) not in self._backends:
                self._backends[(key, choice)] = self._make_backend(entry, choice)
            return self._backends[(key, choice)]

    def decoder_for(self, key: str, choice: str):
        """The decoder of a model on a menu choice: an export's VAE decoder graph on the same runtime, where the
        export was built with --vae; else the demo's own (--vae in diffusers, or none), created once and kept."""
        from ..backends.open import open_decoder

        entry = self.entry(key)
        runtime, precision = parse_backend_choice(choice)
        with self._backend_lock:
            if (key, choice) not in self._decoders:
                own = None
                if entry.export_dir is not None and runtime != "torch":
                    own = open_decoder("auto", entry.export_dir, runtime, precision, device=self.device)
                self._decoders[(key, choice)] = own or self.decoder
            return self._decoders[(key, choice)]

    def _make_backend(self, entry: ModelEntry, choice: str) -> Backend:
        from ..backends.open import open_backend

        runtime, precision = parse_backend_choice(choice)
        if runtime == "torch":
            return open_backend("torch", model=entry.torch_model, device=self.device)
        # The export's files are checked against its manifest, under its read lock, before they are opened.
        return open_backend(runtime, precision, config=entry.config, export_dir=entry.export_dir,
                            threads=torch.get_num_threads() if runtime == "onnxruntime" else None)  # torch's CPU budget

    def close(self) -> None:
        """Releases every backend and export decoder this demo opened."""
        with self._backend_lock:
            for backend in self._backends.values():
                backend.close()
            for decoder in self._decoders.values():
                if decoder is not self.decoder:
                    getattr(decoder, "close", lambda: None)()
            self._backends.clear()
            self._decoders.clear()

    # -- one request -----------------------------------------------------------------------------

    def check(self, request: GenerateRequest) -> ModelEntry:
        """Validates a request against the limits and the model; returns the model's entry."""
        r = request
        check_limits(self.limits, r.steps, r.num_images, r.guidance, r.seed, r.blend_weight)
        entry = self.entry(r.model)
        if r.sampler not in SAMPLING_METHODS:
            raise DemoInputError(f"sampler must be one of {', '.join(SAMPLING_METHODS)}, got {r.sampler!r}")
        n = entry.config.num_classes
        if not 0 <= r.class_index < n:
            raise DemoInputError(f"class must be in 0..{n - 1} for {r.model}, got {r.class_index}")
        if r.blend_class != NO_BLEND and not 0 <= r.blend_class < n:
            raise DemoInputError(f"the class to blend with must be in 0..{n - 1}, got {r.blend_class}")
        runtime, precision = parse_backend_choice(r.backend)
        if r.blend_class != NO_BLEND and runtime == "onnxruntime" and precision not in entry.cond_paths:
            raise DemoInputError(f"blending on onnxruntime needs the conditioning-vector graph, and {r.model} "
                                 f"has no {precision} cond graph; re-export it, or blend on another backend")
        if r.blend_class != NO_BLEND and runtime == "tensorrt" and "cond" not in entry.engine_paths:
            raise DemoInputError(f"blending on tensorrt needs the conditioning-vector engine, and {r.model} has "
                                 "none built for this GPU; build it, or blend on another backend")
        if r.blend_class != NO_BLEND and entry.condition_embedder() is None:
            raise DemoInputError(f"blending needs the model's timestep and label embedders, and {r.model} has "
                                 "neither its checkpoint here nor embedder weights in its graph")
        if r.guidance != 1.0 and not entry.config.has_null_class:
            raise DemoInputError("this model was trained without class dropout, so it cannot be guided; "
                                 "set the guidance scale to 1")
        return entry

    def generate(self, request: GenerateRequest, progress: bool = True, on_wait=None) -> GenerateResponse:
        """Validates, waits for a slot on the runtime, samples, and returns displayable images; refuses at once
        (DemoBusyError) while `limits.max_queue` requests are running or waiting.

        `on_wait(message)` is called before waiting for a busy runtime (the UI shows it).
        """
        if not self._admitted.acquire(blocking=False):
            raise DemoBusyError(f"the demo is busy: {self.limits.max_queue} requests are already running or "
                                "waiting; try again in a few seconds")
        try:
            return self._generate(request, progress, on_wait)
        finally:
            self._admitted.release()

    def _generate(self, request: GenerateRequest, progress: bool, on_wait) -> GenerateResponse:
        r = request
        entry = self.check(r)
        backend = self.backend(r.model, r.backend)
        runtime, _ = parse_backend_choice(r.backend)
        sampler_cfg = SamplerConfig(num_steps=int(r.steps), method=r.sampler, guidance_scale=float(r.guidance))
        runner: Backend = backend
        if r.blend_class != NO_BLEND:
            from ..blend import BlendedConditionBackend

            runner = BlendedConditionBackend(backend, entry.condition_embedder(), int(r.blend_class),
                                             float(r.blend_weight))
        slot = self._slots[runtime]
        if not slot.acquire(blocking=False):
            if on_wait is not None:
                on_wait(f"waiting for the {runtime} backend (busy with another request)")
            slot.acquire()
        try:
            pipeline = Pipeline(runner, self.decoder_for(r.model, r.backend))
            result = pipeline.run([int(r.class_index)] * int(r.num_images), seed=int(r.seed), sampler_cfg=sampler_cfg,
                                  progress=progress)
        finally:
            slot.release()
        captions = [self._caption(entry, r, i) for i in range(len(result.labels))]
        return GenerateResponse(images=self.displayable(result.images), captions=captions, result=result,
                                summary=self._summary(entry, r, result))

    def warm_up(self, key: str | None = None) -> float:
        """Runs two steps once, so the first user does not pay for lazy initialisation; returns seconds."""
        start = time.perf_counter()
        key = key or self.model_keys()[0]
        entry = self.entry(key)
        choice = entry.backend_choices()[0]
        self.generate(GenerateRequest(model=key, backend=choice, num_images=2, steps=2,
                                      guidance=4.0 if entry.config.has_null_class else 1.0), progress=False)
        return time.perf_counter() - start

    # -- presentation ----------------------------------------------------------------------------

    def displayable(self, images: torch.Tensor) -> list[np.ndarray]:
        """(N, C, H, W) in [0, 1] -> N RGB uint8 arrays enlarged to the demo's display size."""
        return displayable(images, self.display_size)

    @staticmethod
    def _caption(entry: ModelEntry, r: GenerateRequest, i: int) -> str:
        name = entry.class_names[r.class_index]
        if r.blend_class != NO_BLEND:
            name = f"{name} ↔ {entry.class_names[r.blend_class]} @ {r.blend_weight:.2f}"
        return f"{name} · #{i + 1}"

    @staticmethod
    def _summary(entry: ModelEntry, r: GenerateRequest, result: SampleResult) -> str:
        what = entry.class_names[r.class_index]
        if r.blend_class != NO_BLEND:
            what = f"{what} ↔ {entry.class_names[r.blend_class]} (blend {r.blend_weight:.2f})"
        batch = len(result.labels) * (2 if r.guidance != 1.0 else 1)
        lines = [
            f"**{result.backend}** ({result.precision}) · {len(result.labels)} samples of {what} · "
            f"{result.steps} {r.sampler.upper()} steps · guidance {r.guidance:g} · seed {r.seed}",
            f"**{result.step_ms:.2f} ms per step** (batch {batch} per forward) · "
            f"**{result.total_s:.2f} s in all** (sampling {result.sampler_s:.2f} s, decoding {result.decode_s:.2f} s)",
            f"model: {entry.key}, {entry.source}",
        ]
        if entry.note:
            lines.append(f"**Note:** {entry.note}")
        return "  \n".join(lines)


def random_seed() -> int:
    return random.randint(0, SEED_MAX)


def create_service(exports_root: str | Path = "exports", device: str = "cpu", limits: DemoLimits | None = None,
                   vae: str | None = None) -> DemoService:
    """The built-in model plus every export under `exports_root`."""
    models = [builtin_entry()] + export_entries(exports_root)
    decoder = None
    if vae is not None:
        from ..backends.decoders import VaeDecoder

        decoder = VaeDecoder(vae, device=device)
    return DemoService(models, limits, device=device, decoder=decoder or IdentityDecoder())


def displayable(images: torch.Tensor, display_size: int) -> list[np.ndarray]:
    """(N, C, H, W) in [0, 1] -> N RGB uint8 arrays, small images enlarged (nearest) to be seen."""
    from ..images import to_uint8

    arr = to_uint8(images[:, :3])  # latent models without a VAE: the first 3 latent channels
    if arr.shape[-1] == 1:
        arr = arr.repeat(3, axis=-1)
    elif arr.shape[-1] == 2:
        arr = np.concatenate([arr, arr[..., :1]], axis=-1)
    scale = max(1, display_size // arr.shape[1])
    if scale > 1:
        arr = arr.repeat(scale, axis=1).repeat(scale, axis=2)
    return [np.ascontiguousarray(a) for a in arr]
