"""Export our weights as official PyTorch weights: state_dict ``.pt`` files that the official
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
from yolov9_jax import interop, models, weights

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "the weights: a train.py workdir or one of its checkpoint (step) "
    "directories, or a weights file (.msgpack or .npz of the model variables, an official .pt "
    "or .safetensors); local or gs://", required=True)
_ARCHITECTURE = flags.DEFINE_enum("architecture", None, list(models.ARCHITECTURES),
                                  "the architecture the checkpoint was trained as", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "path prefix of the files written", required=True)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "float16"], "dtype of the floats written")
_OFFICIAL_REPO = flags.DEFINE_string(
    "official_repo", None, "a checkout of the official repository (WongKinYiu/yolov9): also write "
    "the official whole-model checkpoints, built by its code")
_OFFICIAL_PYTHON = flags.DEFINE_string(
    "official_python", sys.executable, "the Python (with PyTorch and the official requirements) "
    "that runs the official code for --official_repo")
_CLASS_NAMES = flags.DEFINE_list("class_names", None, "class names stored in the official "
                                 "checkpoints of --official_repo (default: the run's, else "
                                 "class0, class1, ...)")
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
  variables, info = weights.load(_CHECKPOINT.value, _ARCHITECTURE.value, ema=_EMA.value)
  meta = info["meta"]
  class_names = _CLASS_NAMES.value or (meta or {}).get("class_names")
  for path in interop.export_official_weights(
      _ARCHITECTURE.value, variables, _OUTPUT.value, dtype=_DTYPE.value,
      official_repository=_OFFICIAL_REPO.value, class_names=class_names,
      hyp=interop.official_hyperparameters(run_config(meta)), python=_OFFICIAL_PYTHON.value):
    print(path)


if __name__ == "__main__":
  app.run(main)
