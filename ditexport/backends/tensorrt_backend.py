"""The TensorRT backend: a built FP16 plan run with torch-owned device buffers and one CUDA graph per batch size."""
from __future__ import annotations

from pathlib import Path

import torch

from ..engine import EngineError, load_engine, tensorrt_unavailable_reason
from ..model import DiTConfig
from .base import Backend
from .cuda_graphs import CapturedForward, fresh_float32

# The graphs' input names (the export contract) and the output name.
XTY_INPUTS = ("x", "t", "y")
COND_INPUTS = ("x", "c")
OUTPUT = "out"


def torch_dtype(trt_dtype) -> torch.dtype:
    """The torch dtype of a TensorRT tensor type."""
    import tensorrt as trt

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
             trt.int64: torch.int64, trt.bool: torch.bool, trt.bfloat16: torch.bfloat16}
    if trt_dtype not in table:
        raise EngineError(f"the engine has an I/O tensor of type {trt_dtype}, which this backend does not feed")
    return table[trt_dtype]


class _BatchContext:
    """One execution context bound to static buffers for one batch size, optionally captured in a CUDA graph.

    Each batch size gets its own context because a context's bound shapes and addresses are what a
    captured graph replays; the contexts share one activation scratch buffer, which is safe because they
    all run in order on one stream.
    """

    def __init__(self, runner: "_EngineRunner", feeds: dict[str, torch.Tensor], cuda_graph: bool):
        import tensorrt as trt

        engine, device = runner.engine, runner.device
        self.context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if self.context is None:
            raise EngineError("TensorRT could not create an execution context (out of GPU memory?)")
        self.context.set_device_memory(runner.scratch.data_ptr(), runner.scratch.numel())
        self.inputs = {}
        for name in runner.input_names:
            shape = tuple(feeds[name].shape)
            self.inputs[name] = torch.empty(shape, dtype=runner.dtypes[name], device=device)
            if not self.context.set_input_shape(name, shape):
                raise EngineError(f"the engine rejects input {name!r} of shape {shape}; its profile allows "
                                  f"{runner.profile_text(name)}")
        self.outputs = {name: torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=runner.dtypes[name],
                                          device=device) for name in runner.output_names}
        for name, buf in {**self.inputs, **self.outputs}.items():
            self.context.set_tensor_address(name, buf.data_ptr())
        self.output_names = runner.output_names
        self.device = device
        # Real values before the first enqueue: garbage labels would index the embedding out of range.
        for name, x in feeds.items():
            self.inputs[name].copy_(x)
        self._captured = (CapturedForward(self._enqueue, list(self.inputs.values()), inputs_are_static=True)
                          if cuda_graph else None)

    def _enqueue(self, *static_inputs):
        # The buffers are already bound; torch's current stream is the capture stream while capturing.
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise EngineError("TensorRT failed to enqueue the engine (see its log above)")
        return [self.outputs[name] for name in self.output_names]

    def __call__(self, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        if self._captured is not None:
            # The captured graph's static inputs are the bound buffers; copying into them is the feed.
            return self._captured(*feeds.values())
        for name, x in feeds.items():
            self.inputs[name].copy_(x, non_blocking=True)
        return self._enqueue()


class _EngineRunner:
    """A deserialised engine, its I/O description, and a _BatchContext per batch size seen."""

    def __init__(self, plan_path: Path, expected_inputs: tuple[str, ...], device: torch.device, cuda_graph: bool,
                 verify: bool):
        import tensorrt as trt

        self.runtime, self.engine, self.metadata = load_engine(plan_path, verify=verify)
        self.plan_path = plan_path
        self.device, self.cuda_graph = device, cuda_graph
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if sorted(self.input_names) != sorted(expected_inputs) or OUTPUT not in self.output_names:
            raise EngineError(f"{plan_path.name} has inputs {self.input_names} and outputs {self.output_names}; "
                              f"expected inputs {list(expected_inputs)} and output {OUTPUT!r} (is it a DiT export?)")
        self.input_names = list(expected_inputs)  # feed order = the order callers pass tensors
        self.dtypes = {n: torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}
        self.profile = {n: self.engine.get_tensor_profile_shape(n, 0) for n in self.input_names}
        self.max_batch = min(int(self.profile[n][2][0]) for n in self.input_names)
        # One activation buffer for every batch context, sized for the largest shapes of the profile.
        size = self.engine.get_device_memory_size_for_profile_v2(0)
        self.scratch = torch.empty(max(int(size), 1), dtype=torch.uint8, device=device)
        self._contexts: dict[int, _BatchContext] = {}

    def profile_text(self, name: str) -> str:
        lo, _, hi = self.profile[name]
        return f"{tuple(lo)} to {tuple(hi)}"

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        feeds = dict(zip(self.input_names, tensors))
        n = tensors[0].shape[0]
        ctx = self._contexts.get(n)
        if ctx is None:
            ctx = self._contexts[n] = _BatchContext(self, feeds, self.cuda_graph)
        out = ctx(feeds)[self.output_names.index(OUTPUT)]
        return fresh_float32(out)

    def close(self) -> None:
        # Contexts before the engine, the engine before its runtime; the scratch buffer once no context uses it.
        self._contexts.clear()
        self.engine = self.runtime = self.scratch = None


class TensorRTBackend(Backend):
    """Runs a TensorRT plan built by `python -m ditexport build`; float32 in and out like every backend.

    `cond_plan_path` adds `with_condition(x, c)` from the conditioning-vector graph's plan. Batches above
    the engine profile's max (or `max_batch`, if smaller) are split.
    """

    name = "tensorrt"
    precision = "fp16"

    def __init__(self, plan_path: str | Path, config: DiTConfig, *, cond_plan_path: str | Path | None = None,
                 max_batch: int | None = None, device: torch.device | str = "cuda", cuda_graph: bool = True,
                 verify: bool = True):
        reason = tensorrt_unavailable_reason(for_build=False)
        if reason:
            raise EngineError(f"the tensorrt backend is unavailable: {reason}")
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"the tensorrt backend runs on a CUDA device, not {device}")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self._xty = _EngineRunner(Path(plan_path), XTY_INPUTS, device, cuda_graph, verify)
        self._cond = (_EngineRunner(Path(cond_plan_path), COND_INPUTS, device, cuda_graph, verify)
                      if cond_plan_path is not None else None)
        self._check_shapes(config)
        engine_max = self._xty.max_batch if self._cond is None else min(self._xty.max_batch, self._cond.max_batch)
        super().__init__(config, device, torch.float16, min(max_batch or engine_max, engine_max))
        self.plan_path = Path(plan_path)
        self.metadata = self._xty.metadata

    def _check_shapes(self, config: DiTConfig) -> None:
        """Fails early, naming the plan, when an engine was built for another model config."""
        expected = {"x": [config.in_channels, config.input_size, config.input_size], "c": [config.hidden_size]}
        for runner in (self._xty, self._cond):
            if runner is None:
                continue
            for name in set(expected) & set(runner.input_names):
                got = [int(d) for d in runner.profile[name][2]][1:]
                if got != expected[name]:
                    raise EngineError(f"{runner.plan_path.name} takes {name} of shape (batch, "
                                      f"{', '.join(map(str, got))}), but the model config needs (batch, "
                                      f"{', '.join(map(str, expected[name]))}); is it this model's engine?")

    @torch.no_grad()
    def _forward(self, x, t, y):
        return self._xty(x, t, y)

    @torch.no_grad()
    def _forward_with_condition(self, x, c):
        if self._cond is None:
            raise NotImplementedError("this tensorrt backend has no conditioning-vector engine (cond plan)")
        return self._cond(x, c)

    def close(self) -> None:
        for runner in (self._xty, self._cond):
            if runner is not None:
                runner.close()

    def describe(self) -> str:
        return f"{self.name} ({self.precision}, {self.device}, {self.plan_path.name})"
