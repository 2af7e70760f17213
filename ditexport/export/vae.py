"""The VAE decoder of latent DiTs as ONNX (fp32 and fp16, dynamic batch), exported through the DiT's path.

The graph takes the latents exactly as the DiT sampler returns them and gives images in about [-1, 1]: the
1/0.18215 latent scale is inside it, as in `backends.decoders.VaeDecoder`. The fp16 graph runs convolutions,
attention and upsampling in fp16 and keeps every GroupNorm in fp32 (statistics over a whole feature map overflow
fp16), with fp32 inputs and outputs, the same policy as the DiT's fp16 graph.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backends.decoders import VAE_SCALE
from .save import clean_up, save_onnx
from .spec import DEFAULT_OPSET, ExportError
from .trace import trace_to_onnx

INPUT_NAME = "latents"
OUTPUT_NAME = "images"
VAE_PRECISIONS = ("fp32", "fp16")  # 8-bit is for the DiT's GEMMs; the decoder's convolutions stay fp16 at most


class _Fp32GroupNorm(nn.Module):
    """A GroupNorm that computes in fp32 whatever its input's dtype, returning that dtype."""

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        self.num_groups, self.eps = norm.num_groups, norm.eps
        self.weight = nn.Parameter(norm.weight.detach().float().clone(), requires_grad=False) \
            if norm.weight is not None else None
        self.bias = nn.Parameter(norm.bias.detach().float().clone(), requires_grad=False) \
            if norm.bias is not None else None

    def forward(self, x):
        return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)


def _wrap_group_norms(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.GroupNorm):
            setattr(module, name, _Fp32GroupNorm(child))
        else:
            _wrap_group_norms(child)


def fp16_with_fp32_norms(vae):
    """A copy of the VAE in fp16 whose GroupNorms keep their exact fp32 weights and compute in fp32."""
    vae = copy.deepcopy(vae)
    _wrap_group_norms(vae)
    for module in vae.modules():
        if isinstance(module, _Fp32GroupNorm):
            continue
        for tensors in (module._parameters, module._buffers):
            for key, value in tensors.items():
                if value is not None and value.is_floating_point():
                    value.data = value.data.half()
    return vae


class VaeDecodeGraph(nn.Module):
    """latents (B, C, h, w) as the DiT samples them -> images (B, 3, s*h, s*w); float32 in and out."""

    def __init__(self, vae, precision: str = "fp32"):
        super().__init__()
        if precision not in VAE_PRECISIONS:
            raise ExportError(f"unknown VAE precision {precision!r}; choose from {', '.join(VAE_PRECISIONS)}")
        self.compute_dtype = torch.float16 if precision == "fp16" else torch.float32
        if precision == "fp16":
            vae = fp16_with_fp32_norms(vae)
        self.vae = vae.eval()
        self.precision = precision

    def forward(self, latents):
        z = (latents / VAE_SCALE).to(self.compute_dtype)
        return self.vae.decode(z, return_dict=False)[0].float()


def sample_latents(vae, batch: int, latent_size: int, seed: int = 0) -> torch.Tensor:
    """Unit-variance latents: the scale the DiT samples in (before the 1/0.18215 inside the graph)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vae.config.latent_channels, latent_size, latent_size, generator=gen)


def export_vae_graph(vae, path: str | Path, *, precision: str = "fp32", latent_size: int = 32, batch: int = 2,
                     opset: int = DEFAULT_OPSET) -> Path:
    """Exports the decoder (dynamic batch, fixed latent size) to `path` through the DiT's path (trace, clean-up,
    atomic save with shape inference and the checker); returns the path."""
    module = VaeDecodeGraph(vae, precision)
    proto = trace_to_onnx(module, {INPUT_NAME: sample_latents(vae, batch, latent_size)}, [OUTPUT_NAME], opset,
                          what="the VAE decoder", workdir=Path(path).parent)
    proto = clean_up(proto)
    for key, value in (("ditexport.graph", "vae-decoder"), ("ditexport.precision", precision),
                       ("ditexport.vae_scale", str(VAE_SCALE)), ("ditexport.latent_size", str(latent_size))):
        proto.metadata_props.add(key=key, value=value)
    return save_onnx(proto, path)
