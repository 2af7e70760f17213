"""The validation report: what was checked, the verdict, JSON output and differences between runs."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from .samples import SampleCheck
from .tensors import GraphCheck


#################################################################################
#                                The report                                     #
#################################################################################

@dataclass
class ValidationReport:
    """Everything one validation found; `passed` only when every part passed."""
    export_dir: str
    model: str
    onnxruntime: str
    providers: list[str]
    checks: list[GraphCheck] = field(default_factory=list)
    drift: list[dict] = field(default_factory=list)
    stress: dict | None = None
    samples: list[SampleCheck] = field(default_factory=list)
    vae: list[dict] = field(default_factory=list)   # the VAE decoder graphs of a latent export (validate.vae)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        """The ONNX graphs' verdict; TensorRT parity is the plans' (the manifest's engine entry), never part of it."""
        return (bool(self.checks) and all(c.passed for c in self.checks)
                and (self.stress is None or self.stress["passed"]) and all(s.passed for s in self.samples)
                and all(v["passed"] for v in self.vae))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["passed"] = self.passed
        return _finite_json(d)

    def format(self) -> str:
        lines = [f"validation of {self.export_dir} ({self.model}; onnxruntime {self.onnxruntime}, "
                 f"{', '.join(self.providers)})",
                 f"  {'graph':<17} {'precision':<9} {'batch':>5} {'rel err':>9} {'max abs':>9} "
                 f"{'tolerance':>9}  result"]
        for c in self.checks:
            result = "ok" if c.passed else f"FAILED {c.problem}".rstrip()
            precision = c.precision + ("*" if c.emulated else "")
            lines.append(f"  {c.file:<17} {precision:<9} {c.batch:>5} {c.rel_err:>9.2e} {c.max_abs:>9.2e} "
                         f"{c.tolerance:>9.0e}  {result}")
        if any(c.emulated for c in self.checks):
            lines.append("  * fp16 (and the fp16 parts of 8-bit graphs) on the CPU provider: run as fp32 ops on "
                         "fp16-rounded tensors, as fp16 hardware stores them (ORT's CPU kernels would otherwise "
                         "compute most of it in fp32)")
        for d in self.drift:
            if "error" in d:
                lines.append(f"  per-tensor {d['candidate']} vs {d['reference']}: not run ({d['error']})")
                continue
            first = d["first_drift"]
            where = (f"first drifting tensor {first['tensor']!r} (rel err {first['rel_err']:.2e})" if first
                     else "no single tensor exceeds the tolerance")
            lines.append(f"  per-tensor {d['candidate']} vs {d['reference']} ({d['tensors_compared']} tensors): "
                         f"{where}")
        for v in self.vae:
            worst = max(c["rel_err"] for c in v["checks"])
            lines.append(f"  {v['file']:<17} {v['precision'] + ('*' if v['emulated'] else ''):<9} batches "
                         f"{','.join(str(c['batch']) for c in v['checks'])}: worst rel err {worst:.2e} "
                         f"(tolerance {v['tolerance']:.0e}, against the diffusers decoder)  "
                         f"{'ok' if v['passed'] else 'FAILED'}")
        if self.stress:
            s = self.stress
            p, a = s["policy_fp16"], s["all_fp16"]
            lines.append(f"  stress ({s['config']}, residual max {s['residual_max']:.3g} "
                         f"> {s['fp16_max']:g}): mixed fp16 rel err {p['rel_err']:.2e} "
                         f"({'finite' if p['finite'] else 'NON-FINITE'}); all-fp16 "
                         f"{'finite (overflow not shown)' if a['finite'] else 'non-finite, as expected'}  "
                         f"{'ok' if s['passed'] else 'FAILED'}")
            for precision, q in (s.get("quantized") or {}).items():
                lines.append(f"  stress {precision} (Q/DQ on the mixed fp16 graph): rel err {q['rel_err']:.2e} "
                             f"({'finite' if q['finite'] else 'NON-FINITE'}; bound {q['tolerance']:g})  "
                             f"{'ok' if q['passed'] else 'FAILED'}")
        for s in self.samples:
            finite = [v for v in s.psnr_db if math.isfinite(v)]
            low = min(s.psnr_db)
            text = (f"  samples {s.file:<17} {s.precision:<5} "
                    + (f"decoded by {s.decoder}, " if s.decoder else "")
                    + f"{len(s.labels)} images, {s.steps} {s.method} steps, "
                    f"guidance {s.guidance_scale:g}: PSNR min {low:.1f} dB"
                    + (f", mean {np.mean(finite):.1f} dB" if finite else "") + f" (floor {s.psnr_floor:g})")
            if s.class_agreement is not None:
                text += f", classes agree {100 * s.class_agreement:.0f} %"
            lines.append(f"{text}  {'ok' if s.passed else 'FAILED'}")
        lines.append(f"{'PASSED' if self.passed else 'FAILED'} ({self.seconds:.1f} s)")
        return "\n".join(lines)


def _finite_json(obj):
    """JSON has no inf/nan: they become strings, so report.json stays standard JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_json(v) for v in obj]
    return obj


def report_differences(old: dict, new: dict, relative: float = 0.1) -> list[str]:
    """Where a stored report disagrees with a re-run: the verdict, a check's verdict, or a number (relative
    error, or a sample check's lowest PSNR) that moved by more than `relative` — re-runs on one machine agree
    far more closely. Checks only one of the two ran (e.g. samples skipped) are not disagreements."""
    differences = []
    if old.get("passed") != new.get("passed"):
        differences.append(f"it said {_verdict(old.get('passed'))}, this run says {_verdict(new.get('passed'))}")

    def rows(report: dict) -> dict:
        out = {}
        for c in report.get("checks") or []:
            if isinstance(c, dict):
                out[f"{c.get('file')} batch {c.get('batch')}"] = (c.get("passed"), c.get("rel_err"))
        for s in report.get("samples") or []:
            if isinstance(s, dict):
                try:
                    low = min(float(v) for v in s.get("psnr_db") or [])
                except (TypeError, ValueError):
                    low = None
                out[f"samples {s.get('file')} PSNR"] = (s.get("passed"), low)
        return out

    before, after = rows(old), rows(new)
    for key in sorted(set(before) & set(after)):
        (passed_a, a), (passed_b, b) = before[key], after[key]
        if passed_a != passed_b:
            differences.append(f"{key}: {_verdict(passed_a)} before, {_verdict(passed_b)} now")
        elif _moved(a, b, relative):
            differences.append(f"{key}: {a} before, {b} now")
    return differences


def _verdict(passed) -> str:
    return "PASSED" if passed is True else "FAILED" if passed is False else "nothing"


def _moved(a, b, relative: float) -> bool:
    try:
        a, b = float(a), float(b)
    except (TypeError, ValueError):
        return a != b
    if a == b or (a != a and b != b):
        return False
    return abs(a - b) > relative * max(abs(a), abs(b))
