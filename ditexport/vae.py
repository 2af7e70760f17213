"""The VAE decoder of latent DiTs: loading a local diffusers AutoencoderKL, its identity in a manifest, and the
export stage that `build --vae` runs beside the DiT (and `export-vae` runs alone): graphs from `export.vae`,
checked by `validate.vae`."""
from __future__ import annotations

import json
import time
from pathlib import Path

from .artifacts import vae_onnx_filename
from .errors import DitexportError
from .export.spec import DEFAULT_OPSET
from .export.vae import VAE_PRECISIONS, export_vae_graph
from .logs import get_logger
from .backends.decoders import VAE_SCALE

LOG = get_logger("vae")

REPORT_NAME = "vae_report.json"  # the standalone `export-vae` report; `build --vae` writes into report.json


class VaeExportError(DitexportError):
    """A VAE that cannot be loaded, exported or validated."""


def load_vae(path: str | Path):
    """A diffusers AutoencoderKL from a local directory, through the pipeline's loader (fp32, CPU, eval)."""
    from .backends.decoders import VaeDecoder

    try:
        return VaeDecoder(path).vae
    except (RuntimeError, FileNotFoundError) as e:
        raise VaeExportError(str(e)) from None
    except (OSError, ValueError) as e:  # diffusers' own errors for a directory without a usable model
        raise VaeExportError(f"cannot load a diffusers AutoencoderKL from {path}: {e}") from None


def vae_scale_factor(vae) -> int:
    """Image side per latent side: 2 per down block after the first (8 for the SD VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def vae_digest(path: str | Path) -> str:
    """SHA-256 over the relative names and contents of every file of a diffusers model directory."""
    import hashlib

    from .hashing import sha256_file

    root = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(root).as_posix()}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


def vae_record(vae_dir: str | Path, vae, latent_size: int) -> dict:
    """The manifest's "vae": where the decoder comes from, its digest, and its shapes."""
    return {"source": {"path": str(Path(vae_dir).resolve()), "sha256": vae_digest(vae_dir)},
            "latent_channels": vae.config.latent_channels, "latent_size": latent_size,
            "image_size": latent_size * vae_scale_factor(vae), "out_channels": vae.config.out_channels,
            "scale": VAE_SCALE}


def load_fitting_vae(vae_dir: str | Path, config) -> tuple[object, dict]:
    """The AutoencoderKL of `build --vae`, refused when its latents are not the DiT's samples, and its manifest
    record."""
    vae = load_vae(vae_dir)
    if vae.config.latent_channels != config.in_channels:
        raise VaeExportError(f"the VAE takes {vae.config.latent_channels}-channel latents, but the DiT samples "
                             f"{config.in_channels} channels; pass the VAE this DiT was trained with")
    return vae, vae_record(vae_dir, vae, config.input_size)


def recorded_vae(manifest: dict, rebuild: str):
    """The VAE an export's decoder graphs came from (None for an export without one), refused when it is gone or
    changed since."""
    from .artifacts import ArtifactError

    record = manifest.get("vae")
    if not record:
        return None
    path = Path(record["source"]["path"])
    if not path.is_dir():
        raise ArtifactError(f"the VAE this export came from is gone ({path}); validation needs it")
    if vae_digest(path) != record["source"]["sha256"]:
        raise ArtifactError(f"the VAE in {path} changed since this export; rebuild with: {rebuild}")
    return load_vae(path)


def export_vae_graphs(vae, out_dir: str | Path, *, latent_size: int, precisions=VAE_PRECISIONS,
                      opset: int | None = None, log=LOG.info) -> dict[str, Path]:
    """vae.onnx, vae.fp16.onnx (those of `precisions`) into `out_dir`; precision -> path."""
    paths = {}
    for precision in precisions:
        if precision not in VAE_PRECISIONS:
            raise VaeExportError(f"unknown VAE precision {precision!r}; choose from {', '.join(VAE_PRECISIONS)}")
        path = Path(out_dir) / vae_onnx_filename(precision)
        start = time.perf_counter()
        paths[precision] = export_vae_graph(vae, path, precision=precision, latent_size=latent_size,
                                            opset=opset or DEFAULT_OPSET)
        log(f"export: {path.name:<18} {precision:<5} (VAE decoder, {latent_size}x{latent_size} latents)  "
            f"({time.perf_counter() - start:.1f} s)")
    return paths


# ---------------------------------------------------------------------------------------- export-vae

def export_vae(vae_dir: str | Path, out_dir: str | Path, *, latent_size: int | None = None,
               image_size: int | None = None, precisions=VAE_PRECISIONS, opset: int | None = None,
               log=LOG.info) -> dict:
    """The decoder alone (`export-vae`) for `latent_size` latents (or those of `image_size` images): exports and
    validates each precision into `out_dir` with `vae_report.json`; returns the report, whose "passed" says whether
    every validation passed. `build --vae` runs the same export and validation inside a DiT export."""
    from .artifacts import atomic_write_json, ensure_writable_dir
    from .validate.vae import validate_vae_decoder

    vae = load_vae(vae_dir)
    if latent_size is None:
        factor = vae_scale_factor(vae)
        if image_size is None or image_size % factor:
            raise VaeExportError(f"--image-size {image_size} is not a multiple of the VAE's factor {factor}")
        latent_size = image_size // factor
    out_dir = ensure_writable_dir(out_dir)
    report = {"vae": str(vae_dir), "latent_size": latent_size, "image_size": latent_size * vae_scale_factor(vae),
              "latent_channels": vae.config.latent_channels, "scale": VAE_SCALE, "graphs": {}}
    for precision, path in export_vae_graphs(vae, out_dir, latent_size=latent_size, precisions=precisions,
                                             opset=opset, log=log).items():
        result = validate_vae_decoder(vae, path, precision=precision, latent_size=latent_size)
        report["graphs"][precision] = result
        worst = max((c["rel_err"] for c in result["checks"] if c["rel_err"] is not None), default=float("nan"))
        log(f"vae: {path.name:<15} rel err {worst:.2e} (tolerance {result['tolerance']:.0e}"
            f"{', fp16 emulated' if result['emulated'] else ''}) on batches "
            f"{[c['batch'] for c in result['checks']]}: {'ok' if result['passed'] else 'FAILED'}")
    report["passed"] = all(g["passed"] for g in report["graphs"].values())
    atomic_write_json(out_dir / REPORT_NAME, json.loads(json.dumps(report)))
    log(f"vae: {'PASSED' if report['passed'] else 'FAILED'} ({out_dir / REPORT_NAME})")
    return report
