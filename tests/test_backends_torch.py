"""The torch backend's CUDA paths (graphs, compile) and the sampler's freedom from per-step host syncs."""
import pytest
import torch
from conftest import no_host_sync_after_first_step

from ditexport.backends import TorchBackend
from ditexport.diffusion import Sampler, SamplerConfig
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
