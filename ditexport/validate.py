"""Parity of exported graphs with the torch fp32 reference, and the report that says whether an export is good.

Four kinds of evidence, as in DESIGN.md:
- tensor level: every graph on ONNX Runtime at several batch sizes on random non-zero inputs, checked
  names first, then shapes, then values (||a-b||/||b|| and max abs next to the tolerance; NaN/Inf fails);
- per-tensor: when an fp16 check fails, Polygraphy runs the fp32 and fp16 graphs with every tensor marked as
  an output and names the first tensor (in graph order) that drifts;
- stress: weights scaled so the residual stream exceeds the fp16 range; the all-fp16 graph must overflow
  while the mixed-precision graph stays finite and within tolerance;
- sample level: the whole sampler through the ONNX Runtime backend vs torch fp32 with the same noise,
  PSNR per sample and, for 8x8 digit models, agreement of a real-digit classifier.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .artifacts import onnx_filename, scratch_dir
from .errors import DitexportError
from .export import GRAPHS, PRECISIONS, TOLERANCE, graph_spec, release_memory
from .model import DiT, DiTConfig
from .progress import heartbeat

DEFAULT_BATCHES = (1, 2, 5)           # 1, 2 and an odd size on one session: the batch axis is really dynamic
FP16_MAX = 65504.0
# Sample-level floors on PSNR (images in [0, 1]); measured margins are in docs/export.md.
SAMPLE_PSNR_FLOOR = {"fp32": 40.0, "fp16": 25.0}
CLASS_AGREEMENT_FLOOR = 0.9           # share of samples the digit classifier puts in the same class as torch's


def relative_error(actual, expected) -> tuple[float, float, bool]:
    """(||a - b|| / ||b||, max |a - b|, all finite) in float64."""
    a = np.asarray(actual, dtype=np.float64)
    b = np.asarray(expected, dtype=np.float64)
    finite = bool(np.isfinite(a).all())
    if not finite:
        return math.inf, math.inf, False
    diff = a - b
    denom = np.linalg.norm(b)
    rel = float(np.linalg.norm(diff) / denom) if denom > 0 else float(np.linalg.norm(diff))
    return rel, float(np.abs(diff).max()) if diff.size else 0.0, True


def psnr(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """PSNR in dB per sample of two (N, ...) image batches in [0, 1]; inf where they are identical."""
    mse = ((a.double() - b.double()) ** 2).flatten(1).mean(1)
    return [math.inf if m == 0 else float(10 * math.log10(1.0 / m)) for m in mse.tolist()]


#################################################################################
#                        fp16 arithmetic on the CPU                             #
#################################################################################

# ONNX Runtime's CPU provider has few fp16 kernels on x86: it runs the rest of an fp16 graph in fp32,
# casting only where fp16 and fp32 kernels meet, so an fp16 graph on the CPU neither rounds nor overflows
# like fp16 hardware (measured: an all-fp16 graph whose residual stream reaches 2e5 stays finite). To
# validate what a GPU computes, the CPU runs an fp32 twin of the fp16 graph in which every fp16 tensor is
# rounded to fp16 (an explicit Cast to fp16 and back, which ORT keeps): ops compute in fp32 from fp16
# inputs and store fp16 results, like fp16 kernels with fp32 accumulation, overflow to inf included.

def emulate_fp16(proto):
    """The fp32 twin of an fp16 graph described above, in place; tensor names are kept."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from .export import tensor_types

    FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
    g = proto.graph
    types = tensor_types(proto)
    for t in g.initializer:
        if t.data_type == HALF:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    nodes = []
    for n in list(g.node):
        for attr in n.attribute:
            if n.op_type == "Cast" and attr.name == "to" and attr.i == HALF:
                attr.i = FLOAT  # computes in fp32; the rounding pair below makes it fp16-valued
            elif attr.type == attr.TENSOR and attr.t.data_type == HALF:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float32),
                                                        attr.t.name))
        rounding = []
        for i, name in enumerate(n.output):
            if types.get(name) == HALF:
                n.output[i] = f"{name}.exact"
                rounding += [helper.make_node("Cast", [f"{name}.exact"], [f"{name}.half"], to=HALF),
                             helper.make_node("Cast", [f"{name}.half"], [name], to=FLOAT)]
        nodes += [n, *rounding]
    del g.node[:]
    g.node.extend(nodes)
    for vi in g.value_info:
        if vi.type.tensor_type.elem_type == HALF:
            vi.type.tensor_type.elem_type = FLOAT
    proto.metadata_props.add(key="ditexport.emulated", value="fp16 tensors rounded on fp32 compute")
    return proto


