"""Detect objects in images, folders or globs; write annotated images and a detections JSON.

    python detect.py --weights=runs/custom photos/          # a train.py workdir: model, class names
    python detect.py --model=gelan-c --weights=gelan-c.pt --out_dir=runs/detect photos/ "more/*.jpg"
    python detect.py --weights=exported/gelan-c.onnx photos/   # a file of export.py --format=...

An exported detector (.onnx, .tflite, .stablehlo or a SavedModel folder) runs in its own runtime
with the image size, thresholds and class names stored in it; the settings flags below are for
weights and workdirs.

The class names are ``--class_names``, else those saved with the weights (a train.py workdir, an
official checkpoint), else those of the dataset a ``--config`` names (``--config.data.*`` fields,
exactly as train.py and eval.py take them), else the label numbers.

Official detect settings (FACTS.md §8.3): best class per anchor, conf 0.25, IoU 0.45, at most 1000
detections per image. Each image is letterboxed like the official detect (resized to fit
``--image_size``, enlarging included, bilinear; centred grey 114 padding) but always to the full
square, where the official one pads only to the next multiple of 32: every batch then has one
static shape and compiles once. Boxes in the JSON and the pictures are in original image pixels.
"""
import glob
import json
import os
import sys

from yolov9_jax import xla_flags

# Before JAX starts: XLA:CPU's default convolutions run this detector ~25 % slower
# (gelan-t at 640, batch 1: 7.8 -> 9.9 images/s on 2 cores; benchmarks/deploy.py).
xla_flags.use_fast_cpu_convolutions()

import cv2  # noqa: E402

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from yolov9_jax import models, paths, run_config, sharding, weights  # noqa: E402
from yolov9_jax.data import pipeline, transforms, visualize  # noqa: E402
from yolov9_jax.deploy import runtimes  # noqa: E402
from yolov9_jax.evaluation import coco_metrics, evaluator  # noqa: E402

# This script's own flags (eval.py has some of the same names; both run in one test process).
FLAGS = flags.FlagValues()
run_config.define_model_flags(FLAGS, f"{run_config.WEIGHTS_HELP}; or a detector of export.py "
                              f"({', '.join(runtimes.SUFFIXES)} or a SavedModel folder)")
flags.DEFINE_list("class_names", None, "class names in label order (default: the weights', else "
                  "the --config dataset's, else label numbers)", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 8, "images per step, divisible by the number of devices",
                     flag_values=FLAGS)
flags.DEFINE_float("conf_threshold", 0.25, "minimum class score", flag_values=FLAGS)
flags.DEFINE_float("iou_threshold", 0.45, "NMS IoU threshold (same class)", flag_values=FLAGS)
flags.DEFINE_integer("max_det", 1000, "detections per image at most", flag_values=FLAGS)
flags.DEFINE_string("out_dir", "runs/detect", "where the pictures and JSON are written",
                    flag_values=FLAGS)
flags.DEFINE_boolean("help", False, "show this help", flag_values=FLAGS)
IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")


def image_paths(inputs):
  """The image files named by ``inputs`` (files, folders, glob patterns; local or remote), in a
  stable order."""
  found_paths = []
  for item in inputs:
    path = paths.user_path(item)
    if path.is_dir():
      found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    elif path.is_file():
      found = [path]
    else:
      found = sorted(p for p in _glob(os.fspath(path)) if p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
      raise FileNotFoundError(f"no image files at {item!r} (a file, a folder or a glob pattern)")
    found_paths.extend(found)
  return found_paths


def _glob(pattern):
  """The paths matching ``pattern``, local (``**`` recursive) or remote (``gs://b/images/*.jpg``)."""
  if not paths.is_remote(pattern):
    return [paths.user_path(p) for p in glob.glob(pattern, recursive=True)]
  parts = pattern.split("/")
  first_wild = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))
  return list(paths.user_path("/".join(parts[:first_wild])).glob("/".join(parts[first_wild:])))


def _read_rgb(path):
  with paths.local_file(path) as local:  # cv2 reads local files only
    image = cv2.imread(os.fspath(local), cv2.IMREAD_COLOR)  # applies EXIF orientation, like the official
  return None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def main(argv):
  inputs = run_config.parse(FLAGS, argv)[1:]
  if FLAGS.help:
    print(__doc__ + "\n" + FLAGS.get_help())
    return None
  if FLAGS.weights is None or not inputs:
    raise ValueError(f"detect.py needs {', '.join(['--weights'] * (FLAGS.weights is None) + ['images'] * (not inputs))}")
  images_found = image_paths(inputs)
  if runtimes.format_of(FLAGS.weights):
    run_batch, class_names, image_size, batch_size = _exported_detector(FLAGS.weights)
  else:
    run_batch, class_names, image_size, batch_size = _jax_detector(FLAGS.weights)
  with paths.local_dir(FLAGS.out_dir) as out_dir:  # a remote --out_dir gets the files at the end
    records, unreadable = _detect_all(images_found, run_batch, class_names, image_size,
                                      batch_size, out_dir)
  print(f"{len(records)} images, {sum(len(r['detections']) for r in records)} detections; "
        f"{len(unreadable)} unreadable; wrote {paths.user_path(FLAGS.out_dir)}")
  return records


