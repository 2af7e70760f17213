"""The torch backend: the reference model, eager, in fp32 or (on CUDA) fp16."""
from __future__ import annotations

import torch

from ..model import DiT
from .base import Backend


class TorchBackend(Backend):
    """Runs the reference DiT in PyTorch; fp16 is offered on CUDA only (CPU fp16 is slow and inexact)."""

    name = "torch"

    def __init__(self, model: DiT, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 max_batch: int | None = None):
        device = torch.device(device)
        if dtype == torch.float16 and device.type != "cuda":
            raise ValueError("fp16 on the torch backend needs a CUDA device; use fp32 on the CPU")
        super().__init__(model.config, device, dtype, max_batch)
        self.precision = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
        self.model = model.to(device=device, dtype=dtype).eval()

    @torch.no_grad()
    def _forward(self, x, t, y):
        return self.model(x.to(self.dtype), t, y).float()

    @torch.no_grad()
    def _forward_with_condition(self, x, c):
        return self.model.forward_with_condition(x.to(self.dtype), c.to(self.dtype)).float()
