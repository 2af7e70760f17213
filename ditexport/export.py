"""Torch -> ONNX for the DiT: the export declared as data, fp32 and fp16 graphs, clean-up and external data.

Two graphs per model: `xty` takes (x, t, y) like `DiT.forward`; `cond` takes (x, c), the conditioning vector
that drives every adaLN-Zero modulation (`DiT.forward_with_condition`), so callers can feed blended or custom
conditions. Both keep t, y and c as runtime inputs with a dynamic batch axis; guidance stays in the sampler.

Precision lives in the graph, because TensorRT 11 builds strongly typed networks only. The fp16 graph is
derived from the fp32 graph by `apply_fp16_policy`: attention and the MLP (their matmuls, softmax and GELU)
and the final projection run in fp16; the patch embedding, the residual stream, layer norms, adaLN modulation
and gates, the timestep/label embedders and the unpatchify stay fp32 (NVIDIA's fix for fp16 overflow in
DiT-family models). Inputs and outputs stay fp32 in every graph, so one backend contract serves both, and
tensor names inside the fp16 regions are those of the fp32 graph, so the two compare tensor by tensor.
"""
from __future__ import annotations

import json
import logging
import re
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .artifacts import onnx_filename, publish, scratch_dir
from .errors import DitexportError, UsageError
from .model import DiT, DiTConfig

GRAPHS = ("xty", "cond")
PRECISIONS = ("fp32", "fp16")
# "fp16-all" (every op in fp16, I/O fp32) exists only to show what the precision policy prevents.
DIAGNOSTIC_PRECISIONS = ("fp16-all",)

# Opset 18 with attention written as MatMul-Softmax-MatMul, chosen by measurement (docs/export.md): on ONNX
# Runtime CPU the opset-23 `Attention` op is only 5 % faster, while TensorRT's parser reads that op from
# 10.14 on only and fuses this pattern into its MHA kernels on every TensorRT 10/11.
DEFAULT_OPSET = 18
ONNX_ATTENTION_OPSET = 23  # from this opset on, SDPA is exported as the ONNX `Attention` op instead

# A protobuf message cannot exceed 2 GiB, so bigger graphs keep their weights in a side file.
EXTERNAL_DATA_THRESHOLD = 2_000_000_000

TOLERANCE = {"fp32": 1e-5, "fp16": 5e-3}  # relative error ||a - b|| / ||b|| against torch fp32
DEFAULT_MAX_BATCH_IMAGES = 8             # images per request an engine profile is built for


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


#################################################################################
#                       Export-time module substitutions                        #
#################################################################################

def attention_mode(opset: int) -> str:
    return "onnx-attention-op" if opset >= ONNX_ATTENTION_OPSET else "matmul-softmax-matmul"


class _MatMulAttention(nn.Module):
    """The DiT attention as MatMul-Softmax-MatMul, with the 1/sqrt(d) scale split over Q and K.

    Scaling Q and K by d**-0.25 before their product is the pattern TensorRT fuses into its MHA kernels, and
    keeps Q K^T inside the fp16 range. Shares the parameters of the module it stands in for.
    """

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.qkv, self.proj = attn.qkv, attn.proj
        self.num_heads, self.head_dim = attn.num_heads, attn.head_dim

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                 # (B, heads, N, head_dim)
        s = self.head_dim ** -0.25
        weights = torch.softmax((q * s) @ (k * s).transpose(-2, -1), dim=-1)  # (B, heads, N, N)
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
    """The fp32 ONNX ModelProto of one graph, from the dynamo exporter (traced through a file in `workdir`)."""
    if batch < 2:
        # torch.export specialises sizes 0 and 1, which would fix the batch axis.
        raise ExportError(f"export with a batch of at least 2 so the batch axis stays dynamic, got {batch}")
    spec = graph_spec(model.config, graph)
    sample = spec.sample_inputs(batch)
    batch_dim = torch.export.Dim("batch", min=1, max=65536)
    dynamic_shapes = {name: {0: batch_dim} for name in spec.input_names}
    module = model if graph == "xty" else _ConditionGraph(model)
    was_training = model.training
    model.eval()
    # The exporter logs a warning per torchvision op it cannot register; none of them is used here.
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration_log.level
    registration_log.setLevel(logging.ERROR)
    try:
        with _export_attention(model, opset), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, tuple(sample.values()), dynamo=True, opset_version=opset,
                                        input_names=spec.input_names, output_names=spec.output_names,
                                        dynamic_shapes=dynamic_shapes, optimize=True, verbose=False)
    except Exception as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ExportError(f"torch.onnx.export failed for the {graph!r} graph: {first_line}") from e
    finally:
        model.train(was_training)
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