def emulated_copy(onnx_path: str | Path, workdir: str | Path) -> Path:
    """Writes the emulated twin of an fp16 ONNX file into `workdir` and returns its path."""
    import onnx

    from .export import save_onnx

    proto = onnx.load(str(onnx_path))
    path = save_onnx(emulate_fp16(proto), Path(workdir) / f"emulated.{Path(onnx_path).name}")
    del proto
    release_memory()
    return path


def needs_emulation(precision: str, providers: list) -> bool:
    """fp16 graphs run emulated where the CPU provider would run them (see above)."""
    from .backends.onnxruntime_backend import provider_names

    return precision != "fp32" and provider_names(providers)[0] == "CPUExecutionProvider"


#################################################################################
#                               Tensor level                                    #
#################################################################################

@dataclass
class GraphCheck:
    """One graph at one batch size against torch fp32."""
    file: str
    graph: str
    precision: str
    batch: int
    rel_err: float
    max_abs: float
    tolerance: float
    finite: bool
    passed: bool
    problem: str = ""
    emulated: bool = False   # fp16 run as its fp32 twin with fp16 rounding (CPU provider)


def reference_output(model: DiT, graph: str, feed: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        if graph == "xty":
            return model(feed["x"], feed["t"], feed["y"]).float()
        return model.forward_with_condition(feed["x"], feed["c"]).float()


def graph_feed(model: DiT, graph: str, batch: int, seed: int) -> dict[str, torch.Tensor]:
    """Random non-zero inputs; the cond graph gets c from the torch embedders, at its real scale."""
    feed = graph_spec(model.config, "xty").sample_inputs(batch, seed)
    if graph == "cond":
        with torch.no_grad():
            feed = {"x": feed["x"], "c": model.embed_condition(feed["t"], feed["y"])}
    return feed


def _io_problem(session, spec, batch: int, out: np.ndarray) -> str:
    """Names, then shapes: what does not fit the declared I/O (empty when all fits)."""
    names_in = [i.name for i in session.get_inputs()]
    names_out = [o.name for o in session.get_outputs()]
    if names_in != spec.input_names or names_out != spec.output_names:
        return f"I/O names {names_in} -> {names_out}, expected {spec.input_names} -> {spec.output_names}"
    expected = spec.outputs[0].concrete_shape(batch)
    if tuple(out.shape) != expected:
        return f"output shape {tuple(out.shape)}, expected {expected}"
    if out.dtype != np.float32:
        return f"output dtype {out.dtype}, expected float32"
    return ""


def check_graph(model: DiT, onnx_path: str | Path, *, graph: str = "xty", precision: str = "fp32",
                batches=DEFAULT_BATCHES, seed: int = 0, providers: list[str] | None = None,
                tolerance: float | None = None, references: dict | None = None) -> list[GraphCheck]:
    """One ONNX Runtime session, run at every batch size and compared with torch fp32 (fp16 on the CPU: emulated).

    `references` caches torch outputs by (graph, batch, seed), so the fp32 and fp16 graphs share them.
    """
    from .backends.onnxruntime_backend import default_providers, load_session

    onnx_path = Path(onnx_path)
    tolerance = TOLERANCE[precision] if tolerance is None else tolerance
    spec = graph_spec(model.config, graph)
    providers = providers or default_providers()
    emulated = needs_emulation(precision, providers)
    with scratch_dir(onnx_path.parent, "check") as tmp:
        session = load_session(emulated_copy(onnx_path, tmp) if emulated else onnx_path, providers)
    checks = []
    references = {} if references is None else references
    for batch in batches:
        feed = graph_feed(model, graph, batch, seed + batch)
        key = (graph, batch, seed + batch)
        if key not in references:
            references[key] = reference_output(model, graph, feed).numpy()
        expected = references[key]
        (out,) = session.run(None, {k: v.numpy() for k, v in feed.items()})
        problem = _io_problem(session, spec, batch, out)
        if problem:
            checks.append(GraphCheck(onnx_path.name, graph, precision, batch, math.inf, math.inf, tolerance,
                                     False, False, problem, emulated))
            continue
        rel, max_abs, finite = relative_error(out, expected)
        passed = finite and rel <= tolerance
        checks.append(GraphCheck(onnx_path.name, graph, precision, batch, rel, max_abs, tolerance, finite, passed,
                                 "" if finite else "non-finite values (NaN/Inf) in the output", emulated))
    del session
    release_memory()
    return checks


#################################################################################
#                      Per tensor: where does fp16 drift?                       #
#################################################################################

def _all_tensors(onnx_path: Path, feed: dict[str, np.ndarray], workdir: Path) -> tuple[dict, list[str]]:
    """Every float tensor of a graph (Polygraphy, all outputs marked, ONNX Runtime), and the graph order."""
    try:
        from polygraphy import constants
        from polygraphy.backend.onnx import ModifyOutputs, OnnxFromPath, SaveOnnx
        from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    except ImportError:
        raise DitexportError("naming the tensor where fp16 drifts needs Polygraphy: "
                             "pip install 'ditexport[trt]' (or polygraphy)") from None

    from .export import EXTERNAL_DATA_THRESHOLD

    marked = workdir / f"marked.{onnx_path.name}"
    big = onnx_path.with_name(onnx_path.name + ".data").is_file() or \
        onnx_path.stat().st_size > EXTERNAL_DATA_THRESHOLD
    model = ModifyOutputs(OnnxFromPath(str(onnx_path)), outputs=constants.MARK_ALL)
    proto = SaveOnnx(model, str(marked), external_data_path=f"{marked.name}.data" if big else None)()
    order = [o for n in proto.graph.node for o in n.output]
    del proto
    with OnnxrtRunner(SessionFromOnnx(str(marked), providers=["CPUExecutionProvider"])) as runner:
        outputs = runner.infer(feed)
    tensors = {name: np.asarray(v) for name, v in outputs.items()
               if isinstance(v, np.ndarray) and v.dtype.kind == "f"}
    return tensors, order


def locate_drift(reference_path: str | Path, candidate_path: str | Path, feed: dict[str, torch.Tensor],
                 tolerance: float = TOLERANCE["fp16"]) -> dict:
    """Compares two graphs of one model tensor by tensor and names the first tensor whose rel error
    exceeds `tolerance`, in the candidate's graph order (tensors only the candidate has, e.g. casts, are skipped).
    `candidate_path` is an fp16 graph; `reference_path` the fp32 graph of the same export.
    """
    arrays = {k: v.numpy() for k, v in feed.items()}
    with scratch_dir(Path(candidate_path).parent, "drift") as tmp:
        reference, _ = _all_tensors(Path(reference_path), arrays, Path(tmp))
        # Polygraphy runs ONNX Runtime on the CPU here, so an fp16 candidate runs as its emulated twin.
        candidate, order = _all_tensors(emulated_copy(candidate_path, tmp), arrays, Path(tmp))
    compared = []
    for name in order:
        if name in reference and name in candidate and reference[name].shape == candidate[name].shape:
            rel, max_abs, finite = relative_error(candidate[name], reference[name])
            compared.append({"tensor": name, "rel_err": rel, "max_abs": max_abs, "finite": finite})
    first = next((c for c in compared if not c["finite"] or c["rel_err"] > tolerance), None)
    worst = sorted(compared, key=lambda c: -c["rel_err"])[:5]
    return {"reference": Path(reference_path).name, "candidate": Path(candidate_path).name,
            "tolerance": tolerance, "tensors_compared": len(compared), "first_drift": first, "worst": worst}


#################################################################################
#                  Stress: does the precision policy do its job?                #
#################################################################################

def residual_stream_max(model: DiT, feed: dict[str, torch.Tensor]) -> float:
    """Largest |value| the residual stream (every block's output) takes on `feed`."""
    peaks = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: peaks.append(out.abs().max().item())) for b in model.blocks]
    try:
        reference_output(model, "xty", feed)
    finally:
        for h in hooks:
            h.remove()
    return max(peaks)


