"""ditexport.pipeline: requests checked before work, chunked sampling with bounded batches, non-finite values kept
for the writers to refuse."""
from __future__ import annotations

import math

import pytest
import torch

from ditexport.backends import TorchBackend
from ditexport.sampler import SamplerConfig, SamplerConfigError
from ditexport.model import create_model
from ditexport.pipeline import CHUNK_IMAGES, Pipeline, check_seed, chunk_seed

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CFG = SamplerConfig(num_steps=2)


class RecordingBackend(TorchBackend):
    """The real torch backend, noting the batch of every forward it runs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches = []

    def _forward(self, x, t, y):
        self.batches.append(len(x))
        return super()._forward(x, t, y)


@pytest.fixture(scope="module")
def model():
    return create_model("DiT-tiny/2", seed=0)


def test_counts_up_to_one_chunk_draw_exactly_the_single_batch_images(model):
    pipeline = Pipeline(TorchBackend(model))
    labels = [i % 10 for i in range(CHUNK_IMAGES)]
    (chunk,) = list(pipeline.chunks(labels, seed=7, sampler_cfg=CFG, progress=False))
    assert torch.equal(chunk.images, pipeline.run(labels, seed=7, sampler_cfg=CFG, progress=False).images)


def test_larger_counts_run_in_chunks_of_bounded_batch_each_noised_by_its_own_seed(model):
    backend = RecordingBackend(model)
    pipeline = Pipeline(backend)
    labels = [i % 10 for i in range(10)]
    chunks = list(pipeline.chunks(labels, seed=7, sampler_cfg=CFG, progress=False, chunk_images=4))
    assert [len(c.labels) for c in chunks] == [4, 4, 2]
    assert max(backend.batches) == 2 * 4  # guided: two rows per image, never more than one chunk's
    for index, (chunk, start) in enumerate(zip(chunks, (0, 4, 8))):
        alone = pipeline.run(labels[start:start + 4], seed=chunk_seed(7, index), sampler_cfg=CFG, progress=False)
        assert chunk.seed == chunk_seed(7, index) and torch.equal(chunk.images, alone.images)
    assert chunk_seed(7, 0) == 7 and len({chunk_seed(7, k) for k in range(100)}) == 100
    assert all(0 <= chunk_seed(s, k) < 2**63 for s in (0, -5, 2**64 - 1) for k in (1, 2))


def test_a_request_of_several_chunks_shows_progress_over_images(model, capsys):
    list(Pipeline(TorchBackend(model)).chunks([1] * 6, seed=0, sampler_cfg=CFG, progress=True, chunk_images=4))
    err = capsys.readouterr().err
    assert "images" in err and "6/6" in err


def test_requests_are_refused_before_any_work(model):
    backend = RecordingBackend(model)
    pipeline = Pipeline(backend)
    for labels, seed, cfg, message in [
        ([10], 0, CFG, r"class labels must be in 0\.\.9"),
        ([], 0, CFG, "no class labels"),
        ([1], 2**70, CFG, "seed must be an integer"),
        ([1], 0, SamplerConfig(num_steps=1001), "steps must be between 1 and 1000"),
    ]:
        with pytest.raises(ValueError, match=message):
            list(pipeline.chunks(labels, seed=seed, sampler_cfg=cfg, progress=False))
    assert backend.batches == []
    check_seed(2**64 - 1)
    check_seed(-(2**63))


@pytest.mark.parametrize("field, value", [("guidance_scale", math.nan), ("guidance_scale", math.inf),
                                          ("eta", math.nan), ("eta", -math.inf), ("guidance_scale", "4")])
def test_sampler_config_refuses_non_finite_numbers(field, value):
    with pytest.raises(SamplerConfigError, match=f"{field} must be a finite number") as info:
        SamplerConfig(**{field: value})
    assert info.value.field == field


@pytest.mark.parametrize("eta", [1.0000001, 1.5, 10, 1e308, -1e-9, -1e308])
def test_the_sampler_refuses_eta_outside_0_to_1(eta):
    from ditexport.sampler import Sampler

    with pytest.raises(SamplerConfigError, match="eta must be between 0 and 1") as info:
        Sampler(SamplerConfig(method="ddim", eta=eta), 1, 10)
    assert info.value.field == "eta"
    for ends in (0.0, 1.0):  # DDIM and DDPM's variance
        Sampler(SamplerConfig(method="ddim", eta=ends), 1, 10)


def test_non_finite_model_outputs_reach_the_result_unclamped(model):
    broken = create_model("DiT-tiny/2", seed=0)
    with torch.no_grad():
        broken.final_layer.linear.weight[0, 0] = math.inf
    images = Pipeline(TorchBackend(broken)).run([1, 2], seed=0, sampler_cfg=CFG, progress=False).images
    assert not torch.isfinite(images).all()  # left for the writers to refuse, not clamped into black pixels
    fine = Pipeline(TorchBackend(model)).run([1, 2], seed=0, sampler_cfg=CFG, progress=False).images
    assert torch.isfinite(fine).all() and fine.min() >= 0 and fine.max() <= 1
