"""The Gradio demo: pick a model, a backend and a class (or a blend of two), sample, see images and timings.

Everything a request does lives in plain objects (`DemoLimits`, `ModelEntry`, `DemoService.generate`),
tested without a browser; `build_app` only lays Gradio components over them and `launch` serves them.
Gradio is imported inside `build_app` and `launch`, so the package imports without it.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .backends.base import Backend
from .class_names import class_label, class_names
from .sampler import SAMPLING_METHODS, SamplerConfig
from .errors import DitexportError
from .model import DIT_CONFIGS, DiT, DiTConfig
from .pipeline import IdentityDecoder, Pipeline, SampleResult

log = logging.getLogger(__name__)

BUILTIN_KEY = "digits (built-in)"
SEED_MAX = 2**31 - 1
NO_BLEND = -1  # the "blend with" menu's value for plain sampling


class DemoInputError(DitexportError):
    """A request outside the server's limits or naming something this server does not have."""


#################################################################################
#                                     Limits                                    #
#################################################################################

@dataclass(frozen=True)
class DemoLimits:
    """Server-side bounds on one request: anything outside gets a clear error instead of a long wait."""
    max_steps: int = 1000        # the diffusion has 1000 timesteps; more cannot be respaced
    max_images: int = 16         # one request must not hold a backend for long
    max_guidance: float = 20.0   # far beyond any useful scale (official: 4), still finite

    def check(self, steps: int, num_images: int, guidance: float, seed: int, blend_weight: float) -> None:
        """Raises one DemoInputError naming the first field out of range."""
        checks = [
            ("steps", steps, 1, self.max_steps),
            ("number of images", num_images, 1, self.max_images),
            ("guidance scale", guidance, 1.0, self.max_guidance),
            ("seed", seed, 0, SEED_MAX),
            ("blend", blend_weight, 0.0, 1.0),
        ]
        for name, value, low, high in checks:
            if value is None or not (low <= value <= high):
                raise DemoInputError(f"{name} must be between {low} and {high} on this server, got {value}")


#################################################################################
#                              Models and backends                              #
#################################################################################

@dataclass
class ModelEntry:
    """One model the demo offers: its config, where its weights are, and what can run it."""
    key: str                                   # what the model menu shows
    config: DiTConfig
    source: str                                # where the weights came from, shown after each run
    class_names: list[str]
    load_torch: Callable[[], DiT] | None = None  # the reference model, loaded on first use (XL is 2.7 GB)
    onnx_paths: dict[str, Path] = field(default_factory=dict)   # precision -> (t, y) graph
    cond_paths: dict[str, Path] = field(default_factory=dict)   # precision -> conditioning-vector graph
    engine_paths: dict[str, Path] = field(default_factory=dict)  # graph ("xty", "cond") -> plan for this GPU
    note: str = ""                             # a warning shown with the model (e.g. random weights)
    export_dir: Path | None = None             # the export the graphs belong to, checked before they are opened
    _embedder: object = field(default=None, repr=False)
    _torch_model: DiT | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def torch_model(self) -> DiT | None:
        """The reference model (for the torch backend and the blend embedders), or None where there is none."""
        with self._lock:
            if self._torch_model is None and self.load_torch is not None:
                self._torch_model = self.load_torch()
            return self._torch_model

    def condition_embedder(self):
        """c(t, y) for blending: from the reference model when it is loaded, else from the exported graph
        (five tensors, not the whole checkpoint), else from the reference model loaded now; None if none."""
        from .blend import TorchConditionEmbedder, embedders_from_onnx

        if self._embedder is None:
            module = self._torch_model
            for path in ([] if module is not None else self.onnx_paths.values()):
                with self.verified([path]):
                    module = embedders_from_onnx(path, self.config)
                if module is not None:
                    break
            if module is None:
                module = self.torch_model
            self._embedder = TorchConditionEmbedder(module) if module is not None else False
        return self._embedder or None

    @contextmanager
    def verified(self, paths: list[Path]):
        """Checks export files against the manifest (under the export's read lock) before the block opens them;
        an export that no longer matches is refused with its rebuild command."""
        if self.export_dir is None:
            yield
            return
        from .locking import read_lock
        from .verification import verify_export

        with read_lock(self.export_dir, log=log.info):
            verify_export(self.export_dir, [p for p in paths if p is not None])
            yield

    def backend_choices(self) -> list[str]:
        """The runtimes that can run this model here, as menu values "runtime (precision)"."""
        choices = []
        if self.load_torch is not None:
            choices.append("torch (fp32)")
        if self.onnx_paths and _onnxruntime_backend_class() is not None:
            choices += [f"onnxruntime ({p})" for p in ("fp32", "fp16") if p in self.onnx_paths]
        if "xty" in self.engine_paths and _tensorrt_available():
            choices.append("tensorrt (fp16)")
        return choices


def parse_backend_choice(choice: str) -> tuple[str, str]:
    """"onnxruntime (fp16)" -> ("onnxruntime", "fp16")."""
    runtime, _, rest = choice.partition(" (")
    return runtime, rest.rstrip(")") or "fp32"


def _onnxruntime_backend_class():
    """The onnxruntime backend class when onnxruntime is installed, else None (the menu leaves it out)."""
    try:
        import onnxruntime  # noqa: F401

        from .backends.onnxruntime_backend import OnnxRuntimeBackend
    except ImportError:
        return None
    return OnnxRuntimeBackend


def _tensorrt_available() -> bool:
    """Whether the engine module says TensorRT and a CUDA GPU are usable here (to run, not to build)."""
    from .engine import tensorrt_unavailable_reason

    return tensorrt_unavailable_reason(for_build=False) is None


def _engine_plans(export_dir: Path) -> dict[str, Path]:
    """This machine's TensorRT plans in an export, by graph; none where TensorRT or a GPU is missing."""
    if not _tensorrt_available():
        return {}
    from .engine import EngineError, find_plan

    plans = {}
    for graph, stem in (("xty", "model"), ("cond", "cond")):
        try:
            plans[graph] = find_plan(export_dir, stem)
        except EngineError:
            continue  # no plan for this GPU: the menu simply does not offer tensorrt
    return plans


def builtin_entry() -> ModelEntry:
    """The built-in digits model; with random weights (and a visible note) while its weights are missing."""
    from .checkpoint import load_model
    from .zoo import load_builtin

    try:
        model, source = load_builtin("digits"), "built-in digits weights"
        note = ""
    except DitexportError as e:
        model, source = load_model("DiT-digits", seed=0)
        note = f"Random weights: {e}"
        log.warning("demo: %s", note)
    return ModelEntry(key=BUILTIN_KEY, config=model.config, source=source,
                      class_names=class_names(model.config.num_classes, "digits"), load_torch=lambda: model,
                      note=note)


def export_entries(root: str | Path) -> list[ModelEntry]:
    """One entry per validated, complete export under `root`; others are skipped with one log line each."""
    from .artifacts import list_exports, manifest_flags, rebuild_command
    from .verification import verify_files

    root = Path(root)
    if not root.is_dir():
        return []
    entries = []
    for export in list_exports(root):
        rebuild = rebuild_command(export.path, manifest_flags(export.manifest))
        problems = [] if export.validated else [f"its validation failed (see {export.path / 'report.json'})"]
        # Sizes now (cheap); SHA-256 when a request first opens a graph.
        problems += verify_files(export.path, export.manifest.get("files", {}), check_hashes=False)
        if problems:
            log.warning("demo: not offering %s: %s; rebuild it with: %s", export.path, "; ".join(problems), rebuild)
            continue
        try:
            entries.append(_export_entry(export.path, export.manifest))
        except (DitexportError, KeyError, TypeError, ValueError) as e:
            log.warning("demo: skipping export %s: %s", export.path, e)
    return entries


def _export_entry(export_dir: Path, manifest: dict) -> ModelEntry:
    config = DiTConfig.from_dict(manifest["config"])
    files = manifest.get("files", {})
    onnx_paths = {p: export_dir / f for p, f in (("fp32", "model.onnx"), ("fp16", "model.fp16.onnx")) if f in files}
    cond_paths = {p: export_dir / f for p, f in (("fp32", "cond.onnx"), ("fp16", "cond.fp16.onnx")) if f in files}
    load_torch, source, note = _export_torch_loader(manifest)
    name = manifest.get("model_name") or manifest.get("model") or ""
    if config == DIT_CONFIGS["DiT-digits"]:  # that config exists only for the digits model
        name = "digits"
    return ModelEntry(key=f"exports/{export_dir.name}", config=config, source=f"{source}, exported to {export_dir}",
                      class_names=class_names(config.num_classes, name if isinstance(name, str) else None),
                      load_torch=load_torch, onnx_paths=onnx_paths, cond_paths=cond_paths,
                      engine_paths=_engine_plans(export_dir), note=note, export_dir=export_dir)


