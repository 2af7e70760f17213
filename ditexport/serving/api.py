"""The HTTP API's JSON: requests parsed and checked field by field, images as base64 PNG. No Ray in here."""
from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path

import torch

from ..class_names import class_names
from ..images import to_uint8
from ..sampler import SAMPLING_METHODS, SamplerConfig, SamplerConfigError
from .engine import ImageRequest, RequestError

FIELDS = {"class_labels", "steps", "sampler", "guidance_scale", "seed", "eta"}
# The defaults of `python -m ditexport sample`.
DEFAULTS = {"steps": 250, "sampler": "ddpm", "guidance_scale": 4.0, "seed": 0, "eta": 0.0}


def parse_image_request(body: bytes, num_classes: int, names: list[str]) -> ImageRequest:
    """A POST /v1/images body -> ImageRequest; anything wrong is a RequestError naming its field."""
    try:
        data = json.loads(body, parse_constant=lambda c: float(c))
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError("body", f"the body is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise RequestError("body", "the body must be a JSON object")
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise RequestError(unknown[0], f"unknown field {unknown[0]!r}; fields: {', '.join(sorted(FIELDS))}")
    if "class_labels" not in data:
        raise RequestError("class_labels", "class_labels is required, e.g. [3, 1]")
    labels = data["class_labels"]
    if not isinstance(labels, list):
        raise RequestError("class_labels", "class_labels must be a list of class indices or names")
    values = {**DEFAULTS, **{k: v for k, v in data.items() if k != "class_labels"}}
    for name in ("steps", "seed"):
        if not isinstance(values[name], int) or isinstance(values[name], bool):
            raise RequestError(name, f"{name} must be an integer, got {values[name]!r}")
    for name in ("guidance_scale", "eta"):
        value = values[name]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise RequestError(name, f"{name} must be a finite number, got {value!r}")
    if values["sampler"] not in SAMPLING_METHODS:
        raise RequestError("sampler", f"sampler must be one of {', '.join(SAMPLING_METHODS)}, "
                                      f"got {values['sampler']!r}")
    try:
        cfg = SamplerConfig(num_steps=values["steps"], method=values["sampler"],
                            guidance_scale=float(values["guidance_scale"]), eta=float(values["eta"]))
    except SamplerConfigError as e:
        raise RequestError(e.field, str(e)) from None
    return ImageRequest(labels=[class_index(v, num_classes, names) for v in labels], seed=values["seed"],
                        sampler_cfg=cfg)


def class_index(value, num_classes: int, names: list[str]) -> int:
    """A class given by index, or by name where the model has names."""
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < num_classes:
            raise RequestError("class_labels", f"class labels must be in 0..{num_classes - 1}, got {value}")
        return value
    if isinstance(value, str) and value in names:
        return names.index(value)
    raise RequestError("class_labels", f"unknown class {value!r}: give an index 0..{num_classes - 1} "
                                       "or one of the model's class names")


def png_base64(images: torch.Tensor) -> list[str]:
    """(N, C, H, W) in [0, 1] -> one base64 PNG per image, pixels as `sample` writes them (`to_uint8`)."""
    from PIL import Image

    out = []
    for pixels in to_uint8(images[:, :3]):
        buffer = io.BytesIO()
        Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels).save(buffer, format="PNG")
        out.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return out


def model_info(export_dir: str | Path, backend) -> dict:
    """GET /v1/models: the served export, its config, backend, precision, CPU threads and validation summary."""
    import torch

    manifest = json.loads((Path(export_dir) / "manifest.json").read_text())
    cfg = backend.config
    return {"models": [{"name": manifest.get("name"), "export_dir": str(export_dir), "config": manifest.get("config"),
                        "backend": backend.name, "precision": backend.precision, "threads": torch.get_num_threads(),
                        "validation": manifest.get("validation"),
                        "class_names": class_names(cfg.num_classes, manifest.get("model"))[:100]}]}
