"""The VAE decoder of latent DiTs as ONNX (fp32 and fp16, dynamic batch), validated like the DiT.

The graph takes the latents exactly as the DiT sampler returns them and gives images in about [-1, 1]:
the 1/0.18215 latent scale is inside it, as in `pipeline.VaeDecoder`. The fp16 graph runs convolutions,
attention and upsampling in fp16 and keeps every GroupNorm in fp32 (statistics over a whole feature map
overflow fp16), with fp32 inputs and outputs, the same policy as the DiT's fp16 graph. No TensorRT engine
is built for it: the decoder runs once per sample against 250 DiT forwards (docs/gpu.md).
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import DitexportError
from .export import TOLERANCE  # the DiT's tolerances, against the torch fp32 decoder
from .pipeline import VAE_SCALE
from .validate import relative_error
from .logs import get_logger

LOG = get_logger("vae")

INPUT_NAME = "latents"
OUTPUT_NAME = "images"
VAE_PRECISIONS = ("fp32", "fp16")
DEFAULT_OPSET = 18
REPORT_NAME = "vae_report.json"


class VaeExportError(DitexportError):
    """A VAE that cannot be loaded, exported or validated."""


def vae_onnx_filename(precision: str = "fp32") -> str:
    return "vae.onnx" if precision == "fp32" else f"vae.{precision}.onnx"


def load_vae(path: str | Path):
    """A diffusers AutoencoderKL from a local directory, through the pipeline's loader (fp32, CPU, eval)."""
    from .pipeline import VaeDecoder

    try:
        return VaeDecoder(path).vae
    except (RuntimeError, FileNotFoundError) as e:
        raise VaeExportError(str(e)) from None
    except (OSError, ValueError) as e:  # diffusers' own errors for a directory without a usable model
        raise VaeExportError(f"cannot load a diffusers AutoencoderKL from {path}: {e}") from None