def scale_residual_branches(model: DiT, gate_gain: float, branch_gain: float) -> None:
    """Adds `gate_gain` to every adaLN-Zero gate bias and multiplies the branch output projections (attn.proj,
    mlp.fc2) by `branch_gain`, so each block adds ~gate_gain x branch_gain x its branch to the residual stream."""
    hidden = model.config.hidden_size
    with torch.no_grad():
        for block in model.blocks:
            bias = block.adaLN_modulation[-1].bias
            bias[2 * hidden:3 * hidden] += gate_gain  # gate_msa
            bias[5 * hidden:6 * hidden] += gate_gain  # gate_mlp
            for linear in (block.attn.proj, block.mlp.fc2):
                linear.weight.mul_(branch_gain)
                linear.bias.mul_(branch_gain)


_STRESS_RESULTS: dict[tuple, dict] = {}


def stress_check(config: DiTConfig | str = "DiT-tiny/2", *, opset: int | None = None, seed: int = 0,
                 batch: int = 2, target: float = 2 * FP16_MAX, gate_gain: float = 1024.0,
                 workdir: str | Path | None = None) -> dict:
    """Weights scaled until the residual stream passes `target` (> 65504), every weight still representable
    in fp16; then the mixed-precision fp16 graph and an all-fp16 graph of that model vs torch fp32.

    It checks the export code, not a particular model, so one result per process and settings is reused.
    Its graphs are written into a temporary directory in `workdir` (the export directory being validated).
    """
    from .export import DEFAULT_OPSET

    key = (config, opset or DEFAULT_OPSET, seed, batch, target, gate_gain)
    if key not in _STRESS_RESULTS:
        _STRESS_RESULTS[key] = _stress_check(*key, workdir=workdir)
    return copy.deepcopy(_STRESS_RESULTS[key])


