"""diffusers model directories: the exact name mapping both ways, loading a real DiTTransformer2DModel's
directory, the two places diffusers' DiT computes something else than the official one, the manifest round trip,
the CLI end to end, and the directory's VAE."""
from __future__ import annotations

import hashlib
import inspect
import json

import pytest
import torch

from ditexport.artifacts import ArtifactError
from ditexport.building import check_source
from ditexport.checkpoint import CheckpointError
from ditexport.diffusers_format import (DIFFUSERS_DEFAULTS, config_from_diffusers, config_to_diffusers,
                                        diffusers_to_official, official_to_diffusers, transformer_sha256, vae_dir_of)
from ditexport.hashing import sha256_file
from ditexport.model import create_model, get_config
from ditexport.source import ModelSource

diffusers = pytest.importorskip("diffusers")

CONFIG = get_config("DiT-tiny/2")  # 4 latent channels, 8x8 latents, width 64, 2 blocks, learned sigma


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _diffusers_dit(seed: int = 0):
    """A DiTTransformer2DModel of CONFIG with diffusers' own random (non-zero) initialisation; every block gets
    block 0's timestep and label embedder, as in a model converted from an official checkpoint."""
    torch.manual_seed(seed)
    model = diffusers.DiTTransformer2DModel(**config_to_diffusers(CONFIG)).eval()
    shared = model.transformer_blocks[0].norm1.emb.state_dict()
    for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(shared)
    return model


def _model_dir(tmp_path, seed: int = 0, safetensors: bool = True):
    model = _diffusers_dit(seed)
    model.save_pretrained(tmp_path / "transformer", safe_serialization=safetensors)
    return tmp_path, model


def _inputs(batch: int = 4):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, CONFIG.in_channels, CONFIG.input_size, CONFIG.input_size, generator=gen)
    return x, torch.tensor([0, 50, 500, 999])[:batch], torch.tensor([0, 3, 9, CONFIG.num_classes])[:batch]


# --------------------------------------------------------------------------------------------- mapping

def test_official_weights_go_to_diffusers_names_and_back_bit_identical():
    official = create_model(CONFIG, seed=3).state_dict()
    named = official_to_diffusers(official)
    # The names are exactly the ones a DiTTransformer2DModel has: it loads them strictly.
    diffusers.DiTTransformer2DModel(**config_to_diffusers(CONFIG)).load_state_dict(named, strict=True)
    assert "transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight" in named
    assert torch.equal(named["transformer_blocks.1.attn1.to_k.weight"], official["blocks.1.attn.qkv.weight"][64:128])
    back = diffusers_to_official(named, CONFIG)
    assert back.keys() == official.keys()
    assert all(torch.equal(back[k], official[k]) for k in official)


def test_embedder_copies_that_differ_cannot_become_an_official_dit():
    named = official_to_diffusers(create_model(CONFIG, seed=3).state_dict())
    key = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_2.bias"
    named[key] = named[key] + 1e-3
    with pytest.raises(CheckpointError, match=rf"cannot be represented as an official DiT: {key} differs from "
                                              r"transformer_blocks\.0\..* one timestep and label embedder"):
        diffusers_to_official(named, CONFIG)
    named["transformer_blocks.0.norm1.emb.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"not a DiT's weights; unexpected keys: .*norm1\.emb\.extra"):
        diffusers_to_official(named, CONFIG)


def test_configs_map_both_ways_and_a_transformer_that_is_not_a_dit_is_refused_in_one_line():
    assert config_from_diffusers({"_class_name": "DiTTransformer2DModel", **config_to_diffusers(CONFIG)}) == CONFIG
    # The published DiT-XL-2-256 directory predates DiTTransformer2DModel: its class is Transformer2DModel.
    xl = {"_class_name": "Transformer2DModel", "norm_type": "ada_norm_zero", "num_layers": 28,
          "attention_head_dim": 72, "num_attention_heads": 16, "out_channels": 8, "sample_size": 32}
    assert config_from_diffusers(xl) == get_config("DiT-XL/2", image_size=256)
    # Our defaults for missing keys are diffusers' own.
    signature = inspect.signature(diffusers.DiTTransformer2DModel.__init__).parameters
    assert DIFFUSERS_DEFAULTS == {key: signature[key].default for key in DIFFUSERS_DEFAULTS}
    for config, why in (({"_class_name": "UNet2DConditionModel"}, "_class_name 'UNet2DConditionModel'"),
                        ({"_class_name": "Transformer2DModel"}, "norm_type None"),
                        ({"_class_name": "DiTTransformer2DModel", "activation_fn": "geglu"}, "activation_fn 'geglu'"),
                        ({"_class_name": "DiTTransformer2DModel", "out_channels": 5}, "out_channels 5")):
        with pytest.raises(CheckpointError) as refused:
            config_from_diffusers(config, where="t/config.json")
        message = str(refused.value)
        assert message.startswith("t/config.json is not a DiT") and why in message and "\n" not in message


# ------------------------------------------------------------------------------ a real diffusers directory

@pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "bin"])
def test_a_diffusers_directory_computes_diffusers_dit_with_its_two_differences_undone(tmp_path, safetensors):
    """Our DiT from the directory against DiTTransformer2DModel: apart by diffusers' timestep frequencies and MLP
    norm eps (the drifts docs/diffusers.md quotes), and equal to fp32 rounding once both are set to the
    official values on diffusers' side, which proves the weight mapping exact."""
    directory, theirs = _model_dir(tmp_path, safetensors=safetensors)
    assert (directory / "transformer" / ("diffusion_pytorch_model." + ("safetensors" if safetensors else "bin"))
            ).is_file()
    ours = ModelSource.resolve(checkpoint=directory).load()
    assert ours.config == CONFIG
    x, t, y = _inputs()
    with torch.no_grad():
        reference = ours(x, t, y)

        def drift() -> float:
            return _relative_error(theirs(x, t, y).sample, reference)

        as_published = drift()
        for block in theirs.transformer_blocks:
            block.norm1.emb.time_proj.downscale_freq_shift = 0  # the official frequencies exp(-ln(1e4) * i / 128)
        norm_eps_only = drift()
        for block in theirs.transformer_blocks:
            block.norm3.eps = 1e-6  # the official MLP LayerNorm eps
        official = drift()
        for block in theirs.transformer_blocks:
            block.norm1.emb.time_proj.downscale_freq_shift = 1
        frequencies_only = drift()
    print(f"drift vs DiTTransformer2DModel: as published {as_published:.2e}, timestep frequencies only "
          f"{frequencies_only:.2e}, MLP norm eps only {norm_eps_only:.2e}, both undone {official:.2e}")
    assert official < 1e-7                  # the mapping is exact: at most fp32 rounding remains (measured: 0)
    assert 1e-2 < frequencies_only < 1e-1   # docs/diffusers.md: 2.9e-2 here, 6.4e-2 for DiT-XL/2
    assert 1e-7 < norm_eps_only < 1e-5      # docs/diffusers.md: 1.1e-6 here, 2.9e-6 for DiT-XL/2
    assert as_published == pytest.approx(frequencies_only, rel=0.05)


def test_sharded_weights_load_like_one_file(tmp_path):
    _, theirs = _model_dir(tmp_path / "one")
    theirs.save_pretrained(tmp_path / "sharded" / "transformer", max_shard_size="40KB")
    shards = sorted((tmp_path / "sharded" / "transformer").glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "sharded" / "transformer" /
                                "diffusion_pytorch_model.safetensors.index.json").is_file()
    one, sharded = (ModelSource.resolve(checkpoint=tmp_path / name).load().state_dict() for name in ("one", "sharded"))
    assert all(torch.equal(sharded[k], v) for k, v in one.items())
    shards[0].unlink()
    with pytest.raises(CheckpointError, match=f"names shards that are not there: {shards[0].name}"):
        ModelSource.resolve(checkpoint=tmp_path / "sharded").load()


def test_a_directory_whose_scheduler_is_not_the_official_diffusion_is_refused(tmp_path):
    directory, _ = _model_dir(tmp_path)
    diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon",
                            clip_sample=False).save_pretrained(directory / "scheduler")
    ModelSource.resolve(checkpoint=directory).load()  # the scheduler diffusers' conversion script writes
    diffusers.DDIMScheduler(beta_schedule="scaled_linear").save_pretrained(directory / "scheduler")
    with pytest.raises(CheckpointError, match=r"scheduler_config.json declares beta_schedule 'scaled_linear'; "
                                              r"ditexport samples with the official DiT diffusion"):
        ModelSource.resolve(checkpoint=directory).load()


