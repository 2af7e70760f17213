"""The torch backend: fp16 on the CPU, sharing between threads, its CUDA paths (graphs, compile, devices,
streams) and the sampler's freedom from per-step host syncs."""
import numpy as np
import pytest
import torch
from conftest import concurrent_calls_match_lone_calls, model_feeds, no_host_sync_after_first_step, observe_chunks

from ditexport import zoo
from ditexport.backends import TorchBackend
from ditexport.cli import main
from ditexport.sampler import Sampler, SamplerConfig
from ditexport.export import TOLERANCE
from ditexport.model import create_model

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs an NVIDIA GPU with CUDA: torch sees none")


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def inputs(cfg, n, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen)
    t = torch.randint(0, 1000, (n,), generator=gen)
    y = torch.randint(0, cfg.num_classes + 1, (n,), generator=gen)
    return x.to(device), t.to(device), y.to(device)


# ------------------------------------------------------------------------------------ CPU

def test_cuda_only_modes_are_refused_on_cpu():
    model = create_model("DiT-tiny/2", seed=0)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        TorchBackend(model, "cpu", cuda_graph=True)
    with pytest.raises(ValueError, match="not both"):
        TorchBackend(model, "cuda", torch.float16, cuda_graph=True, compile_mode="reduce-overhead")
    with pytest.raises(ValueError, match="unknown torch.compile mode"):
        TorchBackend(model, "cpu", compile_mode="fastest")
    assert TorchBackend(model, "cpu").describe() == "torch (fp32, cpu)"


def _models():
    return {"DiT-tiny/2": create_model("DiT-tiny/2", seed=0), "digits": zoo.load_builtin("digits")}


@pytest.mark.parametrize("name", ["DiT-tiny/2", "digits"])
def test_fp16_on_the_cpu_matches_fp32_on_both_graphs(name, one_torch_thread):
    # Before the fix every fp16 forward crashed: the timestep frequencies (fp32) met the fp16 MLP.
    model = _models()[name]
    fp32 = TorchBackend(model, "cpu", torch.float32)
    fp16 = TorchBackend(_models()[name], "cpu", torch.float16)
    assert fp16.describe() == "torch (fp16, cpu)" and fp16.model.t_embedder.mlp[0].weight.dtype == torch.float16
    (x, t, y), = model_feeds(model.config, [6], seed=3)
    expected = fp32(x, t, y)
    got = fp16(x, t, y)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert 0 < rel_err(got, expected) <= TOLERANCE["fp16"]  # > 0: it really computed in fp16
    with torch.no_grad():
        c = fp32.model.embed_condition(t, y)
    expected_c = fp32.with_condition(x, c)
    assert torch.equal(expected_c, expected)
    assert 0 < rel_err(fp16.with_condition(x, c), expected_c) <= TOLERANCE["fp16"]


def test_the_issues_fp16_reproduction_runs():
    model = zoo.load_builtin("digits").half()
    x = torch.randn(2, 1, 8, 8).half()
    with torch.no_grad():
        out = model(x, torch.tensor([10, 900]), torch.tensor([3, 10]))
    assert out.dtype == torch.float16 and out.shape == (2, 2, 8, 8) and torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cpu_backend_is_safe_to_share_between_threads(dtype, one_torch_thread):
    backend = TorchBackend(create_model("DiT-tiny/2", seed=0), "cpu", dtype, max_batch=4)
    feeds = model_feeds(backend.config, [1, 2, 5, 3, 2, 6], seed=7)  # 5 and 6 are split by max_batch
    assert concurrent_calls_match_lone_calls(backend, feeds, threads=4) == 24


