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

`spec` declares the graphs and tolerances, `trace` turns torch into ONNX, `precision` holds the fp16 policy
and the fp16 emulation that validation uses, `save` cleans up and writes graphs (external data above 2 GB).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..artifacts import onnx_filename, scratch_dir
from ..model import DiT, DiTConfig
from .emulation import emulate_fp16, emulated_copy
from .precision import FP16_POLICY_TEXT, apply_fp16_policy, in_fp16_region, tensor_types
from .save import clean_up, initializer_bytes, save_onnx
from .spec import (DEFAULT_OPSET, DIAGNOSTIC_PRECISIONS, EXTERNAL_DATA_THRESHOLD, GRAPHS, ONNX_ATTENTION_OPSET,
                   PRECISIONS, TOLERANCE, ExportError, GraphSpec, TensorSpec, attention_mode, graph_spec, io_spec)
from .trace import _torch_to_onnx, release_memory
from ..logs import get_logger

LOG = get_logger("export")

__all__ = ["DEFAULT_OPSET", "DIAGNOSTIC_PRECISIONS", "EXTERNAL_DATA_THRESHOLD", "FP16_POLICY_TEXT", "GRAPHS",
           "ONNX_ATTENTION_OPSET", "PRECISIONS", "TOLERANCE", "ExportError", "GraphSpec", "TensorSpec",
           "apply_fp16_policy", "attention_mode", "clean_up", "emulate_fp16", "emulated_copy", "export_graphs",
           "export_onnx", "graph_spec", "in_fp16_region", "initializer_bytes", "io_spec", "release_memory",
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


def _finish(proto, config: DiTConfig, graph: str, precision: str, opset: int):
    """fp16 conversion where asked, clean-up, and the metadata that identifies the graph."""
    ir_version = proto.ir_version
    kept = [p for p in proto.metadata_props if not p.key.startswith("ditexport.")]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    if precision == "fp16":
        apply_fp16_policy(proto)
    elif precision == "fp16-all":
        apply_fp16_policy(proto, in_fp16=lambda node: True)
    proto = clean_up(proto)
    proto.ir_version = ir_version
    for key, value in (("ditexport.graph", graph), ("ditexport.precision", precision),
                       ("ditexport.config", json.dumps(config.to_dict())),
                       ("ditexport.attention", attention_mode(opset))):
        proto.metadata_props.add(key=key, value=value)
    return proto


def export_onnx(model: DiT, path: str | Path, *, precision: str = "fp32", graph: str = "xty",
                opset: int | None = None, batch: int = 2,
                external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> Path:
    """Exports one graph of `model` to `path` (written atomically) and returns the path.

    precision: "fp32" or "fp16" (the mixed policy above); graph: "xty" (x, t, y) or "cond" (x, c).
    `batch` is the size of the sample the exporter traces with; the batch axis stays dynamic.
    """
    opset = opset or DEFAULT_OPSET
    _check_options(precision, graph, opset)
    proto = _torch_to_onnx(model, graph, opset, batch, workdir=Path(path).parent)
    return save_onnx(_finish(proto, model.config, graph, precision, opset), path, external_data_threshold)


def export_graphs(model: DiT, out_dir: str | Path, *, precisions=PRECISIONS, graphs=GRAPHS,
                  opset: int | None = None, batch: int = 2,
                  external_data_threshold: int = EXTERNAL_DATA_THRESHOLD, log=LOG.info) -> dict[tuple[str, str], Path]:
    """Every (graph, precision) into `out_dir` under the layout's file names, tracing each graph once.

    The fp16 graph is derived from the saved fp32 graph rather than from a copy in memory, so at most one
    graph's weights are held at a time besides the model's (DiT-XL/2: 2.7 GB each).
    """
    import time

    import onnx

    from ..progress import heartbeat

    opset = opset or DEFAULT_OPSET
    for precision in precisions:
        _check_options(precision, "xty", opset)
    out_dir = Path(out_dir)
    paths = {}
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
                if precision != "fp32":
                    path = out_dir / onnx_filename(graph, precision)
                    with heartbeat(log, f"export: deriving {path.name} from {fp32_path.name} ({precision} policy)"):
                        proto = onnx.load(str(fp32_path))
                        save_onnx(_finish(proto, model.config, graph, precision, opset), path,
                                  external_data_threshold)
                        del proto
                        release_memory()
                else:
                    path = fp32_path
                paths[(graph, precision)] = path
                log(f"export: {path.name:<18} {precision:<5} opset {opset}  "
                    f"{_size_text(path)}  ({time.perf_counter() - start:.1f} s)")
                start = time.perf_counter()
    return paths


def _size_text(path: Path) -> str:
    size = path.stat().st_size
    data = path.parent / f"{path.name}.data"
    if data.is_file():
        size += data.stat().st_size
    return f"{size / 1e6:8.1f} MB" + (" (external data)" if data.is_file() else "")
