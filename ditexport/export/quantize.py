"""8-bit graphs: the quantization recipe and the Q/DQ rewrite of an exported graph (TensorRT explicit quantization).

Every quantized GEMM gets a QuantizeLinear -> DequantizeLinear pair on its activation input (one scale for the
tensor, from calibration) and its weight stored quantized (int8 or FP8 E4M3, one scale per output channel,
symmetric) behind a DequantizeLinear: TensorRT fuses DQ -> GEMM into an 8-bit kernel and keeps the weights in
8 bits. Outputs are not quantized (the bias Add, GELU, gates and the residual stream stay in the precision of
`model.fp16.onnx`). Which GEMMs are quantized is the recipe; what stays high precision by default, and why, is
in docs/quantization.md.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

from ..precisions import QUANT_PRECISIONS, QUANTIZABLE, QuantizationError, QuantRecipe

QUANT_MAX = {"int8": 127.0, "fp8": 448.0}      # symmetric int8 [-127, 127]; FP8 E4M3's largest finite value
QUANT_OPSET = 19                                # QuantizeLinear with fp16 scales and FP8 types
# "tensorrt": Q/DQ inside the fp16 policy's graph, what TensorRT builds; "cpu": int8 Q/DQ in the fp32 graph,
# what ONNX Runtime's CPU int8 kernels run fastest (the same quantized values; docs/quantization.md).
QUANT_FORMS = ("tensorrt", "cpu")

def quantized_layer(node, recipe: QuantRecipe) -> str | None:
    """The module path of the GEMM `node` computes when the recipe quantizes it (None otherwise).

    Scopes are the dynamo exporter's module paths; the conditioning-vector graph prefixes them with "model.".
    """
    from .precision import _node_scopes

    if node.op_type not in ("MatMul", "Gemm", "Conv"):
        return None
    for name in recipe.layers:
        pattern = re.compile(rf"(?:^|\.)({QUANTIZABLE[name]})$")
        for scope in reversed(_node_scopes(node)):
            match = pattern.search(scope)
            if match:
                return match.group(1)
    return None


#################################################################################
#                             Scales and weights                                #
#################################################################################

def quant_scale(amax: float, precision: str) -> float:
    """amax / qmax rounded up to an fp16 value: the fp16 regions store scales in fp16, so the value a graph stores
    is exactly the one its weights were quantized with (in both forms), and amax still maps inside the range."""
    import numpy as np

    scale = float(amax) / QUANT_MAX[precision] if amax > 0 else 1.0
    rounded = np.float16(scale)
    if float(rounded) < scale:
        rounded = np.nextafter(rounded, np.float16(np.inf))
    return float(max(rounded, np.float16(2.0 ** -24)))  # the smallest fp16 subnormal, never zero


def quantize_array(values, scale, precision: str):
    """values / scale in the 8-bit type: int8 rounded half to even and clipped to [-127, 127]; FP8 E4M3
    rounded to nearest even and saturated at +-448, as QuantizeLinear does."""
    import ml_dtypes
    import numpy as np

    scaled = np.asarray(values, np.float64) / np.asarray(scale, np.float64)
    if precision == "int8":
        return np.clip(np.rint(scaled), -127, 127).astype(np.int8)
    return np.clip(scaled, -448.0, 448.0).astype(np.float32).astype(ml_dtypes.float8_e4m3fn)


def smoothing_factors(channel_amax, weight_amax, alpha: float):
    """SmoothQuant's per-input-channel divisors s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), rounded to fp16 values
    (the graph stores 1/s in fp16 regions; weights are scaled by exactly what it stores)."""
    import numpy as np

    x = np.maximum(np.asarray(channel_amax, np.float64), 1e-5)
    w = np.maximum(np.asarray(weight_amax, np.float64), 1e-5)
    s = np.clip(x ** alpha / w ** (1.0 - alpha), 1e-4, 1e4)
    return (1.0 / (1.0 / s).astype(np.float16).astype(np.float64))


def smoothed_amax(channel_amax, smoothing) -> float:
    """The per-tensor range of a smoothed input: max_j max|X_j| / s_j."""
    return float(max(c / s for c, s in zip(channel_amax, smoothing)))


def _zero_point(name: str, precision: str, unsigned: bool = False):
    """The zero point that makes QuantizeLinear produce the 8-bit type: 0 (symmetric), or 128 for uint8, whose
    grid is int8's shifted by 128 (the same values, clipped at the same ends)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    if precision == "int8":
        return numpy_helper.from_array(np.array(128, np.uint8) if unsigned else np.array(0, np.int8), name)
    return helper.make_tensor(name, TensorProto.FLOAT8E4M3FN, [], [0.0])


