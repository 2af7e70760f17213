"""What a bench run measures: its backends, batches and sampler settings, and why a row is skipped."""
from __future__ import annotations

from dataclasses import dataclass


# How the numbers are made; the report records it.
METHOD = ("For each backend and forward batch size it reports the median ms per forward (CUDA events on a GPU, "
          "`perf_counter` on the CPU), images/s for 250- and 50-step sampling, the share of the card's fp16 matmul "
          "rate (GPU only, the rate measured in the same run) and the speed-up over torch eager measured in the "
          "same run. Images/s is derived, not guessed: images per forward / (steps x (forward ms + sampler ms)), "
          "where the sampler's own per-step cost is measured by running the real sampler loop with the network "
          "replaced by a constant output, and one real end-to-end sample per backend checks the derivation.")

BENCH_BACKENDS = ("torch-eager", "torch-cuda-graph", "torch-compile", "onnxruntime-fp32", "onnxruntime-fp16",
                  "onnxruntime-int8", "onnxruntime-fp8", "tensorrt", "tensorrt-int8", "tensorrt-fp8")
BASELINE = "torch-eager"
GUIDED_BATCHES = (2, 8, 32, 64)
SAMPLING_STEPS = (250, 50)
# The fastest setting within the measurement noise of DDPM 250 on the digits model (docs/digits.md), the demo's
# default. Its images/s uses the DDPM sampler cost per step: DPM-Solver++ draws no noise per step, so this
# slightly understates its throughput.
QUALITY_SETTING = ("dpmpp-2m", 10)
# A measurement whose slowest timed call exceeds its fastest by more than this share of the median was
# disturbed by other work: quiet CPU runs spread 3-36 %, shared ones 84 % and more (docs/gpu.md, "Unstable timings").
UNSTABLE_SPREAD = 0.5


class Skip(Exception):
    """A backend this machine cannot run; the message says why."""


@dataclass
class BenchSettings:
    """What to measure; the defaults are the full run, `quick()` a fast smoke run."""
    batch_sizes: tuple[int, ...] = GUIDED_BATCHES   # guided forward batches (2 rows per image)
    unguided: bool = True                           # also batch 1 without guidance
    backends: tuple[str, ...] | None = None         # None: every backend this machine can run
    device: str = "auto"                            # where the torch/onnxruntime backends run
    warmup: int = 5                                 # untimed calls first (CUDA graph capture, autotuning)
    iters: int = 30                                 # timed calls; the median is reported
    sample_steps: int = 250                         # end-to-end check: one guided image, this many steps
    compile_mode: str = "reduce-overhead"
    matmul_size: int = 8192                         # side of the fp16 matmul that measures the card's rate
    builder_optimization_level: int = 3
    export_dir: str | None = None                   # reuse these ONNX files / plans instead of exporting
    out_dir: str = "exports/bench"
    quick: bool = False

    def __post_init__(self):
        from ..errors import DitexportError, UsageError

        unknown = [b for b in self.backends or () if b not in BENCH_BACKENDS]
        if unknown:
            raise DitexportError(f"unknown bench backend(s) {', '.join(unknown)}; choose from "
                                 f"{', '.join(BENCH_BACKENDS)}")
        for b in self.batch_sizes:
            if b < 2 or b % 2:
                raise UsageError(f"guided batch sizes are even and at least 2 (2 rows per image), got {b}")

    @classmethod
    def quick_settings(cls, **overrides) -> "BenchSettings":
        base = dict(warmup=2, iters=5, sample_steps=20, matmul_size=4096, quick=True)
        base.update(overrides)
        return cls(**base)


def bench_rows(settings: BenchSettings) -> list[tuple[int, bool]]:
    """The (batch, guided) rows a run times: batch 1 unguided where asked, then every guided batch."""
    rows = [(1, False)] if settings.unguided else []
    rows += [(b, True) for b in sorted(set(settings.batch_sizes))]
    return rows


def row_key(batch: int, guided: bool) -> str:
    """A row's key in the report: its batch, "u" added when unguided."""
    return f"{batch}" if guided else f"{batch}u"