@pytest.mark.parametrize("rows, chunks", [(10, [4, 4, 2]), (8, [4, 4]), (4, [4]), (3, [3])])
def test_batches_above_max_batch_run_in_chunks_of_max_batch(rows, chunks, one_torch_thread):
    model = create_model("DiT-tiny/2", seed=0)
    backend = TorchBackend(model, "cpu", max_batch=4)
    xty_sizes, cond_sizes = observe_chunks(backend, "_forward"), observe_chunks(backend, "_forward_with_condition")
    (x, t, y), = model_feeds(model.config, [rows], seed=3)
    with torch.no_grad():
        whole, c = model(x, t, y), model.embed_condition(t, y)
        whole_cond = model.forward_with_condition(x, c)
    out = backend(x, t, y)
    assert xty_sizes == chunks and cond_sizes == []
    torch.testing.assert_close(out, whole, rtol=1e-5, atol=1e-6)  # rows in order, each from its own inputs
    out_cond = backend.with_condition(x, c)
    assert cond_sizes == chunks and xty_sizes == chunks
    torch.testing.assert_close(out_cond, whole_cond, rtol=1e-5, atol=1e-6)
    assert (out_cond - out).abs().max() < 1e-5  # both graphs agree: the same conditioning


def test_sample_command_runs_fp16_on_the_cpu(tmp_path, capsys):
    from PIL import Image

    args = ["sample", "--steps", "20", "--num-images", "4", "--seed", "5", "--quiet"]
    assert main([*args, "--precision", "fp16", "--out", str(tmp_path / "fp16.png")]) == 0
    assert "backend: torch (fp16, cpu)" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "fp32.png")]) == 0
    a, b = (torch.from_numpy(np.asarray(Image.open(tmp_path / f"{p}.png").convert("L"), dtype=np.float32))
            for p in ("fp16", "fp32"))
    assert a.shape == b.shape and b.std() > 20  # real digits, not a blank grid
    assert (a - b).abs().mean() < 0.5  # the same digits up to fp16 rounding (mean |diff| in 0..255 levels; 0.06 seen)


class _ReadsAValue:
    """A backend wrapper that reads one value per call, the kind of host sync the meta check must catch."""

    def __init__(self, backend):
        self.backend = backend

    def __call__(self, x, t, y):
        if t[0].item() < 0:
            raise AssertionError("unreachable")
        return self.backend(x, t, y)


def _sample_on_meta(backend, cfg, method="ddpm"):
    sampler = Sampler(SamplerConfig(num_steps=4, method=method), cfg.in_channels, cfg.num_classes, cfg.learn_sigma)
    x_T, noise = sampler.make_noise((2, cfg.in_channels, cfg.input_size, cfg.input_size), seed=0)
    return sampler.run(backend, x_T.to("meta"), torch.tensor([1, 2]), noise)


@pytest.mark.parametrize("method", ["ddpm", "ddim", "dpmpp-2m"])
def test_sampler_and_torch_backend_never_read_device_values(method):
    # Meta tensors carry shapes but no data: any .item(), bool(tensor), .tolist() or copy to the host raises.
    # The guided chain completing on them proves no step waits on a device value (on CUDA: no host sync).
    model = create_model("DiT-tiny/2", seed=0)
    backend = TorchBackend(model, "meta", max_batch=3)  # max_batch 3 also exercises the split of 4 rows
    out = _sample_on_meta(backend, model.config, method)
    assert out.device.type == "meta" and out.shape == (2, 4, 8, 8)
    # The check can fail: a backend that reads one value per step is caught.
    with pytest.raises((RuntimeError, NotImplementedError)):
        _sample_on_meta(_ReadsAValue(backend), model.config, method)


# ------------------------------------------------------------------------------------ CUDA

@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_matches_eager_fp16_and_replays_new_inputs():
    eager = TorchBackend(create_model("DiT-tiny/2", seed=0), "cuda", torch.float16)
    graphed = TorchBackend(create_model("DiT-tiny/2", seed=0), "cuda", torch.float16, cuda_graph=True)
    cfg = eager.config
    for n in (1, 2, 5, 2):  # batch 2 again: a replay of the graph captured before
        for seed in (0, 1):  # new inputs through the same graph
            x, t, y = inputs(cfg, n, "cuda", seed=10 * n + seed)
            expected, got = eager(x, t, y), graphed(x, t, y)
            assert got.dtype == torch.float32 and got.shape == expected.shape
            assert rel_err(got, expected) < 1e-3
    assert len(graphed._graphs) == 3  # one capture per batch size
    # Outputs are copies: a later replay does not overwrite what an earlier call returned.
    x, t, y = inputs(cfg, 2, "cuda", seed=5)
    first = graphed(x, t, y)
    kept = first.clone()
    graphed(*inputs(cfg, 2, "cuda", seed=6))
    assert torch.equal(first, kept)


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_condition_path_and_split():
    model = create_model("DiT-tiny/2", seed=0)
    reference = model.eval()
    graphed = TorchBackend(create_model("DiT-tiny/2", seed=0), "cuda", torch.float16, cuda_graph=True, max_batch=4)
    x, t, y = inputs(graphed.config, 10, "cuda")  # 10 rows, split 4 + 4 + 2
    with torch.no_grad():
        c = reference.to("cuda").embed_condition(t, y)
        expected = reference(x, t, y)
    assert rel_err(graphed(x, t, y), expected) < 5e-3
    assert rel_err(graphed.with_condition(x, c), expected) < 5e-3


