"""Every default is declared once, in a dataclass of ditexport/settings.py (or the bench's settings), and every
reader takes it from there: the CLI's flags (and so --help) and the Python API's signatures. Nothing is changed
here: the parser is built as users get it and its defaults are compared with the dataclass fields."""
import inspect
from dataclasses import fields

import pytest

import ditexport
from ditexport.bench.settings import BenchSettings
from ditexport.cli import build_parser
from ditexport.settings import BuildSettings, DigitsTrainConfig, EvalSettings, SamplerConfig

SAMPLER_FLAGS = {"steps": "num_steps", "sampler": "method", "cfg_scale": "guidance_scale"}
# command -> (dataclass, {argparse dest: field}); a dest starting with "no_" is the negation of its field.
DECLARED = {
    "sample": (SamplerConfig, {**SAMPLER_FLAGS, "eta": "eta", "guide_all_channels": "guide_all_channels"}),
    "eval": (SamplerConfig, SAMPLER_FLAGS),
    "build": (BuildSettings, {"max_batch": "max_images", "opset": "opset", "sample_steps": "sample_steps",
                              "vae": "vae", "force": "force", "no_wait": "wait"}),
    "validate": (BuildSettings, {"sample_steps": "sample_steps", "no_wait": "wait"}),
    "train-digits": (DigitsTrainConfig, {"steps": "steps", "batch_size": "batch_size", "lr": "lr", "seed": "seed"}),
    "bench": (BenchSettings, {"device": "device", "batch_sizes": "batch_sizes", "no_unguided": "unguided",
                              "quick": "quick", "compile_mode": "compile_mode", "out": "out_dir",
                              "builder_optimization_level": "builder_optimization_level"}),
}


def parsed_defaults(command: str):
    return build_parser().parse_args([command, *(["--vae", "x"] if command == "export-vae" else [])])


@pytest.mark.parametrize("command", sorted(DECLARED))
def test_each_cli_default_is_its_dataclass_field(command):
    cls, mapping = DECLARED[command]
    declared = cls()
    args = parsed_defaults(command)
    for dest, name in mapping.items():
        value = getattr(args, dest)
        expected = getattr(declared, name)
        if dest.startswith("no_"):
            value = not value
        assert value == expected, f"{command} --{dest.replace('_', '-')}: {value!r}, {cls.__name__}.{name}: {expected!r}"


def test_the_remaining_cli_defaults_read_the_same_fields():
    assert parsed_defaults("build").precision == ",".join(BuildSettings().precisions)
    assert parsed_defaults("eval").num_per_class == EvalSettings().num_per_class
    assert parsed_defaults("export-vae").opset == BuildSettings().opset


def test_the_python_api_takes_the_same_defaults():
    signature = inspect.signature(ditexport.build).parameters
    for f in fields(BuildSettings):
        assert signature[f.name].default == f.default, f.name
    # Unset sampler settings of a pipeline call are SamplerConfig's own (None means "the declared default").
    call = inspect.signature(ditexport.Pipeline.__call__).parameters
    assert all(call[name].default is None for name in ("num_steps", "sampler", "guidance_scale", "eta"))


def test_help_shows_the_declared_defaults(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"default: {SamplerConfig.num_steps}, official" in text and f"default: {SamplerConfig.method}" in text
