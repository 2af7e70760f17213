"""What one request may ask of a server (the demo and the HTTP service), declared once: the flags
(`add_limit_arguments`), the Gradio widgets and the HTTP API read these fields."""
from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, field, fields

from .errors import UsageError


def limit(default, help: str):
    """A dataclass field whose `--flag` help is declared beside its default."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class RequestLimits:
    """Server-side bounds on one request: anything outside gets a clear error instead of a long wait."""
    # The diffusion has 1000 timesteps; more cannot be respaced.
    max_steps: int = limit(1000, "server limit on steps per request")
    # One request must not hold a backend for long.
    max_images: int = limit(16, "server limit on images per request")
    # Far beyond any useful scale (official: 4), still finite.
    max_guidance: float = limit(20.0, "server limit on the guidance scale")

    def bounds(self, num_images: int, steps: int, guidance: float) -> list[tuple[str, float, float, float]]:
        """(field, value, low, high) of each bounded setting, fields named as `UsageError.field` names them."""
        return [("num_images", num_images, 1, self.max_images), ("num_steps", steps, 1, self.max_steps),
                ("guidance_scale", guidance, 1.0, self.max_guidance)]

    def check(self, num_images: int, steps: int, guidance: float, names: dict[str, str] | None = None) -> None:
        """Raises a UsageError naming the first setting out of range; `names`: the words its message uses."""
        for name, value, low, high in self.bounds(num_images, steps, guidance):
            if value is None or not low <= value <= high:
                what = (names or {}).get(name, name)
                raise UsageError(f"{what} must be between {low} and {high} on this server, got {value}", name)


@dataclass(frozen=True)
class DemoLimits(RequestLimits):
    """The Gradio demo's bounds: a request's (as the HTTP service's) and its queue's."""
    concurrency: int = limit(1, "requests that run at once on each runtime (torch, onnxruntime, tensorrt); "
                                "the others wait")
    # Gradio's queue and the service refuse beyond it with "busy, try again" instead of a wait of minutes.
    max_queue: int = limit(32, "requests the demo holds at once, running or waiting; more are told it is busy")


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_limit_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One `--flag` per field of the limits dataclass `cls`, its default and help read from the field."""
    for f in fields(cls):
        if "help" not in f.metadata:
            continue
        default = None if f.default is MISSING else f.default
        kind = float if isinstance(default, float) or "float" in str(f.type) else int
        parser.add_argument(flag_name(f.name), type=positive(kind), default=default, metavar="N",
                            help=f"{f.metadata['help']}" + ("" if default is None else f" (default: {default})"))


def positive(kind):
    """An argparse type: a number of `kind` above 0 (a limit of 0 would refuse everything)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not value > 0 or value != value or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be above 0 and finite, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse
