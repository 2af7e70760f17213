"""`python -m ditexport gpu-check`: every GPU path this machine has, on the digits model and DiT-XL/2, in one table.

Per model and path (torch fp16 eager, CUDA graph, torch.compile, ONNX Runtime CUDA fp32/fp16 where
onnxruntime-gpu is installed, TensorRT where it is installed): the relative error against fp32 torch at a
guided batch of 2, ms per forward at batches 2 and 64, and one guided 250-step sample (seconds, finite).

Set-up comes first and outside the time budget: each model, its fp32 reference and its ONNX export (built
once, without TensorRT engines: the tensorrt row builds the one engine it runs). Then the plan is printed,
every row with its time, and the rows run within the budget: each isolated (a failure is its row, with the
one-line reason) and capped in time. A path this machine lacks is skipped; a path it has that did not run
makes the verdict INCOMPLETE, never PASSED. The row code is device-agnostic: the test suite runs it on the CPU
with the paths a CPU has.
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .backends.base import synchronize
from .errors import summary
from .errors import DitexportError
from .export import TOLERANCE
from .logs import get_logger
from .precisions import CalibrationSettings

LOG = get_logger("gpu_check")

if TYPE_CHECKING:
    from .bench import BenchContext
    from .model import DiT

MODELS = ("digits", "DiT-XL/2")                   # DiT-XL/2 at 256 px, random weights
# Cheapest first: the long set-ups (an engine build, a compile) come last, when the budget still allows them.
PATHS = ("torch-eager", "torch-cuda-graph", "onnxruntime-fp32", "onnxruntime-fp16", "tensorrt", "tensorrt-int8",
         "tensorrt-fp8", "torch-compile")
# The 8-bit graphs of the check's exports calibrate on a short run (2 images x 10 steps): XL's torch forwards on
# the CPU would otherwise take much of the budget. Their accuracy is judged on the real recipe by `build`.
CHECK_CALIBRATION = CalibrationSettings(images=2, steps=10)
TIMED_BATCHES = (2, 64)                           # guided forward batches (2 rows per image)
BUDGET_S = 450.0                                  # the rows, after set-up (the exports are made before it)
ROW_CAP_S = {"small": 60.0, "large": 120.0}       # one path on one model, after its backend is made
BUILDER_LEVEL = 2                                 # the check's TensorRT engines: level 2 to fit the budget
# Time a row needs left before it starts, for making its backend; estimates, not measurements (no GPU was at
# hand): building the XL engines (level 2) and compiling XL are the long ones, then opening the XL graphs.
START_NEED_S = {("tensorrt", "large"): 240.0, ("tensorrt-int8", "large"): 240.0, ("tensorrt-fp8", "large"): 240.0,
                ("torch-compile", "large"): 120.0, ("tensorrt", "small"): 60.0,
                ("onnxruntime-fp32", "large"): 60.0, ("onnxruntime-fp16", "large"): 60.0}
START_NEED_DEFAULT_S = 10.0
INCOMPLETE_EXIT = 3                               # a path this machine has did not run (1: a row failed)


@dataclass
class CheckRow:
    """One path on one model; None where a measure was not taken (see `notes`)."""
    model: str
    path: str
    precision: str = "-"
    rel_err: float | None = None
    tolerance: float | None = None
    ms: dict = field(default_factory=dict)        # forward batch -> median ms
    sample_s: float | None = None
    sample_finite: bool | None = None
    seconds: float = 0.0
    skipped: str | None = None                    # a path this machine lacks
    not_run: str | None = None                    # a path it has that did not run (the budget)
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        if self.error:
            return "FAILED"
        if self.skipped:
            return "skipped"
        if self.not_run:
            return "INCOMPLETE"
        within = self.rel_err is not None and self.tolerance is not None and self.rel_err <= self.tolerance
        return "ok" if within and self.sample_finite is not False else "FAILED"


class _Clock:
    """What a row may still spend: its own cap, and never past the run's deadline."""

    def __init__(self, deadline: float, cap_s: float):
        self.end = min(deadline, time.perf_counter() + cap_s)

    def left(self) -> float:
        return self.end - time.perf_counter()


@dataclass
class _Subject:
    """A model under check, its fp32 reference output at a guided batch of 2, and the bench context for exports."""
    name: str
    model: DiT
    size: str
    reference: torch.Tensor
    inputs: tuple
    context: BenchContext


def _load(name: str):
    from .source import ModelSource

    model = ModelSource.resolve(name, image_size=None if name == "digits" else 256).load()
    return model.float().eval(), "small" if name == "digits" else "large"


def _subject(name: str, device: torch.device, out_dir: Path, level: int, log) -> _Subject:
    from .backends.open import open_backend
    from .bench import BenchContext, BenchSettings, forward_inputs

    model, size = _load(name)
    inputs = forward_inputs(model.config, 2, True, device, seed=0)
    # The reference in true fp32: cuDNN's convolution (the patch embedding) would otherwise use TF32.
    allowed = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with open_backend("torch", "fp32", model=copy.deepcopy(model), device=device) as reference:
            expected = reference(*inputs)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = allowed
    settings = BenchSettings(batch_sizes=TIMED_BATCHES, unguided=False, device=str(device), out_dir=str(out_dir),
                             builder_optimization_level=level, compile_mode="reduce-overhead",
                             backends=PATHS if device.type == "cuda" else None)
    slug = name.replace("/", "-")

    def export() -> Path:
        # A validated export as `build` makes it, without the sample-level check (minutes for DiT-XL/2 on a CPU).
        from .building import ensure_export
        from .precisions import DEFAULT_PRECISIONS, PRECISIONS
        from .source import ModelSource

        # No engines: the tensorrt rows build the ones they run, at the check's level, with a profile per timed
        # batch. The 8-bit graphs only where their TensorRT rows can run.
        precisions = PRECISIONS if device.type == "cuda" else DEFAULT_PRECISIONS
        return ensure_export(model, ModelSource.resolve(name).to_manifest(), out_dir / slug, model_name=name,
                             sample_steps=0, engines=False, precisions=precisions, calibration=CHECK_CALIBRATION,
                             log=lambda m: log(f"  {m.strip()}"))[0]

    context = BenchContext(model, device, settings, max(TIMED_BATCHES), out_dir / f"{slug}-bench-engine",
                           lambda m: log(f"  {m.strip()}"), export)
    return _Subject(name, model, size, expected, inputs, context)


def _make_backend(subject: _Subject, path: str, device: torch.device):
    """The backend of a path: fp16 torch eager here, the others as `bench` makes them (Skip when absent)."""
    from .backends.open import open_backend
    from .bench import make_bench_backend

    if path == "torch-eager":
        return open_backend("torch", "fp16", model=copy.deepcopy(subject.model), device=device)
    return make_bench_backend(subject.context, path)


def _time_ms(backend, inputs, device: torch.device, clock: _Clock) -> float | None:
    """Median ms per forward: two untimed calls (a new shape captures or compiles), then 3 to 20 timed calls,
    as many as fit a fifth of the row's time left; None when even 3 do not fit."""
    from .bench import time_calls

    backend(*inputs)
    synchronize(device)
    start = time.perf_counter()
    backend(*inputs)
    synchronize(device)
    per_call = max(time.perf_counter() - start, 1e-6)
    iters = int(min(20, 0.2 * clock.left() / per_call))
    if iters < 3:
        return None
    return statistics.median(time_calls(lambda: backend(*inputs), device, warmup=0, iters=iters))


def _sample(backend, subject: _Subject, steps: int, device: torch.device) -> tuple[float, bool]:
    """One guided sample of one image (a forward batch of 2): seconds, and whether it is finite."""
    from .sampler import Sampler, SamplerConfig

    cfg = subject.model.config
    sampler = Sampler(SamplerConfig(num_steps=steps), cfg.in_channels, cfg.num_classes, cfg.learn_sigma)
    synchronize(device)
    start = time.perf_counter()
    x0 = sampler.sample(backend, torch.tensor([1]), seed=0, input_size=cfg.input_size, device=str(device))
    synchronize(device)
    return time.perf_counter() - start, bool(torch.isfinite(x0).all())


def _measure(row: CheckRow, backend, subject: _Subject, clock: _Clock, steps: int, device: torch.device) -> None:
    from .bench import forward_inputs
    from .validate import relative_error

    row.precision, row.tolerance = backend.precision, TOLERANCE.get(backend.precision)
    start = time.perf_counter()
    out = backend(*subject.inputs)
    synchronize(device)
    first_s = time.perf_counter() - start  # includes a capture or a compile
    row.rel_err = relative_error(out.float().cpu(), subject.reference.float().cpu())[0]
    for batch in TIMED_BATCHES:
        # A new batch may compile again: it starts only if one more such first call fits twice.
        if clock.left() < 2 * first_s:
            row.notes.append(f"batch {batch}: time cap")
            continue
        ms = _time_ms(backend, forward_inputs(subject.model.config, batch, True, device), device, clock)
        if ms is None:
            row.notes.append(f"batch {batch}: time cap")
        else:
            row.ms[batch] = ms
    per_step_s = row.ms.get(2, 1000 * first_s) / 1000 + 0.001  # the sampler's own step costs well under 1 ms
    if 1.5 * steps * per_step_s > clock.left():
        row.notes.append(f"sample: time cap (about {steps * per_step_s:.0f} s needed)")
        return
    row.sample_s, row.sample_finite = _sample(backend, subject, steps, device)


