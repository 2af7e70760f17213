"""Class blending: sample from a mix of two classes' conditioning vectors.

DiT conditions every adaLN-Zero modulation on one vector c = t_emb(t) + y_emb(y). Mixing the vectors
of two classes, c = (1 - w) c(t, a) + w c(t, b), and running the conditioning-vector graph
(`backend.with_condition`) on it gives images between the two classes. The blend is a Backend that
wraps another one, so the Sampler and the Pipeline drive it unchanged.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from .errors import UsageError
from .backends.base import Backend
from .model import DiT, DiTConfig, LabelEmbedder, TimestepEmbedder

EMBEDDER_KEYS = ("t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight",
                 "t_embedder.mlp.2.bias", "y_embedder.embedding_table.weight")


class ConditionEmbedders(nn.Module):
    """DiT's timestep and label embedders alone: all that blending computes outside the graph."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.t_embedder = TimestepEmbedder(cfg.hidden_size)
        self.y_embedder = LabelEmbedder(cfg.num_classes, cfg.hidden_size, cfg.class_dropout_prob)

    def embed_condition(self, t, y):
        return self.t_embedder(t) + self.y_embedder(y, False)


def embedders_from_onnx(onnx_path: str | Path, cfg: DiTConfig) -> ConditionEmbedders | None:
    """The embedders read from an exported graph's initializers, which keep their state-dict names.

    Lets an export blend without its checkpoint. Reads only these five tensors (external data included);
    None when the graph does not carry them under those names.
    """
    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    onnx_path = Path(onnx_path)
    proto = onnx.load(str(onnx_path), load_external_data=False)
    tensors = {}
    for init in proto.graph.initializer:
        if init.name in EMBEDDER_KEYS:
            if uses_external_data(init):
                load_external_data_for_tensor(init, str(onnx_path.parent))
            tensors[init.name] = torch.from_numpy(numpy_helper.to_array(init).copy()).float()
    embedders = ConditionEmbedders(cfg)
    own = embedders.state_dict()
    if set(tensors) != set(EMBEDDER_KEYS) or any(tensors[k].shape != own[k].shape for k in EMBEDDER_KEYS):
        return None
    embedders.load_state_dict(tensors)
    return embedders.eval()


class TorchConditionEmbedder:
    """c(t, y) from torch embedders (a DiT or ConditionEmbedders): two small MLP rows and a table lookup."""

    def __init__(self, model: DiT | ConditionEmbedders):
        self.model = model.eval()
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def __call__(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c = self.model.embed_condition(t.to(self.device), y.to(self.device))
        return c.float()


class BlendedConditionBackend(Backend):
    """`backend(x, t, y)` that feeds `lerp(c(t, y), c(t, second_class), weight)` to `inner.with_condition`.

    Rows whose label is the null class (the unconditional half of a guided batch) keep c(t, null), so
    classifier-free guidance pushes towards the blend. torch.lerp is exact at both ends: weight 0 gives
    c(t, y) and weight 1 c(t, second_class), bit for bit.
    """

    def __init__(self, inner: Backend, embedder, second_class: int, weight: float):
        if not 0.0 <= weight <= 1.0:
            raise UsageError(f"the blend weight must be between 0 and 1, got {weight}")
        num_classes = inner.config.num_classes
        if not 0 <= second_class < num_classes:
            raise UsageError(f"the class to blend with must be in 0..{num_classes - 1}, got {second_class}")
        super().__init__(inner.config, inner.device, inner.dtype, max_batch=None)  # inner splits batches
        self.inner = inner
        self.embedder = embedder
        self.second_class = second_class
        self.weight = weight
        self.name = inner.name
        self.precision = inner.precision
        self.null_class = inner.config.num_classes

    def _forward(self, x, t, y):
        y_second = torch.where(y == self.null_class, y, torch.full_like(y, self.second_class))
        c_first = self.embedder(t, y)
        c_second = self.embedder(t, y_second)
        c = torch.lerp(c_first, c_second, self.weight)
        return self.inner.with_condition(x, c.to(self.inner.device))

    def close(self) -> None:
        """The inner backend is owned by whoever made it."""
