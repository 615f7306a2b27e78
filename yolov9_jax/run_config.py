"""The training config that eval.py and detect.py take their dataset and model from, so that every
entry point names a dataset the same way: ``--config=configs/custom.py:gelan-c
--config.data.path=data.yaml`` (any ``--config.*`` field, as train.py takes them), or, without
``--config``, the config saved in the checkpoints of a train.py workdir given as ``--weights``.
"""
import sys

import ml_collections
from absl import flags
from ml_collections import config_flags

from configs import common
from yolov9_jax import paths
from yolov9_jax.data import prepare, sources
from yolov9_jax.training import checkpoint

HELP = ("a training config, configs/<file>.py[:argument], with any --config.<field>=value "
        "override, exactly as train.py takes it: its data fields name the dataset (source=tfds, "
        "yolo, coco or shapes) and model.name the architecture. Default: the config saved with a "
        "train.py workdir or checkpoint given as --weights")


WEIGHTS_HELP = ("a train.py workdir or checkpoint (EMA weights), or a weights file: .msgpack, "
                ".npz, an official .pt or .safetensors")


def define_model_flags(flag_values, weights_help=WEIGHTS_HELP):
  """--config, --model, --weights and --image_size, which eval.py and detect.py share (each its
  own ``flag_values``: both run in one test process). ``model_and_image_size`` reads them."""
  config_flags.DEFINE_config_file("config", None, HELP, flag_values=flag_values, lock_config=False)
  flags.DEFINE_string("model", None, "architecture, e.g. gelan-c or yolov9-c (default: the "
                      "config's model.name)", flag_values=flag_values)
  flags.DEFINE_string("weights", None, weights_help, flag_values=flag_values)
  flags.DEFINE_integer("image_size", None, "letterbox side, a multiple of 32 (default: the "
                       "config's augment.image_size, else 640)", flag_values=flag_values)


def model_and_image_size(flag_values, config, program):
  """(architecture, letterbox side): the flags', else the training ``config``'s (None: none
  given), else 640 for the side; an error naming ``program`` when no architecture is known."""
  model = flag_values.model or (config.model.name if config else None)
  if model is None:
    raise ValueError(f"{program} needs --model (or a --config, or a train.py workdir as --weights)")
  return model, flag_values.image_size or (config.augment.image_size if config else 640)


def parse(flag_values, argv):
  """Parses ``argv`` into ``flag_values`` (anew: a program may be run twice in one process);
  returns the arguments that are not flags. config_flags reads the ``--config.*`` overrides from
  ``sys.argv`` at parse time, so ``argv`` stands in for it meanwhile (tests, other programs)."""
  saved_argv = sys.argv
  sys.argv = list(argv)
  try:
    flag_values.unparse_flags()
    return flag_values(argv)
  finally:
    sys.argv = saved_argv


def _merged(defaults, saved):
  """``defaults`` (a ConfigDict) with the values of ``saved`` (a dict) where a field of that name
  exists: a config saved by an older version still reads, with today's defaults for new fields."""
  for key, value in saved.items():
    if key not in defaults:
      continue
    if isinstance(defaults[key], ml_collections.ConfigDict) and isinstance(value, dict):
      _merged(defaults[key], value)
    else:
      defaults[key] = tuple(value) if isinstance(value, list) else value
  return defaults


def training_config(config, weights):
  """``config`` (the --config flag's value) when given; else the config saved with the train.py
  workdir or checkpoint directory ``weights``; else None (a weights file carries no dataset)."""
  if config is not None:
    return config
  if weights and paths.user_path(weights).is_dir():
    try:
      saved = checkpoint.read_meta(weights).get("config")
    except (FileNotFoundError, ValueError):
      return None
    if saved:
      return _merged(common.base(), saved)
  return None


def open_dataset(data_config, log=print):
  """``sources.open_datasets`` for a single-process command, preparing a YOLO or COCO source
  first where it is not prepared (or changed since)."""
  if data_config.source in prepare.SOURCES:
    prepare.ensure_prepared(data_config, log=log)
  return sources.open_datasets(data_config)
