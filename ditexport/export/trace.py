"""torch -> ONNX: the dynamo exporter with attention as MatMul-Softmax-MatMul, one graph at a time."""
from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from ..artifacts import scratch_dir
from ..model import DiT
from .spec import ExportError, attention_mode, graph_spec


#################################################################################
#                       Export-time module substitutions                        #
#################################################################################

class _MatMulAttention(nn.Module):
    """The DiT attention as MatMul-Softmax-MatMul, with the 1/sqrt(d) scale split over Q and K.

    Scaling Q and K by d**-0.25 before their product is the pattern TensorRT fuses into its MHA kernels, and
    keeps Q K^T inside the fp16 range. Shares the parameters of the module it stands in for.
    """

    def __init__(self, attn: nn.Module, observe=None):
        super().__init__()
        self.qkv, self.proj = attn.qkv, attn.proj
        self.num_heads, self.head_dim = attn.num_heads, attn.head_dim
        self.observe = observe  # calibration: called with ("q" | "k" | "softmax" | "v", tensor) of both matmuls

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                 # (B, heads, N, head_dim)
        s = self.head_dim ** -0.25
        q, k = q * s, k * s
        weights = torch.softmax(q @ k.transpose(-2, -1), dim=-1)  # (B, heads, N, N)
        if self.observe is not None:
            for role, tensor in (("q", q), ("k", k), ("softmax", weights), ("v", v)):
                self.observe(role, tensor)
        x = (weights @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class _ConditionGraph(nn.Module):
    """The DiT with the conditioning vector as input: (x, c) -> out."""

    def __init__(self, model: DiT):
        super().__init__()
        self.model = model

    def forward(self, x, c):
        return self.model.forward_with_condition(x, c)


@contextmanager
def _export_attention(model: DiT, opset: int):
    """Swaps in the MatMul attention below the `Attention`-op opset; restores the model afterwards."""
    if attention_mode(opset) != "matmul-softmax-matmul":
        yield
        return
    originals = [block.attn for block in model.blocks]
    try:
        for block in model.blocks:
            block.attn = _MatMulAttention(block.attn)
        yield
    finally:
        for block, attn in zip(model.blocks, originals):
            block.attn = attn


def _torch_to_onnx(model: DiT, graph: str, opset: int, batch: int, workdir: str | Path | None = None):
    """The fp32 ONNX ModelProto of one DiT graph (see `trace_to_onnx`)."""
    spec = graph_spec(model.config, graph)
    module = model if graph == "xty" else _ConditionGraph(model)
    with _export_attention(model, opset):
        return trace_to_onnx(module, spec.sample_inputs(batch), spec.output_names, opset, what=f"the {graph!r} graph",
                             workdir=workdir)


def trace_to_onnx(module: nn.Module, sample: dict[str, torch.Tensor], output_names: list[str], opset: int,
                  what: str, workdir: str | Path | None = None):
    """The ONNX ModelProto of `module` from the dynamo exporter, every input's axis 0 a dynamic batch, traced through
    a file in `workdir`. `sample` holds the named inputs, in the forward's order, with a batch of at least 2."""
    batch = next(iter(sample.values())).shape[0]
    if batch < 2:
        # torch.export specialises sizes 0 and 1, which would fix the batch axis.
        raise ExportError(f"export with a batch of at least 2 so the batch axis stays dynamic, got {batch}")
    batch_dim = torch.export.Dim("batch", min=1, max=65536)
    dynamic_shapes = {name: {0: batch_dim} for name in sample}
    modes = [(m, m.training) for m in module.modules()]  # each restored as it was (a wrapper is born training)
    module.eval()
    # The exporter logs a warning per torchvision op it cannot register; none of them is used here.
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration_log.level
    registration_log.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, tuple(sample.values()), dynamo=True, opset_version=opset,
                                        input_names=list(sample), output_names=output_names,
                                        dynamic_shapes=dynamic_shapes, optimize=True, verbose=False)
    except Exception as e:  # torch.export reports unsupported code as several exception types
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ExportError(f"torch.onnx.export failed for {what}: {first_line}") from e
    finally:
        for m, training in modes:
            m.training = training
        registration_log.setLevel(level)
    # Through a file rather than `program.model_proto`: the exporter's own copy of the weights is freed before
    # the ModelProto is built, so the two never sit in memory together (DiT-XL/2: 2.7 GB each).
    import onnx

    with scratch_dir(workdir, "trace") as tmp:
        path = Path(tmp) / "traced.onnx"
        program.save(str(path), external_data=True)
        del program
        release_memory()
        return onnx.load(str(path))


def release_memory() -> None:
    """Hands freed heap back to the OS, so the peak of one export stage does not stay resident for the next."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the memory is reused by the process instead