def _stress_check(config, opset, seed, batch, target, gate_gain, workdir) -> dict:
    from .backends.onnxruntime_backend import load_session
    from .export import export_onnx
    from .model import create_model

    branch_gain, peak = 0.5, 0.0
    while peak <= target:
        branch_gain *= 2
        model = create_model(config, seed=seed)
        scale_residual_branches(model, gate_gain, branch_gain)
        feed = graph_feed(model, "xty", batch, seed)
        peak = residual_stream_max(model, feed)
    largest_weight = max(p.abs().max().item() for p in model.parameters())
    expected = reference_output(model, "xty", feed).numpy()
    results = {}
    with scratch_dir(workdir, "stress") as tmp:
        for precision in ("fp16", "fp16-all"):
            path = export_onnx(model, Path(tmp) / f"stress.{precision}.onnx", precision=precision, opset=opset)
            session = load_session(emulated_copy(path, tmp), ["CPUExecutionProvider"])
            (out,) = session.run(None, {k: v.numpy() for k, v in feed.items()})
            rel, max_abs, finite = relative_error(out, expected)
            results[precision] = {"rel_err": rel, "max_abs": max_abs, "finite": finite}
    policy, all_fp16 = results["fp16"], results["fp16-all"]
    # The overflow must come from activations, not from a weight fp16 cannot hold.
    passed = (largest_weight < FP16_MAX and policy["finite"] and policy["rel_err"] <= TOLERANCE["fp16"]
              and not all_fp16["finite"])
    name = config if isinstance(config, str) else "custom config"
    return {"config": name, "gate_gain": gate_gain, "branch_gain": branch_gain, "largest_weight": largest_weight,
            "residual_max": peak, "fp16_max": FP16_MAX, "policy_fp16": policy, "all_fp16": all_fp16,
            "tolerance": TOLERANCE["fp16"], "passed": passed}


