"""Export a detector to deploy (``--format=stablehlo|saved_model|tflite|onnx``), or our weights as
official PyTorch weights (``--format=pt``, the default).

Deployable detectors are eval.py's folded detector with NMS on the graph: uint8 letterboxed images
in; boxes (letterbox pixels), scores, classes and counts out (``--nms=false``: every anchor's boxes
and class scores, for an NMS of one's own). The class names and settings travel in each file's
metadata, and ``python detect.py --weights=<the exported file> images/`` runs it:

  python export.py --checkpoint=runs/shapes_demo --architecture=gelan-t --format=onnx \
      --output=exported/gelan-t --image_size=640 --batch_size=0    # exported/gelan-t.onnx, any batch

(``stablehlo``: <output>.stablehlo + .json, any batch with --batch_size=0; ``saved_model``:
<output>_saved_model/, any batch with 0; ``tflite``: <output>.tflite, a fixed batch, --dtype=float16
for half-size weights; ``onnx``: <output>.onnx, any batch with 0.) docs/deploy.md has the table.

Official PyTorch weights: state_dict ``.pt`` files that the official
model's ``load_state_dict(..., strict=True)`` takes, and the same tensors as ``.safetensors``.

  python export.py --checkpoint=runs/demo/checkpoints/1000 --architecture=yolov9-t \
      --output=exported/yolov9-t --dtype=float16

writes exported/yolov9-t.pt and .safetensors (yolov9-t with its auxiliary branch, to train on
with the official code) and exported/yolov9-t-converted.pt and .safetensors (the main branch in
the gelan-t layout, for the official detect/val/export scripts and TensorRT/ONNX tooling).
PyTorch is not needed. Given a checkout of the official repository and a Python with PyTorch,
--official_repo also writes <output>-official.pt and <output>-converted-official.pt, whole-model
checkpoints that the official detect.py/val.py load directly:

  python export.py --checkpoint=... --architecture=yolov9-t --output=exported/yolov9-t \
      --official_repo=../yolov9 --official_python=../yolov9/.venv/bin/python --class_names=cat,dog
"""
import sys

from absl import app, flags
from configs import common
from yolov9_jax import deploy, interop, models, weights
from yolov9_jax.deploy import formats

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "the weights: a train.py workdir or one of its checkpoint (step) "
    "directories, or a weights file (.msgpack or .npz of the model variables, an official .pt "
    "or .safetensors); local or gs://", required=True)
_ARCHITECTURE = flags.DEFINE_enum("architecture", None, list(models.ARCHITECTURES),
                                  "the architecture the checkpoint was trained as", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "path prefix of the files written", required=True)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "float16"], "dtype of the floats written "
                           "(pt and tflite)")
_OFFICIAL_REPO = flags.DEFINE_string(
    "official_repo", None, "a checkout of the official repository (WongKinYiu/yolov9): also write "
    "the official whole-model checkpoints, built by its code")
_OFFICIAL_PYTHON = flags.DEFINE_string(
    "official_python", sys.executable, "the Python (with PyTorch and the official requirements) "
    "that runs the official code for --official_repo")
_CLASS_NAMES = flags.DEFINE_list("class_names", None, "class names stored in the official "
                                 "checkpoints of --official_repo (default: the run's, else "
                                 "class0, class1, ...)")
_FORMAT = flags.DEFINE_string(
    "format", "pt", f"what to write: pt (official PyTorch weights), {', '.join(deploy.FORMATS)}")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 640, "deployable formats: the square input side "
                                   "in pixels, a multiple of 32")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 1, "deployable formats: images per call; 0 for "
                                   "any batch (stablehlo, saved_model, onnx)")
_CONF = flags.DEFINE_float("conf_threshold", 0.25, "deployable formats: minimum class score")
_IOU = flags.DEFINE_float("iou_threshold", 0.45, "deployable formats: NMS IoU threshold")
_MAX_DET = flags.DEFINE_integer("max_det", 300, "deployable formats: detections per image at most")
_MULTI_LABEL = flags.DEFINE_bool("multi_label", False, "deployable formats: every class above the "
                                 "threshold per anchor (the evaluation setting) rather than the best")
_NMS = flags.DEFINE_bool("nms", True, "deployable formats: NMS in the graph; false: raw boxes and "
                         "class scores of every anchor")
_EMA = flags.DEFINE_bool("ema", True, "export the EMA weights of a training state (as the official "
                         "code saves them) rather than its raw training weights")


def run_config(meta):
  """The training config of the run that saved ``meta`` (its recipe goes into the official
  checkpoints, as the official training's does): the defaults, with the run's saved values."""
  config = common.base()
  for group in ("optimizer", "augment", "loss"):
    saved = ((meta or {}).get("config") or {}).get(group) or {}
    config[group].update({k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()
                          if k in config[group]})
  return config


def main(argv):
  del argv
  if _FORMAT.value != "pt" and _FORMAT.value not in deploy.FORMATS:
    raise ValueError(f"unknown --format {_FORMAT.value!r}: one of pt, {', '.join(deploy.FORMATS)}")
  variables, info = weights.load(_CHECKPOINT.value, _ARCHITECTURE.value, ema=_EMA.value)
  meta = info["meta"]
  class_names = _CLASS_NAMES.value or info.get("class_names") or (meta or {}).get("class_names")
  if _FORMAT.value != "pt":
    _, written = formats.export_detector(_FORMAT.value, _ARCHITECTURE.value, variables, {
        "class_names": class_names, "image_size": _IMAGE_SIZE.value,
        "batch_size": _BATCH_SIZE.value or None, "conf_threshold": _CONF.value,
        "iou_threshold": _IOU.value, "max_det": _MAX_DET.value, "multi_label": _MULTI_LABEL.value,
        "nms": _NMS.value, "dtype": _DTYPE.value}, _OUTPUT.value)
    for path in written:
      print(path)
    return
  for path in interop.export_official_weights(
      _ARCHITECTURE.value, variables, _OUTPUT.value, dtype=_DTYPE.value,
      official_repository=_OFFICIAL_REPO.value, class_names=class_names,
      hyp=interop.official_hyperparameters(run_config(meta)), python=_OFFICIAL_PYTHON.value):
    print(path)


def _main_with_clear_errors(argv):
  try:
    main(argv)
  except (FileNotFoundError, ValueError) as error:
    sys.exit(f"export.py: {error}")


if __name__ == "__main__":
  app.run(_main_with_clear_errors)
