"""Adaptive computation modules of the thesis (SGS, ATS) as `vqs` custom ops, and their ONNX
functions."""
