"""The torch backend: the reference model, eager, in fp32 or fp16; on CUDA also graphed or compiled."""
from __future__ import annotations

import threading

import torch

from ..errors import UsageError
from ..model import DiT
from .base import Backend, device_scope
from .cuda_graphs import GraphCache, fresh_float32, run_ordered

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class TorchBackend(Backend):
    """Runs the reference DiT in PyTorch, in fp32 or fp16 (fp16 on the CPU is slow but correct).

    On CUDA, `cuda_graph=True` captures the whole forward (input cast, model, output cast) once per batch
    size and replays it; `compile_mode` runs `torch.compile(model, mode=...)` instead (opt-in: compiling
    takes tens of seconds per batch size). Attention is `scaled_dot_product_attention` in every mode.
    Safe to share between threads: eager calls run side by side, graph and compiled calls one at a time.
    """

    name = "torch"

    def __init__(self, model: DiT, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 max_batch: int | None = None, *, cuda_graph: bool = False, compile_mode: str | None = None):
        device = torch.device(device)
        if cuda_graph and device.type != "cuda":
            raise UsageError("CUDA graphs need a CUDA device; use the eager torch backend on the CPU")
        if cuda_graph and compile_mode:
            raise UsageError("choose CUDA graphs or torch.compile, not both ('reduce-overhead' compiles into "
                             "CUDA graphs itself)")
        if compile_mode is not None and compile_mode not in COMPILE_MODES:
            raise UsageError(f"unknown torch.compile mode {compile_mode!r}; choose one of: {', '.join(COMPILE_MODES)}")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        super().__init__(model.config, device, dtype, max_batch)
        self.precision = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
        self.mode = "cuda-graph" if cuda_graph else (f"compile:{compile_mode}" if compile_mode else "eager")
        # Graph replays and compiled CUDA graphs overwrite shared static buffers: one call at a time.
        self._lock = threading.Lock()
        self._graphs = GraphCache() if cuda_graph else None
        self._compiled = None
        with device_scope(device):
            self.model = model.to(device=device, dtype=dtype).eval()
            self._stream = torch.cuda.Stream(device) if cuda_graph else None
        if compile_mode:
            from torch import _dynamo

            # One static graph per batch size, as on the CUDA-graph path: the sampler's batch never changes
            # within a run, and static shapes give inductor its best kernels. The recompiles per batch size
            # (1, 2, 8, 32, 64 in `bench`) must not hit dynamo's default recompile limit of 8.
            _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, 64)
            self._compiled = torch.compile(self.model, mode=compile_mode, dynamic=False, fullgraph=True)

    # The (t, y) graph and the conditioning-vector graph, each with float32 in and out.
    def _model_xty(self, x, t, y):
        return self.model(x.to(self.dtype), t, y).float()

    def _model_cond(self, x, c):
        return self.model.forward_with_condition(x.to(self.dtype), c.to(self.dtype)).float()

    @torch.no_grad()
    def _forward(self, x, t, y):
        if self._graphs is not None:
            return self._replay("xty", self._model_xty, x, t, y)
        if self._compiled is not None:
            return self._run_compiled(self._compiled, x.to(self.dtype), t, y)
        with device_scope(self.device):
            return self._model_xty(x, t, y)

    @torch.no_grad()
    def _forward_with_condition(self, x, c):
        if self._graphs is not None:
            return self._replay("cond", self._model_cond, x, c)
        with device_scope(self.device):
            return self._model_cond(x, c)  # torch.compile wraps forward() only: this graph runs eagerly

    def _replay(self, key: str, fn, *inputs: torch.Tensor) -> torch.Tensor:
        """Copy in, replay and copy out on this backend's stream, one caller at a time."""
        graphs, stream = self._graphs, self._stream
        assert graphs is not None and stream is not None  # set together in __init__ when cuda_graph
        with self._lock, torch.cuda.device(self.device):
            return run_ordered(stream, lambda *a: fresh_float32(graphs(key, fn, *a)), *inputs)

    def _run_compiled(self, compiled, *inputs):
        with self._lock, device_scope(self.device):
            if self.mode in ("compile:reduce-overhead", "compile:max-autotune"):
                # These modes replay CUDA graphs whose outputs the next replay overwrites; marking the step
                # tells torch that the previous outputs are no longer read (we copy them out below).
                torch.compiler.cudagraph_mark_step_begin()
            return fresh_float32(compiled(*inputs))

    def describe(self) -> str:
        """The runtime, precision, device and mode (eager, CUDA graph or compiled), for banners."""
        mode = "" if self.mode == "eager" else f", {self.mode}"
        return f"{self.name} ({self.precision}, {self.device}{mode})"

    def close(self) -> None:
        """Releases the captured CUDA graphs and their static buffers."""
        if self._graphs is not None:
            with self._lock:
                self._graphs.clear()
