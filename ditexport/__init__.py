"""ditexport: a class-conditional DiT from PyTorch to validated ONNX, TensorRT engines and a demo."""

__version__ = "0.1.0"
