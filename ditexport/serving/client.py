"""A small client of the HTTP service (standard library only), for the demo and scripts."""
from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request

import numpy as np

from ..errors import DitexportError


class ServiceError(DitexportError):
    """The service refused a request (4xx/503) or could not be reached; `status` 0 when unreachable."""

    def __init__(self, message: str, status: int = 0, field: str | None = None, retry_after_s: float | None = None):
        super().__init__(message)
        self.status, self.field, self.retry_after_s = status, field, retry_after_s


class ImageClient:
    """POST /v1/images, GET /v1/models and /healthz of a running `ditexport serve` at `url`."""

    def __init__(self, url: str, timeout_s: float = 300.0):
        self.url, self.timeout_s = url.rstrip("/"), timeout_s

    def _call(self, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            try:
                answer = json.loads(e.read())
            except ValueError:
                answer = {}
            retry = e.headers.get("Retry-After")
            raise ServiceError(f"{self.url}{path}: {answer.get('error', e.reason)}", e.code, answer.get("field"),
                               float(retry) if retry else None) from None
        except OSError as e:
            raise ServiceError(f"cannot reach the service at {self.url}: {e}") from None

    def health(self) -> dict:
        return self._call("/healthz")

    def models(self) -> dict:
        return self._call("/v1/models")

    def images(self, class_labels: list, **fields) -> tuple[list[np.ndarray], dict]:
        """(H, W, C) uint8 images and the whole answer; `fields`: steps, sampler, guidance_scale, seed, eta."""
        from PIL import Image

        answer = self._call("/v1/images", {"class_labels": class_labels, **fields})
        images = []
        for png in answer["images"]:
            pixels = np.array(Image.open(io.BytesIO(base64.b64decode(png))))
            images.append(pixels[:, :, None] if pixels.ndim == 2 else pixels)
        return images, answer