def vae_scale_factor(vae) -> int:
    """Image side per latent side: 2 per down block after the first (8 for the SD VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


# ---------------------------------------------------------------------------------------- graphs

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
            raise VaeExportError(f"unknown VAE precision {precision!r}; choose from {', '.join(VAE_PRECISIONS)}")
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


def export_vae_decoder(vae, path: str | Path, *, precision: str = "fp32", latent_size: int = 32, batch: int = 2,
                       opset: int | None = None) -> Path:
    """Exports the decoder (dynamic batch, fixed latent size) to `path`, written atomically; returns the path."""
    from .export import clean_up, save_onnx

    if batch < 2:
        raise VaeExportError(f"export with a batch of at least 2 so the batch axis stays dynamic, got {batch}")
    module = VaeDecodeGraph(vae, precision)
    example = sample_latents(vae, batch, latent_size)
    batch_dim = torch.export.Dim("batch", min=1, max=4096)
    import warnings

    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, (example,), dynamo=True, opset_version=opset or DEFAULT_OPSET,
                                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        dynamic_shapes={"latents": {0: batch_dim}}, optimize=True, verbose=False)
    except Exception as e:  # torch.export reports unsupported code as several exception types
        raise VaeExportError(f"the VAE decoder could not be exported: {type(e).__name__}: {e}") from None
    proto = clean_up(program.model_proto)
    for key, value in (("ditexport.graph", "vae-decoder"), ("ditexport.precision", precision),
                       ("ditexport.vae_scale", str(VAE_SCALE)), ("ditexport.latent_size", str(latent_size))):
        proto.metadata_props.add(key=key, value=value)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_onnx(proto, path)


# ---------------------------------------------------------------------------------------- validation

def validate_vae_decoder(vae, onnx_path: str | Path, *, precision: str, latent_size: int,
                         batches: tuple[int, ...] = (1, 2, 3), providers: list[str] | None = None,
                         seed: int = 0) -> dict:
    """The ONNX decoder on ONNX Runtime against the torch fp32 decoder: rel. error and max abs per batch size.

    An fp16 graph on the CPU provider runs as its fp16-rounding twin (`export.emulated_copy`), as the
    DiT's do, so that the error measured is the one fp16 hardware makes.
    """
    import tempfile

    import onnxruntime as ort

    from .export import emulated_copy
    from .validate import needs_emulation

    providers = providers or ["CPUExecutionProvider"]
    emulated = needs_emulation(precision, providers)
    reference = VaeDecodeGraph(vae, "fp32")
    tolerance = TOLERANCE[precision]
    checks = []
    with tempfile.TemporaryDirectory(prefix="ditexport-vae-") as tmp:
        run_path = emulated_copy(onnx_path, tmp) if emulated else onnx_path
        session = ort.InferenceSession(str(run_path), providers=providers)
        for i, batch in enumerate(batches):
            latents = sample_latents(vae, batch, latent_size, seed + i)
            with torch.no_grad():
                expected = reference(latents).numpy()
            got = session.run([OUTPUT_NAME], {INPUT_NAME: latents.numpy()})[0]
            shape_ok = got.shape == expected.shape
            rel, max_abs, finite = (relative_error(got, expected) if shape_ok
                                    else (None, None, bool(np.isfinite(got).all())))
            checks.append({"batch": batch, "shape": list(got.shape), "expected_shape": list(expected.shape),
                           "rel_err": rel, "max_abs": max_abs, "finite": finite,
                           "passed": bool(shape_ok and finite and rel is not None and rel <= tolerance)})
        provider = session.get_providers()[0]
        del session
    return {"file": Path(onnx_path).name, "precision": precision, "tolerance": tolerance, "provider": provider,
            "emulated": emulated, "checks": checks, "passed": all(c["passed"] for c in checks)}


# ---------------------------------------------------------------------------------------- the whole stage

def export_vae(vae_dir: str | Path, out_dir: str | Path, *, latent_size: int, precisions=VAE_PRECISIONS,
               opset: int | None = None, log=LOG.info) -> dict:
    """Loads the VAE, exports and validates each precision.

    Writes `vae.onnx`, `vae.fp16.onnx` and `vae_report.json` into `out_dir`; returns the report, whose
    "passed" says whether every validation passed.
    """
    from .artifacts import atomic_write_json, ensure_writable_dir

    for precision in precisions:
        if precision not in VAE_PRECISIONS:
            raise VaeExportError(f"unknown VAE precision {precision!r}; choose from {', '.join(VAE_PRECISIONS)}")
    vae = load_vae(vae_dir)
    out_dir = ensure_writable_dir(out_dir)
    report = {"vae": str(vae_dir), "latent_size": latent_size, "image_size": latent_size * vae_scale_factor(vae),
              "latent_channels": vae.config.latent_channels, "scale": VAE_SCALE, "graphs": {}}
    for precision in precisions:
        path = out_dir / vae_onnx_filename(precision)
        start = time.perf_counter()
        export_vae_decoder(vae, path, precision=precision, latent_size=latent_size, opset=opset)
        exported = time.perf_counter() - start
        result = validate_vae_decoder(vae, path, precision=precision, latent_size=latent_size)
        result["export_seconds"] = round(exported, 2)
        report["graphs"][precision] = result
        worst = max((c["rel_err"] for c in result["checks"] if c["rel_err"] is not None), default=float("nan"))
        log(f"vae: {path.name:<15} exported in {exported:.1f} s; rel err {worst:.2e} (tolerance "
            f"{result['tolerance']:.0e}{', fp16 emulated' if result['emulated'] else ''}) on batches "
            f"{[c['batch'] for c in result['checks']]}: {'ok' if result['passed'] else 'FAILED'}")
    report["passed"] = all(g["passed"] for g in report["graphs"].values())
    atomic_write_json(out_dir / REPORT_NAME, json.loads(json.dumps(report)))
    log(f"vae: {'PASSED' if report['passed'] else 'FAILED'} ({out_dir / REPORT_NAME})")
    return report
