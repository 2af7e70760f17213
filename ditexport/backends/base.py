"""The backend interface shared by every runtime."""
from __future__ import annotations

import contextlib

import torch

from ..errors import DitexportError
from ..model import DiTConfig


def resolve_device(name: str) -> torch.device:
    """A `--device` value (cpu, cuda, cuda:N or auto) as a torch device; cuda without a GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DitexportError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


def device_scope(device: torch.device):
    """Makes `device` torch's current CUDA device (for calls that act on the current one); nothing on the CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    """Waits for queued GPU work, so that a host timer measures it; nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
        """The model output (B, C_out, H, W) for noisy inputs x (B, C, H, W), timesteps t (B,) and labels y (B,)."""
        return self._split(self._forward, x, t, y)

    def with_condition(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The model output for x driven by conditioning vectors c (B, hidden) instead of (t, y): the embedding
        sum t_embedder(t) + y_embedder(y) that every adaLN-Zero modulation reads, so blended or custom conditions
        can be fed (the export's cond graph)."""
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
        """One line for banners: the runtime, its precision and where it runs."""
        return f"{self.name} ({self.precision}, {self.device})"
