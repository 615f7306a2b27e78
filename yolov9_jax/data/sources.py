"""The datasets a training config names: a prepared TFDS dataset, a user's YOLO data YAML or COCO
JSONs (prepared on first use, ``data/prepare.py``), or the built-in shapes set (generated and
prepared on first use). All come back as random-access TFDS data sources."""
import dataclasses
import os

import tensorflow_datasets as tfds

from yolov9_jax import paths
from yolov9_jax.data import coco_format, prepare, shapes
from yolov9_jax.evaluation import coco_metrics


@dataclasses.dataclass
class Datasets:
  train: object                # TFDS data source (random access)
  eval: object
  class_names: list
  category_ids: list           # label -> the dataset's own category id (COCO: 1..90)
  eval_annotations: str        # COCO instances JSON of the eval split ("" = build from the split)


def shapes_builder(data_dir, num_train, num_val, image_hw, seed=0):
  """The shapes set with ``num_train`` / ``num_val`` images, generated and prepared once under
  ``data_dir`` (reused when it is already there). Returns (builder, val annotations path)."""
  if paths.is_remote(data_dir):
    raise ValueError(f"data.data_dir={data_dir}: the shapes set is generated on a local disk; "
                     "generate it locally and copy the prepared folder, or use data.source=tfds")
  data_dir = paths.user_path(data_dir).absolute()
  name = f"shapes_{num_train}_{num_val}_{image_hw[0]}x{image_hw[1]}_seed{seed}"
  raw = data_dir / "raw" / name
  val_annotations = raw / "validation" / "annotations.json"
  try:
    builder = tfds.builder(name, data_dir=str(data_dir))
    if val_annotations.exists():
      return builder, val_annotations
  except Exception:  # noqa: BLE001  not prepared yet (TFDS raises DatasetNotFoundError and kin)
    pass
  splits = {}
  for split, count, split_seed in (("train", num_train, seed), ("validation", num_val, seed + 1)):
    annotations = shapes.generate(raw / split, num_images=count, image_hw=image_hw, seed=split_seed)
    splits[split] = (annotations, raw / split / "images")
  builder, _ = coco_format.prepare_splits(splits, data_dir, name)
  return builder, val_annotations


SOURCES = ("tfds", "shapes") + prepare.SOURCES


def check_source(source):
  """ValueError naming the config field unless ``source`` is one of ``SOURCES``."""
  if source not in SOURCES:
    raise ValueError(f"config field data.source={source!r}: expected one of {SOURCES}")


def open_datasets(data_config):
  """``data_config``: the config's ``data`` field (see configs/common.py)."""
  check_source(data_config.source)
  if data_config.source == "shapes":
    builder, annotations = shapes_builder(
        data_config.data_dir or ".cache/datasets", data_config.shapes.num_train,
        data_config.shapes.num_val, tuple(data_config.shapes.image_hw), data_config.shapes.seed)
    eval_annotations = str(annotations)
  elif data_config.source in prepare.SOURCES:
    # Prepared by prepare.ensure_prepared (train.py: on process 0, before every process opens it).
    builder = tfds.builder(f"{prepare.dataset_name(data_config)}:{prepare.VERSION}",
                           data_dir=os.fspath(prepare.data_dir_of(data_config)))
    # COCO: the validation JSON, for the official numbers (segment areas); YOLO: from the split.
    eval_annotations = data_config.eval_annotations if data_config.source == "coco" else ""
  else:  # tfds
    try:
      builder = tfds.builder(data_config.name, data_dir=data_config.data_dir and os.fspath(
          paths.user_path(data_config.data_dir)) or None)
    except Exception as error:  # noqa: BLE001
      raise FileNotFoundError(
          f"config field data.name={data_config.name!r}: no prepared TFDS dataset of that name in "
          f"data.data_dir={data_config.data_dir!r} ({error})") from error
    eval_annotations = data_config.eval_annotations
  names = list(data_config.class_names) or list(builder.info.features["objects"]["label"].names)
  categories_file = paths.user_path(builder.data_dir) / coco_format.CATEGORIES_FILE
  if categories_file.exists():
    category_ids = coco_format.category_ids(builder)
  elif data_config.name.startswith("coco/"):
    category_ids = list(coco_metrics.COCO80_TO_91)
  else:
    category_ids = list(range(len(names)))
  for split in (data_config.train_split, data_config.eval_split):
    if split not in builder.info.splits:
      raise ValueError(f"dataset {builder.name} has no split {split!r}; it has "
                       f"{sorted(builder.info.splits)}")
  return Datasets(train=builder.as_data_source(split=data_config.train_split),
                  eval=builder.as_data_source(split=data_config.eval_split), class_names=names,
                  category_ids=category_ids, eval_annotations=eval_annotations)

