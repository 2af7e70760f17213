"""Where a model's weights come from: a built-in model, a registry config with seeded random weights, a
checkpoint file or a diffusers model directory. One `ModelSource` resolves the model flags of every command,
loads the model, describes it in one line, and round-trips through an export's manifest (`manifest["source"]`),
where it also proves that the weights did not change since the export.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from .artifacts import ArtifactError, manifest_flags, rebuild_command
from .checkpoint import CheckpointError, load_checkpoint
from .diffusers_format import load_diffusers_dir, transformer_sha256
from .hashing import sha256_file
from .model import DIT_CONFIGS, DiT, DiTConfig, create_model, get_config
from .zoo import BUILTIN_MODELS, builtin_weights, load_builtin

KINDS = ("builtin", "random", "checkpoint", "module")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


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
    def named(cls, model: str | Path = "digits", *, image_size: int | None = None, config: str | None = None,
              seed: int = 0) -> ModelSource:
        """`ditexport.load_model`'s one argument: a built-in model, a registry config (random weights) or the path
        of a checkpoint file or directory."""
        if isinstance(model, str) and (model in BUILTIN_MODELS or model in DIT_CONFIGS):
            return cls.resolve(model, None, config, image_size, seed)
        if isinstance(model, (str, Path)) and (Path(model).exists() or Path(model).suffix in CHECKPOINT_SUFFIXES):
            return cls.resolve(None, model, config, image_size)  # a missing file is refused as it loads
        raise CheckpointError(f"{str(model)!r} is neither a model ({', '.join([*BUILTIN_MODELS, *DIT_CONFIGS])}) "
                              "nor an existing checkpoint file or directory")

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

    @property
    def name(self) -> str:
        """What the model is called in messages and reports: the built-in or config name, the checkpoint's."""
        if self.kind == "checkpoint":
            assert self.checkpoint is not None
            return self.checkpoint.name
        return self.model or "a model in memory"

    def flags(self) -> list[str]:
        """The model flags of the CLI that name this source (for rebuild commands)."""
        if self.kind == "checkpoint":
            return ["--checkpoint", str(self.checkpoint)] + (["--config", self.config_name] if self.config_name
                                                             else [])
        if self.kind == "module":
            return []
        flags = ["--model", self.model or "digits"]
        return flags + (["--image-size", str(self.image_size)] if self.image_size is not None else [])

    def default_vae(self) -> Path | None:
        """The decoder of a diffusers model directory's latents: its own `vae/` (None for every other source)."""
        from .diffusers_format import vae_dir_of

        return vae_dir_of(self.checkpoint) if self.kind == "checkpoint" else None

    def describe(self) -> str:
        """One line: where the weights come from."""
        if self.kind == "module":
            return "a DiT given in memory"
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

    def load_recorded(self, manifest: dict, rebuild: str | None = None, export_dir: str | Path | None = None) -> DiT:
        """The model of `from_manifest`, refusing weights whose SHA-256 changed since the export."""
        recorded = manifest.get("source") or {}
        rebuild = rebuild or rebuild_command(export_dir, manifest_flags(manifest))
        if self.kind == "module":
            raise ArtifactError("this export was built from a DiT given in memory, whose weights are not on file; "
                                "build it again from Python with ditexport.build(model, export_dir, force=True)")
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
        if self.kind == "module":
            return False
        return self.kind != "checkpoint" or (self.checkpoint is not None and self.checkpoint.exists())


# A DiT handed to `ditexport.build` carries the source it was loaded from (`load_model` records it), so its export
# can be re-validated and rebuilt from the command line.
_SOURCES: "weakref.WeakKeyDictionary[DiT, ModelSource]" = weakref.WeakKeyDictionary()


def remember_source(model: DiT, source: ModelSource) -> DiT:
    _SOURCES[model] = source
    return model


def source_of(model: DiT) -> ModelSource | None:
    """The source `load_model` loaded `model` from; None for a DiT made some other way."""
    return _SOURCES.get(model)


def module_source_manifest(model: DiT) -> dict:
    """The manifest's "source" of a DiT given in memory: its weights' SHA-256 (over names, shapes and bytes)."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"kind": "module", "model": None, "checkpoint": None, "weights_sha256": digest.hexdigest()}
