"""diffusers-layout model directories, as published for facebook/DiT-XL-2-256 and -512: `transformer/` (a
`DiTTransformer2DModel`, or the older `Transformer2DModel` name diffusers remaps to it), `vae/` and `scheduler/`.

The transformer's weights map to the official DiT names and back exactly, laid out as diffusers' own
`scripts/convert_dit_to_diffusers.py` lays them out: the official model's one timestep and label embedder is
copied into every block (`transformer_blocks.N.norm1.emb`), the fused qkv is split into to_q/to_k/to_v, and
`pos_embed` (a fixed sin-cos table) is not stored, diffusers recomputes it. Loading needs no diffusers:
the model is our reference DiT, which computes the official function, not diffusers' (docs/diffusers.md).
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch

from .checkpoint import CheckpointError, check_state_dict, read_state_dict
from .hashing import sha256_file
from .model import DiT, DiTConfig, get_2d_sincos_pos_embed

TRANSFORMER_DIR, VAE_DIR, SCHEDULER_DIR = "transformer", "vae", "scheduler"
CONFIG_NAME = "config.json"
SCHEDULER_CONFIG_NAME = "scheduler_config.json"
# Read in this order: safetensors (no pickle at all) before .bin (torch.load(weights_only=True)); a sharded
# model has "<name>.index.json" naming its shards.
WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
TRANSFORMER_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")

# DiTTransformer2DModel's defaults (diffusers 0.42) for the keys that decide the function; a config that leaves
# one out gets this value from diffusers too (an older "Transformer2DModel" config is remapped to that class).
DIFFUSERS_DEFAULTS = {"num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": None,
                      "num_layers": 28, "attention_bias": True, "sample_size": 32, "patch_size": 2,
                      "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000, "norm_type": "ada_norm_zero",
                      "norm_elementwise_affine": False, "norm_eps": 1e-5}
# What the official DiT is and diffusers can configure otherwise: any other value is not a DiT.
_REQUIRED = {"norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate", "attention_bias": True,
             "norm_elementwise_affine": False}
# The official diffusion process; the scheduler config of a DiT directory declares the same one.
OFFICIAL_SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
                     "prediction_type": "epsilon"}

# Official module -> diffusers module, for tensors that are simply renamed.
_GLOBAL = {"x_embedder.proj": "pos_embed.proj", "final_layer.adaLN_modulation.1": "proj_out_1",
           "final_layer.linear": "proj_out_2"}
_PER_BLOCK = {"adaLN_modulation.1": "norm1.linear", "attn.proj": "attn1.to_out.0", "mlp.fc1": "ff.net.0.proj",
              "mlp.fc2": "ff.net.2"}
# The official model's single embedders, copied into every diffusers block.
_EMBEDDERS = {"t_embedder.mlp.0": "norm1.emb.timestep_embedder.linear_1",
              "t_embedder.mlp.2": "norm1.emb.timestep_embedder.linear_2",
              "y_embedder.embedding_table": "norm1.emb.class_embedder.embedding_table"}
_QKV = ("to_q", "to_k", "to_v")
_OFFICIAL_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_DIFFUSERS_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.(.+)")


# ---------------------------------------------------------------------------------------------- directory

def transformer_dir(path: str | Path) -> Path:
    """The `transformer/` of a model directory (or the directory itself when it is that folder)."""
    path = Path(path)
    for candidate in (path / TRANSFORMER_DIR, path):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    raise CheckpointError(f"checkpoint {path} is a directory but not a diffusers model directory (no "
                          f"{TRANSFORMER_DIR}/{CONFIG_NAME}); pass one, or a .pt or .safetensors file")


def vae_dir_of(checkpoint: str | Path | None) -> Path | None:
    """The `vae/` of a diffusers model directory, the default decoder of its latents; None for a checkpoint
    file or a directory without one."""
    if checkpoint is None or not Path(checkpoint).is_dir():
        return None
    vae = Path(checkpoint) / VAE_DIR
    if not (vae / CONFIG_NAME).is_file():
        return None
    name = _read_json(vae / CONFIG_NAME).get("_class_name")
    if name != "AutoencoderKL":
        raise CheckpointError(f"{vae / CONFIG_NAME} names {name}, not the AutoencoderKL that ditexport decodes "
                              "latents with; pass a VAE directory with --vae")
    return vae


def transformer_files(path: str | Path) -> list[Path]:
    """The files the transformer is read from: its config, then its weights (an index and its shards)."""
    directory = transformer_dir(path)
    for name in WEIGHTS_NAMES:
        if (directory / name).is_file():
            return [directory / CONFIG_NAME, directory / name]
        index = directory / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
            missing = [s for s in shards if not (directory / s).is_file()]
            if missing or not shards:
                raise CheckpointError(f"{index} names shards that are not there: {', '.join(missing) or 'none'}")
            return [directory / CONFIG_NAME, index, *(directory / s for s in shards)]
    found = _listing(sorted(p.name for p in directory.iterdir())) or "nothing"
    raise CheckpointError(f"{directory} holds no {' or '.join(WEIGHTS_NAMES)} (found: {found})")


def transformer_sha256(path: str | Path) -> str:
    """One SHA-256 over the transformer's files: their names (relative to `path`) and their own SHA-256, sorted."""
    path = Path(path)
    digest = hashlib.sha256()
    for name, sha in sorted((f.relative_to(path).as_posix(), sha256_file(f)) for f in transformer_files(path)):
        digest.update(f"{name} {sha}\n".encode())
    return digest.hexdigest()


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data