#################################################################################
#                              The fp16 policy                                  #
#################################################################################

FP16_POLICY_TEXT = ("fp16: attention (qkv, Q K^T, softmax, V, proj), MLP (fc1, GELU, fc2) and the final linear; "
                    "fp32: patch embedding, residual stream, layer norms, adaLN modulation, gates, t/y embedders, "
                    "unpatchify")

# Module scopes whose ops run in fp16 (the dynamo exporter records each node's module path).
_FP16_SCOPES = re.compile(r"(^|\.)(blocks\.\d+\.(attn|mlp)|final_layer\.linear)$")


SCOPES_KEY = "pkg.torch.onnx.name_scopes"  # the module path of each node, recorded by the dynamo exporter


def _node_scopes(node) -> list[str]:
    for prop in node.metadata_props:
        if prop.key == SCOPES_KEY:
            try:
                return list(json.loads(prop.value.replace("'", '"')))
            except ValueError:
                return []
    return []


def in_fp16_region(node) -> bool:
    """Whether the precision policy runs this node in fp16 (it lies inside attention, an MLP, or the final linear)."""
    return any(_FP16_SCOPES.search(scope) for scope in _node_scopes(node))


def tensor_types(proto) -> dict[str, int]:
    """Element type of every tensor, by shape inference on a weight-free skeleton (cheap for any size)."""
    import onnx
    from onnx import helper

    g = proto.graph
    inits = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in g.initializer]
    skeleton = helper.make_model(helper.make_graph(list(g.node), "skeleton", list(g.input) + inits, list(g.output)),
                                 opset_imports=list(proto.opset_import), ir_version=proto.ir_version)
    inferred = onnx.shape_inference.infer_shapes(skeleton)
    types = {}
    for vi in (*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info, *g.value_info):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for t in g.initializer:
        types[t.name] = t.data_type
    return types