def _jax_detector(weights_path):
  """(run_batch, class names, image size, batch size) for weights or a workdir, jitted here."""
  config = run_config.training_config(FLAGS.config, weights_path)
  model, image_size = run_config.model_and_image_size(FLAGS, config, "detect.py")
  models.check_image_size(image_size, "--image_size")
  variables, info = weights.load(weights_path, model)
  mesh = sharding.make_mesh()
  sharding.check_batch_size(FLAGS.batch_size, mesh.size, "--batch_size")
  detect, fused_variables, num_classes = evaluator.prepare_detector(
      model, variables, mesh, FLAGS.conf_threshold, FLAGS.iou_threshold, FLAGS.max_det,
      multi_label=False)
  class_names = FLAGS.class_names or info.get("class_names")
  if not class_names and FLAGS.config is not None:
    class_names = run_config.open_dataset(FLAGS.config.data).class_names
  class_names = list(class_names or [str(label) for label in range(num_classes)])
  if len(class_names) != num_classes:
    raise ValueError(f"{len(class_names)} class names, the model {num_classes} classes")

  def run_batch(images):
    detections = detect(fused_variables, pipeline.to_global_array(images, mesh))
    return {"boxes_xyxy_px": evaluator.host_rows(detections.boxes_xyxy_px),
            "scores": evaluator.host_rows(detections.scores),
            "classes": evaluator.host_rows(detections.classes),
            "count": evaluator.host_rows(detections.count)}
  return run_batch, class_names, image_size, FLAGS.batch_size


def _exported_detector(path):
  """(run_batch, class names, image size, batch size) for a file of export.py --format=..."""
  detector = runtimes.load(path)
  spec = detector.spec
  if not spec.nms:
    raise ValueError(f"{path} was exported with --nms=false (raw predictions): detect.py needs "
                     "the NMS inside")
  if FLAGS.class_names and len(FLAGS.class_names) != len(spec.class_names):
    raise ValueError(f"{len(FLAGS.class_names)} class names, the model {len(spec.class_names)}")
  print(f"detect.py: {runtimes.describe(detector)}")
  return (detector, list(FLAGS.class_names or spec.class_names), spec.image_size,
          spec.batch_size or FLAGS.batch_size)


def _detect_all(images_found, run_batch, class_names, image_size, batch_size, out_dir):
  """Detects in batches, draws each image into ``out_dir`` and writes detections.json there;
  returns (records, unreadable files)."""
  size = image_size
  records, unreadable = [], []
  for first in range(0, len(images_found), batch_size):
    batch_paths, originals, transforms_ = [], [], []
    images = np.full((batch_size, size, size, 3), transforms.FILL_VALUE, np.uint8)
    for path in images_found[first:first + batch_size]:
      image = _read_rgb(path)
      if image is None:
        unreadable.append(str(path))
        continue
      images[len(batch_paths)], _, letterbox = transforms.letterbox(image, np.zeros((0, 4)),
                                                                    (size, size))
      batch_paths.append(path)
      originals.append(image)
      transforms_.append(letterbox)
    detections = run_batch(images)
    for i, (path, image, letterbox) in enumerate(zip(batch_paths, originals, transforms_)):
      count = int(detections["count"][i])
      boxes = coco_metrics.boxes_to_original(detections["boxes_xyxy_px"][i, :count],
                                             letterbox.ratio, letterbox.pad_xy, image.shape[:2])
      scores, labels = detections["scores"][i, :count], detections["classes"][i, :count]
      picture = out_dir / path.name
      visualize.draw_boxes(image, boxes, labels, class_names, scores).save(picture)
      records.append({"file": os.fspath(path), "annotated": os.fspath(paths.user_path(FLAGS.out_dir) / path.name), "height": image.shape[0],
                      "width": image.shape[1], "detections": [
                          {"box_xyxy_px": [round(float(v), 2) for v in box], "score": float(score),
                           "class": int(label), "name": class_names[int(label)]}
                          for box, score, label in zip(boxes, scores, labels)]})
  (out_dir / "detections.json").write_text(json.dumps(
      {"images": records, "unreadable": unreadable}, indent=1))
  return records, unreadable


if __name__ == "__main__":
  try:
    main(sys.argv)
  except (FileNotFoundError, ValueError, NotImplementedError, flags.Error) as error:
    sys.exit(f"detect.py: {error}")
