"""The ONNX Runtime backend: an exported graph on the CPU provider, or the CUDA provider with I/O binding."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import DitexportError
from ..logs import get_logger
from ..model import DiTConfig
from .base import Backend

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

    ONNX Runtime up to 1.30 refuses FP8 Q/DQ graphs with float inputs above the basic optimisation level (a
    fusion matches FP8 nodes it cannot run, microsoft/onnxruntime#22269); such a graph is loaded at "basic".
    """
    ort = _import_onnxruntime()
    path = Path(path)
    if not path.is_file():
        raise OnnxRuntimeError(f"ONNX graph not found: {path}")
    providers = exact_fp32_providers(providers or default_providers(), cuda_index())
    try:
        return ort.InferenceSession(str(path), session_options(threads, optimization), providers=providers)
    except Exception as e:  # ORT raises its own Fail/InvalidProtobuf/... types
        error = e
    if optimization not in ("basic", "disable") and has_fp8(path):
        try:
            session = ort.InferenceSession(str(path), session_options(threads, "basic"), providers=providers)
        except Exception:
            pass
        else:
            LOG.info(f"onnxruntime {ort.__version__} refused the FP8 graph {path.name} at optimisation level "
                     f"{optimization!r}; loaded it at 'basic' (microsoft/onnxruntime#22269)")
            return session
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise OnnxRuntimeError(f"cannot load ONNX graph {path} (corrupt, truncated or incomplete?): "
                           f"{first_line}") from None


def graph_metadata(session) -> dict[str, str]:
    return dict(session.get_modelmeta().custom_metadata_map)


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
        providers = exact_fp32_providers(providers or default_providers(device), cuda_index(device))
        self.session = load_session(self.onnx_path, providers, threads, optimization)
        self.cond_session = load_session(cond_path, providers, threads, optimization) if cond_path else None
        self.providers = self.session.get_providers()
        if self.providers[0] == CUDA:
            index = int(self.session.get_provider_options()[CUDA].get("device_id", 0))
            device = torch.device("cuda", index)
        else:
            device = torch.device("cpu")
        super().__init__(config, device, torch.float32, max_batch)
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
        if self.device.type == "cuda":
            return self._run_bound(session, feed)
        arrays = {name: value.detach().cpu().numpy() for name, value in feed.items()}
        (out,) = session.run(["out"], arrays)
        return torch.from_numpy(out)

    def _run_bound(self, session: InferenceSession, feed: dict[str, torch.Tensor]) -> torch.Tensor:
        """CUDA provider: inputs and the output stay in torch-owned device memory (I/O binding)."""
        x = feed["x"]
        cfg = self.config
        out = torch.empty((x.shape[0], cfg.out_channels, cfg.input_size, cfg.input_size), dtype=torch.float32,
                          device=self.device)
        binding = session.io_binding()
        keep = []  # contiguous copies must outlive the run
        for name, value in feed.items():
            value = value.to(self.device).contiguous()
            keep.append(value)
            binding.bind_input(name, "cuda", self.device.index or 0,
                               np.int64 if value.dtype == torch.int64 else np.float32,
                               tuple(value.shape), value.data_ptr())
        binding.bind_output("out", "cuda", self.device.index or 0, np.float32, tuple(out.shape), out.data_ptr())
        # ORT runs on its own stream: the inputs written on torch's stream must be ready first.
        torch.cuda.current_stream(self.device).synchronize()
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return out

    def _forward(self, x, t, y):
        return self._run(self.session, {"x": x.float(), "t": t.long(), "y": y.long()})

    def _forward_with_condition(self, x, c):
        if self.cond_session is None:
            raise OnnxRuntimeError("this onnxruntime backend has no conditioning-vector graph; pass cond_path "
                                   "(cond.onnx of the export)")
        return self._run(self.cond_session, {"x": x.float(), "c": c.float()})

    def describe(self) -> str:
        provider = "CUDA, TF32 off" if self.device.type == "cuda" else "CPU"
        form = f" {self.form} form" if self.form else ""
        return f"{self.name} ({self.precision}{form}, {provider}, {self.onnx_path.name})"

    def close(self) -> None:
        # Drops the sessions and their memory; the backend cannot run afterwards.
        self.__dict__.pop("session", None)
        self.cond_session = None
