"""The ONNX Runtime backend: an exported graph on the CPU provider, or the CUDA provider with I/O binding."""
from __future__ import annotations

import contextlib
import functools
import io
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import DitexportError, one_line, summary
from ..logs import get_logger
from ..model import DiTConfig
from .base import Backend
from .cuda_graphs import run_ordered

LOG = get_logger("onnxruntime")

if TYPE_CHECKING:  # onnxruntime ships no stubs; its Python wrapper classes type-check the I/O-binding calls
    from onnxruntime import InferenceSession

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

# Measured in docs/export.md: "basic", "extended" and "all" are within 1 % on DiT graphs, so the most complete
# level is kept; ORT's transformer optimizer fuses only GELU here and did not help, so it is not used.
GRAPH_OPTIMIZATION = "all"


class OnnxRuntimeError(DitexportError):
    """An ONNX graph that ONNX Runtime cannot load or run (missing, corrupt, truncated, wrong model)."""


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise OnnxRuntimeError("the onnxruntime backend needs ONNX Runtime: pip install onnxruntime "
                               "(or onnxruntime-gpu on a CUDA machine)") from None
    return onnxruntime


def cuda_provider_options(device_index: int) -> dict[str, str]:
    """The CUDA provider's options: the device, and TF32 off.

    ORT runs fp32 MatMul/Conv in TF32 by default (`use_tf32` 1), which rounds their inputs to 10 mantissa
    bits: about 1e-3 relative error, far outside the fp32 contract (1e-5). With TF32 off, fp32 graphs compute
    in fp32, and the fp16 graph's fp32 parts (norms, modulation) stay fp32 as its precision policy says.
    """
    return {"device_id": str(device_index), "use_tf32": "0"}


def exact_fp32_providers(providers: list, device_index: int = 0) -> list:
    """`providers` with TF32 off in the CUDA provider's options (see above), a bare name given them all."""
    result = []
    for p in providers:
        if p == CUDA:
            p = (CUDA, cuda_provider_options(device_index))
        elif not isinstance(p, str) and p[0] == CUDA:
            p = (CUDA, {**dict(p[1]), "use_tf32": "0"})
        result.append(p)
    return result


def cuda_index(device: torch.device | None = None) -> int:
    """The GPU index of `device`, torch's current GPU for None or a bare "cuda" (0 without CUDA)."""
    if device is not None and device.index is not None:
        return device.index
    return torch.cuda.current_device() if torch.cuda.is_available() else 0


def default_providers(device: torch.device | None = None) -> list:
    """CUDA on `device` (torch's current GPU when None; CPU as fallback) where onnxruntime-gpu and a GPU exist,
    otherwise CPU."""
    ort = _import_onnxruntime()
    if device is not None and device.type != "cuda":
        return [CPU]
    if CUDA in ort.get_available_providers() and torch.cuda.is_available():
        return [(CUDA, cuda_provider_options(cuda_index(device))), CPU]
    return [CPU]


def provider_names(providers: list) -> list[str]:
    """Provider names of a providers list whose entries may be (name, options) pairs."""
    return [p if isinstance(p, str) else p[0] for p in providers]


def session_options(threads: int | None = None, optimization: str = GRAPH_OPTIMIZATION):
    ort = _import_onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    # Unless told otherwise, the same CPU budget as torch, so one setting (ditexport.threads, --torch-threads)
    # governs both runtimes: ORT's own default, one thread per core, collapses on a busy machine as torch's does.
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.log_severity_level = 3  # errors only: ORT warns about every fp16 node it runs through a cast on the CPU
    return options


