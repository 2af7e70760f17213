"""ModelSource: the one place that resolves model flags, loads, describes and round-trips through a manifest."""
import pytest
import torch

from ditexport.artifacts import ArtifactError
from ditexport.checkpoint import CheckpointError
from ditexport.hashing import sha256_file
from ditexport.model import create_model, get_config
from ditexport.source import ModelSource
from ditexport.zoo import builtin_weights


def _manifest(source: ModelSource, model) -> dict:
    return {"source": source.to_manifest(), "config": model.config.to_dict()}


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_random_source_round_trips_through_the_manifest_with_its_exact_config():
    source = ModelSource.resolve("DiT-tiny/2", seed=3)
    model = source.load()
    manifest = _manifest(source, model)
    assert manifest["source"] == {"kind": "random", "model": "DiT-tiny/2", "checkpoint": None, "seed": 3}
    back = ModelSource.from_manifest(manifest)
    assert back.config == model.config and back.describe() == "DiT-tiny/2 with random weights (seed 3)"
    assert _same_weights(back.load_recorded(manifest), model)
    assert not _same_weights(ModelSource.resolve("DiT-tiny/2", seed=4).load(), model)


def test_checkpoint_source_records_its_hash_and_refuses_changed_or_missing_weights(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(create_model("DiT-tiny/2", seed=1).state_dict(), path)
    source = ModelSource.resolve(checkpoint=path, config="DiT-tiny/2")
    model = source.load()
    manifest = _manifest(source, model)
    assert manifest["source"]["checkpoint"] == {"path": str(path.resolve()), "sha256": sha256_file(path)}
    back = ModelSource.from_manifest(manifest)
    assert back.available() and back.describe() == f"checkpoint {path.resolve()}"
    assert _same_weights(back.load_recorded(manifest), model)

    torch.save(create_model("DiT-tiny/2", seed=2).state_dict(), path)
    with pytest.raises(ArtifactError, match=r"changed since this export \(SHA-256 differs\); rebuild with: "
                                            r"python -m ditexport build --checkpoint .*tiny.pt --force"):
        back.load_recorded(manifest)
    path.unlink()
    assert not back.available()
    with pytest.raises(ArtifactError, match="the checkpoint this export came from is gone"):
        back.load_recorded(manifest)


def test_builtin_source_is_pinned_to_the_shipped_weights():
    source = ModelSource.resolve()
    assert source.kind == "builtin" and source.describe() == "built-in model 'digits'"
    manifest = _manifest(source, source.load())
    assert manifest["source"]["weights_sha256"] == sha256_file(builtin_weights("digits"))
    stale = {**manifest, "source": {**manifest["source"], "weights_sha256": "0" * 64}}
    with pytest.raises(ArtifactError, match="weights of built-in model 'digits' changed since this export"):
        ModelSource.from_manifest(stale).load_recorded(stale)


def test_unknown_names_and_kinds_are_refused():
    with pytest.raises(CheckpointError, match="unknown model 'DiT-Q/2'"):
        ModelSource.resolve("DiT-Q/2")
    with pytest.raises(ArtifactError, match="no known weights source"):
        ModelSource.from_manifest({"source": {"kind": "url"}, "config": get_config("DiT-tiny/2").to_dict()})
