"""kdpipe: a model-compression pipeline (teacher -> distilled students -> ONNX on the edge)."""

__version__ = "0.1.0"
