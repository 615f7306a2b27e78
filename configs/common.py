"""The fields every training config has, with the official recipe's values. Experiment files
(``shapes_demo.py``, ``coco.py``) start from ``base()`` and change what they need."""
import ml_collections

from yolov9_jax import losses, models
from yolov9_jax.data import pipeline
from yolov9_jax.training import optimizer


def known_model(model, config_file):
  """``model`` (a config file's argument) when it names an architecture, else an error that lists
  them: at once, before a long job starts."""
  if model not in models.ARCHITECTURES:
    raise ValueError(f"{config_file}: unknown model {model!r}; expected one of "
                     f"{sorted(models.ARCHITECTURES)}")
  return model


def base() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.distributed = False  # True on TPU pods / multi-node GPU: jax.distributed.initialize()
  # Where no cluster manager tells JAX (TPU VMs and SLURM do), name the job's processes:
  config.coordinator_address = ""  # "host0:1234"
  config.num_processes = 0
  config.process_id = -1
  # A process that stops sending heartbeats this long (a preempted or crashed host) makes the JAX
  # coordination service stop every other process, which would otherwise wait in the next
  # collective forever. Heartbeats come from a background thread, so long compilations and
  # checkpoint writes do not count; a minute bounds what a pod loses (JAX's default: 100 s).
  config.heartbeat_timeout_seconds = 60
  config.model = ml_collections.ConfigDict(dict(
      name="yolov9-c",
      dtype="float32",      # compute dtype: bfloat16 on accelerators; params and BN stay float32
      remat=False,          # recompute each layer's insides in the backward pass: less
                            # activation memory (docs/benchmarks.md, TPU plan), more compute
      init_from="",         # a checkpoint to fine-tune from (ours: a workdir or checkpoint dir;
                            # official: .pt / .safetensors); the class head is re-initialised
  ))
  config.data = ml_collections.ConfigDict(dict(
      # "tfds": a prepared TFDS dataset; "yolo": a YOLO data YAML (data.path); "coco": instances
      # JSONs and image folders (data.train_*, data.eval_*); both prepared on first use into
      # data_dir and reused while unchanged (yolov9_jax/data/prepare.py); "shapes": the demo set
      source="tfds",
      name="coco/2017",     # source=tfds: the TFDS name (prepared as array_record)
      data_dir="",          # TFDS data dir ("" = TFDS default; yolo/coco/shapes: .cache/datasets)
      path="",              # source=yolo: the data YAML (path, train, val, test, names, nc)
      train_annotations="",  # source=coco: the train split's instances JSON
      train_images="",      # source=coco: the train split's image folder
      eval_images="",       # source=coco: the validation split's image folder
      train_split="train",
      eval_split="validation",  # a YOLO YAML's val; its test is "test"
      eval_annotations="",  # instances JSON for evaluation (COCO: segment areas); "" = from the
                            # split; source=coco: the validation split's JSON
      class_names=(),       # () = from the dataset's metadata
      # source="shapes": the synthetic set's size; generated once under data_dir (default .cache/)
      shapes=ml_collections.ConfigDict(dict(num_train=512, num_val=128, image_hw=(160, 160), seed=0)),
  ))
  config.augment = pipeline.default_config()
  config.optimizer = optimizer.default_config()
  config.loss = losses.default_config()
  config.train = ml_collections.ConfigDict(dict(
      batch_size=64,        # global, over all devices of all hosts; accumulated up to 64
      epochs=500,
      steps_per_epoch=0,    # 0 = dataset size // batch size
      log_every_steps=50,
      checkpoint_every_steps=1000,
      keep_checkpoints=3,
      max_consecutive_nonfinite=20,  # then stop: the data or the settings are broken
      shard_state=False,    # FSDP: split weights, EMA, momentum and gradient sum over the devices
  ))
  config.eval = ml_collections.ConfigDict(dict(
      every_epochs=10,      # and after the last epoch
      batch_size=64,
      conf_threshold=0.001, iou_threshold=0.7, max_det=300,  # the official val.py protocol
      rectangular=True,     # the official batches sorted by aspect ratio, one compilation per
                            # shape; False: image_size squares (one compilation, faster)
      num_images_logged=8,  # validation images with predicted boxes in TensorBoard
  ))
  return config
