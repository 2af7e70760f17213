"""Decoders of latent DiTs' samples, each a callable `images = decoder(latents)` (images in about [-1, 1]):
`VaeDecoder`, the diffusers AutoencoderKL in torch (the reference), and the export's decoder graph on the runtime its
DiT runs on (ONNX Runtime: CPU, or CUDA with I/O binding)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import DitexportError

VAE_SCALE = 0.18215  # the SD VAE latent scale used by DiT


class VaeDecoder:
    """The Stable Diffusion VAE decoder (diffusers `AutoencoderKL`) from a local directory."""

    name = "vae (diffusers, torch)"

    def __init__(self, path: str | Path, device="cpu", dtype=torch.float32):
        try:
            from diffusers import AutoencoderKL  # pyright: ignore[reportPrivateImportUsage]  (diffusers' public name)
        except ImportError:
            raise DitexportError("the VAE decoder needs diffusers: pip install 'ditexport[vae]'") from None
        if not Path(path).is_dir():
            raise FileNotFoundError(f"VAE directory not found: {path}")
        vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True)
        self.vae = vae.to(device=device, dtype=dtype)  # pyright: ignore[reportCallIssue]  (diffusers' own typing)
        self.vae.eval()
        self.dtype = dtype

    @classmethod
    def from_vae(cls, vae, dtype=torch.float32) -> "VaeDecoder":
        """A decoder over an AutoencoderKL already loaded (in eval mode, on its device)."""
        decoder = cls.__new__(cls)
        decoder.vae, decoder.dtype = vae, dtype
        return decoder

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.to(self.vae.device)
        return self.vae.decode((latents / VAE_SCALE).to(self.dtype)).sample.float()


class OnnxRuntimeDecoder:
    """The exported VAE decoder graph (latents as the DiT samples them -> images in about [-1, 1]) on ONNX Runtime."""

    name = "vae (onnxruntime)"

    def __init__(self, onnx_path: str | Path, *, image_shape: tuple[int, int, int], device: torch.device | None = None,
                 providers: list | None = None, threads: int | None = None, label: str | None = None):
        from .onnxruntime_backend import load_session, providers_with_stream, session_device

        self.onnx_path = Path(onnx_path)
        self.label = label or self.onnx_path.name  # what reports call it (an emulated copy reports its original)
        self.image_shape = tuple(image_shape)  # (C, H, W) of one image
        providers, self.stream = providers_with_stream(providers, device)
        self.session = load_session(self.onnx_path, providers, threads)
        self.device = session_device(self.session, self.stream, self.onnx_path)

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        from .onnxruntime_backend import run_session

        shape = (latents.shape[0], *self.image_shape)
        return run_session(self.session, {"latents": latents.float()}, "images", shape, self.device, self.stream)

    def close(self) -> None:
        self.__dict__.pop("session", None)


class TensorRTDecoder:
    """The export's VAE decoder plan (built by the engine stage beside the DiT's) on TensorRT; float32 latents in,
    float32 images out on the GPU, batches above the plan's profile split."""

    name = "vae (tensorrt)"

    def __init__(self, plan_path: str | Path, *, device: torch.device, cuda_graph: bool = True):
        from .tensorrt_backend import open_runner

        self.plan_path = Path(plan_path)
        self.label = self.plan_path.name
        self.device = device
        self.runner = open_runner(self.plan_path, ("latents",), device, cuda_graph, verify=True, output="images")

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.to(self.device, torch.float32)
        step = self.runner.max_batch
        return torch.cat([self.runner(latents[i:i + step]) for i in range(0, latents.shape[0], step)])

    def close(self) -> None:
        self.runner.close()


def open_export_decoder(export_dir: Path, kind: str, precision: str, *, device=None, threads: int | None = None):
    """The export's VAE decoder graph for a DiT running in `precision` on `kind` (fp32 DiT: the fp32 decoder, any
    other: the fp16 one where it was built), verified against the manifest under the export's read lock; None for
    an export without one."""
    from ..artifacts import VAE_GRAPH, ExportEntry, read_manifest
    from ..locking import read_lock
    from ..verification import verify_export

    export_dir = Path(export_dir)
    with read_lock(export_dir):
        manifest = read_manifest(export_dir)
        record = manifest.get("vae")
        if not record:
            return None
        entry = ExportEntry(export_dir, manifest)
        path = (entry.graph_path(VAE_GRAPH, "fp16") if precision != "fp32" else None) or \
            entry.graph_path(VAE_GRAPH, "fp32")
        if path is None:
            raise DitexportError(f"the export in {export_dir} records a VAE but has no VAE graph; rebuild it")
        verify_export(export_dir, [path], all_sizes=False)
        image_shape = (record["out_channels"], record["image_size"], record["image_size"])
        if kind == "tensorrt":
            from ..engine.plans import EngineError, current_environment, find_plan

            device = torch.device(device) if device is not None else torch.device("cuda")
            try:
                plan = find_plan(export_dir, stem=VAE_GRAPH, environment=current_environment(device))
            except EngineError as e:
                raise EngineError(f"the export's VAE decoder has no TensorRT engine for this GPU ({e}); decode on "
                                  "ONNX Runtime with --backend onnxruntime, or rebuild the engines with "
                                  "python -m ditexport build") from None
            return TensorRTDecoder(plan, device=device)  # the plan is checked against its SHA-256 as it loads
        if isinstance(device, str):
            device = None if device == "auto" else torch.device(device)
        return OnnxRuntimeDecoder(path, image_shape=image_shape, device=device, threads=threads)
