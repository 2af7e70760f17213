"""The backend interface shared by every runtime."""
from __future__ import annotations

import torch

from ..model import DiTConfig


class Backend:
    """A callable DiT: `out = backend(x, t, y)`; batches above `max_batch` are split, never refused."""

    name: str = "backend"
    precision: str = "fp32"

    def __init__(self, config: DiTConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 max_batch: int | None = None):
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_batch = max_batch

    # Subclasses implement these two on batches of at most max_batch.
    def _forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not run the (t, y) graph")

    def _forward_with_condition(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not run the conditioning-vector graph")

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._split(self._forward, x, t, y)

    def with_condition(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self._split(self._forward_with_condition, x, c)

    def _split(self, fn, *inputs):
        n = inputs[0].shape[0]
        if self.max_batch is None or n <= self.max_batch:
            return fn(*inputs)
        chunks = [fn(*(a[i:i + self.max_batch] for a in inputs)) for i in range(0, n, self.max_batch)]
        return torch.cat(chunks)

    def close(self) -> None:
        """Releases runtime resources (sessions, engines, graphs)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def describe(self) -> str:
        return f"{self.name} ({self.precision}, {self.device})"