# ------------------------------------------------------------------------------------------------- config

def config_from_diffusers(config: dict, where: str = "the transformer config") -> DiTConfig:
    """The official DiT config of a DiTTransformer2DModel config; anything that is not a DiT is refused."""
    name = config.get("_class_name")
    c = {**DIFFUSERS_DEFAULTS, **config}
    if name != TRANSFORMER_CLASSES[0]:
        c["norm_type"] = config.get("norm_type")  # only ada_norm_zero makes diffusers remap the old class to a DiT
    problems = [f"_class_name {name!r}"] if name not in TRANSFORMER_CLASSES else []
    problems += [f"{key} {c[key]!r}" for key, value in _REQUIRED.items() if c[key] != value]
    problems += [f"{key} None" for key in ("patch_size", "num_embeds_ada_norm") if c[key] is None]
    if problems:
        raise CheckpointError(f"{where} is not a DiT (a DiTTransformer2DModel with norm_type 'ada_norm_zero'): "
                              f"{', '.join(problems)}")
    in_channels, heads = int(c["in_channels"]), int(c["num_attention_heads"])
    out_channels = in_channels if c["out_channels"] is None else int(c["out_channels"])
    if out_channels not in (in_channels, 2 * in_channels):
        raise CheckpointError(f"{where} is not a DiT: out_channels {out_channels} is neither in_channels "
                              f"({in_channels}) nor twice it (learned sigma)")
    # diffusers' label table always has the null-class row (class dropout 0.1), as every official model does.
    return DiTConfig(input_size=int(c["sample_size"]), patch_size=int(c["patch_size"]), in_channels=in_channels,
                     hidden_size=heads * int(c["attention_head_dim"]), depth=int(c["num_layers"]), num_heads=heads,
                     mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=int(c["num_embeds_ada_norm"]),
                     learn_sigma=out_channels == 2 * in_channels)


def config_to_diffusers(config: DiTConfig) -> dict:
    """DiTTransformer2DModel's arguments for an official config, as diffusers' conversion script sets them
    (norm_eps left at diffusers' default, as there)."""
    if config.mlp_ratio != 4.0 or not config.has_null_class or config.hidden_size % config.num_heads:
        raise CheckpointError("diffusers' DiT has an MLP ratio of 4, a null class and a width divisible by its "
                              f"heads; this config cannot be written in its layout: {config}")
    return {"num_attention_heads": config.num_heads, "attention_head_dim": config.hidden_size // config.num_heads,
            "in_channels": config.in_channels, "out_channels": config.out_channels, "num_layers": config.depth,
            "sample_size": config.input_size, "patch_size": config.patch_size,
            "num_embeds_ada_norm": config.num_classes, **_REQUIRED}


def check_scheduler(path: str | Path) -> None:
    """Refuses a directory whose scheduler declares another diffusion process than the official one the
    samplers run (the scheduler itself is not used)."""
    file = Path(path) / SCHEDULER_DIR / SCHEDULER_CONFIG_NAME
    if not file.is_file():
        return
    declared = _read_json(file)
    wrong = [f"{key} {declared[key]!r}" for key, value in OFFICIAL_SCHEDULE.items()
             if key in declared and declared[key] != value]
    if declared.get("trained_betas") is not None:
        wrong.append("trained_betas")
    if wrong:
        expected = ", ".join(f"{k} {v!r}" for k, v in OFFICIAL_SCHEDULE.items())
        raise CheckpointError(f"{file} declares {', '.join(wrong)}; ditexport samples with the official DiT "
                              f"diffusion ({expected})")


# ---------------------------------------------------------------------------------------------- weights

def fixed_pos_embed(hidden_size: int, grid: int) -> torch.Tensor:
    """The official fixed sin-cos position table, (1, grid**2, hidden), as DiT.initialize_weights makes it."""
    return torch.from_numpy(get_2d_sincos_pos_embed(hidden_size, grid)).float().unsqueeze(0)


