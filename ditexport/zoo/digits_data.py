"""The training data of the built-in digits DiT: scikit-learn's bundled 8x8 digits, offline."""
from __future__ import annotations

import torch

DIGIT_MAX = 16.0  # load_digits stores 4-bit grey levels, 0..16


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as (N, 1, 8, 8) float32 in [-1, 1] and their (N,) int64 classes 0..9."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.from_numpy(data.images).float().unsqueeze(1) / DIGIT_MAX * 2 - 1  # (N, 1, 8, 8)
    labels = torch.from_numpy(data.target).long()
    return images, labels


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] model space -> [0, 1], the range of `SampleResult.images`."""
    return ((images.float().clamp(-1, 1) + 1) / 2)
