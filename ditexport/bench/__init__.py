"""`python -m ditexport bench`: one model through every backend this machine has, measured side by side.

The method is `settings.METHOD`, which every report records.
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


