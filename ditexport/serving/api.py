"""The HTTP API's JSON: requests parsed and checked field by field before any work, answers as plain
(status, JSON, headers), images as base64 PNG. No Ray in here: the deployment only moves bytes in and out."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import torch

from ..class_names import class_names
from ..errors import shown
from ..images import to_uint8
from ..limits import RequestLimits
from ..sampler import SAMPLING_METHODS, SamplerConfig, SamplerConfigError
from .engine import ImageRequest, QueueFullError, RequestError
from .settings import ServiceLimits

log = logging.getLogger("ditexport.serving")

FIELDS = {"class_labels", "steps", "sampler", "guidance_scale", "seed", "eta", "model"}
# The defaults of `python -m ditexport sample`, read from the sampler's dataclass.
DEFAULTS = {"steps": SamplerConfig.num_steps, "sampler": SamplerConfig.method,
            "guidance_scale": SamplerConfig.guidance_scale, "seed": 0, "eta": SamplerConfig.eta}
MAX_DEPTH = 2  # a request is an object holding one list: anything deeper is refused before it is parsed
MAX_INT_DIGITS = 40  # longer integers parse as floats, so that a field refuses them by name (no OverflowError)
_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"')
_INNERMOST = re.compile(rb"[\[{][^\[\]{}]*[\]}]")
_BRACKETS = re.compile(rb"[\[\]{}]")


def check_depth(body: bytes, depth: int = MAX_DEPTH) -> None:
    """Refuses JSON nested deeper than `depth` in linear time, before `json.loads` pays for it (or recurses)."""
    text = _STRINGS.sub(b"", body)
    for _ in range(depth):
        text = _INNERMOST.sub(b"", text)
    if _BRACKETS.search(text):
        raise RequestError("body", f"the body nests deeper than a request does ({depth} levels: an object "
                                   "holding the class_labels list)")


def _parse_int(text: str):
    return int(text) if len(text) <= MAX_INT_DIGITS else float(text)


def decode_body(body: bytes) -> dict:
    """A POST /v1/images body as a JSON object (nesting checked before it is parsed), or a RequestError."""
    check_depth(body)
    try:
        data = json.loads(body, parse_constant=float, parse_int=_parse_int)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError("body", f"the body is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise RequestError("body", "the body must be a JSON object")
    return data


def requested_model(data: dict) -> str | None:
    """The request's `model` (an application as GET /v1/models lists it), None where it names none."""
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("model", f"model must be a string naming a served model, got {shown(model)}")
    return model


def parse_image_request(body: bytes, num_classes: int, names: list[str],
                        limits: RequestLimits | None = None) -> ImageRequest:
    """A POST /v1/images body -> ImageRequest; anything wrong is a RequestError naming its field."""
    return image_request(decode_body(body), num_classes, names, limits)


def image_request(data: dict, num_classes: int, names: list[str],
                  limits: RequestLimits | None = None) -> ImageRequest:
    """A decoded request body -> ImageRequest, checked field by field (`model` is the router's, not checked here)."""
    limits = limits or RequestLimits()
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise RequestError(unknown[0], f"unknown field {str(unknown[0])[:40]!r}; fields: {', '.join(sorted(FIELDS))}")
    if "class_labels" not in data:
        raise RequestError("class_labels", "class_labels is required, e.g. [3, 1]")
    labels = data["class_labels"]
    if not isinstance(labels, list):
        raise RequestError("class_labels", "class_labels must be a list of class indices or names")
    if not 1 <= len(labels) <= limits.max_images:  # before any label is looked at
        raise RequestError("class_labels", f"number of class labels must be between 1 and {limits.max_images} "
                                           f"on this server, got {len(labels)}")
    values = {**DEFAULTS, **{k: v for k, v in data.items() if k not in ("class_labels", "model")}}
    for name in ("steps", "seed"):
        if not isinstance(values[name], int) or isinstance(values[name], bool):
            raise RequestError(name, f"{name} must be an integer, got {shown(values[name])}")
    for name in ("guidance_scale", "eta"):
        value = values[name]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise RequestError(name, f"{name} must be a finite number, got {shown(value)}")
    if not isinstance(values["sampler"], str) or values["sampler"] not in SAMPLING_METHODS:
        raise RequestError("sampler", f"sampler must be one of {', '.join(SAMPLING_METHODS)}, "
                                      f"got {shown(values['sampler'])}")
    try:
        cfg = SamplerConfig(num_steps=values["steps"], method=values["sampler"],
                            guidance_scale=float(values["guidance_scale"]), eta=float(values["eta"]))
    except SamplerConfigError as e:
        raise RequestError(e.field, str(e)) from None
    return ImageRequest(labels=[class_index(v, num_classes, names) for v in labels], seed=values["seed"],
                        sampler_cfg=cfg)


def class_index(value, num_classes: int, names: list[str]) -> int:
    """A class given by index, or by name where the model has names."""
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < num_classes:
            raise RequestError("class_labels", f"class labels must be in 0..{num_classes - 1}, got {shown(value)}")
        return value
    if isinstance(value, str) and value in names:
        return names.index(value)
    raise RequestError("class_labels", f"unknown class {shown(value)}: give an index 0..{num_classes - 1} "
                                       "or one of the model's class names")


