"""The fp16 emulation that validation runs on the CPU, beside the fp16 policy it checks."""
from __future__ import annotations

from pathlib import Path

from .precision import tensor_types
from .save import save_onnx
from .trace import release_memory


#################################################################################
#                        fp16 arithmetic on the CPU                             #
#################################################################################

# ONNX Runtime's CPU provider has few fp16 kernels on x86: it runs the rest of an fp16 graph in fp32,
# casting only where fp16 and fp32 kernels meet, so an fp16 graph on the CPU neither rounds nor overflows
# like fp16 hardware (measured: an all-fp16 graph whose residual stream reaches 2e5 stays finite). To
# validate what a GPU computes, the CPU runs an fp32 twin of the fp16 graph in which every fp16 tensor is
# rounded to fp16 (an explicit Cast to fp16 and back, which ORT keeps): ops compute in fp32 from fp16
# inputs and store fp16 results, like fp16 kernels with fp32 accumulation, overflow to inf included.

def emulate_fp16(proto):
    """The fp32 twin of an fp16 graph described above, in place; tensor names are kept."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
    g = proto.graph
    types = tensor_types(proto)
    for t in g.initializer:
        if t.data_type == HALF:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    nodes = []
    for n in list(g.node):
        for attr in n.attribute:
            if n.op_type == "Cast" and attr.name == "to" and attr.i == HALF:
                attr.i = FLOAT  # computes in fp32; the rounding pair below makes it fp16-valued
            elif attr.type == attr.TENSOR and attr.t.data_type == HALF:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float32),
                                                        attr.t.name))
        rounding = []
        for i, name in enumerate(n.output):
            if types.get(name) == HALF:
                n.output[i] = f"{name}.exact"
                rounding += [helper.make_node("Cast", [f"{name}.exact"], [f"{name}.half"], to=HALF),
                             helper.make_node("Cast", [f"{name}.half"], [name], to=FLOAT)]
        nodes += [n, *rounding]
    del g.node[:]
    g.node.extend(nodes)
    for vi in g.value_info:
        if vi.type.tensor_type.elem_type == HALF:
            vi.type.tensor_type.elem_type = FLOAT
    proto.metadata_props.add(key="ditexport.emulated", value="fp16 tensors rounded on fp32 compute")
    return proto


def emulated_copy(onnx_path: str | Path, workdir: str | Path) -> Path:
    """Writes the emulated twin of an fp16 ONNX file into `workdir` and returns its path."""
    import onnx

    proto = onnx.load(str(onnx_path))
    path = save_onnx(emulate_fp16(proto), Path(workdir) / f"emulated.{Path(onnx_path).name}")
    del proto
    release_memory()
    return path
