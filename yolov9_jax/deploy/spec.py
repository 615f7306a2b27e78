"""What an exported detector is: its settings, stored as JSON metadata in every exported file, and
the pure function that every format serialises."""
import dataclasses
import json
from typing import Optional

import jax.numpy as jnp

from yolov9_jax import models
from yolov9_jax.evaluation import inference, nms

# --format values of export.py besides the PyTorch weights, with the file each one writes.
FORMATS = {"stablehlo": ".stablehlo", "saved_model": "_saved_model", "tflite": ".tflite",
           "onnx": ".onnx"}
# The metadata key (ONNX metadata_props, TFLite metadata, the SavedModel's and StableHLO's JSON).
METADATA_KEY = "yolov9_jax"
NMS_OUTPUTS = ("boxes_xyxy_px", "scores", "classes", "count")
RAW_OUTPUTS = ("boxes_xyxy_px", "class_scores")


@dataclasses.dataclass(frozen=True)
class DetectorSpec:
  """An exported detector's settings. Inputs: ``images`` (batch, image_size, image_size, 3) uint8
  RGB, letterboxed as detect.py does. Outputs with ``nms``: boxes_xyxy_px (B, max_det, 4) in input
  (letterbox) pixels, scores (B, max_det), classes (B, max_det) int32, count (B,) int32 (the rows
  past count are zeros); without: boxes_xyxy_px (B, A, 4) and class_scores (B, A, C) of every
  anchor, for an NMS of one's own (TensorRT's EfficientNMS takes them with box_coding 0)."""
  architecture: str             # the fused (gelan) layout that runs
  class_names: tuple
  image_size: int               # pixels, square
  batch_size: Optional[int]     # None: any batch
  conf_threshold: float
  iou_threshold: float
  max_det: int
  multi_label: bool
  nms: bool = True
  dtype: str = "float32"        # the weights' storage in the file (float16: TFLite only)

  @property
  def output_names(self):
    return NMS_OUTPUTS if self.nms else RAW_OUTPUTS

  def to_json(self):
    return json.dumps({"format": "yolov9_jax detector", "version": 1,
                       **dataclasses.asdict(self), "class_names": list(self.class_names)})

  @classmethod
  def from_json(cls, text):
    fields = json.loads(text)
    if fields.pop("format", None) != "yolov9_jax detector":
      raise ValueError("not the metadata of a yolov9_jax exported detector")
    fields.pop("version")
    return cls(**{**fields, "class_names": tuple(fields["class_names"])})


def detector_function(model, fused_variables, spec):
  """images (B, S, S, 3) uint8 -> {name: array} of ``spec.output_names``, the weights closed over
  (every format stores them as constants). With NMS this is eval.py's detector itself
  (``inference.detection_function``)."""
  if spec.nms:
    detect = inference.detection_function(model, spec.conf_threshold, spec.iou_threshold,
                                          spec.max_det, spec.multi_label)

    def end_to_end(images_uint8):
      detections = detect(fused_variables, images_uint8)
      return {"boxes_xyxy_px": detections.boxes_xyxy_px, "scores": detections.scores,
              "classes": detections.classes, "count": detections.count}
    return end_to_end

  def raw(images_uint8):
    predictions = model.apply(fused_variables, images_uint8.astype(model.dtype) / 255,
                              train=False)["main"].astype(jnp.float32)
    return {"boxes_xyxy_px": nms.boxes_xyxy(predictions), "class_scores": predictions[..., 4:]}
  return raw


def check_request(spec, export_format, num_anchors_times_classes=None):
  """A clear error for what ``export_format`` cannot hold."""
  if export_format not in FORMATS:
    raise ValueError(f"unknown format {export_format!r}: one of {', '.join(FORMATS)} (or pt)")
  models.check_image_size(spec.image_size, "--image_size")
  if spec.batch_size is not None and spec.batch_size < 1:
    raise ValueError(f"--batch_size {spec.batch_size}: at least 1 (0 for any batch)")
  if export_format == "tflite" and spec.batch_size is None:
    raise ValueError("tflite needs a fixed --batch_size (TFLite graphs have static shapes)")
  if spec.dtype == "float16" and export_format != "tflite":
    raise ValueError(f"--dtype=float16 is for tflite (and the PyTorch weights), not {export_format}")
  if (spec.nms and export_format in ("saved_model", "tflite") and num_anchors_times_classes
      and num_anchors_times_classes > nms.MAX_CANDIDATES):
    raise ValueError(
        f"{export_format}: multi-label NMS over {num_anchors_times_classes} (anchor, class) pairs "
        f"needs a top-k of {nms.MAX_CANDIDATES}, which TensorFlow's StableHLO reader in tf 2.21 "
        "cannot load; export single-label (the detect default), or to stablehlo or onnx")
