"""Torch -> ONNX for the DiT: the export declared as data, fp32 and fp16 graphs, clean-up and external data.

Two graphs per model: `xty` takes (x, t, y) like `DiT.forward`; `cond` takes (x, c), the conditioning vector
that drives every adaLN-Zero modulation (`DiT.forward_with_condition`), so callers can feed blended or custom
conditions. Both keep t, y and c as runtime inputs with a dynamic batch axis; guidance stays in the sampler.

Precision lives in the graph, because TensorRT 11 builds strongly typed networks only. The fp16 graph is
derived from the fp32 graph by `apply_fp16_policy`: attention and the MLP (their matmuls, softmax and GELU)
and the final projection run in fp16; the patch embedding, the residual stream, layer norms, adaLN modulation
and gates, the timestep/label embedders and the unpatchify stay fp32 (NVIDIA's fix for fp16 overflow in
DiT-family models). Inputs and outputs stay fp32 in every graph, so one backend contract serves both, and
tensor names inside the fp16 regions are those of the fp32 graph, so the two compare tensor by tensor.

The 8-bit graphs (int8, fp8) are the fp32 graph with Q/DQ pairs on the GEMMs of every block, calibrated along
the sampler's own trajectories, then the fp16 policy (the "tensorrt" form, what TensorRT builds); int8 also gets
a "cpu" form, the same quantized values in the fp32 graph, which ONNX Runtime's CPU int8 kernels run fast.

`spec` declares the graphs and tolerances, `trace` turns torch into ONNX, `precision` holds the fp16 policy
and the fp16 emulation that validation uses, `quantize` the 8-bit recipe and Q/DQ rewrite, `calibrate` the
ranges, `save` cleans up and writes graphs (external data above 2 GB).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..artifacts import onnx_filename, scratch_dir
from ..model import DiT, DiTConfig
from ..precisions import CALIBRATION_LIMITS, CalibrationSettings, QuantizationError, QuantRecipe
from .calibrate import Calibration, calibrate
from .emulation import emulate_fp16, emulated_copy
from .precision import FP16_POLICY_TEXT, apply_fp16_policy, in_fp16_region, tensor_types
from .quantize import QUANT_FORMS, QUANT_OPSET, insert_qdq
from .save import clean_up, initializer_bytes, save_onnx
from .spec import (DEFAULT_OPSET, DEFAULT_PRECISIONS, DIAGNOSTIC_PRECISIONS, EXTERNAL_DATA_THRESHOLD, GRAPHS,
                   ONNX_ATTENTION_OPSET, PRECISIONS, QUANT_PRECISIONS, TOLERANCE, ExportError, GraphSpec, TensorSpec,
                   attention_mode, graph_spec, io_spec)
from .trace import _torch_to_onnx, release_memory
from ..logs import get_logger

LOG = get_logger("export")

__all__ = ["CALIBRATION_LIMITS", "DEFAULT_OPSET", "DEFAULT_PRECISIONS", "DIAGNOSTIC_PRECISIONS",
           "EXTERNAL_DATA_THRESHOLD", "FP16_POLICY_TEXT", "GRAPHS", "ONNX_ATTENTION_OPSET", "PRECISIONS",
           "QUANT_FORMS", "QUANT_PRECISIONS", "TOLERANCE", "Calibration", "CalibrationSettings", "ExportError",
           "GraphSpec", "QuantRecipe", "QuantizationError", "TensorSpec", "apply_fp16_policy", "attention_mode",
           "calibrate", "clean_up", "emulate_fp16", "emulated_copy", "export_graphs", "export_onnx", "graph_spec",
           "in_fp16_region", "initializer_bytes", "insert_qdq", "io_spec", "quantization_record", "release_memory",
           "save_onnx", "tensor_types"]


#################################################################################
#                                 Public API                                    #
#################################################################################

def _check_options(precision: str, graph: str, opset: int) -> None:
    if precision not in PRECISIONS + DIAGNOSTIC_PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if graph not in GRAPHS:
        raise ExportError(f"unknown graph {graph!r}; choose one of {', '.join(GRAPHS)}")
    if not 18 <= opset <= 25:
        raise ExportError(f"opset {opset} is not supported; use 18 to 25 (default {DEFAULT_OPSET})")


def _finish(proto, config: DiTConfig, graph: str, precision: str, opset: int,
            calibration: Calibration | None = None, form: str = ""):
    """fp16 conversion (and Q/DQ for 8-bit) where asked, clean-up, and the metadata that identifies the graph."""
    ir_version = proto.ir_version
    kept = [p for p in proto.metadata_props if not p.key.startswith("ditexport.")]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    quantized = None
    if precision in QUANT_PRECISIONS:
        if calibration is None:
            raise ExportError(f"a {precision} graph needs a calibration (ditexport.export.calibrate)")
        if "attention" in calibration.recipe.layers and attention_mode(opset) != "matmul-softmax-matmul":
            raise QuantizationError(f"attention is one ONNX Attention op at opset {opset}; quantizing its matmuls "
                                    f"needs opset below {ONNX_ATTENTION_OPSET}", "layers")
        form = form or "tensorrt"
        quantized = insert_qdq(proto, precision, calibration.amax, calibration.recipe, form=form,
                               channel_amax=calibration.channel_amax)
        if form == "tensorrt":
            apply_fp16_policy(proto)
    elif precision == "fp16":
        apply_fp16_policy(proto)
    elif precision == "fp16-all":
        apply_fp16_policy(proto, in_fp16=lambda node: True)
    proto = clean_up(proto)
    proto.ir_version = ir_version
    meta = [("ditexport.graph", graph), ("ditexport.precision", precision),
            ("ditexport.config", json.dumps(config.to_dict())), ("ditexport.attention", attention_mode(opset))]
    if quantized is not None:
        meta += [("ditexport.form", form),
                 ("ditexport.quantization", json.dumps({
                     "recipe": calibration.recipe.to_dict(), "calibration": calibration.to_dict(),
                     "quantized_gemms": len(quantized.layers), "scales_sha256": quantized.scales_sha256()}))]
    for key, value in meta:
        proto.metadata_props.add(key=key, value=value)
    return proto


def quantization_record(onnx_path: str | Path) -> dict | None:
    """What an 8-bit graph records about its quantization (recipe, calibration, scales' hash), read without
    its weights; None for an fp32/fp16 graph."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    if "ditexport.quantization" not in meta:
        return None
    return {"form": meta.get("ditexport.form"), **json.loads(meta["ditexport.quantization"])}


def export_onnx(model: DiT, path: str | Path, *, precision: str = "fp32", graph: str = "xty",
                opset: int | None = None, batch: int = 2,
                external_data_threshold: int = EXTERNAL_DATA_THRESHOLD, calibration: Calibration | None = None,
                form: str = "") -> Path:
    """Exports one graph of `model` to `path` (written atomically) and returns the path.

    precision: "fp32", "fp16" (the mixed policy above), "int8" or "fp8" (Q/DQ, calibrated by `calibration`, else
    by `calibrate(model)` with the default settings; `form` "tensorrt" or, for int8, "cpu");
    graph: "xty" (x, t, y) or "cond" (x, c).
    `batch` is the size of the sample the exporter traces with; the batch axis stays dynamic.
    """
    opset = opset or DEFAULT_OPSET
    _check_options(precision, graph, opset)
    if precision in QUANT_PRECISIONS and calibration is None:
        calibration = calibrate(model)
    proto = _torch_to_onnx(model, graph, opset, batch, workdir=Path(path).parent)
    return save_onnx(_finish(proto, model.config, graph, precision, opset, calibration, form), path,
                     external_data_threshold)


def export_graphs(model: DiT, out_dir: str | Path, *, precisions=DEFAULT_PRECISIONS, graphs=GRAPHS,
                  opset: int | None = None, batch: int = 2,
                  external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
                  calibration: CalibrationSettings | None = None, recipe: QuantRecipe | None = None,
                  log=LOG.info) -> dict[tuple, Path]:
    """Every (graph, precision) into `out_dir` under the layout's file names, tracing each graph once;
    int8 adds its CPU form under the key (graph, "int8", "cpu").

    The fp16 and 8-bit graphs are derived from the saved fp32 graph rather than from a copy in memory, so at
    most one graph's weights are held at a time besides the model's (DiT-XL/2: 2.7 GB each). The 8-bit graphs
    share one calibration (`calibration` settings, `recipe`), run first.
    """
    import time

    import onnx

    from ..progress import heartbeat

    opset = opset or DEFAULT_OPSET
    for precision in precisions:
        _check_options(precision, "xty", opset)
    out_dir = Path(out_dir)
    paths = {}
    calibrated = None
    if any(p in QUANT_PRECISIONS for p in precisions):
        settings, recipe = calibration or CalibrationSettings(), recipe or QuantRecipe()
        settings.check()
        recipe.check()
        with heartbeat(log, f"calibrate: {settings.images} images x {settings.steps} {settings.method} steps "
                            f"through torch ({', '.join(recipe.layers)})", end_line=True):
            calibrated = calibrate(model, settings, recipe)
        log(f"calibrate: {len(calibrated.amax)} input ranges from {calibrated.forwards} forwards of "
            f"{calibrated.rows} rows ({calibrated.seconds:.1f} s)")
    with scratch_dir(out_dir, "fp32") as scratch:
        for graph in graphs:
            start = time.perf_counter()
            fp32_path = out_dir / onnx_filename(graph, "fp32") if "fp32" in precisions else \
                Path(scratch) / onnx_filename(graph, "fp32")
            with heartbeat(log, f"export: tracing the {graph} graph (torch.onnx.export, dynamo)", end_line=True):
                proto = _torch_to_onnx(model, graph, opset, batch, workdir=out_dir)
            with heartbeat(log, f"export: cleaning up and writing {fp32_path.name}"):
                save_onnx(_finish(proto, model.config, graph, "fp32", opset), fp32_path, external_data_threshold)
                del proto
                release_memory()
            for precision in precisions:
                forms = ("", "cpu") if precision == "int8" else ("",)
                for form in forms:
                    if precision != "fp32":
                        path = out_dir / onnx_filename(graph, precision, form)
                        what = f"{precision} policy" + (f", {form} form" if form else "")
                        with heartbeat(log, f"export: deriving {path.name} from {fp32_path.name} ({what})"):
                            proto = onnx.load(str(fp32_path))
                            save_onnx(_finish(proto, model.config, graph, precision, opset, calibrated, form),
                                      path, external_data_threshold)
                            del proto
                            release_memory()
                    else:
                        path = fp32_path
                    paths[(graph, precision, form) if form else (graph, precision)] = path
                    graph_opset = max(opset, QUANT_OPSET) if precision in QUANT_PRECISIONS else opset
                    log(f"export: {path.name:<20} {precision:<5} opset {graph_opset}  "
                        f"{_size_text(path)}  ({time.perf_counter() - start:.1f} s)")
                    start = time.perf_counter()
    return paths


def _size_text(path: Path) -> str:
    size = path.stat().st_size
    data = path.parent / f"{path.name}.data"
    if data.is_file():
        size += data.stat().st_size
    return f"{size / 1e6:8.1f} MB" + (" (external data)" if data.is_file() else "")