def _export_torch_loader(manifest: dict) -> tuple[Callable[[], DiT] | None, str, str]:
    """A loader of the reference model an export came from, where its weights are still here; a description
    of the weights; and a note when there is no torch model (the graphs still run)."""
    from .build import load_reference

    source = manifest.get("source") or {}
    kind = source.get("kind")
    checkpoint = (source.get("checkpoint") or {}).get("path")
    if kind == "builtin":
        described = f"built-in {source.get('model')} weights"
    elif kind == "random":
        described = f"{source.get('model')} with random weights (seed {source.get('seed')})"
    else:
        described = f"checkpoint {checkpoint}" if checkpoint else "unrecorded weights"
    if kind in ("builtin", "random") or (checkpoint and Path(checkpoint).is_file()):
        # load_reference refuses weights whose SHA-256 changed since the export, with the rebuild command.
        return (lambda: load_reference(manifest)), described, ""
    return None, described, "the weights this export came from are not on this machine: no torch backend"


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
                 concurrency: int = 1, display_size: int = 128, decoder=None):
        if not models:
            raise DitexportError("the demo has no model to serve")
        self.models = {m.key: m for m in models}
        self.limits = limits or DemoLimits()
        self.device = torch.device(device)
        self.display_size = display_size
        self.decoder = decoder
        self._backends: dict[tuple[str, str], Backend] = {}
        self._backend_lock = threading.Lock()
        # Requests for one runtime wait for each other; requests for different runtimes do not.
        self._slots = {runtime: threading.BoundedSemaphore(concurrency)
                       for runtime in ("torch", "onnxruntime", "tensorrt")}

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

    def _make_backend(self, entry: ModelEntry, choice: str) -> Backend:
        from .backends import TorchBackend

        runtime, precision = parse_backend_choice(choice)
        if runtime == "torch":
            return TorchBackend(entry.torch_model, device=self.device)
        if runtime == "onnxruntime":
            backend_cls = _onnxruntime_backend_class()
            graph, cond = entry.onnx_paths[precision], entry.cond_paths.get(precision)
            with entry.verified([graph, cond]):
                return backend_cls(graph, entry.config, cond_path=cond,
                                   threads=torch.get_num_threads())  # the same CPU budget as torch
        from .backends.tensorrt_backend import TensorRTBackend  # offered only where TensorRT is usable

        with entry.verified([]):  # the plans are checked against their metadata's SHA-256 as they load
            return TensorRTBackend(entry.engine_paths["xty"], entry.config,
                                   cond_plan_path=entry.engine_paths.get("cond"))

    def close(self) -> None:
        with self._backend_lock:
            for backend in self._backends.values():
                backend.close()
            self._backends.clear()

    # -- one request -----------------------------------------------------------------------------

    def check(self, request: GenerateRequest) -> ModelEntry:
        """Validates a request against the limits and the model; returns the model's entry."""
        r = request
        self.limits.check(r.steps, r.num_images, r.guidance, r.seed, r.blend_weight)
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
        """Validates, waits for a slot on the runtime, samples, and returns displayable images.

        `on_wait(message)` is called before waiting for a busy runtime (the UI shows it).
        """
        r = request
        entry = self.check(r)
        backend = self.backend(r.model, r.backend)
        runtime, _ = parse_backend_choice(r.backend)
        sampler_cfg = SamplerConfig(num_steps=int(r.steps), method=r.sampler, guidance_scale=float(r.guidance))
        runner: Backend = backend
        if r.blend_class != NO_BLEND:
            from .blend import BlendedConditionBackend

            runner = BlendedConditionBackend(backend, entry.condition_embedder(), int(r.blend_class),
                                             float(r.blend_weight))
        slot = self._slots[runtime]
        if not slot.acquire(blocking=False):
            if on_wait is not None:
                on_wait(f"waiting for the {runtime} backend (busy with another request)")
            slot.acquire()
        try:
            result = Pipeline(runner, self.decoder)([int(r.class_index)] * int(r.num_images), seed=int(r.seed),
                                                    sampler_cfg=sampler_cfg, progress=progress)
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
        """(N, C, H, W) in [0, 1] -> N RGB uint8 arrays, small images enlarged (nearest) to be seen."""
        from .images import to_uint8

        arr = to_uint8(images[:, :3])  # latent models without a VAE: the first 3 latent channels
        if arr.shape[-1] == 1:
            arr = arr.repeat(3, axis=-1)
        elif arr.shape[-1] == 2:
            arr = np.concatenate([arr, arr[..., :1]], axis=-1)
        scale = max(1, self.display_size // arr.shape[1])
        if scale > 1:
            arr = arr.repeat(scale, axis=1).repeat(scale, axis=2)
        return [np.ascontiguousarray(a) for a in arr]

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


class RemoteService:
    """`demo --server URL`: DemoService's `generate(request)`, sampled by a running `python -m ditexport serve`."""

    def __init__(self, url: str, display_size: int = 128):
        from .serving.client import ImageClient

        self.client = ImageClient(url)
        self.display_size = display_size
        self.model = self.client.models()["models"][0]

    def generate(self, request: GenerateRequest, progress: bool = True, on_wait=None) -> GenerateResponse:
        r, start = request, time.perf_counter()
        labels = [int(r.class_index)] * int(r.num_images)
        pixels, answer = self.client.images(labels, steps=int(r.steps), sampler=r.sampler,
                                            guidance_scale=float(r.guidance), seed=int(r.seed))
        # uint8 -> [0, 1] floats that to_uint8 maps back to the same bytes.
        images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).double().div(255).float()
        total = time.perf_counter() - start
        result = SampleResult(images=images, labels=labels, seed=int(r.seed),
                              backend=f"remote {self.model['backend']}", precision=self.model["precision"],
                              steps=answer["steps"], total_s=total, sampler_s=answer["timings"]["sampling_s"],
                              decode_s=answer["timings"]["decode_s"], timings=answer["timings"])
        names = self.model["class_names"]
        captions = [names[r.class_index] if r.class_index < len(names) else str(r.class_index)] * len(labels)
        shown = DemoService.displayable(self, images)  # type: ignore[arg-type]  # it reads display_size only
        return GenerateResponse(images=shown, captions=captions, result=result,
                                summary=f"{len(labels)} images from {self.client.url} in {total:.2f} s")


