"""Checkpoint loading: official flat files, train.py dicts, safetensors, config inference, clear errors."""
import argparse
import collections
import json
import re

import pytest
import torch
from safetensors.torch import save_file

from ditexport.checkpoint import CheckpointError, infer_config, load_checkpoint, read_state_dict
from ditexport.source import ModelSource
from ditexport.model import create_model, get_config


@pytest.fixture
def digits_model():
    return create_model("DiT-digits", seed=1)


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_flat_official_style_pt(tmp_path, digits_model):
    path = tmp_path / "flat.pt"
    torch.save(digits_model.state_dict(), path)
    loaded = load_checkpoint(path)
    assert loaded.config == get_config("DiT-digits")
    assert_same_weights(loaded, digits_model)
    assert not loaded.training


def test_train_py_checkpoint_prefers_ema(tmp_path, digits_model):
    raw = create_model("DiT-digits", seed=2)
    ckpt = {"model": raw.state_dict(), "ema": digits_model.state_dict(), "opt": {"state": {}, "param_groups": []},
            "args": argparse.Namespace(model="DiT-digits", image_size=64)}
    path = tmp_path / "0400000.pt"
    torch.save(ckpt, path)
    assert_same_weights(load_checkpoint(path), digits_model)
    del ckpt["ema"]
    torch.save(ckpt, path)
    assert_same_weights(load_checkpoint(path), raw)


def test_ddp_module_prefix_is_stripped(tmp_path, digits_model):
    path = tmp_path / "ddp.pt"
    torch.save({"model": {"module." + k: v for k, v in digits_model.state_dict().items()}}, path)
    assert_same_weights(load_checkpoint(path), digits_model)


def test_safetensors_with_and_without_config_metadata(tmp_path):
    model = create_model("DiT-tiny/2", seed=4)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    bare = tmp_path / "bare.safetensors"
    save_file(sd, bare)
    assert_same_weights(load_checkpoint(bare, config="DiT-tiny/2"), model)
    meta = tmp_path / "meta.safetensors"
    save_file(sd, meta, metadata={"config": json.dumps(model.config.to_dict())})
    assert_same_weights(load_checkpoint(meta), model)


def test_infer_config_recovers_fixed_variance_and_ratio():
    model = create_model(get_config("DiT-S/8", learn_sigma=False, num_classes=7, input_size=16), seed=0)
    cfg = infer_config(model.state_dict())
    assert cfg == model.config


def test_heads_not_inferable_is_a_clear_error():
    model = create_model(get_config("DiT-tiny/2", depth=3, hidden_size=96), seed=0)  # in no registry entry
    with pytest.raises(CheckpointError, match="cannot infer the number of heads.*--config"):
        infer_config(model.state_dict())


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"model": collections.OrderedDict(w=torch.zeros(1)), "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="needs arbitrary code to unpickle, which ditexport refuses"):
        read_state_dict(path)
    assert "this must never run" not in capsys.readouterr().out


def test_mismatch_lists_missing_unexpected_and_shapes(tmp_path, digits_model):
    sd = digits_model.state_dict()
    del sd["blocks.3.mlp.fc2.bias"]
    sd["blocks.0.extra.weight"] = torch.zeros(2)
    sd["final_layer.linear.bias"] = torch.zeros(3)
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, config="DiT-digits")
    msg = str(info.value)
    assert "missing keys: blocks.3.mlp.fc2.bias" in msg
    assert "unexpected keys: blocks.0.extra.weight" in msg
    assert "final_layer.linear.bias: checkpoint (3,) vs model (8,)" in msg


def test_wrong_config_for_checkpoint(tmp_path, digits_model):
    path = tmp_path / "d.pt"
    torch.save(digits_model.state_dict(), path)
    with pytest.raises(CheckpointError, match="shape differences"):
        load_checkpoint(path, config="DiT-S/2", image_size=256)


def test_bad_files(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        read_state_dict(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_state_dict(junk)
    junk_st = tmp_path / "junk.safetensors"
    junk_st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(CheckpointError, match="cannot read safetensors"):
        read_state_dict(junk_st)
    empty = tmp_path / "empty.pt"
    torch.save({"args": 3}, empty)
    with pytest.raises(CheckpointError, match="holds no DiT state dict"):
        read_state_dict(empty)


def test_load_model_names(tmp_path):
    source = ModelSource.resolve("DiT-S/8", image_size=256)
    model = source.load()
    assert model.config == get_config("DiT-S/8", image_size=256) and "random weights" in source.describe()
    with pytest.raises(CheckpointError, match="unknown model 'nonsense'"):
        ModelSource.resolve("nonsense")


class RunsShell:
    def __reduce__(self):
        import os

        return (os.system, ("echo this must never run",))


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_refusals_are_one_line_of_our_own_naming_the_global(tmp_path, capsys, protocol):
    """A plain pickle (any protocol) or a torch zip whose pickle imports code: the global is named, torch's
    advice to load with weights_only=False is not repeated."""
    import pickle

    path = tmp_path / f"plain{protocol}.pt"
    with open(path, "wb") as f:
        pickle.dump({"w": torch.zeros(1), "payload": RunsShell()}, f, protocol=protocol)
    zipped = tmp_path / "zipped.pt"
    torch.save({"model": collections.OrderedDict(w=torch.zeros(1)), "payload": RunsShell()}, zipped)
    for p in (path, zipped):
        with pytest.raises(CheckpointError) as info:
            read_state_dict(p)
        message = str(info.value)
        assert "\n" not in message and str(p) in message and "posix.system" in message
        assert "weights_only" not in message and "file an issue" not in message.lower()
    assert "this must never run" not in capsys.readouterr().out


def test_empty_truncated_noise_and_directory_checkpoints_say_what_they_are(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(create_model("DiT-tiny/2", seed=0).state_dict(), good)
    cases = {
        "empty.pt": (b"", "is empty (0 bytes)"),
        "truncated.pt": (good.read_bytes()[: good.stat().st_size // 2], "is truncated"),
        "noise.pt": (bytes(range(256)) * 4, "is not a PyTorch checkpoint or a safetensors file"),
    }
    for name, (data, expected) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=re.escape(expected)) as info:
            read_state_dict(tmp_path / name)
        assert "\n" not in str(info.value) and name in str(info.value)
    (tmp_path / "dir.pt").mkdir()
    with pytest.raises(CheckpointError, match="dir.pt is a directory"):
        read_state_dict(tmp_path / "dir.pt")
