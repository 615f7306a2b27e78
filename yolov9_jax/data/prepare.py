"""A user's own dataset, a YOLO data YAML or COCO JSONs with image folders, prepared once as a
TFDS dataset (array_record) in the dataset cache and reused while the source is unchanged:

    python -m yolov9_jax.data.prepare --source=yolo --path=data.yaml --data_dir=gs://bucket/datasets
    python -m yolov9_jax.data.prepare --source=coco --train_annotations=train.json \\
        --train_images=images/train --eval_annotations=val.json --eval_images=images/val

train.py does the same on first use (``--config.data.source=yolo --config.data.path=data.yaml``);
the command is for large datasets prepared once on one machine and read by every host of a pod,
which then trains with the ``source=tfds`` settings it prints.

The dataset's name comes from the source's location; a fingerprint of the source (the YAML or
JSON contents, every label file's contents, every image's name, size and modification time)
is stored beside the prepared data, and a changed source is prepared again. The preparation
report (images skipped and why, boxes clipped or dropped, images without objects) is stored there
too, printed, and copied into each training run's workdir.
"""
import hashlib
import json
import os
import re
import sys
import time

from yolov9_jax import paths
from yolov9_jax.data import coco_format, yolo_format

SOURCES = ("yolo", "coco")  # the data.source values prepared here
PREPARED_FILE = "prepared.json"  # fingerprint and report, in the prepared version's folder
VERSION = "1.0.0"
DEFAULT_DATA_DIR = ".cache/datasets"


def data_dir_of(data_config):
  return paths.absolute(data_config.data_dir or DEFAULT_DATA_DIR)


def source_files(data_config):
  """The user's source files that name the dataset, checked to be given (config_checks calls it
  before anything is built)."""
  if data_config.source == "yolo":
    if not data_config.path:
      raise ValueError("config field data.path is empty: data.source='yolo' needs the data YAML, "
                       "e.g. --config.data.path=data.yaml")
    return [data_config.path]
  fields = ("train_annotations", "train_images", "eval_annotations", "eval_images")
  empty = [f"data.{field}" for field in fields if not data_config[field]]
  if empty:
    raise ValueError(f"data.source='coco' needs {', '.join(empty)} (the instances JSONs and the "
                     "image folders of the train and validation splits)")
  return [data_config[field] for field in fields]


def dataset_name(data_config):
  """The TFDS name of the prepared source: its kind, the first file's stem, and a hash of where
  the source lies (two datasets of the same file name do not collide)."""
  files = [os.fspath(paths.absolute(f)) for f in source_files(data_config)]
  stem = re.sub(r"[^a-z0-9]+", "_", os.path.splitext(os.path.basename(files[0]))[0].lower()).strip("_")
  where = hashlib.sha256("\n".join(files).encode()).hexdigest()[:8]
  return f"{data_config.source}_{stem or 'data'}_{where}"


def _splits(data_config):
  """{TFDS split: (COCO dict or JSON path, images root)} of the source, checked."""
  if data_config.source == "yolo":
    data = yolo_format.DataYaml(data_config.path)
    return {split: (data.to_coco(split), data.root) for split in data.splits}
  source_files(data_config)
  return {"train": (data_config.train_annotations, data_config.train_images),
          "validation": (data_config.eval_annotations, data_config.eval_images)}


def fingerprint(data_config):
  """A hash of everything the prepared dataset is made of (see the module docstring)."""
  digest = hashlib.sha256(data_config.source.encode())

  def add_stat(path):
    stat = path.stat()
    digest.update(f"{path}\0{stat.length}\0{stat.mtime}\n".encode())

  if data_config.source == "yolo":
    data = yolo_format.DataYaml(data_config.path)
    digest.update(data.yaml_path.read_bytes())
    for split, images in data.splits.items():
      digest.update(split.encode())
      for image in images:
        add_stat(image)
        labels = yolo_format.label_path(image)
        digest.update(labels.read_bytes() if labels.exists() else b"\0no labels\0")
  else:
    for annotations, images_dir in ((data_config.train_annotations, data_config.train_images),
                                    (data_config.eval_annotations, data_config.eval_images)):
      annotations, images_dir = paths.user_path(annotations), paths.user_path(images_dir)
      if not annotations.is_file():
        raise FileNotFoundError(f"COCO annotations file {annotations} does not exist")
      if not images_dir.is_dir():
        raise FileNotFoundError(f"image folder {images_dir} (for {annotations.name}) does not exist")
      digest.update(annotations.read_bytes())
      for folder, _, names in sorted(images_dir.walk()):
        for name in sorted(names):
          add_stat(folder / name)
  return digest.hexdigest()


def _prepared_record(data_config):
  """The stored record of the prepared dataset (fingerprint, reports), or None."""
  record = data_dir_of(data_config) / dataset_name(data_config) / VERSION / PREPARED_FILE
  return json.loads(record.read_text()) if record.exists() else None