def create_service(exports_root: str | Path = "exports", device: str = "cpu", limits: DemoLimits | None = None,
                   concurrency: int = 1, vae: str | None = None) -> DemoService:
    """The built-in model plus every export under `exports_root`."""
    models = [builtin_entry()] + export_entries(exports_root)
    decoder = None
    if vae is not None:
        from .pipeline import VaeDecoder

        decoder = VaeDecoder(vae, device=device)
    return DemoService(models, limits, device=device, concurrency=concurrency, decoder=decoder or IdentityDecoder())


#################################################################################
#                                   Gradio UI                                   #
#################################################################################

def _import_gradio():
    try:
        import gradio as gr
    except ImportError:
        raise DitexportError("the demo needs gradio 6: pip install 'ditexport[demo]'") from None
    return gr


def build_app(service: DemoService):
    """The Gradio Blocks app over `service`; its generate event is the API endpoint "/generate"."""
    gr = _import_gradio()

    first = service.model_keys()[0]
    entry = service.entry(first)
    limits = service.limits

    def model_changed(key):
        e = service.entry(key)
        classes = service.class_choices(key)
        backends = e.backend_choices()
        blend = [("no blend", NO_BLEND)] + classes
        return (gr.Dropdown(choices=backends, value=backends[0] if backends else None),
                gr.Dropdown(choices=classes, value=0), gr.Dropdown(choices=blend, value=NO_BLEND),
                gr.Markdown(f"**Note:** {e.note}" if e.note else "", visible=bool(e.note)))

    def run(model, backend, class_index, blend_class, blend_weight, num_images, guidance, sampler, steps, seed,
            progress=gr.Progress(track_tqdm=True)):
        try:
            request = GenerateRequest(
                model=model, backend=backend, class_index=_as_int(class_index, "class"),
                num_images=_as_int(num_images, "number of images"), guidance=_as_float(guidance, "guidance scale"),
                sampler=sampler, steps=_as_int(steps, "steps"), seed=_as_int(seed, "seed"),
                blend_class=_as_int(blend_class, "blend class"), blend_weight=_as_float(blend_weight, "blend"))
            response = service.generate(request, on_wait=lambda msg: progress(0, desc=msg))
        except (DitexportError, ValueError) as e:
            # A rejected request is the user's to fix, not a server fault: no traceback in the server log.
            raise gr.Error(str(e), print_exception=False) from None
        return list(zip(response.images, response.captions)), response.summary

    with gr.Blocks(title="ditexport · DiT demo", analytics_enabled=False) as app:
        gr.Markdown("## ditexport · class-conditional DiT\nSample a class, or blend two classes' "
                    "conditioning vectors, on any runtime this machine has.")
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                model = gr.Dropdown(service.model_keys(), value=first, label="Model / export")
                note = gr.Markdown(f"**Note:** {entry.note}" if entry.note else "", visible=bool(entry.note))
                backend = gr.Dropdown(entry.backend_choices(), value=entry.backend_choices()[0], label="Backend")
                class_index = gr.Dropdown(service.class_choices(first), value=0, label="Class")
                with gr.Row():
                    blend_class = gr.Dropdown([("no blend", NO_BLEND)] + service.class_choices(first),
                                              value=NO_BLEND, label="Blend with")
                    blend_weight = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Blend (0 = class, 1 = blend)")
                with gr.Row():
                    sampler = gr.Radio(list(SAMPLING_METHODS), value=GenerateRequest.sampler, label="Sampler")
                    steps = gr.Number(GenerateRequest.steps, label=f"Steps (1-{limits.max_steps})")
                with gr.Row():
                    guidance = gr.Slider(1.0, limits.max_guidance, value=4.0, step=0.25, label="Guidance scale")
                    num_images = gr.Number(8, label=f"Images (1-{limits.max_images})")
                with gr.Row():
                    seed = gr.Number(0, label="Seed")
                    randomize = gr.Button("Random seed", size="sm")
                generate = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                gallery = gr.Gallery(label="Samples", columns=4, height="auto", format="png", elem_id="gallery")
                summary = gr.Markdown(elem_id="summary")

        model.change(model_changed, inputs=model, outputs=[backend, class_index, blend_class, note], queue=False)
        randomize.click(random_seed, outputs=seed, queue=False, api_visibility="private")
        # Per-runtime limits are enforced by the service; the queue itself lets requests through to them.
        # preprocess=False: values reach `run` as sent, so the service (not the menus a page started with, nor
        # a rounding Number) judges every request, API calls included, and answers in one message.
        generate.click(run, inputs=[model, backend, class_index, blend_class, blend_weight, num_images, guidance,
                                    sampler, steps, seed], outputs=[gallery, summary], api_name="generate",
                       concurrency_limit=None, preprocess=False)
    app.queue(max_size=32)
    return app


