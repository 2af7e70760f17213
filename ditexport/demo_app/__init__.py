"""The Gradio demo: pick a model, a backend and a class (or a blend of two), sample, see images and timings.

Everything a request does lives in plain objects (`DemoLimits`, `ModelEntry`, `DemoService.generate`),
tested without a browser; `build_app` only lays Gradio components over them and `launch` serves them.
Gradio is imported inside `build_app` and `launch`, so the package imports without it.
"""
from __future__ import annotations

from .limits import BUILTIN_KEY, DemoBusyError, DemoInputError, DemoLimits, NO_BLEND, SEED_MAX
from .models import builtin_entry, export_entries, ModelEntry, parse_backend_choice
from .remote import RemoteService
from .service import create_service, DemoService, GenerateRequest, GenerateResponse, random_seed
from .ui import build_app, launch

__all__ = ["BUILTIN_KEY", "DemoBusyError", "DemoInputError", "DemoLimits", "NO_BLEND", "SEED_MAX", "builtin_entry",
           "export_entries", "ModelEntry", "parse_backend_choice", "create_service", "DemoService", "GenerateRequest",
           "GenerateResponse", "random_seed", "build_app", "launch", "RemoteService"]


