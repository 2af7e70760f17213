"""Image grids as PNG files and sample files (.npz) for FID as the official `sample_ddp.py` writes them, both
streamed, so that any number of images fits in bounded memory."""
from __future__ import annotations

import math
import struct
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .artifacts import atomic_path
from .errors import DitexportError

PNG_MAX_SIDE = 2**31 - 1
_COLOR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG grey, grey+alpha, RGB, RGBA


class NonFiniteSamplesError(DitexportError):
    """Samples with NaN or infinite values (a broken model, export or setting): never written or shown."""


class ImageWriteError(DitexportError):
    """An output image that cannot be written (a directory, a read-only or full file system, ...)."""


def check_finite(images: torch.Tensor) -> None:
    """Refuses samples holding NaN or inf, which would otherwise become black or white pixels unnoticed."""
    bad = ~torch.isfinite(images.reshape(len(images), -1)).all(dim=1)
    if bad.any():
        raise NonFiniteSamplesError(f"{int(bad.sum())} of {len(images)} samples are not finite (NaN or inf): the "
                                    "model, export or sampler settings produced them")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) floats in [0, 1] -> (N, H, W, C) uint8 by the official `sample_ddp.py` conversion; non-finite
    samples are refused.

    Officially clamp(127.5 x + 128, 0, 255) truncated, for x in [-1, 1]; with x = 2u - 1 that is
    floor(255 u + 0.5), evaluated here in float64, where it is exact for any float32 u.
    """
    check_finite(images)
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


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


class PngGridWriter:
    """Writes `num_images` images as one PNG grid, the same layout as `make_grid`, a grid row at a time.

    Use as a context manager: the file is created under a temporary name on entry (so an unwritable
    destination fails before any sampling), filled by `add`, and renamed onto `path` only when the block
    finishes with every image added; on any error nothing is left at `path`.
    """

    def __init__(self, path: str | Path, num_images: int, nrow: int | None = None, padding: int = 2,
                 upscale: int = 1):
        self.path = Path(path)
        self.num_images = num_images
        self.nrow = nrow or min(num_images, 8)
        self.padding = padding
        self.upscale = upscale
        self.added = 0
        self._pending: np.ndarray | None = None  # images that do not yet fill a grid row
        self._width = None

    # -- the file ------------------------------------------------------------------------------------

    def __enter__(self) -> "PngGridWriter":
        self._atomic = atomic_path(self.path)
        try:
            tmp = self._atomic.__enter__()
        except OSError as e:
            raise ImageWriteError(f"cannot write {self.path}: {e.strerror or e}") from None
        try:
            self._file = open(tmp, "wb")
        except OSError as e:
            self._atomic.__exit__(type(e), e, e.__traceback__)
            raise ImageWriteError(f"cannot write {self.path}: {e.strerror or e}") from None
        self._compressor = zlib.compressobj(6)
        return self

    def __exit__(self, kind, value, traceback) -> None:
        try:
            if kind is None:
                if self.added != self.num_images:
                    raise ImageWriteError(f"{self.path}: {self.added} of {self.num_images} images were added")
                self._guarded(self._finish)
        except BaseException as e:
            self._close(e)
            raise
        self._close(value)

    def _close(self, error: BaseException | None) -> None:
        """Closes the temporary file and renames it onto `path`, or removes it after an error."""
        self._file.close()
        if error is None:
            self._guarded(self._atomic.__exit__, None, None, None)
        else:
            self._atomic.__exit__(type(error), error, error.__traceback__)

    def _guarded(self, write, *args) -> None:
        try:
            write(*args)
        except OSError as e:
            raise ImageWriteError(f"cannot write {self.path}: {e.strerror or e}") from None

    def _header(self, side_h: int, side_w: int, channels: int) -> None:
        rows = math.ceil(self.num_images / self.nrow)
        self._tile = (side_h, side_w)
        self._channels = channels
        self._width = self.nrow * (side_w + self.padding) + self.padding
        height = rows * (side_h + self.padding) + self.padding
        if self._width > PNG_MAX_SIDE or height > PNG_MAX_SIDE:
            raise ImageWriteError(f"{self.path}: a grid of {self.num_images} images would be {self._width} x "
                                  f"{height} px, beyond PNG's limit of {PNG_MAX_SIDE} px per side")
        self._file.write(b"\x89PNG\r\n\x1a\n")
        self._file.write(_chunk(b"IHDR", struct.pack(">IIBBBBB", self._width, height, 8,
                                                     _COLOR_TYPE[channels], 0, 0, 0)))
        self._lines(np.zeros((self.padding, self._width, channels), np.uint8))

    def _lines(self, pixels: np.ndarray) -> None:
        """Appends scanlines (filter type 0, none) to the compressed image data."""
        flat = pixels.reshape(len(pixels), -1)
        scanlines = np.concatenate([np.zeros((len(flat), 1), np.uint8), flat], axis=1)
        data = self._compressor.compress(scanlines.tobytes())
        if data:
            self._file.write(_chunk(b"IDAT", data))

    def _grid_row(self, tiles: np.ndarray) -> None:
        h, w = self._tile
        p = self.padding
        band = np.zeros((h + p, self._width, self._channels), np.uint8)
        for i, tile in enumerate(tiles):
            band[:h, p + i * (w + p):p + i * (w + p) + w] = tile
        self._lines(band)

    def _finish(self) -> None:
        if self._pending is not None and len(self._pending):
            self._grid_row(self._pending)
        self._file.write(_chunk(b"IDAT", self._compressor.flush()))
        self._file.write(_chunk(b"IEND", b""))

    # -- the images ----------------------------------------------------------------------------------

    def add(self, images: torch.Tensor) -> None:
        """Appends (N, C, H, W) images in [0, 1]; refuses non-finite ones (and then nothing is written)."""
        if self.added + len(images) > self.num_images:
            raise ImageWriteError(f"{self.path}: more than the {self.num_images} images announced")
        try:
            arr = to_uint8(images)
        except NonFiniteSamplesError as e:
            raise NonFiniteSamplesError(f"{e} (among images {self.added + 1} to {self.added + len(images)}); "
                                        f"{self.path} was not written") from None
        if self.upscale > 1:
            arr = arr.repeat(self.upscale, axis=1).repeat(self.upscale, axis=2)
        if self._width is None:
            self._guarded(self._header, arr.shape[1], arr.shape[2], arr.shape[3])
        if self._pending is not None:
            arr = np.concatenate([self._pending, arr])
        full = len(arr) - len(arr) % self.nrow
        for start in range(0, full, self.nrow):
            self._guarded(self._grid_row, arr[start:start + self.nrow])
        self._pending = arr[full:]
        self.added += len(images)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, upscale: int = 1) -> Path:
    """Writes a PNG grid atomically (temporary name, then rename); non-finite samples are refused."""
    check_finite(images)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with PngGridWriter(path, len(images), nrow=nrow, upscale=upscale) as writer:
        writer.add(images)
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


def write_samples(results, grid_path: str | Path, num_images: int, *, npz_path: str | Path | None = None,
                  upscale: int = 1) -> dict:
    """Streams a pipeline's chunk results (`Pipeline.chunks`) into a PNG grid and, with `npz_path`, an FID `.npz`
    (the first 3 channels of undecoded latents); both files appear only when complete. Returns what was written
    and how long sampling took: total_s, sampler_s, steps, chunks, shape (N, H, W, C)."""
    import contextlib

    summary = {"total_s": 0.0, "sampler_s": 0.0, "steps": 0, "chunks": 0, "shape": None}
    with contextlib.ExitStack() as outputs:
        # The grid is created now (an unwritable destination fails here) and published only when complete.
        grid = outputs.enter_context(PngGridWriter(grid_path, num_images, upscale=upscale))
        write_npz = None
        for result in results:
            images = result.images[:, :3]
            grid.add(images)
            _, c, h, w = images.shape
            if npz_path is not None:
                if write_npz is None:
                    write_npz = outputs.enter_context(npz_writer(npz_path, num_images, h, w, c))
                write_npz(images)
            summary["total_s"] += result.total_s
            summary["sampler_s"] += result.sampler_s
            summary["steps"], summary["chunks"] = result.steps, summary["chunks"] + 1
            summary["shape"] = (num_images, h, w, c)
    return summary
