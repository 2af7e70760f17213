"""Flags -> library objects: the model, the device, the sampler settings, threads, output paths."""
from __future__ import annotations

from pathlib import Path

from ..errors import DitexportError


def set_threads(args, hidden_size: int | None) -> str:
    """Applies --torch-threads (or the default for this model width); returns the text for the run's banner."""
    from ..threads import describe_threads, resolve_threads

    return describe_threads(*resolve_threads(args.torch_threads, hidden_size))


def model_source(args):
    """The `ModelSource` of the model flags (all four, the same for every command)."""
    from ..source import ModelSource

    return ModelSource.resolve(args.model, args.checkpoint, args.config, args.image_size)


def load_cli_model(args):
    """The model of the model flags, as `ditexport.load_model` loads it, with a line every 10 s while a big one is
    built (DiT-XL/2: about 25 s)."""
    from ..progress import heartbeat
    from ..source import remember_source

    source = model_source(args)
    with heartbeat(print, f"model: loading {args.checkpoint or args.model or 'digits'}"):
        return remember_source(source.load(), source)


def describe_model(model) -> str:
    """One line: where a model from `load_cli_model` comes from."""
    from ..source import source_of

    return source_of(model).describe()


SAMPLER_FLAGS = {"guidance_scale": "--cfg-scale", "eta": "--eta", "num_steps": "--steps"}


def sampler_config(args):
    """The sampler settings of the flags; a setting the sampler refuses is one line naming its flag."""
    from ..sampler import SamplerConfig, SamplerConfigError

    try:
        return SamplerConfig(num_steps=args.steps, method=args.sampler, guidance_scale=args.cfg_scale, eta=args.eta,
                             guide_all_channels=args.guide_all_channels)
    except SamplerConfigError as e:
        flag = SAMPLER_FLAGS.get(e.field, e.field)
        raise DitexportError(f"{flag} must be a finite number, got {getattr(args, flag[2:].replace('-', '_'))}") \
            from None


def check_seed_flag(seed: int) -> None:
    from ..pipeline import SEED_RANGE

    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise DitexportError(f"--seed must be between {SEED_RANGE[0]} and {SEED_RANGE[1]}, got {seed}")


def resolve_device(name: str):
    """backends.base.resolve_device, imported late so that `--help` does not import torch; a name torch does
    not know is one line naming --device."""
    from ..backends.base import resolve_device as resolve

    check_device_name(name)
    return resolve(name)


def check_device_name(name: str) -> None:
    import torch

    if name != "auto":
        try:
            torch.device(name)
        except RuntimeError:
            raise DitexportError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or auto") from None


def model_flags(args) -> list[str]:
    """The model flags the user typed (--model, --checkpoint, --config, --image-size), for hints."""
    flags = []
    for flag, value in (("--model", getattr(args, "model", None)), ("--checkpoint", getattr(args, "checkpoint", None)),
                        ("--config", getattr(args, "config", None)), ("--image-size", getattr(args, "image_size", None))):
        if value is not None:
            flags += [flag, str(value)]
    return flags


def export_dir_of(args) -> Path:
    """--export-dir, or the default export directory of the model flags."""
    from ..artifacts import default_export_dir

    if getattr(args, "export_dir", None):
        return Path(args.export_dir)
    return default_export_dir(args.model, args.checkpoint, image_size=getattr(args, "image_size", None))


def rebuild_hint(args, export_dir: Path) -> str | None:
    """The build command for hints about `export_dir` with the user's model flags; None when the user named
    no model, so the hint takes the flags the export was built with (from its manifest)."""
    from ..artifacts import rebuild_command

    flags = model_flags(args)
    return rebuild_command(export_dir, flags) if flags else None


def flagged_export(args, read) -> tuple[Path, dict]:
    """The export of the command's flags (--export-dir, or the model flags' default one) and its manifest,
    `read(export_dir, rebuild_hint)`; refused when it was built from another model than the model flags name."""
    from ..building import check_source

    export_dir = export_dir_of(args)
    manifest = read(export_dir, rebuild_hint(args, export_dir))
    check_source(manifest, export_dir, model=args.model, checkpoint=args.checkpoint, config=args.config,
                 image_size=args.image_size)
    return export_dir, manifest


def check_output_file(path: str | Path, flag: str = "--out") -> Path:
    """Refuses, before any work, an output path that cannot become a file; creates missing directories only
    under the working directory (elsewhere a missing directory is more likely a typo)."""
    path = Path(path)
    if path.is_dir():
        raise DitexportError(f"{flag} {path} is a directory; name a file in it, e.g. {path / 'samples.png'}")
    parent = path.parent
    for ancestor in (parent, *parent.parents):
        if ancestor.exists():
            if not ancestor.is_dir():
                raise DitexportError(f"{flag} {path}: {ancestor} is a file, not a directory")
            break
    if not parent.exists():
        inside = Path.cwd().resolve()
        resolved = parent.resolve()
        if resolved != inside and inside not in resolved.parents:
            raise DitexportError(f"{flag} {path}: directory {parent} does not exist (directories are created "
                                 "only under the working directory); create it first")
        parent.mkdir(parents=True, exist_ok=True)
    from ..artifacts import write_problem

    problem = write_problem(parent)
    if problem:
        raise DitexportError(f"cannot write {flag} {path}: {problem}")
    return path
