"""Runtimes behind one contract: `backend(x, t, y) -> out` and `backend.with_condition(x, c) -> out`.

Every backend takes and returns float32 tensors (t and y int64) on `backend.device`, whatever precision it
computes in, so the sampler never knows which runtime it drives. Heavy runtimes are imported lazily.
"""
from __future__ import annotations

from .base import Backend
from .torch_backend import TorchBackend

BACKEND_NAMES = ("torch", "onnxruntime", "tensorrt")

__all__ = ["Backend", "TorchBackend", "BACKEND_NAMES"]
