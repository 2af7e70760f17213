"""ditexport.images: the streamed PNG grid equals the in-memory grid; non-finite samples and bad paths are refused."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from ditexport.images import ImageWriteError, NonFiniteSamplesError, PngGridWriter, make_grid, save_grid


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
