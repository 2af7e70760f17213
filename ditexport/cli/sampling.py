"""`info`, `sample` and `eval`."""
from __future__ import annotations

import contextlib
from pathlib import Path

from ..errors import DitexportError
from .options import (check_device_name, check_output_file, check_seed_flag, export_dir_of, load_cli_model,
                      rebuild_hint, resolve_device, sampler_config, set_threads)


# ----------------------------------------------------------------------------------------------- info

def cmd_info(args) -> int:
    import platform

    import torch

    from .. import __version__
    from ..model import DIT_CONFIGS, DiT

    print(f"ditexport {__version__}  python {platform.python_version()}  torch {torch.__version__}")
    print(f"CUDA: {'yes, ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no'}")
    for module in ("onnx", "onnxruntime", "tensorrt", "polygraphy", "gradio", "diffusers"):
        try:
            mod = __import__(module)
            # tensorrt-stubs alone makes `tensorrt` importable, with no version: that is not TensorRT.
            print(f"{module}: {getattr(mod, '__version__', None) or 'not installed (only an empty namespace)'}")
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
    """The backend named by --backend, for `sample`: the model itself, or its validated export (--export-dir,
    or exports/<name>)."""
    from ..backends.open import open_backend

    export_dir = None if args.backend == "torch" else export_dir_of(args)
    return open_backend(args.backend, getattr(args, "precision", "fp32"), model=model, export_dir=export_dir,
                        device=args.device, max_batch=args.max_batch, cuda_graph=getattr(args, "cuda_graph", False),
                        compile_mode=getattr(args, "torch_compile", None),
                        rebuild_hint=rebuild_hint(args, export_dir) if export_dir is not None else None)


def check_backend_available(args) -> None:
    """The cheap checks of --backend, --device and --precision, made before the model is built."""
    from ..backends.open import check_available

    check_device_name(args.device)
    check_available(args.backend, args.device, getattr(args, "precision", "fp32"))


def cmd_sample(args) -> int:
    from ..images import PngGridWriter, npz_writer
    from ..pipeline import CHUNK_IMAGES, Pipeline, VaeDecoder, check_request

    # Everything the flags alone can refuse is refused before the model is built or anything sampled.
    sampler_cfg = sampler_config(args)
    check_seed_flag(args.seed)
    check_device_name(args.device)
    if args.classes is not None and not args.classes:
        raise DitexportError(f"--classes {args.classes.text!r} names no class label; give e.g. --classes 3,1,4")
    out = check_output_file(args.out)
    npz = check_output_file(args.npz, "--npz") if args.npz else None
    check_backend_available(args)
    model, source = load_cli_model(args)
    source = source.describe()
    cfg = model.config
    labels = args.classes or [i % cfg.num_classes for i in range(args.num_images)]
    check_request(cfg, labels, args.seed, sampler_cfg)
    threads = set_threads(args, cfg.hidden_size)
    backend = make_backend(args, model)
    decoder = None
    if args.vae is not None:
        decoder = VaeDecoder(args.vae, device=backend.device)
    pipeline = Pipeline(backend, decoder)
    if cfg.in_channels == 4 and args.vae is None:
        print("note: latent model without --vae: writing the first 3 latent channels, not decoded images")
    print(f"model: {source}; backend: {backend.describe()}, {threads}; {len(labels)} images, {args.steps} "
          f"{args.sampler} steps, guidance {args.cfg_scale}")
    upscale = max(1, 64 // cfg.input_size) if args.vae is None else 1  # 8x8 digits are too small to see unscaled
    total_s = sampler_s = 0.0
    chunks = steps = 0
    with contextlib.ExitStack() as outputs:
        # Both files are created now (an unwritable destination fails here) and published only when complete.
        grid = outputs.enter_context(PngGridWriter(out, len(labels), upscale=upscale))
        write_npz = None
        for result in pipeline.chunks(labels, seed=args.seed, sampler_cfg=sampler_cfg, progress=not args.quiet):
            images = result.images[:, :3]
            grid.add(images)
            if npz is not None:
                if write_npz is None:
                    _, c, h, w = images.shape
                    write_npz = outputs.enter_context(npz_writer(npz, len(labels), h, w, c))
                write_npz(images)
            total_s, sampler_s, steps, chunks = total_s + result.total_s, sampler_s + result.sampler_s, \
                result.steps, chunks + 1
    rows = min(len(labels), CHUNK_IMAGES) * (2 if args.cfg_scale != 1 else 1)
    in_chunks = f", {chunks} chunks of up to {CHUNK_IMAGES} images" if chunks > 1 else ""
    print(f"wrote {out}: {total_s:.2f} s in all, {1000 * sampler_s / (steps * chunks):.1f} ms per step "
          f"({steps} steps, batch {rows} per forward{in_chunks})")
    if npz is not None:
        _, c, h, w = images.shape
        print(f"wrote {npz}: arr_0 of shape ({len(labels)}, {h}, {w}, {c}) uint8")
    return 0


# ----------------------------------------------------------------------------------------------- eval

def cmd_eval(args) -> int:
    from ..artifacts import atomic_write_json
    from ..backends.open import open_backend
    from ..source import ModelSource
    from ..zoo.digits_eval import evaluate_digits

    device = resolve_device(args.device)  # before the model: a missing GPU is refused at once
    check_backend_available(args)
    resolved = ModelSource.resolve(args.model, args.checkpoint, args.config)
    model, source = resolved.load(), resolved.describe()
    threads = set_threads(args, model.config.hidden_size)
    if args.backend == "torch":
        backend = open_backend("torch", args.precision, model=model, device=device)
    else:
        export_dir = export_dir_of(args)
        backend = open_backend(args.backend, args.precision, model=model, export_dir=export_dir, device=args.device,
                               rebuild_hint=rebuild_hint(args, export_dir))
    unguided = "" if args.cfg_scale == 1 else " and without"
    print(f"model: {source}; backend: {backend.describe()}, {threads}; {args.num_per_class} digits per class, "
          f"{args.steps} {args.sampler} steps, with guidance {args.cfg_scale:g}{unguided}")
    report = evaluate_digits(backend, num_per_class=args.num_per_class, num_steps=args.steps,
                             guidance_scale=args.cfg_scale, seed=args.seed, sampler=args.sampler,
                             progress=not args.quiet)
    print(report.format())
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        print(f"wrote {atomic_write_json(args.json, {'model': source, **report.to_dict()})}")
    return 0
