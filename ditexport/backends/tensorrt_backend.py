"""The TensorRT backend: a built plan run with torch-owned device buffers and one CUDA graph per batch size."""
from __future__ import annotations

import threading
from pathlib import Path

import torch

from ..errors import UsageError, summary
from ..engine.plans import EngineError, load_engine, plan_precision, tensorrt_unavailable_reason
from ..engine.profile import profile_for_batch
from ..logs import get_logger
from ..model import DiTConfig
from .base import Backend
from .cuda_graphs import CapturedForward, CaptureError, fresh_float32, run_ordered

LOG = get_logger("tensorrt")

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


def dims(shape) -> tuple[int, ...]:
    """A TensorRT Dims as a tuple of ints (indexing, not tuple(): the 10.13 stubs give Dims no __iter__)."""
    return tuple(int(shape[i]) for i in range(len(shape)))


class _BatchContext:
    """One execution context bound to static buffers for one batch size, optionally captured in a CUDA graph.

    Each batch size gets its own context because a context's bound shapes and addresses are what a
    captured graph replays; the contexts share one activation scratch buffer, which is safe because they
    all run in order on the runner's one stream, one call at a time.
    """

    def __init__(self, runner: "_EngineRunner", feeds: dict[str, torch.Tensor], cuda_graph: bool):
        import tensorrt as trt

        engine, device = runner.engine, runner.device
        stream = torch.cuda.current_stream(device).cuda_stream  # the runner's stream (see _EngineRunner.__call__)
        self.context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if self.context is None:
            raise EngineError("TensorRT could not create an execution context (out of GPU memory?)")
        batch = int(feeds[runner.input_names[0]].shape[0])
        profile = profile_for_batch(runner.batch_ranges, batch)
        # The profile is chosen before any shape is set, and the scratch buffer covers every profile. The bindings
        # raise RuntimeError when TensorRT refuses (their `-> bool` always returns True), so both are caught.
        try:
            accepted = self.context.set_optimization_profile_async(profile, stream)
        except RuntimeError as e:
            raise EngineError(f"TensorRT refused optimization profile {profile} for batch {batch} of "
                              f"{runner.plan_path.name}: {summary(e)}") from None
        if not accepted:
            raise EngineError(f"TensorRT refused optimization profile {profile} for batch {batch} of "
                              f"{runner.plan_path.name}")
        self.context.set_device_memory(runner.scratch.data_ptr(), runner.scratch.numel())
        self.inputs: dict[str, torch.Tensor] = {}
        for name in runner.input_names:
            shape = tuple(feeds[name].shape)
            self.inputs[name] = torch.empty(shape, dtype=runner.dtypes[name], device=device)
            if not self.context.set_input_shape(name, shape):
                raise EngineError(f"the engine rejects input {name!r} of shape {shape}; its profile {profile} "
                                  f"allows {runner.profile_text(name, profile)}")
        output = runner.output
        self.output = torch.empty(dims(self.context.get_tensor_shape(output)), dtype=runner.dtypes[output],
                                  device=device)
        self.others = {name: torch.empty(dims(self.context.get_tensor_shape(name)), dtype=runner.dtypes[name],
                                         device=device) for name in runner.output_names if name != output}  # never read
        for name, buf in {**self.inputs, output: self.output, **self.others}.items():
            if not self.context.set_tensor_address(name, buf.data_ptr()):
                raise EngineError(f"TensorRT refused the address of tensor {name!r}")
        self.device = device
        # Real values before the first enqueue: garbage labels would index the embedding out of range.
        for name, x in feeds.items():
            self.inputs[name].copy_(x)
        self._captured = None
        if cuda_graph:
            try:
                self._captured = CapturedForward(self._enqueue, list(self.inputs.values()), inputs_are_static=True)
            except CaptureError as e:
                # As trtexec does: an engine with operations a CUDA graph cannot hold runs by plain enqueue.
                LOG.warning(f"warning: {runner.plan_path.name}, batch {batch}: {e}; this batch runs without a CUDA "
                            "graph")

    def _enqueue(self, *static_inputs: torch.Tensor) -> torch.Tensor:
        # The buffers are already bound; the current stream is the runner's stream, or the capture stream.
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise EngineError("TensorRT failed to enqueue the engine (see its log above)")
        return self.output

    def __call__(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        if self._captured is not None:
            # The captured graph's static inputs are the bound buffers; copying into them is the feed.
            return self._captured(*feeds.values())
        for name, x in feeds.items():
            self.inputs[name].copy_(x, non_blocking=True)
        return self._enqueue()


class _EngineRunner:
    """A deserialised engine, its I/O description, its own CUDA stream and a _BatchContext per batch size seen.

    Calls are serialised by a lock: a batch context's bound buffers and captured graph are shared state.
    """

    def __init__(self, plan_path: Path, expected_inputs: tuple[str, ...], device: torch.device, cuda_graph: bool,
                 verify: bool, output: str = OUTPUT):
        import tensorrt as trt

        self.runtime, self.engine, self.metadata = load_engine(plan_path, verify=verify, device=device)
        self.plan_path, self.output = plan_path, output
        self.device, self.cuda_graph = device, cuda_graph
        engine = self.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if sorted(self.input_names) != sorted(expected_inputs) or output not in self.output_names:
            raise EngineError(f"{plan_path.name} has inputs {self.input_names} and outputs {self.output_names}; "
                              f"expected inputs {list(expected_inputs)} and output {output!r} (is it a ditexport "
                              "export's plan?)")
        self.input_names = list(expected_inputs)  # feed order = the order callers pass tensors
        self.dtypes = {n: torch_dtype(engine.get_tensor_dtype(n)) for n in names}
        # Per optimization profile: each input's (min, opt, max) shapes, and the batch range it covers.
        self.profiles = [{n: [dims(s) for s in engine.get_tensor_profile_shape(n, i)] for n in self.input_names}
                         for i in range(engine.num_optimization_profiles)]
        self.batch_ranges = [(max(p[n][0][0] for n in p), min(p[n][1][0] for n in p), min(p[n][2][0] for n in p))
                             for p in self.profiles]
        self.max_batch = max(hi for _, _, hi in self.batch_ranges)
        self.stream = torch.cuda.Stream(device)
        # One activation buffer for every batch context, as large as the largest profile needs. Allocated on the
        # caller's stream and used on the runner's: recorded there, so its memory is not reused while in use.
        size = max(engine.get_device_memory_size_for_profile_v2(i) for i in range(len(self.profiles)))
        self.scratch = torch.empty(max(int(size), 1), dtype=torch.uint8, device=device)
        self.scratch.record_stream(self.stream)
        self._contexts: dict[int, _BatchContext] = {}
        self._lock = threading.Lock()
        self._closed = False

    def profile_text(self, name: str, profile: int = 0) -> str:
        lo, _, hi = self.profiles[profile][name]
        return f"{lo} to {hi}"

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        with self._lock, torch.cuda.device(self.device):
            if self._closed:
                raise EngineError(f"the engine of {self.plan_path.name} was closed")
            return run_ordered(self.stream, self._run, *tensors)

    def _run(self, *tensors: torch.Tensor) -> torch.Tensor:
        feeds = dict(zip(self.input_names, tensors))
        n = int(tensors[0].shape[0])
        ctx = self._contexts.get(n)
        if ctx is None:
            ctx = self._contexts[n] = _BatchContext(self, feeds, self.cuda_graph)
        return fresh_float32(ctx(feeds))

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            # A replay or enqueue still queued on the runner's stream uses the contexts, their buffers and the
            # scratch: it finishes before any of them is freed.
            self.stream.synchronize()
            self._contexts.clear()
            # Contexts before the engine, the engine before its runtime; the scratch buffer once no context uses it.
            del self.engine, self.runtime, self.scratch


def open_runner(plan: Path, inputs: tuple[str, ...], device: torch.device, cuda_graph: bool, verify: bool,
                output: str = OUTPUT) -> _EngineRunner:
    """An _EngineRunner on `device`; whatever TensorRT raises while loading becomes an EngineError."""
    try:
        with torch.cuda.device(device):
            return _EngineRunner(plan, inputs, device, cuda_graph, verify, output)
    except EngineError:
        raise
    except Exception as e:
        raise EngineError(f"TensorRT could not load {plan.name} on {device}: {summary(e)}") from None


class TensorRTBackend(Backend):
    """Runs a TensorRT plan built by `python -m ditexport build`; float32 in and out like every backend.

    `cond_plan_path` adds `with_condition(x, c)` from the conditioning-vector graph's plan. Batches above
    the engine profiles' max (or `max_batch`, if smaller) are split. Safe to share between threads.
    """

    name = "tensorrt"

    def __init__(self, plan_path: str | Path, config: DiTConfig, *, cond_plan_path: str | Path | None = None,
                 max_batch: int | None = None, device: torch.device | str = "cuda", cuda_graph: bool = True,
                 verify: bool = True):
        reason = tensorrt_unavailable_reason(for_build=False)
        if reason:
            raise EngineError(f"the tensorrt backend is unavailable: {reason}")
        device = torch.device(device)
        if device.type != "cuda":
            raise UsageError(f"the tensorrt backend runs on a CUDA device, not {device}")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self._xty = open_runner(Path(plan_path), XTY_INPUTS, device, cuda_graph, verify)
        self._cond = (open_runner(Path(cond_plan_path), COND_INPUTS, device, cuda_graph, verify)
                      if cond_plan_path is not None else None)
        self._check_shapes(config)
        engine_max = self._xty.max_batch if self._cond is None else min(self._xty.max_batch, self._cond.max_batch)
        super().__init__(config, device, torch.float16, min(max_batch or engine_max, engine_max))
        self.plan_path = Path(plan_path)
        self.metadata = self._xty.metadata
        # Strong typing keeps the graph's precision: a plan built from the fp32 graph computes in fp32.
        self.precision = plan_precision(self.metadata)
        self.dtype = torch.float16 if self.precision == "fp16" else torch.float32

    def _check_shapes(self, config: DiTConfig) -> None:
        """Fails early, naming the plan, when an engine was built for another model config."""
        expected = {"x": [config.in_channels, config.input_size, config.input_size], "c": [config.hidden_size]}
        for runner in (self._xty, self._cond):
            if runner is None:
                continue
            for name in set(expected) & set(runner.input_names):
                got = list(runner.profiles[0][name][2][1:])
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
