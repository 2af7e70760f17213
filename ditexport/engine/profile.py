"""Engine batch profiles: the rows a plan is optimised for (guided sampling runs 2 rows per image)."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError
from ..settings import BuildSettings
from .plans import EngineError


# ---------------------------------------------------------------------------------------- profile

DEFAULT_MAX_BATCH_IMAGES = BuildSettings.max_images  # images per request an engine profile is built for


@dataclass(frozen=True)
class BatchProfile:
    """Batch rows an engine is optimised for; guided sampling runs 2 rows per image ([cond; uncond])."""
    min: int
    opt: int
    max: int

    @classmethod
    def for_images(cls, max_images: int = DEFAULT_MAX_BATCH_IMAGES, guided: bool = True,
                   opt_images: int | None = None) -> "BatchProfile":
        """min 1; opt defaults to max, since the large batches are where the time goes."""
        if max_images < 1:
            raise UsageError(f"the engine's max batch must be at least 1 image, got {max_images}")
        opt_images = max_images if opt_images is None else opt_images
        if not 1 <= opt_images <= max_images:
            raise UsageError(f"the engine's opt batch must be between 1 and {max_images} images, got {opt_images}")
        rows_per_image = 2 if guided else 1
        return cls(min=1, opt=rows_per_image * opt_images, max=rows_per_image * max_images)



def engine_profile(max_batch_images: int, guided: bool = True,
                   opt_batch_images: int | None = None) -> tuple[int, int, int]:
    """(min, opt, max) engine batch for up to `max_batch_images` images; guidance runs [x; x], doubling it.

    opt defaults to max: TensorRT picks its kernels for the opt shape, and the large batches are where
    the time goes; pass `opt_batch_images` to favour interactive sizes instead.
    """
    p = BatchProfile.for_images(max_batch_images, guided, opt_batch_images)
    return p.min, p.opt, p.max


def batch_profiles(opt_batches) -> list[tuple[int, int, int]]:
    """One (min, opt, max) profile per batch in `opt_batches`: each covers the batches above the previous one
    up to its own, which is its opt (and max), so every batch from 1 up runs on kernels chosen near its size."""
    batches = sorted(set(int(b) for b in opt_batches))
    if not batches or batches[0] < 1:
        raise UsageError(f"profile batches must be at least 1, got {list(opt_batches)}")
    lows = [1] + [b + 1 for b in batches[:-1]]
    return [(lo, b, b) for lo, b in zip(lows, batches)]


def profile_for_batch(ranges: list[tuple[int, int, int]], batch: int) -> int:
    """The index of the profile that runs `batch`: one whose range holds it, the nearest opt first."""
    fits = [i for i, (lo, _, hi) in enumerate(ranges) if lo <= batch <= hi]
    if not fits:
        raise EngineError(f"no optimization profile of the engine takes batch {batch}; its profiles are "
                          f"{', '.join(f'{lo}..{hi}' for lo, _, hi in ranges)}")
    return min(fits, key=lambda i: abs(ranges[i][1] - batch))


def profile_shapes(input_shapes: dict[str, list[int | str]], min_batch: int, opt_batch: int,
                   max_batch: int) -> dict[str, dict[str, list[int]]]:
    """The optimisation profile: every input's min/opt/max shape, the batch axis (0) being the only dynamic one."""
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise UsageError(f"an engine profile needs 1 <= min <= opt <= max, got {min_batch}, {opt_batch}, {max_batch}")
    profile = {}
    for name, shape in input_shapes.items():
        if not shape:
            raise EngineError(f"ONNX input {name!r} is a scalar; every input needs a leading batch axis")
        if isinstance(shape[0], int):
            raise EngineError(f"ONNX input {name!r} has a fixed batch of {shape[0]}; export it with a dynamic batch "
                              "axis (the export pipeline does this) before building an engine")
        rest = shape[1:]
        if any(not isinstance(d, int) for d in rest):
            raise EngineError(f"ONNX input {name!r} has dynamic dimensions besides the batch ({shape}); "
                              "only the batch may be dynamic in an engine profile")
        profile[name] = {"min": [min_batch, *rest], "opt": [opt_batch, *rest], "max": [max_batch, *rest]}
    return profile
