"""ditexport.images: the official `sample_ddp.py` pixel conversion, streamed .npz sample files, and the streamed PNG
grid (equal to the in-memory grid); non-finite samples and bad paths are refused."""
from __future__ import annotations

import math
import tracemalloc
import zipfile
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

from ditexport.images import (ImageWriteError, NonFiniteSamplesError, PngGridWriter, make_grid, npz_writer, save_grid,
                              save_npz, to_uint8)


def official_uint8(x: torch.Tensor) -> np.ndarray:
    """sample_ddp.py: clamp(127.5 x + 128, 0, 255) to uint8 (float32), channels last."""
    return torch.clamp(127.5 * x + 128.0, 0, 255).permute(0, 2, 3, 1).to(torch.uint8).numpy()


def test_to_uint8_is_the_official_conversion():
    x = torch.rand(1000, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2.4 - 1.2  # some out of range
    ours = to_uint8((x.clamp(-1, 1) + 1) / 2).astype(np.int64)
    official = official_uint8(x).astype(np.int64)
    # The official float32 arithmetic rounds 127.5 x itself; where that lands within a rounding of an integer
    # the two differ by one level (measured: 25 pixels in 10 million).
    assert np.abs(ours - official).max() <= 1 and (ours != official).mean() < 1e-5
    assert ours.min() == 0 and ours.max() == 255


def test_to_uint8_is_exact_at_every_half_level():
    # floor(255 u + 1/2) in exact rational arithmetic, at the float32 values nearest to, just below and just above
    # each half level (k + 1/2) / 255, where float32 arithmetic would round the wrong way.
    u = torch.tensor([(k + 0.5) / 255 for k in range(255)], dtype=torch.float32)
    u = torch.cat([u, torch.nextafter(u, torch.zeros(1)), torch.nextafter(u, torch.ones(1)), torch.tensor([0., 1.])])
    expected = [int(255 * Fraction(float(v)) + Fraction(1, 2)) for v in u.tolist()]
    assert to_uint8(u.reshape(-1, 1, 1, 1)).reshape(-1).tolist() == expected


def test_save_npz_is_what_np_savez_writes(tmp_path):
    images = torch.rand(37, 3, 5, 4, generator=torch.Generator().manual_seed(1))
    ours = save_npz(images, tmp_path / "ours.npz", chunk=8)  # 5 chunks, the last one short
    expected = to_uint8(images)
    np.savez(tmp_path / "savez.npz", arr_0=expected)
    with np.load(ours) as data:
        assert data.files == ["arr_0"]
        arr = data["arr_0"]
    assert arr.shape == (37, 5, 4, 3) and arr.dtype == np.uint8 and np.array_equal(arr, expected)
    with zipfile.ZipFile(ours) as a, zipfile.ZipFile(tmp_path / "savez.npz") as b:
        assert a.namelist() == ["arr_0.npy"]
        assert a.read("arr_0.npy") == b.read("arr_0.npy")  # header and data byte for byte
        # The ADM evaluator streams the member: magic, a version 1.0 header, then raw C-order data.
        with a.open("arr_0.npy") as member:
            assert np.lib.format.read_magic(member) == (1, 0)
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(member)
            assert (shape, fortran_order, dtype) == ((37, 5, 4, 3), False, np.dtype(np.uint8))
            assert np.array_equal(np.frombuffer(member.read(), np.uint8).reshape(shape), expected)


def test_npz_writer_streams_in_bounded_memory(tmp_path):
    chunks, per_chunk = 32, 128  # 12.6 MB of uint8 in all, 393 KB per chunk
    gen = torch.Generator().manual_seed(2)
    tracemalloc.start()
    try:
        with npz_writer(tmp_path / "big.npz", chunks * per_chunk, 32, 32, 3) as write:
            for _ in range(chunks):
                write(torch.rand(per_chunk, 3, 32, 32, generator=gen))  # torch memory is not traced: only ours
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    total = chunks * per_chunk * 32 * 32 * 3
    print(f"peak traced memory {peak / 1e6:.2f} MB for a {total / 1e6:.1f} MB array")
    assert peak < total / 8
    arr = np.load(tmp_path / "big.npz", mmap_mode=None)["arr_0"]
    assert arr.shape == (chunks * per_chunk, 32, 32, 3)


def test_npz_writer_leaves_no_file_when_incomplete_or_misfed(tmp_path):
    path = tmp_path / "part.npz"
    with pytest.raises(ValueError, match="4 of 10 images were written"):
        with npz_writer(path, 10, 8, 8, 1) as write:
            write(torch.rand(4, 1, 8, 8))
    with pytest.raises(ValueError, match="do not fit"):
        with npz_writer(path, 10, 8, 8, 1) as write:
            write(torch.rand(4, 3, 8, 8))  # wrong channel count
    with pytest.raises(ValueError, match="do not fit"):
        with npz_writer(path, 3, 8, 8, 1) as write:
            write(torch.rand(4, 1, 8, 8))  # more than announced
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary


@pytest.mark.parametrize("count, channels, upscale, parts", [
    (3, 1, 8, [3]), (20, 3, 1, [7, 7, 6]), (9, 1, 2, [1] * 9), (64, 3, 1, [64]), (5, 2, 1, [5])])
def test_the_streamed_grid_is_the_in_memory_grid(tmp_path, count, channels, upscale, parts):
    images = torch.rand(count, channels, 8, 8, generator=torch.Generator().manual_seed(count))
    path = tmp_path / "grid.png"
    with PngGridWriter(path, count, upscale=upscale) as writer:
        start = 0
        for n in parts:
            writer.add(images[start:start + n])
            start += n
    expected = make_grid(images, upscale=upscale)
    got = np.asarray(Image.open(path))
    assert np.array_equal(got, expected[..., 0] if channels == 1 else expected)
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]


def test_non_finite_samples_are_refused_and_nothing_is_written(tmp_path):
    images = torch.rand(4, 1, 8, 8)
    images[2, 0, 3, 3] = math.nan
    with pytest.raises(NonFiniteSamplesError, match=r"1 of 4 samples are not finite"):
        save_grid(images, tmp_path / "grid.png")
    path = tmp_path / "streamed.png"
    with pytest.raises(NonFiniteSamplesError, match=r"among images 5 to 8\); .*streamed.png was not written"):
        with PngGridWriter(path, 8) as writer:
            writer.add(torch.rand(4, 1, 8, 8))
            writer.add(images)
    assert list(tmp_path.iterdir()) == []


def test_an_incomplete_grid_is_not_published(tmp_path):
    path = tmp_path / "grid.png"
    with pytest.raises(ImageWriteError, match="3 of 8 images were added"):
        with PngGridWriter(path, 8) as writer:
            writer.add(torch.rand(3, 1, 8, 8))
    with pytest.raises(ImageWriteError, match="cannot write"):
        with PngGridWriter(tmp_path / "missing" / "grid.png", 1):
            pass
    assert list(tmp_path.iterdir()) == []
