"""What an export's graphs compute in, declared once: the precisions, and the 8-bit recipe and calibration settings.

No torch here: the CLI's choices, defaults and --help read it (export/quantize.py and export/calibrate.py use it).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .errors import UsageError
from .settings import SAMPLING_METHODS, BuildSettings

PRECISIONS = ("fp32", "fp16", "int8", "fp8")
DEFAULT_PRECISIONS = BuildSettings.precisions   # what `build` makes unless told otherwise
QUANT_PRECISIONS = ("int8", "fp8")      # explicit-quantization (Q/DQ) graphs, calibrated


class QuantizationError(UsageError):
    """A recipe or calibration setting that cannot be used."""


#################################################################################
#                              The 8-bit recipe                                 #
#################################################################################

# What a recipe may quantize: a name -> the module paths (exporter scopes) of its GEMMs.
QUANTIZABLE = {
    "qkv": r"blocks\.\d+\.attn\.qkv",
    "proj": r"blocks\.\d+\.attn\.proj",
    "fc1": r"blocks\.\d+\.mlp\.fc1",
    "fc2": r"blocks\.\d+\.mlp\.fc2",
    "attention": r"blocks\.\d+\.attn",           # Q K^T and softmax . V (no weights: both inputs per tensor)
    "adaLN_modulation": r"(blocks\.\d+|final_layer)\.adaLN_modulation\.1",
    "final_layer": r"final_layer\.linear",
    "t_embedder": r"t_embedder\.mlp\.[02]",
    "x_embedder": r"x_embedder\.proj",
}
DEFAULT_LAYERS = ("qkv", "proj", "fc1", "fc2")
# Never quantized: no GEMM to run in 8 bits, or an op TensorRT keeps in floating point anyway.
NEVER_QUANTIZED = ("y_embedder (a table lookup)", "LayerNorm", "softmax", "GELU", "modulation and gates",
                   "the residual stream", "unpatchify")
ACTIVATION_AMAX = ("max", "percentile")


@dataclass(frozen=True)
class QuantRecipe:
    """What an 8-bit graph quantizes and how its activation scales are chosen; recorded in the manifest."""
    layers: tuple[str, ...] = DEFAULT_LAYERS   # the GEMMs of every block; see QUANTIZABLE for the rest
    activation_amax: str = "max"               # "max": largest |x| seen; "percentile": clips rare outliers
    percentile: float = 99.99                  # of |x| per calibration call, then the max over calls (timesteps)
    # SmoothQuant (Xiao et al. 2023) for int8: each input channel j of a block GEMM is divided by
    # s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) (a Mul before the Q/DQ pair) and the weight's row j multiplied by it,
    # moving outlier channels' range into the per-channel weight scales. None: off.
    smoothquant_alpha: float | None = None

    def check(self) -> None:
        unknown = [name for name in self.layers if name not in QUANTIZABLE]
        if unknown or not self.layers:
            raise QuantizationError(f"quantized layers must be a non-empty subset of {', '.join(QUANTIZABLE)}, "
                                    f"got {', '.join(self.layers) or 'none'}", "layers")
        if self.activation_amax not in ACTIVATION_AMAX:
            raise QuantizationError(f"activation amax must be one of {', '.join(ACTIVATION_AMAX)}, "
                                    f"got {self.activation_amax!r}", "activation_amax")
        if not 50.0 < self.percentile <= 100.0:
            raise QuantizationError(f"the calibration percentile must be in (50, 100], got {self.percentile}",
                                    "percentile")
        alpha = self.smoothquant_alpha
        if alpha is not None and not (isinstance(alpha, (int, float)) and 0.0 < alpha < 1.0):
            raise QuantizationError(f"the SmoothQuant alpha must be between 0 and 1, got {alpha!r}",
                                    "smoothquant_alpha")

    @property
    def excluded(self) -> list[str]:
        """What stays in the high precision of model.fp16.onnx."""
        return [name for name in QUANTIZABLE if name not in self.layers] + list(NEVER_QUANTIZED)

    def to_dict(self) -> dict:
        return {**asdict(self), "layers": list(self.layers), "excluded": self.excluded}

    @classmethod
    def from_dict(cls, d: dict) -> "QuantRecipe":
        fields = cls.__dataclass_fields__
        values = {k: v for k, v in d.items() if k in fields}
        if "layers" in values:
            values["layers"] = tuple(values["layers"])
        return cls(**values)


#################################################################################
#                          The calibration settings                             #
#################################################################################

CALIBRATION_LIMITS = {"images": (1, 1024), "steps": (1, 1000)}
CALIBRATION_METHODS = SAMPLING_METHODS


@dataclass(frozen=True)
class CalibrationSettings:
    """The sampling runs that calibrate an 8-bit graph; recorded in the manifest."""
    images: int = 10              # digits: one per class; labels are spread evenly over the classes
    steps: int = 20               # DDPM respaced to 20 steps visits timesteps from 999 down to 0
    method: str = "ddpm"
    guidance_scale: float = 4.0   # the official default (models without a null class run unguided)
    seed: int = 0

    def check(self) -> None:
        for name, (low, high) in CALIBRATION_LIMITS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or not low <= value <= high:
                raise QuantizationError(f"calibration {name} must be an integer from {low} to {high}, got {value!r}",
                                        f"calib_{name}")
        if self.method not in CALIBRATION_METHODS:
            raise QuantizationError(f"calibration sampler must be one of {', '.join(CALIBRATION_METHODS)}, "
                                    f"got {self.method!r}", "calib_method")
        if self.method == "dpmpp-2m" and self.steps >= 1000:
            raise QuantizationError("dpmpp-2m calibration takes at most 999 steps", "calib_steps")
        if not (isinstance(self.guidance_scale, (int, float)) and math.isfinite(self.guidance_scale)):
            raise QuantizationError(f"calibration guidance must be a finite number, got {self.guidance_scale!r}",
                                    "calib_guidance")

    def to_dict(self) -> dict:
        return asdict(self)