def _as_float(value, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DemoInputError(f"{name} must be a number, got {value!r}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise DemoInputError(f"{name} must be a finite number, got {value!r}")
    return number


def _as_int(value, name: str) -> int:
    """Numbers arrive from the API as floats or strings; fractional values are an error, not rounded."""
    number = _as_float(value, name)
    if number != int(number):
        raise DemoInputError(f"{name} must be a whole number, got {value!r}")
    return int(number)


def launch(host: str = "127.0.0.1", port: int | None = None, share: bool = False, exports_root: str = "exports",
           device: str = "cpu", limits: DemoLimits | None = None, concurrency: int = 1, vae: str | None = None,
           torch_threads: int | None = None, warm_up: bool = True, block: bool = True):
    """Builds the service and the app and serves it; returns the app (with `block=False`, still serving)."""
    started = time.perf_counter()
    _import_gradio()
    service = create_service(exports_root, device, limits, concurrency, vae)
    from .threads import describe_threads, resolve_threads

    print(f"demo: {describe_threads(*resolve_threads(torch_threads, service.widest_hidden_size()))}", flush=True)
    if warm_up:
        service.warm_up()
    app = build_app(service)
    app.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True, ssr_mode=False,
               show_error=True, footer_links=["api"], quiet=True)
    print(f"demo: serving {', '.join(service.model_keys())} at {app.local_url} "
          f"(ready {time.perf_counter() - started:.1f} s after launch; Ctrl+C stops it)", flush=True)
    if share and getattr(app, "share_url", None):
        print(f"demo: public share link {app.share_url}", flush=True)
    if block:
        try:
            app.block_thread()
        finally:
            service.close()
    return app
