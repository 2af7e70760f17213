"""The fp16 policy: which ops of the fp32 graph run in fp16, as a rewrite of the ONNX graph."""
from __future__ import annotations

import json
import re




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