def has_fp8(path: str | Path) -> bool:
    """Whether a graph holds FP8 tensors (read without its weights)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # corrupt or truncated: not a graph to retry, its load error is the one to report
        return False
    fp8 = {onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E4M3FNUZ, onnx.TensorProto.FLOAT8E5M2,
           onnx.TensorProto.FLOAT8E5M2FNUZ}
    return any(t.data_type in fp8 for t in proto.graph.initializer)


def load_session(path: str | Path, providers: list | None = None, threads: int | None = None,
                 optimization: str = GRAPH_OPTIMIZATION):
    """An InferenceSession, or one OnnxRuntimeError naming the file for a missing, corrupt or truncated graph.

    When the CUDA provider is asked for (first in `providers`), the session runs on it or this raises one
    OnnxRuntimeError naming the cause: ONNX Runtime itself only logs a warning and falls back to the CPU.

    ONNX Runtime up to 1.30 refuses FP8 Q/DQ graphs with float inputs above the basic optimisation level (a
    fusion matches FP8 nodes it cannot run, microsoft/onnxruntime#22269); such a graph is loaded at "basic".
    """
    ort = _import_onnxruntime()
    path = Path(path)
    if not path.is_file():
        raise OnnxRuntimeError(f"ONNX graph not found: {path}")
    providers = exact_fp32_providers(providers or default_providers(), cuda_index())
    wants_cuda = provider_names(providers)[0] == CUDA
    preload = _preload_cuda_libraries() if wants_cuda else ""
    try:
        session = ort.InferenceSession(str(path), session_options(threads, optimization), providers=providers)
    except Exception as e:  # ORT raises its own Fail/InvalidProtobuf/... types
        session = _fp8_at_basic(path, threads, optimization, providers)
        if session is None:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if wants_cuda and any(word in first_line for word in ("CUDA", "cuda", "cuDNN", "cudnn")):
                raise OnnxRuntimeError(f"ONNX Runtime could not start its CUDA provider for {path.name}: "
                                       f"{first_line}; {cuda_provider_problem(preload)}") from None
            raise OnnxRuntimeError(f"cannot load ONNX graph {path} (corrupt, truncated or incomplete?): "
                                   f"{first_line}") from None
    ran_on = session.get_providers()[0]
    if wants_cuda and ran_on != CUDA:
        raise OnnxRuntimeError(f"ONNX Runtime {ort.__version__} was asked for its CUDA provider but fell back to "
                               f"{ran_on} for {path.name}: {cuda_provider_problem(preload)}")
    return session


def _fp8_at_basic(path: Path, threads, optimization: str, providers: list):
    """An FP8 graph that ONNX Runtime refused above the basic level, loaded at "basic" (None where that is not the
    case, or it fails there too)."""
    ort = _import_onnxruntime()
    if optimization in ("basic", "disable") or not has_fp8(path):
        return None
    try:
        session = ort.InferenceSession(str(path), session_options(threads, "basic"), providers=providers)
    except Exception:
        return None
    LOG.info(f"onnxruntime {ort.__version__} refused the FP8 graph {path.name} at optimisation level "
             f"{optimization!r}; loaded it at 'basic' (microsoft/onnxruntime#22269)")
    return session


def cuda_provider_library() -> Path:
    """Where onnxruntime-gpu keeps its CUDA provider, the library ONNX Runtime loads when a session asks for CUDA."""
    name = "onnxruntime_providers_cuda.dll" if sys.platform == "win32" else "libonnxruntime_providers_cuda.so"
    return Path(_import_onnxruntime().__file__).parent / "capi" / name


@functools.cache
def _preload_cuda_libraries() -> str:
    """`onnxruntime.preload_dlls()` (ORT >= 1.21) once per process: loads the CUDA and cuDNN libraries of the
    nvidia-* wheels, which the CUDA provider does not find on its own; returns what it printed (its failures)."""
    ort = _import_onnxruntime()
    if not hasattr(ort, "preload_dlls"):
        return ""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # the library never prints: its messages become part of ours
        try:
            ort.preload_dlls()
        except Exception as e:  # a broken install: what follows names the cause
            print(summary(e))
    return " ".join(printed.getvalue().split())


def cuda_provider_problem(preload_notes: str = "") -> str:
    """Why ONNX Runtime's CUDA provider is not running here, in one sentence that says what to install."""
    import ctypes

    ort = _import_onnxruntime()
    library = cuda_provider_library()
    if CUDA not in ort.get_available_providers():
        return (f"onnxruntime {ort.__version__} here has no CUDA provider (the CPU build): "
                "pip uninstall onnxruntime && pip install onnxruntime-gpu")
    if not library.is_file():
        return (f"its CUDA provider did not start ({library.name} is not in {library.parent} to name the missing "
                "library); most often CUDA or cuDNN is missing: pip install 'onnxruntime-gpu[cuda,cudnn]'")
    try:
        ctypes.CDLL(str(library))  # the loader names the first CUDA or cuDNN library it cannot find
    except OSError as e:
        notes = f" (onnxruntime.preload_dlls: {preload_notes})" if preload_notes else ""
        return (f"its CUDA provider library does not load: {one_line(e)}{notes}; install the CUDA and cuDNN "
                f"versions this onnxruntime-gpu needs (pip install 'onnxruntime-gpu[cuda,cudnn]') or put them on "
                "LD_LIBRARY_PATH")
    return (f"its CUDA provider library loads, so the GPU or its driver refused it (is a GPU visible, and the driver "
            f"new enough for onnxruntime {ort.__version__}'s CUDA?); onnxruntime.set_default_logger_severity(0) "
            "before the session shows ONNX Runtime's own reason")


def graph_metadata(session) -> dict[str, str]:
    return dict(session.get_modelmeta().custom_metadata_map)


def providers_with_stream(providers: list | None, device: torch.device | None) -> tuple[list, torch.cuda.Stream | None]:
    """The providers for `device` (TF32 off) and, where the CUDA provider leads and torch sees a GPU, the stream ORT
    is to compute on (`user_compute_stream`; not torch's default stream, which ORT reads as "none"), so that a call
    is ordered after the caller's work on the device, not by host waits."""
    providers = exact_fp32_providers(providers or default_providers(device), cuda_index(device))
    if provider_names(providers)[0] != CUDA or not torch.cuda.is_available():
        return providers, None
    options = dict(providers[0][1])
    stream = torch.cuda.Stream(torch.device("cuda", int(options.get("device_id", cuda_index(device)))))
    return [(CUDA, {**options, "user_compute_stream": str(stream.cuda_stream)}), *providers[1:]], stream


def session_device(session, stream: torch.cuda.Stream | None, path: Path) -> torch.device:
    """Where a session's inputs and outputs live: its CUDA device, or the CPU."""
    if session.get_providers()[0] != CUDA:
        return torch.device("cpu")
    if stream is None:
        raise OnnxRuntimeError(f"ONNX Runtime runs {path.name} on CUDA, but torch {torch.__version__} sees no CUDA "
                               "GPU, and this backend's tensors are torch's: install a CUDA build of torch, or pass "
                               "providers=['CPUExecutionProvider']")
    return torch.device("cuda", int(session.get_provider_options()[CUDA].get("device_id", 0)))


class OnnxRuntimeBackend(Backend):
    """Runs an exported DiT graph; `cond_path` adds the conditioning-vector graph for `with_condition`.

    Inputs and outputs are float32 torch tensors (t, y int64) on `self.device`: the CPU, or the GPU when the
    CUDA provider runs the graph, in which case tensors are bound in place (I/O binding), with no host copy.
    Safe to share between threads: ORT sessions run concurrent calls, and each call binds its own I/O.
    """

    name = "onnxruntime"

    def __init__(self, onnx_path: str | Path, config: DiTConfig, *, cond_path: str | Path | None = None,
                 providers: list | None = None, max_batch: int | None = None, threads: int | None = None,
                 optimization: str = GRAPH_OPTIMIZATION, device: torch.device | str | None = None):
        self.onnx_path = Path(onnx_path)
        device = torch.device(device) if device is not None else None
        providers, self.stream = providers_with_stream(providers, device)
        self.session = load_session(self.onnx_path, providers, threads, optimization)
        self.cond_session = load_session(cond_path, providers, threads, optimization) if cond_path else None
        self.providers = self.session.get_providers()
        super().__init__(config, session_device(self.session, self.stream, self.onnx_path), torch.float32, max_batch)
        meta = graph_metadata(self.session)
        self.precision = meta.get("ditexport.precision", "fp32")
        self.form = meta.get("ditexport.form", "")  # 8-bit graphs: "tensorrt" or "cpu"
        self._check_graph(self.session, ("x", "t", "y"), self.onnx_path)
        if self.cond_session is not None and cond_path is not None:
            self._check_graph(self.cond_session, ("x", "c"), Path(cond_path))

    def _check_graph(self, session, names: tuple[str, ...], path: Path) -> None:
        """Fails early, with the file named, when a graph's inputs or shapes do not fit the config."""
        inputs = {i.name: i for i in session.get_inputs()}
        if tuple(inputs) != names or [o.name for o in session.get_outputs()] != ["out"]:
            raise OnnxRuntimeError(f"{path} takes {tuple(inputs)} -> {[o.name for o in session.get_outputs()]}, "
                                   f"expected {names} -> ['out']; is it a ditexport graph of this kind?")
        cfg = self.config
        expected = [cfg.in_channels, cfg.input_size, cfg.input_size]
        if list(inputs["x"].shape[1:]) != expected:
            raise OnnxRuntimeError(f"{path} takes x of shape {inputs['x'].shape}, but the model config "
                                   f"needs (batch, {', '.join(map(str, expected))})")

    # ------------------------------------------------------------------------------------- running

    def _run(self, session: InferenceSession, feed: dict[str, torch.Tensor]) -> torch.Tensor:
        cfg = self.config
        shape = (feed["x"].shape[0], cfg.out_channels, cfg.input_size, cfg.input_size)
        return run_session(session, feed, "out", shape, self.device, self.stream)

    def _forward(self, x, t, y):
        return self._run(self.session, {"x": x.float(), "t": t.long(), "y": y.long()})

    def _forward_with_condition(self, x, c):
        if self.cond_session is None:
            raise OnnxRuntimeError("this onnxruntime backend has no conditioning-vector graph; pass cond_path "
                                   "(cond.onnx of the export)")
        return self._run(self.cond_session, {"x": x.float(), "c": c.float()})

    def describe(self) -> str:
        """The runtime, precision, provider and graph file, for banners."""
        provider = "CUDA, TF32 off" if self.device.type == "cuda" else "CPU"
        form = f" {self.form} form" if self.form else ""
        return f"{self.name} ({self.precision}{form}, {provider}, {self.onnx_path.name})"

    def close(self) -> None:
        """Drops the sessions and their memory; the backend cannot run afterwards."""
        self.__dict__.pop("session", None)
        self.cond_session = None


def run_session(session: InferenceSession, feed: dict[str, torch.Tensor], output: str, shape: tuple[int, ...],
                device: torch.device, stream: torch.cuda.Stream | None = None) -> torch.Tensor:
    """One float32 output of a session from torch inputs: through numpy on the CPU; on the CUDA provider with
    inputs and the output in torch-owned device memory (I/O binding), no host copy, ORT computing on `stream` (the
    session's `user_compute_stream`, see `cuda_session`), which waits for the caller's stream on the device
    (`run_ordered`)."""
    if device.type != "cuda":
        arrays = {name: value.detach().cpu().numpy() for name, value in feed.items()}
        (out,) = session.run([output], arrays)
        return torch.from_numpy(out)
    assert stream is not None  # every CUDA session is made with its stream (cuda_session)

    def bind_and_run() -> torch.Tensor:
        out = torch.empty(shape, dtype=torch.float32, device=device)
        binding = session.io_binding()
        keep = []  # contiguous copies must outlive the run
        for name, value in feed.items():
            value = value.to(device).contiguous()
            keep.append(value)
            binding.bind_input(name, "cuda", device.index or 0, np.int64 if value.dtype == torch.int64 else np.float32,
                               tuple(value.shape), value.data_ptr())
        binding.bind_output(output, "cuda", device.index or 0, np.float32, tuple(out.shape), out.data_ptr())
        # ORT enqueues on `stream`, after the copies above, and synchronises it before returning (its end-of-run
        # sync): one host wait per call, after which `out` is complete and `keep` may be freed.
        session.run_with_iobinding(binding)
        return out

    return run_ordered(stream, bind_and_run)
