"""Graph clean-up (constant folding, einsum rewrite) and saving, with external data above 2 GB."""
from __future__ import annotations

from pathlib import Path


from ..artifacts import publish, scratch_dir
from .precision import SCOPES_KEY
from .spec import EXTERNAL_DATA_THRESHOLD


#################################################################################
#                                 Clean-up                                      #
#################################################################################

def _einsum_to_transpose(proto) -> int:
    """Rewrites single-input permutation Einsums (the unpatchify) as Transpose, which every runtime fuses."""
    from onnx import helper

    count = 0
    for i, n in enumerate(proto.graph.node):
        if n.op_type != "Einsum" or len(n.input) != 1:
            continue
        equation = next(a.s.decode() for a in n.attribute if a.name == "equation").replace(" ", "")
        lhs, _, rhs = equation.partition("->")
        if "." in equation or sorted(lhs) != sorted(rhs) or len(set(lhs)) != len(lhs):
            continue
        transpose = helper.make_node("Transpose", list(n.input), list(n.output), name=n.name or f"einsum_{i}",
                                     perm=[lhs.index(ch) for ch in rhs])
        transpose.metadata_props.extend(n.metadata_props)
        proto.graph.node[i].CopyFrom(transpose)
        count += 1
    return count


# Weights above this size stay in place during clean-up: graphsurgeon sees them as graph inputs, so it
# neither copies them (DiT-XL/2 holds 2.7 GB) nor folds anything computed from them (the exporter's own
# optimizer already has). Smaller constants (shapes, scales, biases) are folded as usual.
_WEIGHT_BYTES = 1 << 16


def clean_up(proto):
    """Permutation Einsum -> Transpose, then constant folding (incl. static shapes), dead-node removal and a
    topological sort by onnx-graphsurgeon; `proto` is updated in place and returned."""
    import onnx_graphsurgeon as gs
    from onnx import helper

    _einsum_to_transpose(proto)
    g = proto.graph
    # Q/DQ operands too: folding DequantizeLinear of a stored 8-bit weight would undo its quantization, and
    # graphsurgeon has no numpy type for FP8.
    qdq = {name for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") for name in n.input}
    weights = {t.name: t for t in g.initializer if t.ByteSize() > _WEIGHT_BYTES or t.name in qdq}
    skeleton = helper.make_model(
        helper.make_graph(list(g.node), g.name,
                          list(g.input) + [helper.make_tensor_value_info(n, t.data_type, list(t.dims))
                                           for n, t in weights.items()],
                          list(g.output), initializer=[t for t in g.initializer if t.name not in weights],
                          value_info=list(g.value_info)),
        opset_imports=list(proto.opset_import), ir_version=proto.ir_version)
    severity = gs.logger.G_LOGGER.severity
    gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR  # it warns, on stdout, that FP8 has no numpy type
    try:
        graph = gs.import_onnx(skeleton)
        graph.fold_constants(fold_shapes=True, error_ok=True).cleanup(remove_unused_graph_inputs=False).toposort()
        cleaned = gs.export_onnx(graph, do_type_check=True).graph
    finally:
        gs.logger.G_LOGGER.severity = severity
    del graph, skeleton

    # graphsurgeon drops node metadata; the module scopes in it drive the fp16 policy and tell a reader where a
    # node comes from. The exporter's stack traces and FX dumps are dropped: they would double a small file.
    scopes = {n.name: [p for p in n.metadata_props if p.key == SCOPES_KEY] for n in g.node if n.name}
    for node in cleaned.node:
        node.metadata_props.extend(scopes.get(node.name, []))
    used = {name for n in cleaned.node for name in n.input} | {o.name for o in cleaned.output}
    for i in reversed(range(len(g.initializer))):
        name = g.initializer[i].name
        if name not in weights or name not in used:
            del g.initializer[i]
    g.initializer.extend(cleaned.initializer)
    for field, values in (("node", cleaned.node), ("input", [i for i in cleaned.input if i.name not in weights]),
                          ("output", cleaned.output), ("value_info", cleaned.value_info)):
        del getattr(g, field)[:]
        getattr(g, field).extend(values)
    return proto


#################################################################################
#                                 Saving                                        #
#################################################################################

def initializer_bytes(proto) -> int:
    return sum(t.ByteSize() for t in proto.graph.initializer)


def save_onnx(proto, path: str | Path, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> Path:
    """Writes `path` (+ `path.data` above the threshold) atomically, then checks it with shape inference.

    Both files are written into a temporary directory beside `path` and renamed into place, the weights
    first, so a reader never sees a graph whose weights are not there yet.
    """
    import onnx

    path = Path(path)
    external = initializer_bytes(proto) > external_data_threshold
    data_name = f"{path.name}.data"
    with scratch_dir(path.parent, path.name) as tmp_dir:
        tmp = tmp_dir / path.name
        if external:
            onnx.save_model(proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        else:
            onnx.save_model(proto, str(tmp))
        # Strict shape inference rejects a graph whose types do not line up; the result keeps full shapes.
        onnx.shape_inference.infer_shapes_path(str(tmp), str(tmp), check_type=True, strict_mode=True)
        onnx.checker.check_model(str(tmp))
        if external:
            publish(tmp_dir / data_name, path.parent / data_name)
        else:
            (path.parent / data_name).unlink(missing_ok=True)
        publish(tmp, path)
    return path
