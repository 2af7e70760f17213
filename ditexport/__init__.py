"""ditexport: a class-conditional DiT from PyTorch to validated ONNX, TensorRT engines, a sampler, a demo and a service.

    import ditexport

    pipe = ditexport.Pipeline.from_export(ditexport.build("digits").path, backend="onnxruntime")
    images = pipe(class_labels=[3, 1, 4], num_steps=10, sampler="dpmpp-2m", seed=0).images

The names below are imported on first use, so `import ditexport` (and the CLI's `--help`) does not load torch.
"""

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


def __getattr__(name: str):
    if name in _API:
        import importlib

        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ditexport' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