def _weight_tensor(name: str, q, precision: str):
    from onnx import TensorProto, helper, numpy_helper

    if precision == "int8":
        return numpy_helper.from_array(q, name)
    return helper.make_tensor(name, TensorProto.FLOAT8E4M3FN, list(q.shape), q.view("uint8").tobytes(), raw=True)


#################################################################################
#                               The Q/DQ rewrite                                #
#################################################################################

@dataclass
class QuantizedGraph:
    """What `insert_qdq` did: the quantized GEMMs, their scales (for the manifest's hash) and what it skipped."""
    layers: list[str] = field(default_factory=list)
    activation_scales: dict[str, float] = field(default_factory=dict)
    weight_scale_digest: str = ""

    def scales_sha256(self) -> str:
        text = json.dumps({"activations": self.activation_scales, "weights": self.weight_scale_digest},
                          sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


def insert_qdq(proto, precision: str, amax: dict[str, float], recipe: QuantRecipe, *, form: str = "tensorrt",
               channel_amax: dict[str, list[float]] | None = None):
    """Quantizes, in place, every GEMM of `proto` (an fp32 graph of the exporter) that the recipe selects.

    `amax` maps each quantized input (a module path, or "<attn path>.q/.k/.softmax/.v" for attention) to its
    calibrated largest |x|. Q/DQ nodes carry the scopes of their GEMM, so the fp16 policy (applied next for the
    "tensorrt" form) puts them in the GEMM's precision region. The "cpu" form (int8 only) quantizes activations
    to uint8 with zero point 128 — the same grid — which ONNX Runtime's CPU kernels fuse fastest. With the recipe's
    `smoothquant_alpha`, int8 MatMuls divide their input per channel (a Mul) and scale their weight rows to match,
    from `channel_amax` (calibrate's per-channel ranges). Returns a QuantizedGraph.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    if precision not in QUANT_PRECISIONS:
        raise QuantizationError(f"unknown 8-bit precision {precision!r}; choose from {', '.join(QUANT_PRECISIONS)}",
                                "precision")
    if form not in QUANT_FORMS or (form == "cpu" and precision != "int8"):
        raise QuantizationError(f"no {form!r} form of {precision}; forms: tensorrt (int8, fp8), cpu (int8)", "form")
    recipe.check()
    unsigned = form == "cpu"
    g = proto.graph
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < QUANT_OPSET:
            opset.version = QUANT_OPSET
    initializers = {t.name: t for t in g.initializer}
    consumers: dict[str, int] = {}
    for n in g.node:
        for name in n.input:
            consumers[name] = consumers.get(name, 0) + 1
    done = QuantizedGraph()
    weight_digest = hashlib.sha256()
    new_nodes: dict[int, list] = {}   # node index -> Q/DQ nodes to put right before it
    attention_seen: dict[str, int] = {}
    nodes = list(g.node)

    def activation_pair(index: int, node, slot: int, key: str, range_: float | None = None) -> None:
        if key not in amax:
            raise QuantizationError(f"no calibrated range for {key}; calibrate with the same recipe", "layers")
        scale = quant_scale(amax[key] if range_ is None else range_, precision)
        stem = f"{key}.{precision}"
        source = node.input[slot]
        s, z = f"{stem}.act_scale", f"{stem}.act_zero"
        g.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), s),
                              _zero_point(z, precision, unsigned)])
        q = helper.make_node("QuantizeLinear", [source, s, z], [f"{stem}.act_q"], name=f"{stem}.act_quantize")
        dq = helper.make_node("DequantizeLinear", [f"{stem}.act_q", s, z], [f"{stem}.act_dq"],
                              name=f"{stem}.act_dequantize")
        for extra in (q, dq):
            extra.metadata_props.extend(node.metadata_props)
        new_nodes.setdefault(index, []).extend([q, dq])
        node.input[slot] = f"{stem}.act_dq"
        done.activation_scales[key] = scale

    for index, node in enumerate(nodes):
        path = quantized_layer(node, recipe)
        if path is None:
            continue
        weight = initializers.get(node.input[1]) if len(node.input) > 1 else None
        if weight is None:  # attention's batched matmuls: both inputs are activations
            if not re.fullmatch(QUANTIZABLE["attention"], path) or node.op_type != "MatMul":
                continue
            first = attention_seen.setdefault(path, index) == index
            for slot, role in enumerate(("q", "k") if first else ("softmax", "v")):
                activation_pair(index, node, slot, f"{path}.{role}")
            done.layers.append(f"{path}.{'qk' if first else 'av'}")
            continue
        if consumers.get(weight.name, 0) != 1:
            raise QuantizationError(f"the weight of {path} is shared by several nodes; it cannot be quantized "
                                    "in place", "layers")
        w = numpy_helper.to_array(weight).astype(np.float32)
        smoothed_range = None
        if (recipe.smoothquant_alpha is not None and precision == "int8" and node.op_type == "MatMul"
                and w.ndim == 2):
            if not channel_amax or path not in channel_amax:
                raise QuantizationError(f"no per-channel range for {path}; calibrate with the SmoothQuant recipe",
                                        "smoothquant_alpha")
            smooth = smoothing_factors(channel_amax[path], np.abs(w).max(axis=1), recipe.smoothquant_alpha)
            w = w * smooth.astype(np.float32)[:, None]
            smoothed_range = smoothed_amax(channel_amax[path], smooth.tolist())
            inverse, product = f"{path}.{precision}.smooth_inverse", f"{path}.{precision}.smoothed"
            g.initializer.append(numpy_helper.from_array((1.0 / smooth).astype(np.float32), inverse))
            mul = helper.make_node("Mul", [node.input[0], inverse], [product], name=f"{path}.{precision}.smooth")
            mul.metadata_props.extend(node.metadata_props)
            new_nodes.setdefault(index, []).append(mul)
            node.input[0] = product
        if node.op_type == "MatMul":
            axis = w.ndim - 1                         # (K, N): N output channels
        elif node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            axis = 0 if trans_b else 1
        else:
            axis = 0                                  # Conv: (out, in, kh, kw)
        reduce = tuple(i for i in range(w.ndim) if i != axis)
        weight_amax = np.abs(w).max(axis=reduce)
        scales = np.array([quant_scale(a, precision) for a in weight_amax.tolist()], np.float32)
        shape = [1] * w.ndim
        shape[axis] = -1
        q = quantize_array(w, scales.reshape(shape), precision)
        stem = f"{path}.{precision}"
        weight.CopyFrom(_weight_tensor(weight.name, q, precision))
        s = f"{stem}.weight_scale"
        g.initializer.append(numpy_helper.from_array(scales, s))
        dq = helper.make_node("DequantizeLinear", [weight.name, s], [f"{stem}.weight_dq"], axis=axis,
                              name=f"{stem}.weight_dequantize")
        dq.metadata_props.extend(node.metadata_props)
        new_nodes.setdefault(index, []).append(dq)
        node.input[1] = f"{stem}.weight_dq"
        activation_pair(index, node, 0, path, smoothed_range)
        weight_digest.update(path.encode() + scales.tobytes())
        done.layers.append(path)

    ordered = []
    for index, node in enumerate(nodes):
        ordered.extend(new_nodes.get(index, []))
        ordered.append(node)
    del g.node[:]
    g.node.extend(ordered)
    done.weight_scale_digest = weight_digest.hexdigest()
    if not done.layers:
        raise QuantizationError("the recipe selected no GEMM of this graph; nothing would be quantized", "layers")
    return done
