"""The TensorRT backend: error paths on any machine; parity with ONNX Runtime, graphs and syncs on a GPU."""
import pytest
import torch
from conftest import concurrent_calls_match_lone_calls, model_feeds, no_host_sync_after_first_step

from ditexport.cli import main
from ditexport.engine import EngineError, tensorrt_unavailable_reason
from ditexport.model import create_model

REASON = tensorrt_unavailable_reason()
needs_trt = pytest.mark.skipif(REASON is not None, reason=f"needs TensorRT and a GPU: {REASON}")


def rel_err(a, b):
    return ((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm()).item()


# ------------------------------------------------------------------------------------ any machine

@pytest.mark.skipif(REASON is None, reason="TensorRT and a GPU are present: the error path does not apply")
def test_backend_says_why_it_cannot_run(tmp_path):
    from ditexport.backends.tensorrt_backend import TensorRTBackend

    with pytest.raises(EngineError, match="the tensorrt backend is unavailable: ") as info:
        TensorRTBackend(tmp_path / "model.plan", create_model("DiT-tiny/2").config)
    assert str(info.value).endswith(REASON)


@pytest.mark.skipif(REASON is None, reason="TensorRT and a GPU are present: the error path does not apply")
def test_sample_with_tensorrt_is_one_clear_line(capsys):
    code = main(["sample", "--model", "DiT-tiny/2", "--backend", "tensorrt", "--steps", "2", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and err.startswith("error: the tensorrt backend is unavailable")


# ------------------------------------------------------------------------------------ with TensorRT

@pytest.fixture(scope="module")
def tiny_engines(tmp_path_factory):
    """fp32 ONNX (the reference), fp16 ONNX and the two engines (x, t, y) and (x, c), batch 1..8."""
    pytest.importorskip("onnx_graphsurgeon", reason="the export needs onnx-graphsurgeon: pip install 'ditexport[trt]'")
    from ditexport.engine import batch_profiles, build_engine, plan_path_for
    from ditexport.export import export_onnx

    directory = tmp_path_factory.mktemp("tiny-export")
    model = create_model("DiT-tiny/2", seed=0)
    paths = {"fp32": export_onnx(model, directory / "model.onnx"),
             "cond32": export_onnx(model, directory / "cond.onnx", graph="cond"),
             "fp16": export_onnx(model, directory / "model.fp16.onnx", precision="fp16"),
             "cond16": export_onnx(model, directory / "cond.fp16.onnx", precision="fp16", graph="cond")}
    paths["plan"] = plan_path_for(directory)
    paths["cond_plan"] = plan_path_for(directory, stem="cond")
    paths["fp32_plan"] = directory / "fp32" / "model.plan"
    paths["profiles_plan"] = directory / "profiles" / "model.plan"
    for onnx_name, plan_name in (("fp16", "plan"), ("cond16", "cond_plan"), ("fp32", "fp32_plan")):
        build_engine(paths[onnx_name], paths[plan_name], min_batch=1, opt_batch=8, max_batch=8,
                     builder_optimization_level=1)
    build_engine(paths["fp16"], paths["profiles_plan"], batch_ranges=batch_profiles([1, 2, 8]),
                 builder_optimization_level=1)
    return model, paths


def _inputs(cfg, n, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen)
    t = torch.randint(0, 1000, (n,), generator=gen)
    y = torch.randint(0, cfg.num_classes + 1, (n,), generator=gen)
    return x, t, y


@pytest.mark.tensorrt
@needs_trt
def test_tensorrt_matches_onnxruntime_fp32(tiny_engines):
    from ditexport.backends.onnxruntime_backend import OnnxRuntimeBackend
    from ditexport.backends.tensorrt_backend import TensorRTBackend

    model, paths = tiny_engines
    reference = OnnxRuntimeBackend(paths["fp32"], model.config, providers=["CPUExecutionProvider"])
    backend = TensorRTBackend(paths["plan"], model.config)
    assert backend.max_batch == 8
    for n, seed in ((1, 0), (3, 1), (8, 2), (3, 3)):  # 3 again: a replay of the captured graph
        x, t, y = _inputs(model.config, n, seed)
        got = backend(x.cuda(), t.cuda(), y.cuda())
        assert got.dtype == torch.float32 and got.device.type == "cuda"
        assert rel_err(got, reference(x, t, y)) <= 5e-3
    assert sorted(backend._xty._contexts) == [1, 3, 8]


@pytest.mark.tensorrt
@needs_trt
def test_graph_replay_equals_plain_enqueue_and_outputs_are_copies(tiny_engines):
    from ditexport.backends.tensorrt_backend import TensorRTBackend

    model, paths = tiny_engines
    graphed = TensorRTBackend(paths["plan"], model.config)
    plain = TensorRTBackend(paths["plan"], model.config, cuda_graph=False)
    x, t, y = (v.cuda() for v in _inputs(model.config, 4, 7))
    first = graphed(x, t, y)
    kept = first.clone()
    assert torch.equal(first, plain(x, t, y))
    graphed(*(v.cuda() for v in _inputs(model.config, 4, 8)))
    assert torch.equal(first, kept)


@pytest.mark.tensorrt
@needs_trt
def test_condition_engine_and_split_above_the_profile(tiny_engines):
    from ditexport.backends.tensorrt_backend import TensorRTBackend

    model, paths = tiny_engines
    backend = TensorRTBackend(paths["plan"], model.config, cond_plan_path=paths["cond_plan"])
    x, t, y = _inputs(model.config, 19, 4)  # 19 rows: split into 8 + 8 + 3
    with torch.no_grad():
        c = model.embed_condition(t, y)
        expected = model(x, t, y)
    assert rel_err(backend(x.cuda(), t.cuda(), y.cuda()), expected) <= 5e-3
    assert rel_err(backend.with_condition(x.cuda(), c.cuda()), expected) <= 5e-3


@pytest.mark.tensorrt
@needs_trt
def test_tensorrt_sampling_has_no_host_sync_per_step_and_matches_onnxruntime(tiny_engines):
    from ditexport.backends.onnxruntime_backend import OnnxRuntimeBackend
    from ditexport.backends.tensorrt_backend import TensorRTBackend
    from ditexport.sampler import Sampler, SamplerConfig

    model, paths = tiny_engines
    cfg = model.config
    backend = TensorRTBackend(paths["plan"], cfg)
    sampler = Sampler(SamplerConfig(num_steps=20), cfg.in_channels, cfg.num_classes, cfg.learn_sigma)
    labels = torch.tensor([1, 4])
    sampler.sample(backend, labels, seed=0, input_size=cfg.input_size, device="cuda")  # captures the graph

    try:
        got = sampler.sample(backend, labels, seed=0, input_size=cfg.input_size, device="cuda",
                             progress=no_host_sync_after_first_step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    reference = OnnxRuntimeBackend(paths["fp32"], cfg, providers=["CPUExecutionProvider"])
    expected = sampler.sample(reference, labels, seed=0, input_size=cfg.input_size, device="cpu")
    assert torch.isfinite(got).all() and rel_err(got, expected) < 2e-2


@pytest.mark.tensorrt
@needs_trt
def test_plan_for_another_tensorrt_version_is_refused(tiny_engines, tmp_path):
    import json
    import shutil

    from ditexport.backends.tensorrt_backend import TensorRTBackend
    from ditexport.engine import metadata_path

    model, paths = tiny_engines
    plan = tmp_path / paths["plan"].name
    shutil.copy(paths["plan"], plan)
    meta = json.loads(metadata_path(paths["plan"]).read_text())
    meta["tensorrt_version"] = "9.0.0"
    metadata_path(plan).write_text(json.dumps(meta))
    with pytest.raises(EngineError, match="python -m ditexport build"):
        TensorRTBackend(plan, model.config)


@pytest.mark.tensorrt
@needs_trt
def test_polygraphy_comparison_of_onnxruntime_and_tensorrt(tiny_engines):
    from ditexport.engine import compare_with_onnxruntime

    model, paths = tiny_engines
    feeds = [{k: v.numpy() for k, v in zip(("x", "t", "y"), _inputs(model.config, n, n))} for n in (1, 5)]
    rows = compare_with_onnxruntime(paths["fp32"], paths["plan"], feeds)
    assert [(r["batch"], r["output"]) for r in rows] == [(1, "out"), (5, "out")]
    assert all(r["passed"] and 0 < r["rel_err"] <= 5e-3 for r in rows)


@pytest.mark.tensorrt
@needs_trt
def test_plan_from_the_fp32_graph_reports_fp32_and_matches_it(tiny_engines):
    from ditexport.backends.onnxruntime_backend import OnnxRuntimeBackend
    from ditexport.backends.tensorrt_backend import TensorRTBackend
    from ditexport.export import TOLERANCE

    model, paths = tiny_engines
    fp32 = TensorRTBackend(paths["fp32_plan"], model.config)
    assert fp32.precision == "fp32" and fp32.dtype == torch.float32 and "fp32" in fp32.describe()
    assert TensorRTBackend(paths["plan"], model.config).precision == "fp16"
    reference = OnnxRuntimeBackend(paths["fp32"], model.config, providers=["CPUExecutionProvider"])
    x, t, y = _inputs(model.config, 4, 11)
    assert rel_err(fp32(x.cuda(), t.cuda(), y.cuda()), reference(x, t, y)) <= TOLERANCE["fp32"]


@pytest.mark.tensorrt
@needs_trt
def test_each_batch_runs_on_its_own_profile(tiny_engines):
    from ditexport.backends.onnxruntime_backend import OnnxRuntimeBackend
    from ditexport.backends.tensorrt_backend import TensorRTBackend

    model, paths = tiny_engines
    backend = TensorRTBackend(paths["profiles_plan"], model.config)
    assert backend._xty.batch_ranges == [(1, 1, 1), (2, 2, 2), (3, 8, 8)] and backend.max_batch == 8
    reference = OnnxRuntimeBackend(paths["fp32"], model.config, providers=["CPUExecutionProvider"])
    for n in (1, 2, 3, 8, 2):
        x, t, y = _inputs(model.config, n, 20 + n)
        assert rel_err(backend(x.cuda(), t.cuda(), y.cuda()), reference(x, t, y)) <= 5e-3
    assert sorted(backend._xty._contexts) == [1, 2, 3, 8]


@pytest.mark.tensorrt
@needs_trt
@pytest.mark.parametrize("cuda_graph", [True, False])
def test_backend_is_safe_to_share_between_threads(tiny_engines, cuda_graph):
    from ditexport.backends.tensorrt_backend import TensorRTBackend

    model, paths = tiny_engines
    backend = TensorRTBackend(paths["plan"], model.config, cond_plan_path=paths["cond_plan"], cuda_graph=cuda_graph)
    feeds = model_feeds(model.config, [1, 2, 5, 3, 2, 8], device="cuda", seed=3)
    assert concurrent_calls_match_lone_calls(backend, feeds, threads=4) == 24


@pytest.mark.tensorrt
@needs_trt
@pytest.mark.parametrize("cuda_graph", [True, False])
def test_enqueues_on_its_own_stream_ordered_with_the_callers(tiny_engines, cuda_graph):
    from ditexport.backends.tensorrt_backend import TensorRTBackend

    model, paths = tiny_engines
    backend = TensorRTBackend(paths["plan"], model.config, cuda_graph=cuda_graph)
    assert backend._xty.stream.cuda_stream != 0  # never the legacy default stream
    x, t, y = (v.cuda() for v in _inputs(model.config, 4, 5))
    expected = backend(x, t, y)
    torch.cuda.synchronize()
    caller = torch.cuda.Stream()
    with torch.cuda.stream(caller):
        # The input is still being computed on the caller's stream (a long matmul chain first) when the
        # backend is called, and its output is read there at once: only stream ordering makes this right.
        big = torch.randn(2048, 2048, device="cuda")
        for _ in range(20):
            big = big @ big / 2048
        late_x = x + 0 * big.sum()
        got = backend(late_x, t, y) * 1
    torch.cuda.synchronize()
    assert torch.equal(got, expected)


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.skipif(REASON is not None or torch.cuda.device_count() < 2,
                    reason=f"needs TensorRT and two GPUs: {REASON or f'{torch.cuda.device_count()} GPU(s) here'}")
def test_second_gpu_while_the_first_is_current(tiny_engines, tmp_path):
    from ditexport.backends.onnxruntime_backend import OnnxRuntimeBackend
    from ditexport.backends.tensorrt_backend import TensorRTBackend
    from ditexport.engine import build_engine

    model, paths = tiny_engines
    plan = tmp_path / "gpu1" / "model.plan"
    build_engine(paths["fp16"], plan, min_batch=1, opt_batch=8, max_batch=8, builder_optimization_level=1,
                 device=torch.device("cuda", 1))
    torch.cuda.set_device(0)
    backend = TensorRTBackend(plan, model.config, device="cuda:1")
    reference = OnnxRuntimeBackend(paths["fp32"], model.config, providers=["CPUExecutionProvider"])
    x, t, y = _inputs(model.config, 3, 9)
    out = backend(x.to("cuda:1"), t.to("cuda:1"), y.to("cuda:1"))
    assert out.device == torch.device("cuda", 1) and torch.cuda.current_device() == 0
    assert rel_err(out, reference(x, t, y)) <= 5e-3
