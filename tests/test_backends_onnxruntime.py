"""OnnxRuntimeBackend: the Backend contract on an exported graph, and clear errors for bad graphs."""
from __future__ import annotations

import pytest
import torch
from conftest import concurrent_calls_match_lone_calls, model_feeds, observe_chunks

from ditexport.backends import OnnxRuntimeBackend, TorchBackend
from ditexport.backends.onnxruntime_backend import (CPU, CUDA, OnnxRuntimeError, cuda_provider_options,
                                                    default_providers, exact_fp32_providers)
from ditexport.sampler import SamplerConfig
from ditexport.export import export_graphs
from ditexport.model import create_model, get_config
from ditexport.pipeline import Pipeline
from ditexport.validate import graph_feed, relative_error


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = create_model("DiT-tiny/2", seed=11)
    out = tmp_path_factory.mktemp("ort")
    paths = export_graphs(model, out, precisions=("fp32",), log=lambda *_: None)
    return model, paths[("xty", "fp32")], paths[("cond", "fp32")]


@pytest.fixture(scope="module")
def fp16_graph(exported, tmp_path_factory):
    model = exported[0]
    paths = export_graphs(model, tmp_path_factory.mktemp("ort16"), graphs=("xty",), log=lambda *_: None)
    return paths[("xty", "fp16")]


def test_forward_and_with_condition_match_torch(exported):
    model, xty, cond = exported
    backend = OnnxRuntimeBackend(xty, model.config, cond_path=cond)
    reference = TorchBackend(model)
    assert backend.device == torch.device("cpu") and backend.precision == "fp32"
    assert backend.providers == ["CPUExecutionProvider"]
    feed = graph_feed(model, "xty", 3, seed=4)
    out = backend(feed["x"], feed["t"], feed["y"])
    assert out.dtype == torch.float32 and out.shape == (3, 8, 8, 8)
    assert relative_error(out, reference(feed["x"], feed["t"], feed["y"]))[0] < 1e-5
    with torch.no_grad():
        c = model.embed_condition(feed["t"], feed["y"])
    assert relative_error(backend.with_condition(feed["x"], c), out)[0] < 1e-6


def test_batches_above_max_batch_are_split(exported):
    model, xty, _ = exported
    whole = OnnxRuntimeBackend(xty, model.config)
    split = OnnxRuntimeBackend(xty, model.config, max_batch=2)
    chunks = observe_chunks(split, "_forward")
    feed = graph_feed(model, "xty", 5, seed=9)
    a = whole(feed["x"], feed["t"], feed["y"])
    b = split(feed["x"], feed["t"], feed["y"])
    assert b.shape[0] == 5 and relative_error(b, a)[0] < 1e-6
    assert chunks == [2, 2, 1]


def test_pipeline_samples_like_torch(exported):
    model, xty, _ = exported
    cfg = SamplerConfig(num_steps=5, guidance_scale=3.0)
    ours = Pipeline(OnnxRuntimeBackend(xty, model.config)).run([1, 2], seed=3, sampler_cfg=cfg, progress=False)
    ref = Pipeline(TorchBackend(model)).run([1, 2], seed=3, sampler_cfg=cfg, progress=False)
    assert ours.backend == "onnxruntime"
    assert relative_error(ours.images, ref.images)[0] < 1e-4


def test_missing_corrupt_and_truncated_graphs_are_one_clear_error(exported, tmp_path):
    model, xty, _ = exported
    with pytest.raises(OnnxRuntimeError, match="not found"):
        OnnxRuntimeBackend(tmp_path / "nope.onnx", model.config)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf" * 10)
    with pytest.raises(OnnxRuntimeError, match="garbage.onnx.*corrupt"):
        OnnxRuntimeBackend(garbage, model.config)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(xty.read_bytes()[: xty.stat().st_size // 2])
    with pytest.raises(OnnxRuntimeError, match="truncated.onnx"):
        OnnxRuntimeBackend(truncated, model.config)


def test_graph_that_does_not_fit_the_config_or_lacks_cond(exported):
    model, xty, cond = exported
    with pytest.raises(OnnxRuntimeError, match="takes x of shape"):
        OnnxRuntimeBackend(xty, get_config("DiT-digits"))
    with pytest.raises(OnnxRuntimeError, match="expected"):
        OnnxRuntimeBackend(cond, model.config)  # the cond graph where the (x, t, y) graph belongs
    backend = OnnxRuntimeBackend(xty, model.config)
    with pytest.raises(OnnxRuntimeError, match="cond_path"):
        backend.with_condition(torch.zeros(1, 4, 8, 8), torch.zeros(1, 64))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cpu_backend_is_safe_to_share_between_threads(exported, fp16_graph, precision):
    model, xty, _ = exported
    backend = OnnxRuntimeBackend(xty if precision == "fp32" else fp16_graph, model.config, max_batch=4, threads=1)
    assert backend.precision == precision
    feeds = model_feeds(model.config, [1, 2, 5, 3, 2, 6], seed=7)
    assert concurrent_calls_match_lone_calls(backend, feeds, threads=4) == 24


def test_cuda_provider_runs_fp32_without_tf32():
    # ORT's CUDA provider defaults to use_tf32=1; these are the options every session here is created with.
    assert cuda_provider_options(1) == {"device_id": "1", "use_tf32": "0"}
    assert exact_fp32_providers([CUDA, CPU], device_index=2) == [(CUDA, {"device_id": "2", "use_tf32": "0"}), CPU]
    user = [(CUDA, {"device_id": 1, "use_tf32": "1", "gpu_mem_limit": 2 ** 30}), CPU]
    assert exact_fp32_providers(user) == [(CUDA, {"device_id": 1, "use_tf32": "0", "gpu_mem_limit": 2 ** 30}), CPU]
    assert user[0][1]["use_tf32"] == "1"  # the caller's list is not modified
    assert exact_fp32_providers([CPU]) == [CPU]
    assert default_providers(torch.device("cpu")) == [CPU]


def _cuda_provider_missing() -> str | None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "onnxruntime has no CUDA provider here (pip install onnxruntime-gpu)"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch"
    return None


@pytest.mark.gpu
def test_cuda_provider_with_io_binding_matches_the_cpu(tmp_path):
    reason = _cuda_provider_missing()
    if reason:
        pytest.skip(reason)
    model = create_model("DiT-tiny/2", seed=11)
    paths = export_graphs(model, tmp_path, log=lambda *_: None)
    feed = graph_feed(model, "xty", 3, seed=4)
    cpu = OnnxRuntimeBackend(paths[("xty", "fp32")], model.config, providers=["CPUExecutionProvider"])
    expected = cpu(feed["x"], feed["t"], feed["y"])
    for precision, limit in (("fp32", 1e-5), ("fp16", 5e-3)):  # fp32: the contract, reachable with TF32 off
        gpu = OnnxRuntimeBackend(paths[("xty", precision)], model.config,
                                 cond_path=paths[("cond", precision)])
        assert gpu.device.type == "cuda" and gpu.providers[0] == "CUDAExecutionProvider"
        options = gpu.session.get_provider_options()[CUDA]
        assert options["use_tf32"] == "0"
        # ORT computes on the backend's own torch stream, ordered with the caller's on the device (issue 21).
        assert gpu.stream is not None and options["user_compute_stream"] == str(gpu.stream.cuda_stream) != "0"
        x, t, y = (v.to(gpu.device) for v in (feed["x"], feed["t"], feed["y"]))
        out = gpu(x, t, y)
        assert out.device == gpu.device  # bound in place: no trip through the host
        assert relative_error(out.cpu(), expected)[0] < limit
        with torch.no_grad():
            c = model.embed_condition(feed["t"], feed["y"]).to(gpu.device)
        assert relative_error(gpu.with_condition(x, c).cpu(), out.cpu())[0] < 1e-3


# ----------------------------------------------------- a CUDA session that fell back to the CPU (issue 21, defect 3)

def test_a_cuda_session_that_fell_back_to_the_cpu_is_refused_naming_the_cause(exported, monkeypatch):
    """Asked for CUDA, ONNX Runtime creates the session on the CPU with only a warning (here for real: this
    onnxruntime has no CUDA provider); before issue 21 the backend then quietly ran on the CPU."""
    import onnxruntime

    from ditexport.backends import onnxruntime_backend

    model, xty, cond = exported
    preloads = []
    preload = onnxruntime.preload_dlls
    monkeypatch.setattr(onnxruntime, "preload_dlls", lambda *a, **k: (preloads.append(1), preload(*a, **k))[1])
    onnxruntime_backend._preload_cuda_libraries.cache_clear()
    with pytest.raises(OnnxRuntimeError) as info:
        OnnxRuntimeBackend(xty, model.config, cond_path=cond, providers=[CUDA, CPU])
    message = str(info.value)
    assert "\n" not in message and preloads == [1]  # onnxruntime.preload_dlls() ran before the session
    assert message.startswith(f"ONNX Runtime {onnxruntime.__version__} was asked for its CUDA provider but fell back "
                              "to CPUExecutionProvider for model.onnx: ")
    assert message.endswith(f"onnxruntime {onnxruntime.__version__} here has no CUDA provider (the CPU build): "
                            "pip uninstall onnxruntime && pip install onnxruntime-gpu")
    # onnxruntime-gpu lists CUDA among its available providers even when its provider library cannot load (cuDNN
    # or cuBLAS missing): the loader's own error is the cause named.
    broken = exported[1].parent / "libonnxruntime_providers_cuda.so"
    broken.write_bytes(b"\x7fELF" + bytes(60))  # a library the dynamic loader refuses
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(onnxruntime_backend, "cuda_provider_library", lambda: broken)
    with pytest.raises(OnnxRuntimeError) as info:
        OnnxRuntimeBackend(xty, model.config, providers=[CUDA])
    message = str(info.value)
    assert "fell back to CPUExecutionProvider for model.onnx: its CUDA provider library does not load: " in message
    assert str(broken) in message and "pip install 'onnxruntime-gpu[cuda,cudnn]'" in message and "\n" not in message
    # Asked for the CPU, nothing changes.
    assert OnnxRuntimeBackend(xty, model.config, providers=[CPU]).device == torch.device("cpu")