#################################################################################
#                  Sample level: the whole sampler, same noise                  #
#################################################################################

@dataclass
class SampleCheck:
    """The sampler through one graph vs torch fp32 with the same seed."""
    file: str
    precision: str
    steps: int
    method: str
    guidance_scale: float
    labels: list[int]
    psnr_db: list[float]
    psnr_floor: float
    class_agreement: float | None = None   # digit models: classifier(backend) == classifier(torch)
    backend_classes: list[int] | None = None
    torch_classes: list[int] | None = None
    passed: bool = False
    seconds: float = 0.0                   # sampling through this graph (the torch reference not included)


def _is_digits_config(config: DiTConfig) -> bool:
    return (config.in_channels, config.input_size, config.num_classes) == (1, 8, 10)


def _digits_reference():
    """Helper A's real-digit classifier, when the zoo ships it."""
    try:
        from .zoo.digits_eval import DigitsReference
    except ImportError:
        return None
    return DigitsReference()


def sample_parity(model: DiT, backends: dict[str, object], *, labels: list[int], steps: int, seed: int = 0,
                  method: str = "ddpm", guidance_scale: float = 4.0, log=lambda message: None) -> list[SampleCheck]:
    """Samples `labels` with torch fp32 and with each backend (file name -> Backend, or a function making
    one, so big models hold one session at a time), same seed and noise."""
    from .backends.base import Backend

    from .backends import TorchBackend
    from .sampler import SamplerConfig
    from .pipeline import Pipeline

    if not model.config.has_null_class:
        guidance_scale = 1.0
    sampler_cfg = SamplerConfig(num_steps=steps, method=method, guidance_scale=guidance_scale)
    what = f"{len(labels)} images, {steps} {method} steps"
    with heartbeat(log, f"validate: sampling the torch reference ({what})", end_line=True):
        reference = Pipeline(TorchBackend(model))(labels, seed=seed, sampler_cfg=sampler_cfg, progress=False).images
    classifier = _digits_reference() if _is_digits_config(model.config) else None
    torch_classes = classifier.predict(reference).tolist() if classifier is not None else None
    checks = []
    for file, backend in backends.items():
        start = time.perf_counter()
        with heartbeat(log, f"validate: sampling through {file} ({what})", end_line=True):
            owned = not isinstance(backend, Backend)
            backend = backend() if owned else backend
            images = Pipeline(backend)(labels, seed=seed, sampler_cfg=sampler_cfg, progress=False).images
            precision = backend.precision
            if owned:
                backend.close()
                del backend
                release_memory()
        values = psnr(images, reference)
        floor = SAMPLE_PSNR_FLOOR[precision]
        check = SampleCheck(file, precision, steps, method, guidance_scale, list(labels), values, floor,
                            torch_classes=torch_classes, seconds=round(time.perf_counter() - start, 2))
        passed = min(values) >= floor
        if classifier is not None:
            check.backend_classes = classifier.predict(images).tolist()
            check.class_agreement = float(np.mean(np.array(check.backend_classes) == np.array(torch_classes)))
            passed = passed and check.class_agreement >= CLASS_AGREEMENT_FLOOR
        check.passed = passed
        checks.append(check)
    return checks


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
    tensorrt: dict | None = None
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return (bool(self.checks) and all(c.passed for c in self.checks)
                and (self.stress is None or self.stress["passed"]) and all(s.passed for s in self.samples)
                and (self.tensorrt is None or self.tensorrt.get("passed", True)))

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
            lines.append("  * fp16 on the CPU provider: run as fp32 ops on fp16-rounded tensors, as fp16 hardware stores "
                         "them (ORT's CPU kernels would otherwise compute most of it in fp32)")
        for d in self.drift:
            if "error" in d:
                lines.append(f"  per-tensor {d['candidate']} vs {d['reference']}: not run ({d['error']})")
                continue
            first = d["first_drift"]
            where = (f"first drifting tensor {first['tensor']!r} (rel err {first['rel_err']:.2e})" if first
                     else "no single tensor exceeds the tolerance")
            lines.append(f"  per-tensor {d['candidate']} vs {d['reference']} ({d['tensors_compared']} tensors): "
                         f"{where}")
        if self.stress:
            s = self.stress
            p, a = s["policy_fp16"], s["all_fp16"]
            lines.append(f"  stress ({s['config']}, residual max {s['residual_max']:.3g} "
                         f"> {s['fp16_max']:g}): mixed fp16 rel err {p['rel_err']:.2e} "
                         f"({'finite' if p['finite'] else 'NON-FINITE'}); all-fp16 "
                         f"{'finite (overflow not shown)' if a['finite'] else 'non-finite, as expected'}  "
                         f"{'ok' if s['passed'] else 'FAILED'}")
        for s in self.samples:
            finite = [v for v in s.psnr_db if math.isfinite(v)]
            low = min(s.psnr_db)
            text = (f"  samples {s.file:<17} {s.precision:<5} {len(s.labels)} images, {s.steps} {s.method} steps, "
                    f"guidance {s.guidance_scale:g}: PSNR min {low:.1f} dB"
                    + (f", mean {np.mean(finite):.1f} dB" if finite else "") + f" (floor {s.psnr_floor:g})")
            if s.class_agreement is not None:
                text += f", classes agree {100 * s.class_agreement:.0f} %"
            lines.append(f"{text}  {'ok' if s.passed else 'FAILED'}")
        if self.tensorrt and self.tensorrt["status"] == "compared":
            for r in self.tensorrt["rows"]:
                lines.append(f"  tensorrt {r['plan']:<17} vs {r['onnx']}: batch {r['batch']:>3} rel err "
                             f"{r['rel_err']:.2e} max abs {r['max_abs']:.2e} (tolerance {r['tolerance']:.0e})  "
                             f"{'ok' if r['passed'] else 'FAILED'}")
        elif self.tensorrt:
            lines.append(f"  tensorrt: not compared — {self.tensorrt['reason']}")
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


