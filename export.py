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
from flax import serialization

from configs import common
from yolov9_jax import interop, models, paths
from yolov9_jax.training import checkpoint

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "our checkpoint: an orbax checkpoint of the training state (a step "
    "directory of the run's checkpoints, or its 'state' item), or a flax.serialization msgpack of "
    "the model variables ({'params', 'batch_stats'}) or of a training state", required=True)
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


def load_variables(path, ema=True):
  """(model variables ``{"params", "batch_stats"}``, the run's checkpoint metadata or None) from
  one of our checkpoints (see --checkpoint): of a training state, its EMA weights when ``ema``."""
  path = paths.user_path(path)
  if path.is_dir():  # a workdir or a checkpoint of train.py: the model comes from its config
    _, variables, meta = checkpoint.load_model_variables(path, ema=ema)
    return variables, meta
  restored = serialization.msgpack_restore(path.read_bytes())
  prefix = "ema_" if ema and "ema_params" in restored else ""
  if f"{prefix}params" not in restored:
    raise ValueError(f"{path} holds {sorted(restored)[:10]}: expected model variables "
                     "('params', 'batch_stats') or a training state ('ema_params', ...)")
  return {"params": restored[f"{prefix}params"],
          "batch_stats": restored.get(f"{prefix}batch_stats", {})}, None


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
  variables, meta = load_variables(_CHECKPOINT.value, ema=_EMA.value)
  class_names = _CLASS_NAMES.value or (meta or {}).get("class_names")
  for path in interop.export_official_weights(
      _ARCHITECTURE.value, variables, _OUTPUT.value, dtype=_DTYPE.value,
      official_repository=_OFFICIAL_REPO.value, class_names=class_names,
      hyp=interop.official_hyperparameters(run_config(meta)), python=_OFFICIAL_PYTHON.value):
    print(path)


if __name__ == "__main__":
  app.run(main)