def png_base64(images: torch.Tensor) -> list[str]:
    """(N, C, H, W) in [0, 1] -> one base64 PNG per image, pixels as `sample` writes them (`to_uint8`)."""
    from PIL import Image

    out = []
    for pixels in to_uint8(images[:, :3]):
        buffer = io.BytesIO()
        Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels).save(buffer, format="PNG")
        out.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return out


def served_class_names(manifest: dict, num_classes: int) -> list[str]:
    """The class names a served export accepts and advertises: from the manifest's `model` (what was exported),
    never from the export directory's name."""
    return class_names(num_classes, manifest.get("model"))


def model_info(export_dir: str | Path, backend) -> dict:
    """A served export's entry of GET /v1/models: its name, model, config, backend, precision, CPU threads,
    validation and class names."""
    manifest = json.loads((Path(export_dir) / "manifest.json").read_text())
    cfg = backend.config
    return {"name": manifest.get("name"), "model": manifest.get("model"), "export_dir": str(export_dir),
            "config": manifest.get("config"), "backend": backend.name, "precision": backend.precision,
            "threads": torch.get_num_threads(), "validation": manifest.get("validation"),
            "class_names": served_class_names(manifest, cfg.num_classes)[:100]}


def error(status: int, message: str, field: str | None = None, request_id: str | None = None,
          retry_after: int | None = None) -> tuple[int, dict, dict]:
    """(status, JSON, headers) of a refusal: the message, the field at fault, the request id."""
    answer = {"error": message}
    if field is not None:
        answer["field"] = field
    if request_id is not None:
        answer["request_id"] = request_id
    return status, answer, ({"Retry-After": str(retry_after)} if retry_after is not None else {})


class ImageAPI:
    """POST /v1/images over one engine: body limit, parsing, admission, the request timeout, the answer."""

    def __init__(self, engine, names: list[str], limits: RequestLimits, service: ServiceLimits, body_limit: int,
                 model: str | None = None, route=None):
        self.engine, self.names, self.limits, self.service = engine, names, limits, service
        self.body_limit = body_limit
        self.num_classes = engine.config.num_classes
        self.on_submitted = None  # an async callable awaited with each admitted request's Future (a baseline mode)
        # This server's model name (its application), and an async callable (model, body, request id) -> the answer
        # of the application serving another model, for requests that name one (a RequestError if none does).
        self.model, self.route = model, route

    async def read_body(self, chunks: AsyncIterator[bytes], content_length: str | None) -> bytes:
        """The body, refused (413) as soon as it is known to exceed the limit: by its Content-Length before a
        byte is read, else while it streams in."""
        if content_length is not None:
            if not content_length.isdigit():
                raise RequestError("body", f"Content-Length must be a number of bytes, got {content_length[:40]!r}")
            if int(content_length) > self.body_limit:
                raise BodyTooLarge(self.body_limit)
        body = bytearray()
        async for chunk in chunks:
            body += chunk
            if len(body) > self.body_limit:
                raise BodyTooLarge(self.body_limit)
        return bytes(body)

    async def images(self, chunks: AsyncIterator[bytes], content_length: str | None = None,
                     request_id: str | None = None, routed: bool = False) -> tuple[int, dict, dict]:
        """(status, JSON, headers): 200 with images; 400 naming the field; 413; 503 + Retry-After when the queue
        is full or the request ran past its timeout; 500 (logged with its request id) for a real fault. A request
        naming another model is answered by that model's server (`route`), unless it was `routed` here already."""
        request_id = request_id or uuid.uuid4().hex
        start = time.perf_counter()
        future = None
        try:
            body = await self.read_body(chunks, content_length)
            data = decode_body(body)
            model = requested_model(data)
            if model is not None and model != self.model:
                if routed or self.route is None:
                    raise RequestError("model", f"unknown model {shown(model)}: this server serves {self.model!r}")
                return await self.route(model, body, request_id)
            request = image_request(data, self.num_classes, self.names, self.limits)
            future = self.engine.submit(request)
            timeout = max(0.0, self.service.request_timeout_s - (time.perf_counter() - start))
            result = await asyncio.wait_for(self._result(future), timeout)
            cfg = request.sampler_cfg
            return 200, {"images": png_base64(result.images), "model": self.model, "seed": request.seed,
                         "steps": result.steps,
                         "sampler": cfg.method, "guidance_scale": cfg.guidance_scale,
                         "class_labels": request.labels, "request_id": request_id,
                         "timings": {k: round(v, 4) for k, v in result.timings.items()}}, {}
        except BodyTooLarge as e:
            return error(413, str(e), "body", request_id)
        except RequestError as e:
            return error(400, str(e), e.field, request_id)
        except QueueFullError as e:
            return error(503, str(e), None, request_id, e.retry_after_s)
        except asyncio.TimeoutError:
            future.cancel()  # its slots are freed at the next step boundary
            return error(503, f"the request did not finish within {self.service.request_timeout_s:g} s and was "
                              "cancelled; the service is loaded, retry later or ask for fewer steps or images",
                         None, request_id, self.engine.retry_after_s())
        except asyncio.CancelledError:  # the client went away: its slots are freed at the next step
            if future is not None:
                future.cancel()
            raise
        except Exception:
            log.exception(f"request {request_id}: internal error")
            return error(500, f"internal server error (request id {request_id}, in the service's log)", None,
                         request_id)

    async def _result(self, future):
        if self.on_submitted is not None:
            await self.on_submitted(future)
        return await asyncio.wrap_future(future)


class BodyTooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"the body is larger than this server's limit of {limit} bytes")
