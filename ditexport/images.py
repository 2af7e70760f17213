"""Image grids as PNG files, and sample files (.npz) for FID as the official `sample_ddp.py` writes them."""
from __future__ import annotations

import math
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .artifacts import atomic_path


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) floats in [0, 1] -> (N, H, W, C) uint8, by the official `sample_ddp.py` conversion.

    Officially clamp(127.5 x + 128, 0, 255) truncated, for x in [-1, 1]; with x = 2u - 1 that is
    floor(255 u + 0.5), evaluated here in float64, where it is exact for any float32 u.
    """
    exact = torch.floor(images.detach().double().clamp(0, 1) * 255 + 0.5)
    return exact.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2, upscale: int = 1) -> np.ndarray:
    """Tiles images into one (H, W, C) uint8 array; small images can be upscaled (nearest) to be seen."""
    arr = to_uint8(images)
    if upscale > 1:
        arr = arr.repeat(upscale, axis=1).repeat(upscale, axis=2)
    n, h, w, c = arr.shape
    nrow = nrow or min(n, 8)
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = arr[i]
    return grid


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, upscale: int = 1) -> Path:
    """Writes a PNG grid atomically (temporary name, then rename)."""
    from PIL import Image

    grid = make_grid(images, nrow=nrow, upscale=upscale)
    image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


@contextmanager
def npz_writer(path: str | Path, num_images: int, height: int, width: int, channels: int):
    """Yields `write(images)`, which appends (n, C, H, W) images in [0, 1] to an .npz as `sample_ddp.py` writes it.

    The file holds one uint8 array `arr_0` of shape (N, H, W, C), the layout the ADM FID evaluator reads. It
    is streamed chunk by chunk into the zip member (np.savez would need the whole array in memory) and
    appears at `path` only once all `num_images` are written.
    """
    shape = (num_images, height, width, channels)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0

    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive, \
            archive.open("arr_0.npy", "w", force_zip64=True) as member:
        np.lib.format.write_array_header_1_0(member, {"descr": "|u1", "fortran_order": False, "shape": shape})

        def write(images: torch.Tensor) -> None:
            nonlocal written
            arr = to_uint8(images)
            if arr.shape[1:] != shape[1:] or written + len(arr) > num_images:
                raise ValueError(f"images of shape {tuple(arr.shape)} do not fit the remaining "
                                 f"{num_images - written} of {shape} (N, H, W, C)")
            member.write(np.ascontiguousarray(arr).tobytes())
            written += len(arr)

        yield write
        if written != num_images:
            raise ValueError(f"{path}: {written} of {num_images} images were written; the file was not created")


def save_npz(images: torch.Tensor, path: str | Path, chunk: int = 1024) -> Path:
    """Writes (N, C, H, W) images in [0, 1] as `arr_0` (N, H, W, C) uint8, converting `chunk` images at a time."""
    n, c, h, w = images.shape
    with npz_writer(path, n, h, w, c) as write:
        for start in range(0, n, chunk):
            write(images[start:start + chunk])
    return Path(path)
