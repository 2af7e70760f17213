"""The export declared as data: graphs, precisions, opsets, tolerances, tensor specs and batch profiles."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..engine.profile import DEFAULT_MAX_BATCH_IMAGES, BatchProfile
from ..errors import DitexportError
from ..model import DiTConfig
from ..precisions import DEFAULT_PRECISIONS, PRECISIONS, QUANT_PRECISIONS  # re-exported by ditexport.export
from ..settings import BuildSettings
from .precision import FP16_POLICY_TEXT


GRAPHS = ("xty", "cond")
# "fp16-all" (every op in fp16, I/O fp32) exists only to show what the precision policy prevents.
DIAGNOSTIC_PRECISIONS = ("fp16-all",)

DEFAULT_OPSET = BuildSettings.opset  # why 18: see BuildSettings
ONNX_ATTENTION_OPSET = 23  # from this opset on, SDPA is exported as the ONNX `Attention` op instead

# A protobuf message cannot exceed 2 GiB, so bigger graphs keep their weights in a side file.
EXTERNAL_DATA_THRESHOLD = 2_000_000_000

# Relative error ||a - b|| / ||b|| against torch fp32. The 8-bit bounds sit about 3x above the worst error
# measured (the trained digits model and DiT-S/2 ... XL/2 with random weights; docs/quantization.md), and a
# misplaced scale or axis lands far above them.
TOLERANCE = {"fp32": 1e-5, "fp16": 5e-3, "int8": 3e-2, "fp8": 5e-2}


class ExportError(DitexportError):
    """A model or option that cannot be exported."""


#################################################################################
#                         The export, declared as data                          #
#################################################################################

@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: dims are ints, or "batch" for the dynamic axis."""
    name: str
    dtype: str
    shape: tuple

    def concrete_shape(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == "batch" else d for d in self.shape)


@dataclass(frozen=True)
class GraphSpec:
    """What one ONNX graph takes and gives (optimum-style): names, dynamic axes, sample inputs, tolerance."""
    graph: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    config: DiTConfig
    tolerance: dict = field(default_factory=lambda: dict(TOLERANCE))

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]

    def sample_inputs(self, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """Random non-zero inputs: noise-like x, timesteps over the whole schedule, labels incl. the null class."""
        gen = torch.Generator().manual_seed(seed)
        cfg = self.config
        feed = {}
        for spec in self.inputs:
            shape = spec.concrete_shape(batch)
            if spec.name == "t":
                feed["t"] = torch.randint(0, 1000, shape, generator=gen, dtype=torch.int64)
            elif spec.name == "y":
                feed["y"] = torch.randint(0, cfg.num_classes + int(cfg.has_null_class), shape, generator=gen,
                                          dtype=torch.int64)
            else:
                feed[spec.name] = torch.randn(shape, generator=gen)
        return feed

    def to_dict(self) -> dict:
        def tensor(s: TensorSpec) -> dict:
            return {"name": s.name, "dtype": s.dtype, "shape": list(s.shape)}

        return {"graph": self.graph, "inputs": [tensor(s) for s in self.inputs],
                "outputs": [tensor(s) for s in self.outputs],
                "dynamic_axes": {s.name: {"0": "batch"} for s in (*self.inputs, *self.outputs)},
                "tolerance": self.tolerance}


def graph_spec(config: DiTConfig, graph: str = "xty") -> GraphSpec:
    """The I/O of a graph. t and y are int64, as the sampler passes them (no cast at the graph boundary)."""
    if graph not in GRAPHS:
        raise ExportError(f"unknown graph {graph!r}; choose one of {', '.join(GRAPHS)}")
    side, c_in, c_out = config.input_size, config.in_channels, config.out_channels
    x = TensorSpec("x", "float32", ("batch", c_in, side, side))
    out = TensorSpec("out", "float32", ("batch", c_out, side, side))
    if graph == "xty":
        inputs = (x, TensorSpec("t", "int64", ("batch",)), TensorSpec("y", "int64", ("batch",)))
    else:
        inputs = (x, TensorSpec("c", "float32", ("batch", config.hidden_size)))
    return GraphSpec(graph, inputs, (out,), config)


def attention_mode(opset: int) -> str:
    """How the graph writes attention at this opset."""
    return "onnx-attention-op" if opset >= ONNX_ATTENTION_OPSET else "matmul-softmax-matmul"


def io_spec(config: DiTConfig, max_images: int = DEFAULT_MAX_BATCH_IMAGES, opset: int = DEFAULT_OPSET) -> dict:
    """Everything a consumer needs to drive the graphs, as recorded in the manifest."""
    profile = BatchProfile.for_images(max_images, guided=config.has_null_class)
    return {
        "graphs": {g: graph_spec(config, g).to_dict() for g in GRAPHS},
        "image_side": config.input_size,  # fixed by pos_embed
        "precision_io": "float32 inputs and outputs in every graph; t and y int64",
        "fp16_policy": FP16_POLICY_TEXT,
        "batch_profile": asdict(profile),
        "max_images": max_images,
        "opset": opset,
        "attention": attention_mode(opset),
    }
