"""Built-in models that ship with the package and load with no network."""
from __future__ import annotations

from pathlib import Path

from ..errors import DitexportError

ZOO_DIR = Path(__file__).parent
BUILTIN_MODELS = {"digits": ZOO_DIR / "digits"}


def builtin_weights(name: str) -> Path:
    """The shipped safetensors file of a built-in model."""
    if name not in BUILTIN_MODELS:
        raise DitexportError(f"unknown built-in model {name!r}; built-in models: {', '.join(BUILTIN_MODELS)}")
    path = BUILTIN_MODELS[name] / "weights.safetensors"
    if not path.is_file():
        raise DitexportError(f"the weights of built-in model {name!r} are missing ({path}); "
                             f"retrain them with: python -m ditexport train-{name}")
    return path


def load_builtin(name: str):
    """A built-in DiT in eval mode, loaded strictly from its shipped weights and config."""
    from ..checkpoint import load_checkpoint

    return load_checkpoint(builtin_weights(name))
