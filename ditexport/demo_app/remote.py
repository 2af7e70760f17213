"""The demo's requests sampled by a running `python -m ditexport serve` instead of a local backend."""
from __future__ import annotations

import time

import numpy as np
import torch

from ..pipeline import SampleResult
from .service import GenerateRequest, GenerateResponse, displayable


class RemoteService:
    """`DemoService.generate(request)`'s shape, answered by the HTTP service at `url`."""

    def __init__(self, url: str, display_size: int = 128):
        from ..serving.client import ImageClient

        self.client = ImageClient(url)
        self.display_size = display_size
        self.model = self.client.models()["models"][0]

    def generate(self, request: GenerateRequest, progress: bool = True, on_wait=None) -> GenerateResponse:
        r, start = request, time.perf_counter()
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
        names = self.model["class_names"]
        captions = [names[r.class_index] if r.class_index < len(names) else str(r.class_index)] * len(labels)
        return GenerateResponse(images=displayable(images, self.display_size), captions=captions, result=result,
                                summary=f"{len(labels)} images from {self.client.url} in {total:.2f} s")