def official_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official DiT state dict under DiTTransformer2DModel's names (every tensor its own copy, so the
    result can be written to safetensors)."""
    depth = 1 + max((int(m.group(1)) for k in sd if (m := _OFFICIAL_BLOCK.fullmatch(k))), default=-1)
    out, unknown = {}, []
    for key, tensor in sd.items():
        module, _, param = key.rpartition(".")
        block = _OFFICIAL_BLOCK.fullmatch(module)
        if key == "pos_embed":
            _, tokens, hidden = tensor.shape
            if not torch.allclose(tensor.float(), fixed_pos_embed(hidden, round(tokens ** 0.5)), rtol=0, atol=1e-6):
                raise CheckpointError("pos_embed is not the fixed sin-cos table, which diffusers recomputes instead "
                                      "of storing; these weights cannot be written in its layout")
        elif module in _GLOBAL:
            out[f"{_GLOBAL[module]}.{param}"] = tensor.clone()
        elif module in _EMBEDDERS:
            for i in range(depth):
                out[f"transformer_blocks.{i}.{_EMBEDDERS[module]}.{param}"] = tensor.clone()
        elif block and block.group(2) == "attn.qkv":
            for name, part in zip(_QKV, tensor.chunk(3, dim=0)):
                out[f"transformer_blocks.{block.group(1)}.attn1.{name}.{param}"] = part.clone()
        elif block and block.group(2) in _PER_BLOCK:
            out[f"transformer_blocks.{block.group(1)}.{_PER_BLOCK[block.group(2)]}.{param}"] = tensor.clone()
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"not an official DiT state dict; unexpected keys: {_listing(unknown)}")
    return out


def diffusers_to_official(sd: dict[str, torch.Tensor], config: DiTConfig,
                          where: str = "these weights") -> dict[str, torch.Tensor]:
    """A DiTTransformer2DModel state dict under the official names. Every block's embedder copy must equal the
    others, the official model having one; pos_embed is the fixed table diffusers recomputes."""
    global_back = {v: k for k, v in _GLOBAL.items()}
    block_back = {v: k for k, v in _PER_BLOCK.items()}
    embedder_back = {v: k for k, v in _EMBEDDERS.items()}
    out = {"pos_embed": fixed_pos_embed(config.hidden_size, config.input_size // config.patch_size)}
    copies: dict[str, dict[int, tuple[str, torch.Tensor]]] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in sd.items():
        module, _, param = key.rpartition(".")
        block = _DIFFUSERS_BLOCK.fullmatch(module)
        rest = block.group(2) if block else None
        if module in global_back:
            out[f"{global_back[module]}.{param}"] = tensor
        elif key == "pos_embed.pos_embed":
            pass  # older diffusers stored the fixed table; 0.42 recomputes it, and so do we (above)
        elif block and rest in embedder_back:
            copies.setdefault(f"{embedder_back[rest]}.{param}", {})[int(block.group(1))] = (key, tensor)
        elif block and rest in block_back:
            out[f"blocks.{block.group(1)}.{block_back[rest]}.{param}"] = tensor
        elif block and rest.removeprefix("attn1.") in _QKV:
            qkv.setdefault((int(block.group(1)), param), {})[rest.removeprefix("attn1.")] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{where} are not a DiT's weights; unexpected keys: {_listing(unknown)}")
    for (i, param), parts in sorted(qkv.items()):
        if len(parts) == 3:  # otherwise the official qkv key is missing, and check_state_dict names it
            out[f"blocks.{i}.attn.qkv.{param}"] = torch.cat([parts[name] for name in _QKV], dim=0)
    for name, per_block in copies.items():
        (first_key, first), *others = (per_block[i] for i in sorted(per_block))
        if missing := sorted(set(range(config.depth)) - set(per_block)):
            absent = f"transformer_blocks.{missing[0]}.{first_key.split('.', 2)[2]}"
            raise CheckpointError(f"{where} are not a DiT's weights; missing keys: {absent}")
        for key, tensor in others:
            if not torch.equal(tensor, first):
                raise CheckpointError(
                    f"{where} cannot be represented as an official DiT: {key} differs from {first_key} (the "
                    "official DiT has one timestep and label embedder that every block shares)")
        out[name] = first
    return out


def _listing(keys: list[str]) -> str:
    return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")


# ------------------------------------------------------------------------------------------------ loading

def read_config(path: str | Path) -> DiTConfig:
    """The official config of a model directory's transformer."""
    directory = transformer_dir(path)
    return config_from_diffusers(_read_json(directory / CONFIG_NAME), where=str(directory / CONFIG_NAME))


def load_diffusers_dir(path: str | Path, config: DiTConfig | None = None) -> DiT:
    """The reference DiT, in eval mode, with the weights of a diffusers model directory's transformer; `config`,
    when given, must be the directory's."""
    found = read_config(path)
    if config is not None and config != found:
        differences = ", ".join(f"{name} {getattr(found, name)} (asked: {getattr(config, name)})"
                                for name in DiTConfig.__dataclass_fields__
                                if getattr(found, name) != getattr(config, name))
        raise CheckpointError(f"the transformer of {path} is not the config asked for: {differences}")
    check_scheduler(path)
    sd: dict[str, torch.Tensor] = {}
    for file in transformer_files(path)[1:]:
        if not file.name.endswith(".index.json"):
            sd.update(read_state_dict(file)[0])
    official = diffusers_to_official(sd, found, where=f"the weights in {transformer_dir(path)}")
    model = DiT.from_config(found)
    check_state_dict(model, official)
    model.load_state_dict(official, strict=True)
    return model.eval()