@pytest.mark.gpu
@needs_cuda
def test_compiled_backend_matches_eager():
    eager = TorchBackend(create_model("DiT-tiny/2", seed=0), "cuda", torch.float16)
    compiled = TorchBackend(create_model("DiT-tiny/2", seed=0), "cuda", torch.float16, compile_mode="reduce-overhead")
    for n in (2, 2, 4):
        x, t, y = inputs(eager.config, n, "cuda", seed=n)
        assert rel_err(compiled(x, t, y), eager(x, t, y)) < 1e-2


@pytest.mark.gpu
@needs_cuda
def test_graphed_sampling_has_no_host_sync_per_step():
    backend = TorchBackend(create_model("DiT-tiny/2", seed=0), "cuda", torch.float16, cuda_graph=True)
    cfg = backend.config
    sampler = Sampler(SamplerConfig(num_steps=10), cfg.in_channels, cfg.num_classes, cfg.learn_sigma)
    labels = torch.tensor([3, 7])
    warm = sampler.sample(backend, labels, seed=0, input_size=cfg.input_size, device="cuda")  # captures

    try:
        out = sampler.sample(backend, labels, seed=0, input_size=cfg.input_size, device="cuda",
                             progress=no_host_sync_after_first_step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(out, warm)  # same seed, same graphs: bit-identical


@pytest.mark.gpu
@needs_cuda
def test_graphed_sample_matches_eager_fp32_sample():
    cfg_model = create_model("DiT-tiny/2", seed=0)
    reference = TorchBackend(cfg_model, "cuda", torch.float32)
    graphed = TorchBackend(create_model("DiT-tiny/2", seed=0), "cuda", torch.float16, cuda_graph=True)
    cfg = reference.config
    sampler = Sampler(SamplerConfig(num_steps=25), cfg.in_channels, cfg.num_classes, cfg.learn_sigma)
    labels = torch.tensor([0, 5])
    a = sampler.sample(reference, labels, seed=3, input_size=cfg.input_size, device="cuda")
    b = sampler.sample(graphed, labels, seed=3, input_size=cfg.input_size, device="cuda")
    assert torch.isfinite(b).all() and rel_err(b, a) < 2e-2


@pytest.mark.gpu
@needs_cuda
def test_a_failed_capture_names_the_forwards_own_error():
    """A forward that fails under capture (as TensorRT's enqueue returns False): the CaptureError carries its
    message, not only torch's "capture invalidated" (issue 21), and the caller may run it without a graph."""
    from ditexport.backends.cuda_graphs import CapturedForward, CaptureError

    calls = []

    def forward(x):
        calls.append(torch.cuda.is_current_stream_capturing())
        if calls[-1]:
            try:
                torch.cuda.synchronize()  # illegal while capturing: the capture is invalidated, as TensorRT's can be
            except RuntimeError:
                pass
            raise RuntimeError("the enqueue failed (see its log above)")
        return x * 2

    x = torch.ones(4, device="cuda")
    with pytest.raises(CaptureError, match="CUDA graph capture failed: RuntimeError: the enqueue failed"):
        CapturedForward(forward, [x])
    assert calls == [False, False, True]  # two warm-up runs, then the capture
    assert torch.equal(forward(x), x * 2)  # the stream is usable afterwards: the plain call runs