def _absent(subject: _Subject, path: str) -> str | None:
    """Why this machine lacks `path` (torch eager it always has), found without building anything."""
    from .bench.backends import absent_reason

    return None if path == "torch-eager" else absent_reason(subject.context, path)


def _start_need(path: str, size: str) -> float:
    return START_NEED_S.get((path, size), START_NEED_DEFAULT_S)


def plan_lines(subjects: dict[str, _Subject | Exception], paths, budget_s: float) -> list[str]:
    """What the check will run, printed before it starts: each row with its time, or why it will not run."""
    lines = [f"plan: {len(subjects) * len(paths)} rows in this order, within a budget of {budget_s:.0f} s; a row "
             "starts only with its set-up time left in the budget, and measures for at most its cap:"]
    for name, s in subjects.items():
        for path in paths:
            absent = None if isinstance(s, Exception) else _absent(s, path)
            what = ("FAILED: the model could not be set up" if isinstance(s, Exception) else f"skipped: {absent}"
                    if absent else f"set-up up to {_start_need(path, s.size):.0f} s, then measured for up to "
                    f"{ROW_CAP_S[s.size]:.0f} s")
            lines.append(f"  {name:<9} {path:<17} {what}")
    return lines


def check_row(subject: _Subject, path: str, device: torch.device, deadline: float, steps: int) -> CheckRow:
    """One path on one model, isolated: a path this machine lacks is skipped, one that cannot start before the
    deadline is INCOMPLETE, any failure a FAILED row with its reason."""
    from .bench import Skip

    row = CheckRow(subject.name, path)
    start = time.perf_counter()
    row.skipped = _absent(subject, path)
    if row.skipped:
        return row
    need = _start_need(path, subject.size)
    if deadline - start < need:
        row.not_run = f"not started: the run's time budget has under {need:.0f} s left"
        return row
    backend = None
    try:
        backend = _make_backend(subject, path, device)  # the tensorrt row builds its engine here, uncapped
        _measure(row, backend, subject, _Clock(deadline, ROW_CAP_S[subject.size]), steps, device)
    except Skip as e:
        row.skipped = str(e)
    except Exception as e:  # a failing path is a row, never the end of the check
        row.error = summary(e)
    finally:
        if backend is not None:
            backend.close()
        if path == "torch-compile":
            torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        row.seconds = time.perf_counter() - start
    return row


def run_rows(device: torch.device | str = "cuda", *, models=MODELS, paths=PATHS, out_dir: str | Path = "exports/gpu-check",
             budget_s: float = BUDGET_S, sample_steps: int = 250, builder_optimization_level: int = BUILDER_LEVEL,
             log=LOG.info) -> list[CheckRow]:
    """Every path on every model: set-up (models, references, exports) first, then the plan, then the rows
    within `budget_s`."""
    device = torch.device(device)
    subjects: dict[str, _Subject | Exception] = {}
    for name in models:
        start = time.perf_counter()
        log(f"{name}: set-up (model, fp32 reference, ONNX export), outside the time budget")
        try:
            subject = subjects[name] = _subject(name, device, Path(out_dir), builder_optimization_level, log)
        except Exception as e:  # e.g. out of memory for the fp32 reference: the model's rows say so
            subjects[name] = e
            log(f"  FAILED — {summary(e)}")
            continue
        if any(path.startswith("onnxruntime") or path == "tensorrt" for path in paths
               if _absent(subject, path) is None):
            try:
                subject.context.export_dir()  # built once; a failure is remembered and fails the rows that need it
            except Exception as e:
                log(f"  export FAILED — {summary(e)}; the rows that run it fail with this")
        log(f"  set up in {time.perf_counter() - start:.1f} s")
    for line in plan_lines(subjects, paths, budget_s):
        log(line)
    deadline = time.perf_counter() + budget_s
    rows = []
    for name in models:
        log(f"{name}:")
        subject = subjects.pop(name)
        if isinstance(subject, Exception):
            rows += [CheckRow(name, path, error=f"the model could not be set up: {summary(subject)}") for path in paths]
            continue
        for path in paths:
            row = check_row(subject, path, device, deadline, sample_steps)
            reason = row.error or row.skipped or row.not_run
            log(f"  {path}: {row.status}{' — ' + reason if row.status != 'ok' and reason else ''}"
                f" ({row.seconds:.1f} s)")
            rows.append(row)
        del subject
    return rows


