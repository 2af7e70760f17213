"""The demo's requests sampled by a running `python -m ditexport serve` instead of a local backend."""
from __future__ import annotations

import time

import numpy as np
import torch

from ..class_names import class_label
from ..pipeline import SampleResult
from .limits import NO_BLEND, DemoInputError, DemoLimits
from .service import GenerateRequest, GenerateResponse, displayable


class RemoteEntry:
    """The one model a service serves, as the demo's menus show it."""

    def __init__(self, model: dict):
        self.backend = f"{model['backend']} ({model['precision']})"
        self.note = ""

    def backend_choices(self) -> list[str]:
        return [self.backend]


class RemoteService:
    """`demo --server URL`: the demo's service interface (`model_keys`, `entry`, `class_choices`, `generate`),
    answered by the HTTP service at `url`, which enforces its own limits. Blending needs a local backend."""

    def __init__(self, url: str, display_size: int = 128, limits: DemoLimits | None = None):
        from ..serving.client import ImageClient

        self.client = ImageClient(url)
        self.display_size = display_size
        self.limits = limits or DemoLimits()
        self.model = self.client.models()["models"][0]
        self.key = f"service {self.client.url}"
        num_classes = int(self.model["config"]["num_classes"])
        names = list(self.model["class_names"])
        self.class_names = names + [str(i) for i in range(len(names), num_classes)]

    def model_keys(self) -> list[str]:
        return [self.key]

    def entry(self, key: str) -> RemoteEntry:
        return RemoteEntry(self.model)

    def class_choices(self, key: str) -> list[tuple[str, int]]:
        return [(class_label(i, n), i) for i, n in enumerate(self.class_names)]

    def widest_hidden_size(self) -> int:
        return int(self.model["config"]["hidden_size"])

    def warm_up(self) -> None:
        """The service warms itself up."""

    def close(self) -> None:
        """Nothing is held open between requests."""

    def generate(self, request: GenerateRequest, progress: bool = True, on_wait=None) -> GenerateResponse:
        r, start = request, time.perf_counter()
        if r.blend_class != NO_BLEND:
            raise DemoInputError("blending two classes needs a local backend; the service samples plain classes")
        labels = [int(r.class_index)] * int(r.num_images)
        pixels, answer = self.client.images(labels, steps=int(r.steps), sampler=r.sampler,
                                            guidance_scale=float(r.guidance), seed=int(r.seed))
        # uint8 -> [0, 1] floats that to_uint8 maps back to the same bytes.
        images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).double().div(255).float()
        total = time.perf_counter() - start
        result = SampleResult(images=images, labels=labels, seed=int(r.seed),
                              backend=f"remote {self.model['backend']}", precision=self.model["precision"],
                              steps=answer["steps"], total_s=total, sampler_s=answer["timings"]["sampling_s"],
                              decode_s=answer["timings"]["decode_s"], timings=answer["timings"])
        captions = [self.class_names[r.class_index] if r.class_index < len(self.class_names)
                    else str(r.class_index)] * len(labels)
        return GenerateResponse(images=displayable(images, self.display_size), captions=captions, result=result,
                                summary=f"{len(labels)} images from {self.client.url} in {total:.2f} s")
