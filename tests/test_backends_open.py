"""open_backend: the one place that opens a backend, from a model or from a validated export."""
import shutil

import pytest
import torch

from ditexport.artifacts import ArtifactError
from ditexport.backends.open import check_available, open_backend
from ditexport.errors import DitexportError
from ditexport.source import ModelSource


@pytest.fixture(scope="module")
def digits_model():
    return ModelSource.resolve("digits").load()


def _feeds(cfg, n=2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    return x, torch.tensor([10, 500][:n]), torch.tensor([3, cfg.num_classes][:n])


def test_torch_and_onnxruntime_from_the_export_agree(digits_export, digits_model):
    feeds = _feeds(digits_model.config)
    with open_backend("torch", model=digits_model, device="cpu") as reference:
        expected = reference(*feeds)
        assert reference.dtype == torch.float32
    with open_backend("onnxruntime", "fp32", config=digits_model.config, export_dir=digits_export,
                      device="cpu") as backend:
        assert backend.onnx_path.name == "model.onnx" and backend.cond_session is not None
        got = backend(*feeds)
    assert (got - expected).abs().max().item() < 1e-4


def test_the_config_is_taken_from_the_manifest_when_not_given(digits_export, digits_model):
    with open_backend("onnxruntime", export_dir=digits_export) as backend:
        assert backend.config == digits_model.config


def test_an_export_of_another_config_or_a_missing_precision_is_refused(digits_export, tmp_path):
    other = ModelSource.resolve("DiT-tiny/2").load().config
    with pytest.raises(ArtifactError, match="built for another model config"):
        open_backend("onnxruntime", config=other, export_dir=digits_export)
    with pytest.raises(DitexportError, match="has no fp16 graph; rebuild it with: python -m ditexport build .*--precision fp32,fp16 "):
        open_backend("onnxruntime", "fp16", export_dir=digits_export)
    with pytest.raises(DitexportError, match=f"no ONNX export in {tmp_path}"):
        open_backend("onnxruntime", export_dir=tmp_path)


def test_a_damaged_graph_is_refused_before_onnxruntime_reads_it(digits_export, tmp_path):
    damaged = tmp_path / "digits"
    shutil.copytree(digits_export, damaged)
    graph = damaged / "model.onnx"
    data = bytearray(graph.read_bytes())
    data[-1] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="model.onnx"):
        open_backend("onnxruntime", export_dir=damaged)


def test_unknown_or_unavailable_backends_are_one_line_errors():
    with pytest.raises(DitexportError, match="backend 'jax' is not available"):
        check_available("jax")
    if not torch.cuda.is_available():
        with pytest.raises(DitexportError, match="torch sees no CUDA device"):
            check_available("torch", "cuda")
