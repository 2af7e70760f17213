"""Where a model's weights come from: a built-in model, a registry config with seeded random weights, a
checkpoint file or a diffusers model directory. One `ModelSource` resolves the model flags of every command,
loads the model, describes it in one line, and round-trips through an export's manifest (`manifest["source"]`),
where it also proves that the weights did not change since the export.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .artifacts import ArtifactError, manifest_flags
from .checkpoint import CheckpointError, load_checkpoint
from .diffusers_format import load_diffusers_dir, transformer_sha256
from .hashing import sha256_file
from .model import DIT_CONFIGS, DiT, DiTConfig, create_model, get_config
from .zoo import BUILTIN_MODELS, builtin_weights, load_builtin

KINDS = ("builtin", "random", "checkpoint")


def checkpoint_sha256(path: str | Path) -> str:
    """The identity of a checkpoint's weights: a file's SHA-256, or a diffusers directory's over its transformer."""
    return transformer_sha256(path) if Path(path).is_dir() else sha256_file(path)


@dataclass(frozen=True)
class ModelSource:
    """A built-in model, a config with random weights (seeded), or a checkpoint file or diffusers directory (with
    an optional config name)."""
    kind: str
    model: str | None = None
    checkpoint: Path | None = None
    config_name: str | None = None
    image_size: int | None = None
    seed: int = 0
    config: DiTConfig | None = None  # the exact config, when it is known (read back from a manifest)

    @classmethod
    def resolve(cls, model: str | None = None, checkpoint: str | Path | None = None, config: str | None = None,
                image_size: int | None = None, seed: int = 0) -> ModelSource:
        """The model flags of a command: `checkpoint` wins; else a built-in name (default "digits") or a config."""
        if checkpoint is not None:
            return cls("checkpoint", checkpoint=Path(checkpoint), config_name=config, image_size=image_size)
        name = model or "digits"
        if name in BUILTIN_MODELS:
            return cls("builtin", model=name)
        if name in DIT_CONFIGS:
            return cls("random", model=name, image_size=image_size, seed=seed)
        raise CheckpointError(f"unknown model {name!r}; choose a built-in model ({', '.join(BUILTIN_MODELS)}), "
                              f"a config ({', '.join(DIT_CONFIGS)}) with random weights, or pass --checkpoint")

    def load(self) -> DiT:
        """The model in eval mode."""
        if self.kind == "checkpoint":
            assert self.checkpoint is not None
            if self.checkpoint.is_dir():
                config = self.config or (get_config(self.config_name, image_size=self.image_size)
                                         if self.config_name else None)
                return load_diffusers_dir(self.checkpoint, config)
            return load_checkpoint(self.checkpoint, self.config or self.config_name, self.image_size)
        if self.kind == "builtin":
            assert self.model is not None
            return load_builtin(self.model)
        config = self.config or get_config(self.model or "", image_size=self.image_size)
        return create_model(config, seed=self.seed)

    def describe(self) -> str:
        """One line: where the weights come from."""
        if self.kind == "checkpoint":
            assert self.checkpoint is not None
            return f"{'diffusers directory' if self.checkpoint.is_dir() else 'checkpoint'} {self.checkpoint}"
        if self.kind == "builtin":
            return f"built-in model {self.model!r}"
        return f"{self.model} with random weights (seed {self.seed})"

    def to_manifest(self) -> dict:
        """The manifest's "source": the kind and name, with the SHA-256 of the file that holds the weights (of a
        diffusers directory: over its transformer's files)."""
        if self.kind == "checkpoint":
            assert self.checkpoint is not None
            path = self.checkpoint.resolve()
            return {"kind": "checkpoint", "model": None,
                    "checkpoint": {"path": str(path), "sha256": checkpoint_sha256(path)}}
        if self.kind == "builtin":
            assert self.model is not None
            return {"kind": "builtin", "model": self.model, "checkpoint": None,
                    "weights_sha256": sha256_file(builtin_weights(self.model))}
        return {"kind": "random", "model": self.model, "checkpoint": None, "seed": self.seed}

    @classmethod
    def from_manifest(cls, manifest: dict) -> ModelSource:
        """The source an export was built from, with the export's exact config."""
        source, config = manifest.get("source") or {}, DiTConfig.from_dict(manifest["config"])
        kind = source.get("kind")
        if kind not in KINDS:
            raise ArtifactError(f"the manifest names no known weights source (kind {kind!r})")
        path = (source.get("checkpoint") or {}).get("path")
        return cls(kind, model=source.get("model"), checkpoint=Path(path) if path else None,
                   seed=int(source.get("seed") or 0), config=config)

    def load_recorded(self, manifest: dict, rebuild: str | None = None) -> DiT:
        """The model of `from_manifest`, refusing weights whose SHA-256 changed since the export."""
        recorded = manifest.get("source") or {}
        rebuild = rebuild or "python -m ditexport build " + " ".join(manifest_flags(manifest)) + " --force"
        if self.kind == "builtin":
            assert self.model is not None
            if sha256_file(builtin_weights(self.model)) != recorded.get("weights_sha256"):
                raise ArtifactError(f"the weights of built-in model {self.model!r} changed since this export; "
                                    f"rebuild with: {rebuild}")
        elif self.kind == "checkpoint":
            if self.checkpoint is None or not self.checkpoint.exists():
                raise ArtifactError(f"the checkpoint this export came from is gone ({self.checkpoint}); "
                                    "validation needs it")
            if checkpoint_sha256(self.checkpoint) != recorded["checkpoint"]["sha256"]:
                raise ArtifactError(f"{self.checkpoint} changed since this export (SHA-256 differs); "
                                    f"rebuild with: {rebuild}")
        return self.load()

    def available(self) -> bool:
        """Whether the weights are on this machine (a recorded checkpoint may have been moved away)."""
        return self.kind != "checkpoint" or (self.checkpoint is not None and self.checkpoint.exists())