def validate_export(export_dir: str | Path, model: DiT, *, model_name: str = "", batches=DEFAULT_BATCHES,
                    sample_steps: int | None = None, sample_images: int | None = None, stress: bool = True,
                    opset: int | None = None, providers: list[str] | None = None, log=print) -> ValidationReport:
    """Validates every graph present in `export_dir` against `model`; see the module docstring."""
    import onnxruntime

    from .backends.onnxruntime_backend import OnnxRuntimeBackend, default_providers, provider_names

    start = time.perf_counter()
    export_dir = Path(export_dir)
    providers = providers or default_providers()
    model = model.float().eval()
    report = ValidationReport(str(export_dir), model_name, onnxruntime.__version__, provider_names(providers))
    present = {(g, p): export_dir / onnx_filename(g, p) for g in GRAPHS for p in PRECISIONS
               if (export_dir / onnx_filename(g, p)).is_file()}
    references = {}
    for (graph, precision), path in present.items():
        stage_start = time.perf_counter()
        with heartbeat(log, f"validate: {path.name} against torch at batches {', '.join(map(str, batches))}"):
            checks = check_graph(model, path, graph=graph, precision=precision, batches=batches,
                                 providers=providers, references=references)
        report.checks.extend(checks)
        worst = max(checks, key=lambda c: c.rel_err)
        log(f"validate: {path.name:<17} {precision}  worst rel err {worst.rel_err:.2e} "
            f"(tolerance {worst.tolerance:.0e})  {'ok' if all(c.passed for c in checks) else 'FAILED'}  "
            f"({time.perf_counter() - stage_start:.1f} s)")
        fp32 = present.get((graph, "fp32"))
        if precision != "fp32" and not all(c.passed for c in checks) and fp32 is not None:
            try:
                report.drift.append(locate_drift(fp32, path, graph_feed(model, graph, 1, seed=1)))
            except DitexportError as e:  # the diagnosis is optional; the failure is already recorded
                report.drift.append({"candidate": path.name, "reference": fp32.name, "error": str(e)})
    if stress:
        stage_start = time.perf_counter()
        with heartbeat(log, "validate: stress check"):
            report.stress = stress_check(opset=opset, workdir=export_dir)
        log(f"validate: stress check (all-fp16 must overflow, the mixed graph must not)  "
            f"{'ok' if report.stress['passed'] else 'FAILED'}  ({time.perf_counter() - stage_start:.1f} s)")
    if sample_steps != 0:
        digits = _is_digits_config(model.config)
        # The built-in model: one digit per class, 50 steps, seconds. Other models: a short chain of 2 images,
        # since every step is a forward per backend (DiT-XL/2 on 2 CPU cores: ~1 s per image per forward).
        steps = sample_steps or (50 if digits else 5)
        n = sample_images or (model.config.num_classes if digits else 2)
        labels = [i % model.config.num_classes for i in range(n)]
        with scratch_dir(export_dir, "samples") as tmp:
            def make(path: Path, precision: str):
                def backend():
                    run = emulated_copy(path, tmp) if needs_emulation(precision, providers) else path
                    return OnnxRuntimeBackend(run, model.config, providers=providers)
                return backend

            backends = {path.name: make(path, precision) for (graph, precision), path in present.items()
                        if graph == "xty"}
            report.samples = sample_parity(model, backends, labels=labels, steps=steps, log=log)
        for s in report.samples:
            log(f"validate: samples {s.file:<17} PSNR min {min(s.psnr_db):.1f} dB  {'ok' if s.passed else 'FAILED'}  "
                f"({s.seconds:.1f} s)")
    report.tensorrt = tensorrt_parity(export_dir, model, batches=batches, log=log)
    report.seconds = time.perf_counter() - start
    return report


def tensorrt_parity(export_dir: str | Path, model: DiT, *, batches=DEFAULT_BATCHES, log=print) -> dict:
    """ONNX Runtime vs this machine's TensorRT engines in the export, side by side in Polygraphy's Comparator.

    Each engine is compared with the ONNX graph it was built from, at `batches`, within that graph's
    tolerance. Returns {"status": "skipped", "reason"} where TensorRT, a GPU or an engine is missing.
    """
    from . import engine

    reason = engine.tensorrt_unavailable_reason(for_build=False)
    if reason:
        return {"status": "skipped", "reason": reason}
    export_dir = Path(export_dir)
    rows = []
    for graph, stem in (("xty", "model"), ("cond", "cond")):
        plan = engine.plan_path_for(export_dir, stem)
        if not plan.is_file():
            continue
        meta = engine.read_engine_metadata(plan)
        onnx_path = export_dir / meta["onnx_file"]
        precision = "fp16" if ".fp16." in onnx_path.name else "fp32"
        feeds = [{k: v.numpy() for k, v in graph_feed(model, graph, b, seed=b).items()}
                 for b in batches if meta["batch"]["min"] <= b <= meta["batch"]["max"]]
        with heartbeat(log, f"validate: {plan.name} against {onnx_path.name} (TensorRT vs ONNX Runtime)"):
            compared = engine.compare_with_onnxruntime(onnx_path, plan, feeds, tolerance=TOLERANCE[precision])
        for row in compared:
            rows.append({**row, "plan": plan.name, "onnx": onnx_path.name, "tolerance": TOLERANCE[precision]})
    if not rows:
        return {"status": "skipped", "reason": "the export has no TensorRT engine for this GPU"}
    passed = all(r["passed"] for r in rows)
    log(f"validate: tensorrt vs onnxruntime, {len(rows)} comparisons  {'ok' if passed else 'FAILED'}")
    return {"status": "compared", "rows": rows, "passed": passed}