def verdict(rows: list[CheckRow]) -> tuple[str, int]:
    """The last line of the table and the exit code: FAILED (1) when a row failed, INCOMPLETE (3) when a path
    this machine has did not run, PASSED (0) otherwise."""
    count = {status: sum(r.status == status for r in rows) for status in ("ok", "FAILED", "INCOMPLETE", "skipped")}
    word, code = (("FAILED", 1) if count["FAILED"] else ("INCOMPLETE", INCOMPLETE_EXIT) if count["INCOMPLETE"]
                  else ("PASSED", 0))
    return (f"{word}: {count['ok']} ok, {count['FAILED']} failed, {count['INCOMPLETE']} not run, "
            f"{count['skipped']} skipped"), code


def format_table(rows: list[CheckRow], steps: int = 250) -> str:
    """The table printed last, one line per row, and the verdict."""
    def num(v, spec):
        return format(v, spec) if v is not None else "-"

    lines = [f"{'model':<9} {'path':<17} {'prec':<4} {'rel err':>8} {'tol':>6} {'ms@2':>8} {'ms@64':>8} "
             f"{f'sample {steps}':>11} {'s':>6}  status"]
    for r in rows:
        sample = "-" if r.sample_s is None else f"{r.sample_s:.2f} s" + ("" if r.sample_finite else " NaN")
        reason = r.error or r.skipped or r.not_run
        status = r.status + (f": {reason}" if r.status != "ok" and reason else "")
        notes = f" [{'; '.join(r.notes)}]" if r.notes else ""
        lines.append(f"{r.model:<9} {r.path:<17} {r.precision:<4} {num(r.rel_err, '.1e'):>8} "
                     f"{num(r.tolerance, '.0e'):>6} {num(r.ms.get(2), '.3f'):>8} {num(r.ms.get(64), '.3f'):>8} "
                     f"{sample:>11} {r.seconds:>6.1f}  {status}{notes}")
    lines.append(verdict(rows)[0])
    return "\n".join(lines)


def environment_line(device: torch.device) -> str:
    """The card and the runtimes, for the table's heading."""
    import onnxruntime

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    try:
        import tensorrt

        trt = getattr(tensorrt, "__version__", None) or "not installed"
    except ImportError:
        trt = "not installed"
    return (f"{card}; torch {torch.__version__}, onnxruntime {onnxruntime.__version__} "
            f"({', '.join(onnxruntime.get_available_providers())}), TensorRT {trt}")


def gpu_check(out_dir: str | Path = "exports/gpu-check", *, models=MODELS, budget_s: float = BUDGET_S,
              builder_optimization_level: int = BUILDER_LEVEL, log=LOG.info) -> int:
    """The `gpu-check` command: the plan, the rows, a JSON beside the exports, the table last; the exit code
    of `verdict`."""
    from .artifacts import atomic_write_json

    from .model import DIT_CONFIGS

    if not torch.cuda.is_available():
        raise DitexportError(f"gpu-check needs an NVIDIA GPU with CUDA, and torch {torch.__version__} sees none")
    unknown = [m for m in models if m != "digits" and m not in DIT_CONFIGS]
    if unknown:
        raise DitexportError(f"unknown model(s) {', '.join(unknown)} for gpu-check; choose digits or a config "
                             f"such as DiT-XL/2")
    device = torch.device("cuda", torch.cuda.current_device())
    heading = environment_line(device)
    log(f"gpu-check on {heading}; a budget of {budget_s:.0f} s for the rows, after set-up")
    start = time.perf_counter()
    rows = run_rows(device, models=models, out_dir=out_dir, budget_s=budget_s,
                    builder_optimization_level=builder_optimization_level, log=log)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    line, code = verdict(rows)
    path = atomic_write_json(Path(out_dir) / "gpu-check.json",
                             {"environment": heading, "seconds": time.perf_counter() - start, "verdict": line,
                              "rows": [{**asdict(r), "status": r.status} for r in rows]})
    log(f"\nwrote {path}; {time.perf_counter() - start:.0f} s in all\n\n{heading}")
    log(format_table(rows))
    return code
