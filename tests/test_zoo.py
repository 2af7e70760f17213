"""The shipped digits DiT: its files load strictly, match the config, and draw the requested digits."""
import json

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from ditexport import cli
from ditexport.backends import TorchBackend
from ditexport.sampler import SamplerConfig
from ditexport.source import ModelSource
from ditexport.errors import DitexportError
from ditexport.model import DiT, get_config
from ditexport.pipeline import Pipeline
from ditexport.zoo import BUILTIN_MODELS, builtin_weights, load_builtin
from ditexport.zoo.digits_eval import DigitsReference

DIGITS_DIR = BUILTIN_MODELS["digits"]


def test_shipped_files_carry_the_registry_config():
    expected = get_config("DiT-digits").to_dict()
    with safe_open(str(builtin_weights("digits")), framework="pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata["config"]) == expected
    assert json.loads((DIGITS_DIR / "config.json").read_text()) == expected
    # A few MB at most: fp32 1.27 M parameters plus the header.
    assert builtin_weights("digits").stat().st_size < 6_000_000


def test_shipped_weights_load_strictly_and_are_trained():
    model = load_builtin("digits")
    assert model.config == get_config("DiT-digits") and not model.training
    fresh = DiT.from_config(model.config).state_dict()
    shipped = model.state_dict()
    assert set(shipped) == set(fresh)
    assert all(shipped[k].shape == fresh[k].shape and shipped[k].dtype == torch.float32 for k in fresh)
    # The official initialisation zeroes the output layer; trained weights do not.
    assert shipped["final_layer.linear.weight"].abs().max() > 1e-3
    assert 1.2e6 < sum(p.numel() for p in model.parameters()) < 1.4e6


def test_load_model_defaults_to_the_builtin_digits():
    source = ModelSource.resolve()
    model = source.load()
    assert source.describe() == "built-in model 'digits'"
    assert torch.equal(model.final_layer.linear.weight, load_builtin("digits").final_layer.linear.weight)


def test_unknown_builtin_is_a_user_error():
    with pytest.raises(DitexportError, match="unknown built-in model"):
        builtin_weights("faces")


@pytest.mark.slow
def test_default_sampling_draws_the_requested_class(one_torch_thread):
    """100 digits with the defaults (250 DDPM steps, guidance 4) are classified as the requested class."""
    labels = [c for c in range(10) for _ in range(10)]
    result = Pipeline(TorchBackend(load_builtin("digits"))).run(labels, seed=0, sampler_cfg=SamplerConfig(),
                                                             progress=False)
    agreement, per_class = DigitsReference().class_agreement(result.images, labels)
    print(f"class agreement of 100 guided samples: {100 * agreement:.1f} % "
          f"(per class {[round(a, 2) for a in per_class]})")
    assert agreement >= 0.90


def test_sample_command_writes_a_grid_of_the_default_model(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert cli.main(["sample", "--steps", "10", "--num-images", "4", "--out", str(out), "--quiet"]) == 0
    assert "built-in model 'digits'" in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.size == (4 * 64 + 5 * 2, 64 + 2 * 2)  # 8x8 digits upscaled 8x, 2 px padding
