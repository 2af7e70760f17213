"""Human-readable class names for class-conditional models.

ImageNet's 1,000 names ship as `data/imagenet_classes.txt` (one name per line, line i = class i), the
list of `pytorch/hub`'s `imagenet_classes.txt`. Two names occur twice there ("crane" the bird and the
machine, 134/517; "maillot", 638/639), so labels for people always carry the index.
"""
from __future__ import annotations

from functools import lru_cache
from importlib import resources

IMAGENET_NUM_CLASSES = 1000


@lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k class names, index = class label."""
    text = resources.files("ditexport").joinpath("data/imagenet_classes.txt").read_text(encoding="utf-8")
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(names) != IMAGENET_NUM_CLASSES:  # a truncated package install, not a user error
        raise RuntimeError(f"data/imagenet_classes.txt holds {len(names)} names, expected {IMAGENET_NUM_CLASSES}")
    return names


def class_names(num_classes: int, model_name: str | None = None) -> list[str]:
    """Names for a model's classes: digits for the digits model, ImageNet for 1,000 classes, else "class i"."""
    if model_name == "digits" and num_classes == 10:
        return [str(i) for i in range(10)]
    if num_classes == IMAGENET_NUM_CLASSES:
        return list(imagenet_class_names())
    return [f"class {i}" for i in range(num_classes)]


def class_label(index: int, name: str) -> str:
    """What a menu shows for a class: the name, prefixed by the index where the name is not the index."""
    return name if name == str(index) else f"{index}: {name}"