def apply_fp16_policy(proto, in_fp16=in_fp16_region):
    """Runs the nodes selected by `in_fp16` in fp16, in place: their float weights become fp16 and a Cast is
    inserted wherever a float tensor crosses between the fp32 and fp16 parts. Graph inputs and outputs stay fp32.

    `in_fp16=lambda node: True` gives the all-fp16 graph used to show the overflow the policy avoids.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
    g = proto.graph
    types = tensor_types(proto)
    # Protobuf hands out a new wrapper per element access, so nodes are held in one list and known by index.
    nodes = list(g.node)
    half = [bool(in_fp16(n)) for n in nodes]
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    initializers = {t.name: t for t in g.initializer}
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for name in n.input:
            consumers.setdefault(name, []).append(i)
    graph_outputs = [o.name for o in g.output]

    def produced_in_half(name: str) -> bool:
        return name in producer and half[producer[name]]

    # 1. Weights used only inside fp16 regions become fp16; shared ones get an fp16 copy.
    new_initializers, renamed = [], {}
    for name, tensor in initializers.items():
        if tensor.data_type != FLOAT:
            continue
        users = consumers.get(name, [])
        half_users = [i for i in users if half[i]]
        if not half_users:
            continue
        array = numpy_helper.to_array(tensor).astype(np.float16)
        if len(half_users) == len(users):
            tensor.CopyFrom(numpy_helper.from_array(array, name))
        else:
            renamed[name] = f"{name}.fp16"
            new_initializers.append(numpy_helper.from_array(array, renamed[name]))
    g.initializer.extend(new_initializers)

    # 2. Casts at the borders; fp16 node outputs and constants retyped.
    casts_after: dict[str, list] = {}   # producer output -> casts to insert right after it
    to_half: dict[str, str] = {}        # fp32 tensor -> its fp16 cast
    to_float: dict[str, str] = {}       # fp16 tensor -> its fp32 cast

    def cast(source: str, target: str, to: int):
        node = helper.make_node("Cast", [source], [target], to=to, name=f"cast_{target}")
        casts_after.setdefault(source, []).append(node)

    for k, n in enumerate(nodes):
        if half[k]:
            for i, name in enumerate(n.input):
                if name in renamed:
                    n.input[i] = renamed[name]
                elif types.get(name) == FLOAT and name not in initializers and not produced_in_half(name):
                    if name not in to_half:
                        to_half[name] = f"{name}.fp16"
                        cast(name, to_half[name], HALF)
                    n.input[i] = to_half[name]
            for attr in n.attribute:
                if n.op_type == "Cast" and attr.name == "to" and attr.i == FLOAT:
                    attr.i = HALF
                elif attr.type == attr.TENSOR and attr.t.data_type == FLOAT:
                    attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float16),
                                                            attr.t.name))
        else:
            for i, name in enumerate(n.input):
                if produced_in_half(name) and types.get(name) == FLOAT:
                    if name not in to_float:
                        to_float[name] = f"{name}.fp32"
                        cast(name, to_float[name], FLOAT)
                    n.input[i] = to_float[name]

    # Graph outputs keep their names and fp32: an fp16 producer writes "<name>.fp16", a Cast writes the output.
    for out in graph_outputs:
        if produced_in_half(out) and types.get(out) == FLOAT:
            inner = f"{out}.fp16"
            p = nodes[producer[out]]
            p.output[list(p.output).index(out)] = inner
            for k in consumers.get(out, []):
                for i, name in enumerate(nodes[k].input):
                    if name == out and half[k]:
                        nodes[k].input[i] = inner
            casts_after.setdefault(inner, []).append(
                helper.make_node("Cast", [inner], [out], to=FLOAT, name=f"cast_{out}"))

    for vi in g.value_info:
        if produced_in_half(vi.name) and vi.type.tensor_type.elem_type == FLOAT:
            vi.type.tensor_type.elem_type = HALF

    # 3. Node order: casts of graph inputs first, every other cast right after the node that produces its source.
    ordered = [c for name in [i.name for i in g.input] for c in casts_after.get(name, [])]
    for n in nodes:
        ordered.append(n)
        for o in n.output:
            ordered.extend(casts_after.get(o, []))
    del g.node[:]
    g.node.extend(ordered)
    return proto


#################################################################################
#                                 Clean-up                                      #
#################################################################################

def _einsum_to_transpose(proto) -> int:
    """Rewrites single-input permutation Einsums (the unpatchify) as Transpose, which every runtime fuses."""
    from onnx import helper

    count = 0
    for i, n in enumerate(proto.graph.node):
        if n.op_type != "Einsum" or len(n.input) != 1:
            continue
        equation = next(a.s.decode() for a in n.attribute if a.name == "equation").replace(" ", "")
        lhs, _, rhs = equation.partition("->")
        if "." in equation or sorted(lhs) != sorted(rhs) or len(set(lhs)) != len(lhs):
            continue
        transpose = helper.make_node("Transpose", list(n.input), list(n.output), name=n.name or f"einsum_{i}",
                                     perm=[lhs.index(ch) for ch in rhs])
        transpose.metadata_props.extend(n.metadata_props)
        proto.graph.node[i].CopyFrom(transpose)
        count += 1
    return count


# Weights above this size stay in place during clean-up: graphsurgeon sees them as graph inputs, so it
# neither copies them (DiT-XL/2 holds 2.7 GB) nor folds anything computed from them (the exporter's own
# optimizer already has). Smaller constants (shapes, scales, biases) are folded as usual.
_WEIGHT_BYTES = 1 << 16


def clean_up(proto):
    """Permutation Einsum -> Transpose, then constant folding (incl. static shapes), dead-node removal and a
    topological sort by onnx-graphsurgeon; `proto` is updated in place and returned."""
    import onnx_graphsurgeon as gs
    from onnx import helper

    _einsum_to_transpose(proto)
    g = proto.graph
    weights = {t.name: t for t in g.initializer if t.ByteSize() > _WEIGHT_BYTES}
    skeleton = helper.make_model(
        helper.make_graph(list(g.node), g.name,
                          list(g.input) + [helper.make_tensor_value_info(n, t.data_type, list(t.dims))
                                           for n, t in weights.items()],
                          list(g.output), initializer=[t for t in g.initializer if t.name not in weights],
                          value_info=list(g.value_info)),
        opset_imports=list(proto.opset_import), ir_version=proto.ir_version)
    graph = gs.import_onnx(skeleton)
    graph.fold_constants(fold_shapes=True, error_ok=True).cleanup(remove_unused_graph_inputs=False).toposort()
    cleaned = gs.export_onnx(graph, do_type_check=True).graph
    del graph, skeleton

    # graphsurgeon drops node metadata; the module scopes in it drive the fp16 policy and tell a reader where a
    # node comes from. The exporter's stack traces and FX dumps are dropped: they would double a small file.
    scopes = {n.name: [p for p in n.metadata_props if p.key == SCOPES_KEY] for n in g.node if n.name}
    for node in cleaned.node:
        node.metadata_props.extend(scopes.get(node.name, []))
    used = {name for n in cleaned.node for name in n.input} | {o.name for o in cleaned.output}
    for i in reversed(range(len(g.initializer))):
        name = g.initializer[i].name
        if name not in weights or name not in used:
            del g.initializer[i]
    g.initializer.extend(cleaned.initializer)
    for field, values in (("node", cleaned.node), ("input", [i for i in cleaned.input if i.name not in weights]),
                          ("output", cleaned.output), ("value_info", cleaned.value_info)):
        del getattr(g, field)[:]
        getattr(g, field).extend(values)
    return proto


#################################################################################
#                                 Saving                                        #
#################################################################################

def initializer_bytes(proto) -> int:
    return sum(t.ByteSize() for t in proto.graph.initializer)


def save_onnx(proto, path: str | Path, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> Path:
    """Writes `path` (+ `path.data` above the threshold) atomically, then checks it with shape inference.

    Both files are written into a temporary directory beside `path` and renamed into place, the weights
    first, so a reader never sees a graph whose weights are not there yet.
    """
    import onnx

    path = Path(path)
    external = initializer_bytes(proto) > external_data_threshold
    data_name = f"{path.name}.data"
    with scratch_dir(path.parent, path.name) as tmp_dir:
        tmp = tmp_dir / path.name
        if external:
            onnx.save_model(proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        else:
            onnx.save_model(proto, str(tmp))
        # Strict shape inference rejects a graph whose types do not line up; the result keeps full shapes.
        onnx.shape_inference.infer_shapes_path(str(tmp), str(tmp), check_type=True, strict_mode=True)
        onnx.checker.check_model(str(tmp))
        if external:
            publish(tmp_dir / data_name, path.parent / data_name)
        else:
            (path.parent / data_name).unlink(missing_ok=True)
        publish(tmp, path)
    return path


#################################################################################
#                                 Public API                                    #
#################################################################################

def _check_options(precision: str, graph: str, opset: int) -> None:
    if precision not in PRECISIONS + DIAGNOSTIC_PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if graph not in GRAPHS:
        raise ExportError(f"unknown graph {graph!r}; choose one of {', '.join(GRAPHS)}")
    if not 18 <= opset <= 25:
        raise ExportError(f"opset {opset} is not supported; use 18 to 25 (default {DEFAULT_OPSET})")


def _finish(proto, config: DiTConfig, graph: str, precision: str, opset: int):
    """fp16 conversion where asked, clean-up, and the metadata that identifies the graph."""
    ir_version = proto.ir_version
    kept = [p for p in proto.metadata_props if not p.key.startswith("ditexport.")]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    if precision == "fp16":
        apply_fp16_policy(proto)
    elif precision == "fp16-all":
        apply_fp16_policy(proto, in_fp16=lambda node: True)
    proto = clean_up(proto)
    proto.ir_version = ir_version
    for key, value in (("ditexport.graph", graph), ("ditexport.precision", precision),
                       ("ditexport.config", json.dumps(config.to_dict())),
                       ("ditexport.attention", attention_mode(opset))):
        proto.metadata_props.add(key=key, value=value)
    return proto


def export_onnx(model: DiT, path: str | Path, *, precision: str = "fp32", graph: str = "xty",
                opset: int | None = None, batch: int = 2,
                external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> Path:
    """Exports one graph of `model` to `path` (written atomically) and returns the path.

    precision: "fp32" or "fp16" (the mixed policy above); graph: "xty" (x, t, y) or "cond" (x, c).
    `batch` is the size of the sample the exporter traces with; the batch axis stays dynamic.
    """
    opset = opset or DEFAULT_OPSET
    _check_options(precision, graph, opset)
    proto = _torch_to_onnx(model, graph, opset, batch, workdir=Path(path).parent)
    return save_onnx(_finish(proto, model.config, graph, precision, opset), path, external_data_threshold)


def export_graphs(model: DiT, out_dir: str | Path, *, precisions=PRECISIONS, graphs=GRAPHS,
                  opset: int | None = None, batch: int = 2,
                  external_data_threshold: int = EXTERNAL_DATA_THRESHOLD, log=print) -> dict[tuple[str, str], Path]:
    """Every (graph, precision) into `out_dir` under the layout's file names, tracing each graph once.

    The fp16 graph is derived from the saved fp32 graph rather than from a copy in memory, so at most one
    graph's weights are held at a time besides the model's (DiT-XL/2: 2.7 GB each).
    """
    import time

    import onnx

    from .progress import heartbeat

    opset = opset or DEFAULT_OPSET
    for precision in precisions:
        _check_options(precision, "xty", opset)
    out_dir = Path(out_dir)
    paths = {}
    with scratch_dir(out_dir, "fp32") as scratch:
        for graph in graphs:
            start = time.perf_counter()
            fp32_path = out_dir / onnx_filename(graph, "fp32") if "fp32" in precisions else \
                Path(scratch) / onnx_filename(graph, "fp32")
            with heartbeat(log, f"export: tracing the {graph} graph (torch.onnx.export, dynamo)", end_line=True):
                proto = _torch_to_onnx(model, graph, opset, batch, workdir=out_dir)
            with heartbeat(log, f"export: cleaning up and writing {fp32_path.name}"):
                save_onnx(_finish(proto, model.config, graph, "fp32", opset), fp32_path, external_data_threshold)
                del proto
                release_memory()
            for precision in precisions:
                if precision != "fp32":
                    path = out_dir / onnx_filename(graph, precision)
                    with heartbeat(log, f"export: deriving {path.name} from {fp32_path.name} ({precision} policy)"):
                        proto = onnx.load(str(fp32_path))
                        save_onnx(_finish(proto, model.config, graph, precision, opset), path,
                                  external_data_threshold)
                        del proto
                        release_memory()
                else:
                    path = fp32_path
                paths[(graph, precision)] = path
                log(f"export: {path.name:<18} {precision:<5} opset {opset}  "
                    f"{_size_text(path)}  ({time.perf_counter() - start:.1f} s)")
                start = time.perf_counter()
    return paths


def _size_text(path: Path) -> str:
    size = path.stat().st_size
    data = path.parent / f"{path.name}.data"
    if data.is_file():
        size += data.stat().st_size
    return f"{size / 1e6:8.1f} MB" + (" (external data)" if data.is_file() else "")
