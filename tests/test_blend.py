"""Class blending through the conditioning-vector graph: exact at both ends, between the classes inside."""
import pytest
import torch

from ditexport.backends import TorchBackend
from ditexport.blend import BlendedConditionBackend, TorchConditionEmbedder
from ditexport.sampler import SamplerConfig
from ditexport.model import create_model
from ditexport.pipeline import Pipeline


@pytest.fixture(scope="module")
def model():
    return create_model("DiT-tiny/2", seed=0)


def _inputs(n=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * n, 4, 8, 8, generator=gen)
    t = torch.full((2 * n,), 500, dtype=torch.int64)
    y = torch.cat([torch.tensor([1, 2, 3][:n]), torch.full((n,), 10)])  # [classes; null], as guided
    return x, t, y


def test_endpoints_are_exactly_the_plain_classes(model):
    backend = TorchBackend(model)
    embedder = TorchConditionEmbedder(model)
    x, t, y = _inputs()
    at_0 = BlendedConditionBackend(backend, embedder, second_class=7, weight=0.0)(x, t, y)
    at_1 = BlendedConditionBackend(backend, embedder, second_class=7, weight=1.0)(x, t, y)
    assert torch.equal(at_0, backend(x, t, y))
    y_second = torch.where(y == 10, y, 7)
    assert torch.equal(at_1, backend(x, t, y_second))
    assert not torch.equal(at_0, at_1)


def test_middle_mixes_the_vectors_and_keeps_the_null_rows(model):
    backend = TorchBackend(model)
    x, t, y = _inputs()
    half = BlendedConditionBackend(backend, TorchConditionEmbedder(model), second_class=7, weight=0.5)(x, t, y)
    with torch.no_grad():
        c = 0.5 * (model.embed_condition(t, y) + model.embed_condition(t, torch.where(y == 10, y, 7)))
        expected = model.forward_with_condition(x, c)
    torch.testing.assert_close(half, expected, rtol=1e-5, atol=1e-6)
    # The unconditional half sees c(t, null) whatever the weight.
    plain = backend(x, t, y)
    assert torch.equal(half[3:], plain[3:])
    assert (half[:3] - plain[:3]).abs().max() > 1e-4


def test_split_batches_give_the_same_blend(model):
    x, t, y = _inputs()
    embedder = TorchConditionEmbedder(model)
    whole = BlendedConditionBackend(TorchBackend(model), embedder, 7, 0.3)(x, t, y)
    split = BlendedConditionBackend(TorchBackend(model, max_batch=2), embedder, 7, 0.3)(x, t, y)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6)


def test_sampling_at_the_endpoints_reproduces_plain_sampling(model):
    backend = TorchBackend(model)
    cfg = SamplerConfig(num_steps=5, guidance_scale=3.0)
    plain_a = Pipeline(backend).run([1, 2], seed=3, sampler_cfg=cfg, progress=False).images
    plain_b = Pipeline(backend).run([7, 7], seed=3, sampler_cfg=cfg, progress=False).images
    blend = lambda w: BlendedConditionBackend(backend, TorchConditionEmbedder(model), 7, w)  # noqa: E731
    assert torch.equal(Pipeline(blend(0.0)).run([1, 2], seed=3, sampler_cfg=cfg, progress=False).images, plain_a)
    assert torch.equal(Pipeline(blend(1.0)).run([1, 2], seed=3, sampler_cfg=cfg, progress=False).images, plain_b)


def test_rejects_weights_and_classes_out_of_range(model):
    backend = TorchBackend(model)
    with pytest.raises(ValueError, match="between 0 and 1"):
        BlendedConditionBackend(backend, TorchConditionEmbedder(model), 7, 1.5)
    with pytest.raises(ValueError, match="0..9"):
        BlendedConditionBackend(backend, TorchConditionEmbedder(model), 10, 0.5)


def test_embedders_read_from_an_exported_graph_are_the_models(model, tmp_path):
    from ditexport.blend import embedders_from_onnx
    from ditexport.export import export_onnx

    path = export_onnx(model, tmp_path / "model.onnx")
    embedders = embedders_from_onnx(path, model.config)
    assert embedders is not None
    t = torch.tensor([0, 17, 999, 500])
    y = torch.tensor([0, 3, 9, 10])  # 10: the null class
    with torch.no_grad():
        assert torch.equal(embedders.embed_condition(t, y), model.embed_condition(t, y))
    # A graph of another width does not pass for this model's embedders.
    from dataclasses import replace

    assert embedders_from_onnx(path, replace(model.config, hidden_size=32, num_heads=2)) is None
