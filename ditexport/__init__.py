"""ditexport: a class-conditional DiT from PyTorch to validated ONNX, TensorRT engines, a sampler, a demo and a service.

    import ditexport

    pipe = ditexport.Pipeline.from_export(ditexport.build("digits").path, backend="onnxruntime")
    images = pipe(class_labels=[3, 1, 4], num_steps=10, sampler="dpmpp-2m", seed=0).images

The names below are imported on first use, so `import ditexport` (and the CLI's `--help`) does not load torch.
"""

from .lazy import lazy_exports

__version__ = "0.1.0"

# public name -> the module that defines it
_API = {
    "load_model": "api", "build": "api", "open_export": "api", "Export": "api",
    "ValidationFailedError": "api",
    "Pipeline": "pipeline", "PipelineOutput": "pipeline",
    "SamplerConfig": "settings", "BuildSettings": "settings",
    "DitexportError": "errors", "UsageError": "errors",
}

__all__ = ["__version__", *_API]

__getattr__ = lazy_exports(__name__, globals(), _API)


def __dir__():
    return sorted(__all__)