def ensure_prepared(data_config, progress=True, log=print):
  """Prepares the source unless the dataset cache holds it with the same fingerprint; returns
  the stored record: {"name", "data_dir", "fingerprint", "source", "prepared_at", "reports"}."""
  name, data_dir = dataset_name(data_config), data_dir_of(data_config)
  current = fingerprint(data_config)
  record = _prepared_record(data_config)
  if record is not None and record["fingerprint"] == current:
    log(f"dataset {name} in {data_dir}: source unchanged since it was prepared; reusing it")
    log(describe(record))
    return record
  folder = data_dir / name
  if folder.exists():  # a changed source, or a preparation that did not finish
    log(f"dataset {name} in {data_dir}: the source changed since it was prepared"
        if record else f"dataset {name} in {data_dir}: an unfinished preparation, starting again")
    folder.rmtree()
  log(f"preparing {data_config.source} dataset {source_files(data_config)[0]} as {name} in {data_dir}")
  started = time.perf_counter()
  _, reports = coco_format.prepare_splits(_splits(data_config), data_dir, name, VERSION, progress=progress)
  record = {"name": name, "data_dir": os.fspath(data_dir), "fingerprint": current,
            "source": {field: data_config[field] for field in
                       ("source", "path", "train_annotations", "train_images", "eval_annotations",
                        "eval_images")},
            "prepared_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            "prepare_seconds": round(time.perf_counter() - started, 1),
            "reports": {split: report_dict(report) for split, report in reports.items()}}
  # Written last: its presence says the preparation finished.
  (folder / VERSION / PREPARED_FILE).write_text(json.dumps(record, indent=1))
  log(describe(record))
  return record


def report_dict(report):
  return {field: getattr(report, field) for field in report.__dataclass_fields__}


def describe(record):
  """The preparation report as lines a user reads."""
  lines = [f"dataset {record['name']} (prepared {record['prepared_at']}):"]
  for split, report in record["reports"].items():
    skipped = report["skipped_unreadable"]
    named = f" ({', '.join(skipped[:5])}{', ...' if len(skipped) > 5 else ''})" if skipped else ""
    lines.append(
        f"  {split}: {report['images']} images, {report['boxes']} boxes; unreadable images "
        f"skipped: {len(skipped)}{named}; boxes clipped to the image: {report['boxes_clipped']}, "
        f"dropped as empty: {report['boxes_dropped_empty']}; images without objects: "
        f"{report['without_annotations']}; converted to RGB: {report['converted_to_rgb']}, "
        f"EXIF-rotated: {report['exif_rotated']}")
  return "\n".join(lines)


def _flags():
  """This command's flags (absl, the style of every entry point; ``--help`` lists them)."""
  from absl import flags
  flag_values = flags.FlagValues()
  flags.DEFINE_enum("source", None, list(SOURCES), "the kind of source", flag_values=flag_values)
  flags.DEFINE_string("path", "", "source=yolo: the data YAML", flag_values=flag_values)
  for field, text in (("train_annotations", "instances JSON of the train split"),
                      ("train_images", "image folder of the train split"),
                      ("eval_annotations", "instances JSON of the validation split"),
                      ("eval_images", "image folder of the validation split")):
    flags.DEFINE_string(field, "", f"source=coco: the {text}", flag_values=flag_values)
  flags.DEFINE_string("data_dir", "", f"the dataset cache (default {DEFAULT_DATA_DIR}); local or "
                      "gs://", flag_values=flag_values)
  flags.DEFINE_boolean("help", False, "show this help", flag_values=flag_values)
  return flag_values


def main(argv):
  import ml_collections

  from configs import common
  flag_values = _flags()
  flag_values(argv)
  if flag_values.help:
    print(__doc__ + "\n" + flag_values.get_help())
    return None
  if flag_values.source is None:
    raise ValueError(f"--source is required: one of {', '.join(SOURCES)}")
  data_config = ml_collections.ConfigDict(common.base().data.to_dict())
  data_config.update({name: flag_values[name].value for name in
                      ("source", "path", "train_annotations", "train_images", "eval_annotations",
                       "eval_images", "data_dir")})
  record = ensure_prepared(data_config)
  print(f"train on it anywhere with --config.data.source=tfds --config.data.name={record['name']} "
        f"--config.data.data_dir={record['data_dir']}"
        + (f" --config.data.eval_annotations={paths.absolute(data_config.eval_annotations)}"
           if data_config.source == "coco" else ""))
  return record


if __name__ == "__main__":
  from absl import flags as absl_flags
  try:
    main(sys.argv)
  except (FileNotFoundError, ValueError, absl_flags.Error) as error:
    sys.exit(f"prepare: {error}")
