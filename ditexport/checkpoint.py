"""Loading DiT weights: official flat `.pt` files, `train.py` checkpoints and safetensors.

Pickled files are read with `torch.load(weights_only=True)` only; the config is inferred from tensor
shapes when the caller does not name one.
"""
from __future__ import annotations

import argparse
import json
import re
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from .errors import DitexportError
from .model import DIT_CONFIGS, DiT, DiTConfig, get_config


class CheckpointError(DitexportError, ValueError):
    """A checkpoint that cannot be read, or that does not fit the model."""


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors of a checkpoint file and any metadata it carries (e.g. a config in safetensors metadata)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; pass a .pt or .safetensors file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"cannot read safetensors file {path}: {_first_line(e)}") from None
        return tensors, metadata
    try:
        # train.py stores its argparse.Namespace beside the weights; that one plain container is allowed.
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols on stderr, over several lines
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(_refusal(path, e)) from None
    return _unwrap(obj, path), {}


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _refusal(path: Path, error: BaseException) -> str:
    """ditexport's own one-line reason for a file torch.load(weights_only=True) refused; it names the code a
    pickle would load and never suggests loading it unsafely."""
    named = re.search(r"GLOBAL ([\w.]+)", str(error))  # torch names the first global it refused
    code = _pickled_code(path) or (named.group(1) if named else None)
    if code:
        return (f"checkpoint {path} needs arbitrary code to unpickle, which ditexport refuses (its pickle imports "
                f"{code}); ditexport loads tensors only: save a plain state dict (torch.save(model.state_dict(), "
                "...)) or a .safetensors file")
    if isinstance(error, EOFError) or "central directory" in str(error):
        return f"cannot read checkpoint {path}: it is truncated (it ends before its data does)"
    return f"cannot read checkpoint {path}: it is not a PyTorch checkpoint or a safetensors file"


# Globals a plain state dict's pickle uses; anything else is code the file wants to run.
_TENSOR_GLOBALS = re.compile(r"^(torch\.|collections\.OrderedDict$|_codecs\.encode$|argparse\.Namespace$|"
                             r"numpy\.core\.multiarray\._reconstruct$|builtins\.(set|frozenset|bytearray|slice)$)")


_IDENTIFIER = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")


def _pickled_code(path: Path) -> str | None:
    """The first global outside plain tensor containers that a pickle (or a torch zip's data.pkl) would import,
    found by reading its opcodes without running any of them."""
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                member = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                data = archive.read(member) if member else b""
        else:
            data = path.read_bytes()
        strings, memo = [], {}
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING",
                           "BINSTRING", "STRING"):
                strings.append(str(arg))
            elif op.name == "MEMOIZE" and strings:
                memo[len(memo)] = strings[-1]
            elif op.name in ("BINPUT", "LONG_BINPUT", "PUT") and strings:
                memo[arg] = strings[-1]
            elif op.name in ("BINGET", "LONG_BINGET", "GET") and arg in memo:
                strings.append(memo[arg])
            elif op.name in ("GLOBAL", "INST") or (op.name == "STACK_GLOBAL" and len(strings) >= 2):
                name = str(arg).replace(" ", ".") if op.name != "STACK_GLOBAL" else f"{strings[-2]}.{strings[-1]}"
                if not _IDENTIFIER.match(name):
                    return None  # bytes that merely parse as opcodes: not a pickle worth naming
                if not _TENSOR_GLOBALS.match(name):
                    return name
    except Exception:  # not a pickle at all (random bytes): nothing to name
        return None
    return None


def _unwrap(obj, path) -> dict[str, torch.Tensor]:
    """A flat state dict from an official file or a train.py dict (EMA preferred over the raw model)."""
    if isinstance(obj, dict):
        for key in ("ema", "model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        tensors = {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise CheckpointError(f"{path} holds no DiT state dict (expected tensors, or an 'ema'/'model' entry)")


def infer_config(sd: dict[str, torch.Tensor], num_heads: int | None = None) -> DiTConfig:
    """The DiT config implied by tensor shapes; heads from the registry where depth and width identify it."""
    try:
        hidden, in_channels, patch, _ = sd["x_embedder.proj.weight"].shape
        num_patches = sd["pos_embed"].shape[1]
        fc1_rows = sd["blocks.0.mlp.fc1.weight"].shape[0]
        final_rows = sd["final_layer.linear.weight"].shape[0]
        table_rows = sd["y_embedder.embedding_table.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"not a DiT state dict: missing {e.args[0]!r}") from None
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    grid = round(num_patches ** 0.5)
    out_channels = final_rows // (patch * patch)
    # Every official model was trained with class dropout, so the table's last row is the null class.
    cfg = DiTConfig(input_size=grid * patch, patch_size=patch, in_channels=in_channels, hidden_size=hidden,
                    depth=depth, num_heads=num_heads or 1, mlp_ratio=fc1_rows / hidden,
                    class_dropout_prob=0.1, num_classes=table_rows - 1,
                    learn_sigma=out_channels == 2 * in_channels)
    if num_heads is None:
        candidates = {c.num_heads for c in DIT_CONFIGS.values()
                      if (c.depth, c.hidden_size, c.patch_size) == (depth, hidden, patch)}
        if len(candidates) != 1:
            raise CheckpointError(
                f"cannot infer the number of heads of a DiT with depth {depth} and width {hidden}; "
                "name its config (--config)"
            )
        cfg = replace(cfg, num_heads=candidates.pop())
    return cfg


def check_state_dict(model: DiT, sd: dict[str, torch.Tensor]) -> None:
    """Raises one CheckpointError listing missing keys, unexpected keys and shape differences."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(sd)) if sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape differences", shapes)):
            if items:
                shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
                parts.append(f"{title}: {shown}")
        raise CheckpointError("checkpoint does not fit the model; " + "; ".join(parts))


def load_checkpoint(path: str | Path, config: DiTConfig | str | None = None,
                    image_size: int | None = None) -> DiT:
    """A DiT in eval mode with the checkpoint's weights, loaded strictly."""
    sd, metadata = read_state_dict(path)
    if isinstance(config, str):
        config = get_config(config, image_size=image_size)
    elif config is None and "config" in metadata:
        config = DiTConfig.from_dict(json.loads(metadata["config"]))
    elif config is None:
        config = infer_config(sd)
    model = DiT.from_config(config)
    check_state_dict(model, sd)
    model.load_state_dict(sd, strict=True)
    return model.eval()
