"""Bad config values fail at start, with a message naming the field."""
from yolov9_jax import models, sharding
from yolov9_jax.data import prepare, sources


def _fail(field, value, expected):
  raise ValueError(f"config field {field}={value!r}: {expected}")


def validate(config, num_devices):
  """Every rule once, before anything is built: ``num_devices`` is the mesh's size."""
  if config.model.name not in models.ARCHITECTURES:
    _fail("model.name", config.model.name, f"expected one of {sorted(models.ARCHITECTURES)}")
  if config.model.dtype not in ("float32", "bfloat16", "float64"):
    _fail("model.dtype", config.model.dtype, "expected float32, bfloat16 or float64")
  models.check_image_size(config.augment.image_size, "config field augment.image_size")
  for field in ("train.batch_size", "train.epochs", "train.log_every_steps",
                "train.checkpoint_every_steps", "train.keep_checkpoints", "eval.batch_size",
                "eval.every_epochs", "augment.max_boxes", "augment.batches_per_block",
                "augment.prefetch_blocks"):
    section, name = field.split(".")
    value = config[section][name]
    if not isinstance(value, int) or value < 1:
      _fail(field, value, "expected a positive integer")
  if not isinstance(config.augment.workers, int) or config.augment.workers < 0:
    _fail("augment.workers", config.augment.workers, "expected >= 0 (0: build batches in this process)")
  if config.train.steps_per_epoch < 0:
    _fail("train.steps_per_epoch", config.train.steps_per_epoch, "expected >= 0 (0: from the data)")
  for field in ("train.batch_size", "eval.batch_size"):
    section, name = field.split(".")
    sharding.check_batch_size(config[section][name], num_devices, f"config field {field}")
  for name in ("mosaic", "mixup", "fliplr"):
    if not 0 <= config.augment[name] <= 1:
      _fail(f"augment.{name}", config.augment[name], "expected a probability in [0, 1]")
  if not 0 <= config.augment.scale < 1:
    _fail("augment.scale", config.augment.scale, "expected a value in [0, 1)")
  if not config.optimizer.lr0 > 0:  # NaN too
    _fail("optimizer.lr0", config.optimizer.lr0, "expected a positive learning rate")
  sources.check_source(config.data.source)
  if config.data.source in prepare.SOURCES:
    prepare.source_files(config.data)  # the fields a YOLO / COCO source needs are given