def test_a_directory_that_is_not_a_model_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match=r"is a directory but not a diffusers model directory \(no "
                                              r"transformer/config.json\)"):
        ModelSource.resolve(checkpoint=tmp_path).load()
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(
        {"_class_name": "DiTTransformer2DModel", **config_to_diffusers(CONFIG)}))
    with pytest.raises(CheckpointError, match=r"holds no diffusion_pytorch_model.safetensors or "
                                              r"diffusion_pytorch_model.bin \(found: config.json\)"):
        ModelSource.resolve(checkpoint=tmp_path).load()


# ---------------------------------------------------------------------------------- manifest and CLI

def test_the_manifest_records_a_digest_of_the_transformer_files_and_refuses_a_changed_directory(tmp_path):
    directory, _ = _model_dir(tmp_path, seed=0)
    source = ModelSource.resolve(checkpoint=directory)
    model = source.load()
    manifest = {"source": source.to_manifest(), "config": model.config.to_dict()}
    transformer = directory / "transformer"
    listing = "".join(f"transformer/{name} {sha256_file(transformer / name)}\n"
                      for name in ("config.json", "diffusion_pytorch_model.safetensors"))
    assert manifest["source"]["checkpoint"] == {"path": str(directory.resolve()),
                                                "sha256": hashlib.sha256(listing.encode()).hexdigest()}
    back = ModelSource.from_manifest(manifest)
    assert back.available() and back.describe() == f"diffusers directory {directory.resolve()}"
    loaded = back.load_recorded(manifest).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())

    check_source(manifest, tmp_path / "export", checkpoint=str(directory))  # validate --checkpoint DIR

    (directory / "vae").mkdir()
    (directory / "vae" / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    assert transformer_sha256(directory) == manifest["source"]["checkpoint"]["sha256"]  # the VAE is not the DiT
    _model_dir(tmp_path, seed=1)
    with pytest.raises(ArtifactError, match=r"changed since this export \(SHA-256 differs\); rebuild with: "
                                            r"python -m ditexport build --checkpoint "):
        back.load_recorded(manifest)
    with pytest.raises(ArtifactError, match=r"was built from .*, not from --checkpoint .* \(SHA-256 differs\)"):
        check_source(manifest, tmp_path / "export", checkpoint=str(directory))


@pytest.mark.slow
def test_build_and_sample_from_a_diffusers_directory_on_the_command_line(tmp_path, cli):
    directory, _ = _model_dir(tmp_path / "DiT-tiny-diffusers")
    export, png = tmp_path / "export", tmp_path / "sample.png"
    proc = cli("build", "--checkpoint", directory, "--export-dir", export, "--sample-steps", "0", "--precision",
               "fp32")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"model: diffusers directory {directory}" in proc.stdout and "PASSED" in proc.stdout
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["source"]["checkpoint"]["sha256"] == transformer_sha256(directory)
    proc = cli("sample", "--checkpoint", directory, "--backend", "onnxruntime", "--export-dir", export, "--steps",
               "2", "--num-images", "2", "--out", png)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert png.stat().st_size > 0 and f"wrote {png}" in proc.stdout


# ------------------------------------------------------------------------------------------------- VAE

def test_the_vae_of_a_model_directory_is_found_and_loads(tmp_path):
    from ditexport.pipeline import VaeDecoder

    directory, _ = _model_dir(tmp_path)
    assert vae_dir_of(directory) is None and vae_dir_of(None) is None
    diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4,
                            layers_per_block=1).save_pretrained(directory / "vae")
    assert vae_dir_of(directory) == directory / "vae"
    assert vae_dir_of(directory / "transformer" / "diffusion_pytorch_model.safetensors") is None
    decoded = VaeDecoder(vae_dir_of(directory))(torch.zeros(1, 4, 8, 8))
    assert decoded.shape == (1, 3, 8, 8) and torch.isfinite(decoded).all()
    (directory / "vae" / "config.json").write_text('{"_class_name": "AutoencoderTiny"}')
    with pytest.raises(CheckpointError, match="names AutoencoderTiny, not the AutoencoderKL"):
        vae_dir_of(directory)
