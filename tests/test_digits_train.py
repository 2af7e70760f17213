"""Training the digits DiT: the recipe lowers the loss, is reproducible, and writes loadable files."""
import json
from pathlib import Path

import pytest
import torch

from ditexport import cli
from ditexport.checkpoint import load_checkpoint, read_state_dict
from ditexport.hashing import sha256_file
from ditexport.zoo import builtin_weights, load_builtin
from ditexport.zoo.digits_data import load_digits_tensors
from ditexport.zoo.digits_eval import LEARNED_AGREEMENT, quick_class_agreement
from ditexport.zoo.digits_train import (BUILTIN_DIR, DigitsTrainConfig, ema_decay_at, fixed_batch_loss, learning_rate,
                                        new_run_dir, save_weights, train_digits)


def test_digits_data_is_the_scaled_sklearn_set():
    images, labels = load_digits_tensors()
    assert images.shape == (1797, 1, 8, 8) and labels.shape == (1797,)
    assert images.min() == -1 and images.max() == 1
    assert torch.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_learning_rate_warms_up_then_decays_to_zero():
    cfg = DigitsTrainConfig(steps=100, warmup_steps=10, lr=1e-3)
    assert learning_rate(0, cfg) == pytest.approx(1e-4)
    assert learning_rate(9, cfg) == pytest.approx(1e-3)
    assert learning_rate(55, cfg) == pytest.approx(5e-4)
    assert learning_rate(100, cfg) == pytest.approx(0.0, abs=1e-12)
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1) and ema_decay_at(10_000, 0.999) == 0.999


def test_short_training_run_lowers_the_loss_on_a_fixed_batch(one_torch_thread):
    images, labels = load_digits_tensors()
    gen = torch.Generator().manual_seed(123)
    idx = torch.randperm(len(images), generator=gen)[:128]
    x, y = images[idx], labels[idx]
    t = torch.randint(0, 1000, (128,), generator=gen)
    noise = torch.randn(x.shape, generator=gen)

    cfg = DigitsTrainConfig(steps=40, batch_size=32, warmup_steps=5, seed=3)
    initial = train_digits(DigitsTrainConfig(steps=0, seed=3), progress=False).model  # same seeded init
    trained = train_digits(cfg, progress=False)
    before = fixed_batch_loss(initial, x, y, t, noise)
    after = fixed_batch_loss(trained.model, x, y, t, noise)
    after_ema = fixed_batch_loss(trained.ema, x, y, t, noise)
    print(f"fixed-batch loss: initial {before:.4f}, after 40 steps {after:.4f} (EMA {after_ema:.4f})")
    assert len(trained.losses) == 40 and all(torch.isfinite(torch.tensor(trained.losses)))
    assert after < 0.7 * before
    assert after_ema < before


def test_training_is_reproducible_from_its_seed():
    cfg = DigitsTrainConfig(steps=6, batch_size=8, seed=5)
    a, b = train_digits(cfg, progress=False), train_digits(cfg, progress=False)
    other = train_digits(DigitsTrainConfig(steps=6, batch_size=8, seed=6), progress=False)
    assert a.losses == b.losses
    for (name, pa), pb in zip(a.ema.state_dict().items(), b.ema.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.ema.blocks[0].attn.qkv.weight, other.ema.blocks[0].attn.qkv.weight)


def test_saved_weights_reload_strictly_with_their_config(tmp_path):
    result = train_digits(DigitsTrainConfig(steps=3, batch_size=8), progress=False)
    path = save_weights(result.ema, tmp_path, {"steps": 3})
    assert json.loads((tmp_path / "config.json").read_text()) == result.ema.config.to_dict()
    loaded = load_checkpoint(path)
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 3, 7, 10])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), result.ema(x, t, y))


def test_train_digits_command_writes_weights_and_config(tmp_path, capsys):
    assert cli.main(["train-digits", "--steps", "4", "--batch-size", "8", "--seed", "1",
                     "--out", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out
    model = load_checkpoint(tmp_path / "weights.safetensors")
    assert model.config.in_channels == 1 and model.config.num_classes == 10
    assert (tmp_path / "config.json").is_file()
    # 4 steps: the loss is averaged over the 4 there are, and the quick check finds nothing learned.
    training = json.loads(read_state_dict(tmp_path / "weights.safetensors")[1]["training"])
    assert training["final_loss_steps"] == 4 and f"mean loss of the last 4 steps {training['final_loss_mean']}" in out
    assert training["quick_class_agreement"] < LEARNED_AGREEMENT
    assert f"check: {100 * training['quick_class_agreement']:.0f} % of 30 guided samples" in out
    assert "warning: 4 steps were too short to learn the digits" in out


def test_the_quick_check_tells_the_shipped_model_from_an_untrained_one(one_torch_thread):
    untrained = train_digits(DigitsTrainConfig(steps=0), progress=False).ema
    shipped, untrained_share = quick_class_agreement(load_builtin("digits")), quick_class_agreement(untrained)
    print(f"quick check: shipped {shipped:.2f}, untrained {untrained_share:.2f}")
    assert shipped >= LEARNED_AGREEMENT > untrained_share


def test_train_digits_writes_a_new_run_directory_and_never_the_shipped_weights_unasked(tmp_path, capsys,
                                                                                   monkeypatch):
    shipped = builtin_weights("digits")
    digest = sha256_file(shipped)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train-digits", "--steps", "2", "--batch-size", "8", "--quiet"]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("digits-") and (run / "weights.safetensors").is_file()
    assert f"into {Path('runs') / run.name}" in capsys.readouterr().out
    # Naming the package's directory needs --overwrite-builtin; refused before any training.
    assert cli.main(["train-digits", "--steps", "2", "--out", str(BUILTIN_DIR)]) == 2
    captured = capsys.readouterr()
    assert "--overwrite-builtin" in captured.err and "training" not in captured.out
    assert sha256_file(shipped) == digest
    parser = cli.build_parser()
    assert cli.train_digits_out(parser.parse_args(["train-digits", "--overwrite-builtin"])) == BUILTIN_DIR
    assert cli.main(["train-digits", "--overwrite-builtin", "--out", str(tmp_path / "elsewhere")]) == 2
    assert new_run_dir(tmp_path / "runs") != run and not new_run_dir(tmp_path / "runs").exists()
