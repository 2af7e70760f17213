"""`python -m ditexport`: the command-line interface (argparse sub-commands, kebab-case flags)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import DitexportError

# Errors that are the user's to fix: printed as one line, exit code 2. DITEXPORT_DEBUG=1 shows tracebacks.
USER_ERRORS = (DitexportError, ValueError, FileNotFoundError, PermissionError, NotADirectoryError)


def parse_labels(text: str) -> list[int]:
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"class labels must be comma-separated integers, got {text!r}") from None


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="built-in model (default: digits) or a config name such as DiT-S/2 for random weights")
    g.add_argument("--checkpoint", default=None, help="a .pt / .safetensors checkpoint (official or train.py)")
    g.add_argument("--config", default=None, help="config name for --checkpoint when it cannot be inferred")
    g.add_argument("--image-size", type=int, default=None, choices=(256, 512),
                   help="image size of an official latent model (sets input size = size / 8)")


def add_sampler_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampler")
    g.add_argument("--steps", type=positive_int, default=250, help="sampling steps (default: 250, official)")
    g.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm", help="default: ddpm")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity (default: 0)")
    g.add_argument("--cfg-scale", type=float, default=4.0,
                   help="classifier-free guidance scale; 1 disables guidance (default: 4.0, official)")
    g.add_argument("--guide-all-channels", action="store_true",
                   help="guide every latent channel (diffusers) instead of the official first 3")
    g.add_argument("--seed", type=int, default=0, help="seed of the one CPU generator behind all noise")


def sampler_config(args):
    from .diffusion import SamplerConfig

    return SamplerConfig(num_steps=args.steps, method=args.sampler, guidance_scale=args.cfg_scale, eta=args.eta,
                         guide_all_channels=args.guide_all_channels)


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DitexportError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


# ----------------------------------------------------------------------------------------------- info

def cmd_info(args) -> int:
    import platform

    import torch

    from . import __version__
    from .model import DIT_CONFIGS, DiT

    print(f"ditexport {__version__}  python {platform.python_version()}  torch {torch.__version__}")
    print(f"CUDA: {'yes, ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no'}")
    for module in ("onnx", "onnxruntime", "tensorrt", "polygraphy", "gradio", "diffusers"):
        try:
            mod = __import__(module)
            print(f"{module}: {getattr(mod, '__version__', 'installed')}")
        except ImportError:
            print(f"{module}: not installed")
    print()
    print(f"{'config':<12} {'depth':>5} {'hidden':>6} {'heads':>5} {'patch':>5} {'params (256px)':>15}")

    for name, cfg in DIT_CONFIGS.items():
        with torch.device("meta"):
            n = sum(p.numel() for p in DiT.from_config(cfg).parameters())
        print(f"{name:<12} {cfg.depth:>5} {cfg.hidden_size:>6} {cfg.num_heads:>5} {cfg.patch_size:>5} "
              f"{n / 1e6:>13.1f} M")
    return 0


# --------------------------------------------------------------------------------------------- sample

def make_backend(args, model):
    """The backend named by --backend, for `sample` and `bench`."""
    import torch

    from .backends import TorchBackend

    if args.backend == "torch":
        device = resolve_device(args.device)
        dtype = torch.float16 if (args.precision == "fp16") else torch.float32
        return TorchBackend(model, device=device, dtype=dtype, max_batch=args.max_batch)
    raise DitexportError(f"backend {args.backend!r} is not available in this build")


def cmd_sample(args) -> int:
    from .checkpoint import load_model
    from .images import save_grid
    from .pipeline import Pipeline, VaeDecoder

    model, source = load_model(args.model, args.checkpoint, args.config, args.image_size)
    cfg = model.config
    labels = args.classes or [i % cfg.num_classes for i in range(args.num_images)]
    backend = make_backend(args, model)
    decoder = None
    if cfg.in_channels == 4 and args.vae is None:
        print("note: latent model without --vae: writing the first 3 latent channels, not decoded images")
    if args.vae is not None:
        decoder = VaeDecoder(args.vae, device=backend.device)
    print(f"model: {source}; backend: {backend.describe()}; {len(labels)} images, {args.steps} {args.sampler} "
          f"steps, guidance {args.cfg_scale}")
    result = Pipeline(backend, decoder)(labels, seed=args.seed, sampler_cfg=sampler_config(args),
                                        progress=not args.quiet)
    images = result.images[:, :3]
    upscale = max(1, 64 // images.shape[-1])  # 8x8 digits are too small to see unscaled
    path = save_grid(images, args.out, upscale=upscale)
    print(f"wrote {path}: {result.total_s:.2f} s in all, {result.step_ms:.1f} ms per step "
          f"({result.steps} steps, batch {len(labels) * (2 if args.cfg_scale != 1 else 1)} per forward)")
    return 0


# ---------------------------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ditexport",
                                     description="Export, validate, compile and serve class-conditional DiTs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("info", help="versions, devices and the model registry")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("sample", help="sample an image grid", description="Sample class-conditional images "
                       "and write them as a PNG grid; prints the time per step.")
    add_model_arguments(p)
    add_sampler_arguments(p)
    p.add_argument("--classes", type=parse_labels, default=None, help="comma-separated class labels, e.g. 3,1,4")
    p.add_argument("--num-images", type=positive_int, default=8,
                   help="images when --classes is not given, cycling through the classes (default: 8)")
    p.add_argument("--backend", choices=("torch", "onnxruntime", "tensorrt"), default="torch")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda or auto (default: cpu)")
    p.add_argument("--precision", choices=("fp32", "fp16"), default="fp32", help="fp16 needs CUDA or an fp16 export")
    p.add_argument("--max-batch", type=positive_int, default=None, help="split forwards above this batch")
    p.add_argument("--vae", default=None, help="local directory of a diffusers AutoencoderKL (latent models)")
    p.add_argument("--out", default="samples.png", help="output PNG (default: samples.png)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sample)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args) or 0
    except USER_ERRORS as e:
        if os.environ.get("DITEXPORT_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
