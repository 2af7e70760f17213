"""`python -m ditexport bench`: one model through every backend this machine has, measured side by side.

The method is `settings.METHOD`, which every report records.
"""
from __future__ import annotations

from ..lazy import lazy_exports

# name -> the module that defines it; imported on first use, so that the CLI's parser reads `settings` without torch
_NAMES = {
    "BenchContext": "backends", "make_bench_backend": "backends",
    "dit_forward_flops": "measure", "forward_inputs": "measure", "fp16_matmul_tflops": "measure",
    "sampler_step_ms": "measure", "stability_warning": "measure", "time_calls": "measure", "timing_spread": "measure",
    "unstable_rows": "measure",
    "format_table": "report", "write_outputs": "report", "write_plot": "report",
    "run_bench": "run",
    "BASELINE": "settings", "BENCH_BACKENDS": "settings", "BenchSettings": "settings", "GUIDED_BATCHES": "settings",
    "QUALITY_SETTING": "settings", "SAMPLING_STEPS": "settings", "Skip": "settings", "UNSTABLE_SPREAD": "settings",
}

__all__ = list(_NAMES)

__getattr__ = lazy_exports(__name__, globals(), _NAMES)
