"""ditexport.validate: the numbers behind PASSED/FAILED, the fp16 emulation, drift localisation, stress, samples."""
from __future__ import annotations

import math
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from ditexport.backends.onnxruntime_backend import OnnxRuntimeBackend
from ditexport.export import export_graphs
from ditexport.model import create_model
from ditexport.validate import (FP16_MAX, SAMPLE_PSNR_FLOOR, ValidationReport, check_graph, emulate_fp16,
                                emulated_copy, graph_feed, locate_drift, psnr, relative_error, sample_parity,
                                stress_check, validate_export)

CPU = ["CPUExecutionProvider"]


# These models are tiny: one torch thread is faster than two, and immune to a busy second core.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_relative_error_and_non_finite_values():
    b = np.array([3.0, 4.0])
    rel, max_abs, finite = relative_error(b + [0.0, 0.5], b)
    assert rel == pytest.approx(0.1) and max_abs == pytest.approx(0.5) and finite
    assert relative_error([np.nan, 1.0], b) == (math.inf, math.inf, False)
    assert relative_error([np.inf, 1.0], b)[2] is False


def test_psnr_per_sample():
    import torch

    a = torch.zeros(2, 1, 4, 4)
    b = a.clone()
    b[1] += 0.1  # MSE 0.01 -> 20 dB
    assert psnr(a, b) == [math.inf, pytest.approx(20.0)]


def test_fp16_emulation_rounds_and_overflows_like_fp16(tmp_path):
    """A two-op fp16 graph: emulated, it rounds each result to fp16 and overflows past 65504."""
    nodes = [helper.make_node("Cast", ["a"], ["h"], to=TensorProto.FLOAT16),
             helper.make_node("Add", ["h", "h"], ["s"]),
             helper.make_node("Cast", ["s"], ["out"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [3])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    emulated = emulate_fp16(proto)
    assert all(i.type.tensor_type.elem_type == TensorProto.FLOAT for i in emulated.graph.input)
    session = ort.InferenceSession(emulated.SerializeToString(), providers=CPU)
    a = np.array([1.0001, 40000.0, 3.0], np.float32)
    (out,) = session.run(None, {"a": a})
    assert out[0] == np.float32(np.float16(1.0001)) * 2     # rounded to fp16 on the way in
    assert np.isinf(out[1])                                  # 80000 does not fit in fp16
    assert out[2] == 6.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = create_model("DiT-tiny/2", seed=5)
    out = tmp_path_factory.mktemp("validate")
    paths = export_graphs(model, out, graphs=("xty",), log=lambda *_: None)
    return model, paths[("xty", "fp32")], paths[("xty", "fp16")]


def test_check_graph_reports_each_batch(tiny):
    model, fp32, fp16 = tiny
    checks = check_graph(model, fp16, precision="fp16", batches=(1, 2, 5), providers=CPU)
    assert [c.batch for c in checks] == [1, 2, 5]
    assert all(c.emulated and c.passed and 1e-5 < c.rel_err < 5e-3 for c in checks)
    # The same graph fails a tolerance it cannot meet: the check compares real numbers.
    strict = check_graph(model, fp16, precision="fp16", batches=(2,), providers=CPU, tolerance=1e-6)
    assert not strict[0].passed


def test_per_tensor_comparison_names_the_first_drifting_tensor(tiny, tmp_path):
    """A doubled weight matrix planted in block 1's fc1 weights: validation fails and Polygraphy's all-tensor run names
    the output of the MatMul that reads them as the first tensor to drift."""
    model, fp32, fp16 = tiny
    proto = onnx.load(str(fp16))
    bias_add = next(n for n in proto.graph.node if "blocks.1.mlp.fc1.bias" in n.input)
    matmul = next(n for n in proto.graph.node if n.op_type == "MatMul" and n.output[0] in bias_add.input)
    weight = next(t for t in proto.graph.initializer if t.name == matmul.input[1])
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float16(2), weight.name))
    broken = tmp_path / "model.fp16.onnx"
    onnx.save(proto, str(broken))

    checks = check_graph(model, broken, precision="fp16", batches=(2,), providers=CPU)
    assert not checks[0].passed
    drift = locate_drift(fp32, broken, graph_feed(model, "xty", 1, seed=1))
    assert drift["tensors_compared"] > 50
    assert drift["first_drift"]["tensor"] == matmul.output[0]
    assert drift["first_drift"]["rel_err"] > 5e-3

    # The same through the whole validation: FAILED, with the diagnosis in the report.
    shutil.copy(fp32, tmp_path / "model.onnx")
    report = validate_export(tmp_path, model, batches=(2,), stress=False, sample_steps=0, providers=CPU,
                             log=lambda *_: None)
    assert not report.passed
    assert [c.passed for c in report.checks] == [True, False]
    assert report.drift[0]["first_drift"]["tensor"] == matmul.output[0]
    text = report.format()
    assert f"first drifting tensor {matmul.output[0]!r}" in text and text.splitlines()[-1].startswith("FAILED")


