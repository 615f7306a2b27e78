"""Detectors that run without this package's model code: the folded detector of eval.py (uint8
letterboxed images in; boxes in letterbox pixels, scores, classes and counts out, NMS on the graph
with static shapes) written as StableHLO, a TF SavedModel, TFLite or ONNX (``formats``), and
loaded back into one calling convention for detect.py, the tests and the benchmarks
(``runtimes``)."""
from yolov9_jax.deploy.spec import FORMATS, DetectorSpec

__all__ = ["FORMATS", "DetectorSpec"]
