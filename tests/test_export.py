"""ditexport.export: the graphs compute what torch computes, keep their inputs live, and carry the fp16 policy."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto

from ditexport.artifacts import external_data_files
from ditexport.export import ExportError, export_graphs, export_onnx, in_fp16_region, io_spec
from ditexport.model import create_model
from ditexport.validate import check_graph, graph_feed, reference_output, relative_error

CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def model():
    return create_model("DiT-tiny/2", seed=3)


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    """model.onnx, model.fp16.onnx, cond.onnx, cond.fp16.onnx of a tiny random DiT, exported once."""
    out = tmp_path_factory.mktemp("export")
    paths = export_graphs(model, out, log=lambda *_: None)
    return {f"{g}.{p}": path for (g, p), path in paths.items()}


def session(path):
    return ort.InferenceSession(str(path), providers=CPU)


def run(path, feed):
    return session(path).run(None, {k: v.numpy() for k, v in feed.items()})[0]


@pytest.mark.parametrize("graph", ["xty", "cond"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_graphs_match_torch_fp32_at_two_batch_sizes(model, exported, graph, precision):
    checks = check_graph(model, exported[f"{graph}.{precision}"], graph=graph, precision=precision,
                         batches=(2, 3), providers=CPU)
    assert [c.batch for c in checks] == [2, 3]
    limit = 1e-5 if precision == "fp32" else 5e-3
    for c in checks:
        assert c.finite and c.rel_err <= limit, c
    if precision == "fp16":
        # fp16 rounding is really there: an fp16 graph that matched to fp32 accuracy would not be fp16.
        assert min(c.rel_err for c in checks) > 1e-5


def test_dynamic_batch_on_one_session(model, exported):
    s = session(exported["xty.fp32"])
    for batch in (1, 3, 8):
        feed = graph_feed(model, "xty", batch, seed=batch)
        (out,) = s.run(None, {k: v.numpy() for k, v in feed.items()})
        assert out.shape == (batch, model.config.out_channels, 8, 8)
        rel, _, finite = relative_error(out, reference_output(model, "xty", feed))
        assert finite and rel < 1e-5


def test_declared_io_and_metadata(model, exported):
    proto = onnx.load(str(exported["xty.fp16"]))
    inputs = {i.name: i.type.tensor_type for i in proto.graph.input}
    assert list(inputs) == ["x", "t", "y"]
    assert inputs["x"].elem_type == TensorProto.FLOAT  # inputs and outputs stay fp32 in the fp16 graph too
    assert inputs["t"].elem_type == inputs["y"].elem_type == TensorProto.INT64
    assert inputs["x"].shape.dim[0].dim_param == "batch"
    assert [d.dim_value for d in inputs["x"].shape.dim[1:]] == [4, 8, 8]
    (out,) = proto.graph.output
    assert out.name == "out" and out.type.tensor_type.elem_type == TensorProto.FLOAT
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["ditexport.graph"] == "xty" and meta["ditexport.precision"] == "fp16"
    spec = io_spec(model.config, max_images=4)
    assert spec["batch_profile"] == {"min": 1, "opt": 8, "max": 8}  # guided: two rows per image
    assert [i["name"] for i in spec["graphs"]["cond"]["inputs"]] == ["x", "c"]
    assert spec["graphs"]["cond"]["inputs"][1]["shape"] == ["batch", model.config.hidden_size]


def test_timestep_and_label_stay_runtime_inputs(model, exported):
    """Nothing about t or y is folded: changing either changes the output, exactly as in torch."""
    s = session(exported["xty.fp32"])
    base = graph_feed(model, "xty", 2, seed=0)
    variants = [base, {**base, "t": base["t"] + 100}, {**base, "y": (base["y"] + 1) % 10}]
    outs = []
    for feed in variants:
        (out,) = s.run(None, {k: v.numpy() for k, v in feed.items()})
        assert relative_error(out, reference_output(model, "xty", feed))[0] < 1e-5
        outs.append(out)
    assert np.abs(outs[0] - outs[1]).max() > 1e-3
    assert np.abs(outs[0] - outs[2]).max() > 1e-3


def test_cond_graph_equals_xty_graph_given_the_torch_embedders_c(model, exported):
    feed = graph_feed(model, "xty", 3, seed=7)
    with torch.no_grad():
        c = model.embed_condition(feed["t"], feed["y"])
    via_c = run(exported["cond.fp32"], {"x": feed["x"], "c": c})
    via_ty = run(exported["xty.fp32"], feed)
    assert relative_error(via_c, via_ty)[0] < 1e-6


def _producers(proto):
    return {o: n for n in proto.graph.node for o in n.output}


def test_fp16_policy_puts_matmuls_in_fp16_and_the_residual_stream_in_fp32(model, exported):
    proto = onnx.shape_inference.infer_shapes(onnx.load(str(exported["xty.fp16"])))
    types = {v.name: v.type.tensor_type.elem_type for v in (*proto.graph.value_info, *proto.graph.input)}
    types.update({t.name: t.data_type for t in proto.graph.initializer})
    by_op = {}
    for n in proto.graph.node:
        by_op.setdefault(n.op_type, []).append(n)
    half_matmuls = [n for n in by_op["MatMul"] if types[n.input[0]] == TensorProto.FLOAT16]
    # Per block qkv, Q K^T, weights V, proj, fc1, fc2; plus the final linear.
    assert len(half_matmuls) == 6 * model.config.depth + 1
    assert all(types[n.input[0]] == TensorProto.FLOAT16 for n in by_op["Softmax"])
    assert all(types[n.input[0]] == TensorProto.FLOAT for n in by_op["LayerNormalization"])
    # adaLN modulation (the Gemms on c) and the patch embedding stay fp32.
    assert all(types[n.input[1]] == TensorProto.FLOAT for n in by_op["Gemm"])
    assert all(types[n.input[1]] == TensorProto.FLOAT for n in by_op["Conv"])
    # The stream each LayerNorm reads is made by fp32 Adds (residual) fed by fp32 gate Muls.
    producers = _producers(proto)
    for ln in by_op["LayerNormalization"][1:]:
        add = producers[ln.input[0]]
        assert add.op_type == "Add" and all(types[i] == TensorProto.FLOAT for i in add.input)
    # One Cast into fp16 per attention and per MLP, one into the final linear; as many back out.
    to_half = [n for n in by_op["Cast"] if n.attribute[0].i == TensorProto.FLOAT16]
    to_float = [n for n in by_op["Cast"] if n.attribute[0].i == TensorProto.FLOAT
                and types[n.input[0]] == TensorProto.FLOAT16]
    assert len(to_half) == len(to_float) == 2 * model.config.depth + 1


def test_policy_selects_nodes_by_module_scope():
    from onnx import helper

    def node(scope):
        n = helper.make_node("MatMul", ["a", "b"], ["c"])
        n.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=str(["", *scope]))
        return n

    assert in_fp16_region(node(["blocks.3", "blocks.3.attn", "blocks.3.attn.qkv"]))
    assert in_fp16_region(node(["model.blocks.0", "model.blocks.0.mlp", "model.blocks.0.mlp.fc2"]))
    assert in_fp16_region(node(["final_layer", "final_layer.linear"]))
    assert not in_fp16_region(node(["blocks.3", "blocks.3.adaLN_modulation", "blocks.3.adaLN_modulation.1"]))
    assert not in_fp16_region(node(["final_layer", "final_layer.adaLN_modulation"]))
    assert not in_fp16_region(node(["x_embedder", "x_embedder.proj"]))
    assert not in_fp16_region(helper.make_node("Add", ["a", "b"], ["c"]))


def test_attention_is_a_matmul_softmax_matmul_with_the_scale_on_q_and_k(exported):
    proto = onnx.load(str(exported["xty.fp32"]))
    ops = {n.op_type for n in proto.graph.node}
    assert "Attention" not in ops and "Einsum" not in ops  # unpatchify's Einsum became a Transpose
    producers = _producers(proto)
    softmaxes = [n for n in proto.graph.node if n.op_type == "Softmax"]
    assert len(softmaxes) == 2
    for softmax in softmaxes:
        scores = producers[softmax.input[0]]
        assert scores.op_type == "MatMul"
        q_scaled = producers[scores.input[0]]
        k_scaled = producers[producers[scores.input[1]].input[0]]  # K^T = Transpose(k * s)
        assert q_scaled.op_type == k_scaled.op_type == "Mul"
        consumers = [n for n in proto.graph.node if softmax.output[0] in n.input]
        assert [n.op_type for n in consumers] == ["MatMul"]


def test_onnx_attention_op_at_opset_23(model, tmp_path):
    path = export_onnx(model, tmp_path / "model.onnx", opset=23)
    proto = onnx.load(str(path))
    assert sum(n.op_type == "Attention" for n in proto.graph.node) == model.config.depth
    feed = graph_feed(model, "xty", 2, seed=1)
    assert relative_error(run(path, feed), reference_output(model, "xty", feed))[0] < 1e-5


def test_external_data_above_the_threshold(model, exported, tmp_path):
    from ditexport.export import save_onnx

    path = export_onnx(model, tmp_path / "model.onnx", precision="fp16", external_data_threshold=0)
    data = tmp_path / "model.onnx.data"
    assert external_data_files(path) == [data]
    assert data.stat().st_size > 100_000 > path.stat().st_size  # the weights live in the side file
    feed = graph_feed(model, "xty", 2, seed=2)
    assert relative_error(run(path, feed), reference_output(model, "xty", feed))[0] < 5e-3
    assert relative_error(run(path, feed), run(exported["xty.fp16"], feed))[0] == 0.0
    # Saved again under the threshold, the stale side file goes away with the atomic replace.
    save_onnx(onnx.load(str(path)), path)
    assert not data.exists() and external_data_files(path) == []
    assert relative_error(run(path, feed), run(exported["xty.fp16"], feed))[0] == 0.0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_batch_one_export_is_refused(model, tmp_path):
    with pytest.raises(ExportError, match="batch"):
        export_onnx(model, tmp_path / "m.onnx", batch=1)
    with pytest.raises(ExportError, match="precision"):
        export_onnx(model, tmp_path / "m.onnx", precision="int4")
    assert not list(tmp_path.iterdir())


def test_exporting_leaves_the_model_in_its_mode(tmp_path):
    """Tracing the cond graph wraps the model; the model comes back in eval mode (a wrapper restored to its own
    training flag once put the DiT in training mode, with class dropout, after every export)."""
    model = create_model("DiT-tiny/2", seed=3)
    export_graphs(model, tmp_path, precisions=("fp32",), graphs=("cond",), log=lambda *_: None)
    assert not any(m.training for m in model.modules())
    model.train()
    export_onnx(model, tmp_path / "cond.onnx", graph="cond")
    assert all(m.training for m in model.modules())
