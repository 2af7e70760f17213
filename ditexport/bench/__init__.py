"""`python -m ditexport bench`: one model through every backend this machine has, measured side by side.

For each backend and forward batch size it reports the median ms per forward (CUDA events on a GPU,
`perf_counter` on the CPU), images/s for 250- and 50-step sampling, the share of the card's fp16 matmul
rate (GPU only, the rate measured in the same run) and the speed-up over torch eager measured in the
same run. Images/s is derived, not guessed: images per forward / (steps x (forward ms + sampler ms)),
where the sampler's own per-step cost is measured by running the real sampler loop with the network
replaced by a constant output, and one real end-to-end sample per backend checks the derivation.
"""
from __future__ import annotations

from .backends import BenchContext, make_bench_backend
from .measure import (dit_forward_flops, forward_inputs, fp16_matmul_tflops, sampler_step_ms, stability_warning,
                      time_calls, timing_spread, unstable_rows)
from .report import format_table, write_outputs, write_plot
from .run import run_bench
from .settings import (BASELINE, BENCH_BACKENDS, BenchSettings, GUIDED_BATCHES, QUALITY_SETTING, SAMPLING_STEPS, Skip,
                       UNSTABLE_SPREAD)

__all__ = ["BenchContext", "make_bench_backend", "dit_forward_flops", "forward_inputs", "fp16_matmul_tflops",
           "sampler_step_ms", "stability_warning", "time_calls", "timing_spread", "unstable_rows", "format_table",
           "write_outputs", "write_plot", "run_bench", "BASELINE", "BENCH_BACKENDS", "BenchSettings", "GUIDED_BATCHES",
           "QUALITY_SETTING", "SAMPLING_STEPS", "Skip", "UNSTABLE_SPREAD"]


