"""The OpenAPI description of the HTTP API (FastAPI's /docs and /openapi.json): the request with the defaults of
`sample` (`api.DEFAULTS`, read from `SamplerConfig`) and this server's limits (`RequestLimits`), the answers.
Documentation only: requests are parsed and checked by `api.py`, which streams the body under its size limit."""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, Field, create_model

from ..limits import RequestLimits
from ..sampler import SAMPLING_METHODS
from .api import DEFAULTS


def image_request_model(limits: RequestLimits) -> type[BaseModel]:
    """POST /v1/images's body, as this server accepts it."""
    low = {name: lo for name, _, lo, _ in limits.bounds(1, 1, 1.0)}
    return create_model(
        "ImagesRequest",
        class_labels=(list[Union[int, str]], Field(
            ..., min_length=low["num_images"], max_length=limits.max_images, examples=[[3, 1]],
            description="one image per label: a class index, or a class name where the model has names (GET "
                        "/v1/models lists each model's)")),
        steps=(int, Field(DEFAULTS["steps"], ge=low["num_steps"], le=limits.max_steps,
                          description="sampling steps (as `sample --steps`)")),
        sampler=(Literal[SAMPLING_METHODS], Field(DEFAULTS["sampler"], description="as `sample --sampler`")),
        guidance_scale=(float, Field(DEFAULTS["guidance_scale"], ge=low["guidance_scale"], le=limits.max_guidance,
                                     description="classifier-free guidance; 1 disables it")),
        seed=(int, Field(DEFAULTS["seed"], description="the seed of the noise, as `sample --seed`: the same seed "
                                                       "gives the same images whatever the request is batched with")),
        eta=(float, Field(DEFAULTS["eta"], description="DDIM stochasticity, between 0 and 1 (as `sample --eta`)")),
        model=(Optional[str], Field(None, description="the model to sample: an `application` listed by GET "
                                                      "/v1/models; the request goes to that application (default: "
                                                      "this one)")),
    )


class ImagesAnswer(BaseModel):
    """200: the images, pixel-identical to `sample`'s with the same export, backend, labels, seed and sampler."""
    images: list[str] = Field(description="one base64 PNG per class label")
    model: Optional[str] = Field(description="the application that sampled them")
    seed: int
    steps: int
    sampler: str
    guidance_scale: float
    class_labels: list[int] = Field(description="the labels as class indices")
    request_id: str
    timings: dict[str, float] = Field(description="queued_s, sampling_s, decode_s, total_s")


class ErrorAnswer(BaseModel):
    """A refusal, decided before any work (4xx), or a service that is full or a fault (503, 500)."""
    error: str
    field: Optional[str] = Field(None, description="the request's field at fault")
    request_id: Optional[str] = None


def images_openapi(limits: RequestLimits) -> dict:
    """The keyword arguments of FastAPI's route decorator that document POST /v1/images."""
    request = image_request_model(limits)
    return {
        "openapi_extra": {"requestBody": {"required": True, "content": {
            "application/json": {"schema": request.model_json_schema()}}}},
        "responses": {200: {"model": ImagesAnswer},
                      400: {"model": ErrorAnswer, "description": "a field out of range or malformed, named"},
                      413: {"model": ErrorAnswer, "description": "a body over the limit"},
                      503: {"model": ErrorAnswer, "description": "full, past its timeout, or its replica died: "
                                                                 "retry after the Retry-After header's seconds"}},
        "summary": "Sample class-conditional images",
    }
