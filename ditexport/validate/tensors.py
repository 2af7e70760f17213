"""Tensor level: each graph on ONNX Runtime vs torch fp32 at several batches; drift located per tensor."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..artifacts import scratch_dir
from ..errors import DitexportError
from ..export import TOLERANCE, graph_spec, release_memory, emulated_copy
from ..model import DiT
from .metrics import DEFAULT_BATCHES, needs_emulation, relative_error


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
                tolerance: float | None = None, references: dict | None = None, form: str = "") -> list[GraphCheck]:
    """One ONNX Runtime session, run at every batch size and compared with torch fp32 (fp16 on the CPU: emulated;
    an 8-bit graph's CPU `form` holds no fp16 and runs as it is).

    `references` caches torch outputs by (graph, batch, seed), so the fp32, fp16 and 8-bit graphs share them.
    """
    from ..backends.onnxruntime_backend import default_providers, load_session

    onnx_path = Path(onnx_path)
    tolerance = TOLERANCE[precision] if tolerance is None else tolerance
    spec = graph_spec(model.config, graph)
    providers = providers or default_providers()
    emulated = needs_emulation(precision, providers) and form != "cpu"
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

    from ..export import EXTERNAL_DATA_THRESHOLD

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
    `candidate_path` is an fp16 or 8-bit graph; `reference_path` the fp32 graph of the same export.
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