def test_stress_the_all_fp16_graph_overflows_and_the_mixed_graph_does_not():
    result = stress_check("DiT-tiny/2")
    assert result["residual_max"] > FP16_MAX          # the residual stream really leaves the fp16 range
    assert result["largest_weight"] < FP16_MAX        # ... while every weight fits in fp16
    assert not result["all_fp16"]["finite"]
    assert result["policy_fp16"]["finite"] and result["policy_fp16"]["rel_err"] <= 5e-3
    assert result["passed"]


def test_sample_parity_on_the_builtin_digits_model(tmp_path):
    from ditexport.errors import DitexportError
    from ditexport.zoo import load_builtin

    try:
        model = load_builtin("digits")
    except DitexportError as e:
        pytest.skip(f"built-in digits weights are missing: {e}")
    paths = export_graphs(model, tmp_path, graphs=("xty",), log=lambda *_: None)
    backends = {"model.onnx": OnnxRuntimeBackend(paths[("xty", "fp32")], model.config, providers=CPU),
                "model.fp16.onnx": OnnxRuntimeBackend(emulated_copy(paths[("xty", "fp16")], tmp_path),
                                                      model.config, providers=CPU)}
    checks = sample_parity(model, backends, labels=list(range(10)), steps=12)
    fp32, fp16 = checks
    assert fp32.precision == "fp32" and fp16.precision == "fp16"
    assert min(fp32.psnr_db) > SAMPLE_PSNR_FLOOR["fp32"] and min(fp16.psnr_db) > SAMPLE_PSNR_FLOOR["fp16"]
    assert min(fp32.psnr_db) > min(fp16.psnr_db)  # fp16 really differs, and less than fp32 does not
    assert fp32.class_agreement == fp16.class_agreement == 1.0
    # The trained model draws the digits it is asked for, through every backend.
    assert np.mean(np.array(fp16.backend_classes) == np.arange(10)) >= 0.8
    assert fp32.passed and fp16.passed


def test_report_fails_when_any_part_fails():
    from ditexport.validate import GraphCheck

    ok = GraphCheck("model.onnx", "xty", "fp32", 2, 1e-7, 1e-7, 1e-5, True, True)
    bad = GraphCheck("model.fp16.onnx", "xty", "fp16", 2, math.inf, math.inf, 5e-3, False, False, "non-finite")
    report = ValidationReport("exports/x", "m", ort.__version__, CPU, checks=[ok])
    assert report.passed and report.format().endswith(")") and "PASSED" in report.format().splitlines()[-1]
    report.checks.append(bad)
    assert not report.passed
    assert report.format().splitlines()[-1].startswith("FAILED")
    assert report.to_dict()["checks"][1]["rel_err"] == "inf"  # report.json stays standard JSON
    assert ValidationReport("exports/x", "m", ort.__version__, CPU).passed is False  # nothing checked
