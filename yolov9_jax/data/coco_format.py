"""Prepare any COCO-format dataset (instances JSON + image folder) as a TFDS dataset, once.

Category ids may be sparse (COCO's 1..90): training labels are their ranks 0..K-1 in id order,
and ``categories.json`` beside the prepared dataset maps them back (label, id, name).

Bad input never stops the preparation and never passes silently; ``PrepareReport`` counts it:
unreadable or truncated images are skipped; grayscale, CMYK, palette and alpha images are
converted to RGB; EXIF orientation is applied (annotation tools and the official loader both see
the rotated image); boxes are clipped to the image and dropped when nothing is left; images
without annotations are kept as background; ``iscrowd`` annotations are kept, flagged, for
evaluation. Category ids missing from the JSON's ``categories`` are an error that names them.
"""
import collections
import dataclasses
import io
import json

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageOps

from yolov9_jax import paths

CATEGORIES_FILE = "categories.json"
EXIF_ORIENTATION = 0x0112


@dataclasses.dataclass
class PrepareReport:
  images: int = 0
  skipped_unreadable: list = dataclasses.field(default_factory=list)  # file_name of each
  converted_to_rgb: int = 0
  exif_rotated: int = 0
  without_annotations: int = 0
  boxes: int = 0
  boxes_clipped: int = 0
  boxes_dropped_empty: int = 0
  crowd_boxes: int = 0


def _features(class_names):
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3)),
      "image_id": np.int64,
      "objects": tfds.features.Sequence({
          "bbox": tfds.features.BBoxFeature(),  # ymin, xmin, ymax, xmax normalised to [0, 1]
          "label": tfds.features.ClassLabel(names=class_names),
          "category_id": np.int64,  # the dataset's own id, e.g. COCO's sparse 1..90
          "is_crowd": np.bool_,
      }),
  })


def _load_rgb(path, report, name):
  """The image's original bytes when they decode to plain RGB as stored, else a converted RGB
  array (TFDS stores it losslessly): (bytes or array, (height, width)), or (None, None)."""
  try:
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
      image.load()  # decodes fully: truncated files fail here
      rotated = image.getexif().get(EXIF_ORIENTATION, 1) != 1
      needs_rgb = image.mode != "RGB"
      if not rotated and not needs_rgb and image.format in ("JPEG", "PNG"):
        return data, (image.height, image.width)
      report.exif_rotated += rotated
      report.converted_to_rgb += needs_rgb
      rgb = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
      return rgb, rgb.shape[:2]
  except (OSError, SyntaxError, ValueError):
    report.skipped_unreadable.append(name)  # as the JSON names it (YOLO: relative to the YAML's path)
    return None, (None, None)


def _examples(coco, images_dir, label_of_id, report):
  annotations_by_image = collections.defaultdict(list)
  for annotation in coco.get("annotations", []):
    annotations_by_image[annotation["image_id"]].append(annotation)
  for info in coco["images"]:
    image, (height, width) = _load_rgb(paths.user_path(images_dir) / info["file_name"], report,
                                       info["file_name"])
    if image is None:
      continue
    objects = {"bbox": [], "label": [], "category_id": [], "is_crowd": []}
    for annotation in annotations_by_image.get(info["id"], []):
      x, y, w, h = (float(v) for v in annotation["bbox"])
      x1, y1 = np.clip([x, y], 0, [width, height])
      x2, y2 = np.clip([x + w, y + h], 0, [width, height])
      report.boxes_clipped += bool((x1, y1, x2, y2) != (x, y, x + w, y + h) and x2 > x1 and y2 > y1)
      if not (x2 > x1 and y2 > y1):
        report.boxes_dropped_empty += 1
        continue
      crowd = bool(annotation.get("iscrowd", 0))
      report.crowd_boxes += crowd
      report.boxes += 1
      objects["bbox"].append(tfds.features.BBox(y1 / height, x1 / width, y2 / height, x2 / width))
      objects["label"].append(label_of_id[annotation["category_id"]])
      objects["category_id"].append(annotation["category_id"])
      objects["is_crowd"].append(crowd)
    report.images += 1
    report.without_annotations += not objects["bbox"]
    if isinstance(image, bytes):
      image = io.BytesIO(image)
    yield str(info["id"]), {"image": image, "image_id": info["id"], "objects": objects}


def _load_json(annotations):
  """The COCO dict of ``annotations`` (a dict, or a JSON file's path), checked: ValueError naming
  the file when it is not a COCO instances JSON, has no images, or an annotation names an image
  id that its ``images`` list lacks."""
  if isinstance(annotations, dict):
    coco, where = annotations, "the annotations dict"
  else:
    path = paths.user_path(annotations)
    if not path.is_file():
      raise FileNotFoundError(f"COCO annotations file {path} does not exist")
    try:
      coco = json.loads(path.read_text())
    except json.JSONDecodeError as error:
      raise ValueError(f"{path}: not valid JSON ({error})") from error
    where = str(path)
  if not isinstance(coco, dict) or "images" not in coco or "categories" not in coco:
    raise ValueError(f"{where}: expected a COCO instances JSON with 'images', 'annotations' and "
                     "'categories'")
  if not coco["images"]:
    raise ValueError(f"{where}: 'images' is empty (an empty split)")
  image_ids = {image["id"] for image in coco["images"]}
  missing = sorted({a["image_id"] for a in coco.get("annotations", [])} - image_ids)
  if missing:
    first = next(a for a in coco["annotations"] if a["image_id"] == missing[0])
    raise ValueError(f"{where}: {len(missing)} image ids referenced by annotations are not in "
                     f"'images' (first: image_id {missing[0]} of annotation id {first.get('id')}; "
                     f"ids {missing[:10]})")
  return coco


def prepare(annotations, images_dir, data_dir, name, split="train", version="1.0.0"):
  """Writes the TFDS dataset ``name`` (split ``split``) under ``data_dir``; returns
  (builder, PrepareReport). ``annotations``: a COCO instances JSON path, or its dict.
  Read it back with ``tfds.builder(name, data_dir=data_dir).as_data_source(split)``."""
  builder, reports = prepare_splits({split: (annotations, images_dir)}, data_dir, name, version)
  return builder, reports[split]


def prepare_splits(splits, data_dir, name, version="1.0.0", progress=False):
  """``prepare`` for several splits at once: ``splits`` = {split: (annotations, images_dir)},
  all with the same categories. Returns (builder, {split: PrepareReport}). ``progress``: a
  progress bar per split."""
  cocos = {split: _load_json(annotations) for split, (annotations, _) in splits.items()}
  first_split, first = next(iter(cocos.items()))
  categories = sorted(first["categories"], key=lambda c: c["id"])
  for split, coco in cocos.items():
    if sorted(coco["categories"], key=lambda c: c["id"]) != categories:
      raise ValueError(f"{name}: split {split!r} has other categories than split {first_split!r}")
  label_of_id = {c["id"]: label for label, c in enumerate(categories)}
  for split, coco in cocos.items():
    unknown = sorted({a["category_id"] for a in coco.get("annotations", [])} - set(label_of_id))
    if unknown:
      raise ValueError(f"{name} ({split}): annotations use category ids {unknown} that the "
                       f"dataset's 'categories' list does not define (known: {sorted(label_of_id)})")
  reports = {split: PrepareReport() for split in splits}
  builder = tfds.dataset_builders.store_as_tfds_dataset(
      name=name, version=version, features=_features([c["name"] for c in categories]),
      split_datasets={split: _with_progress(
          _examples(cocos[split], images_dir, label_of_id, reports[split]),
          len(cocos[split]["images"]), f"{name} {split}", progress)
                      for split, (_, images_dir) in splits.items()},
      data_dir=str(data_dir), file_format="array_record", disable_shuffling=True)
  (paths.user_path(builder.data_dir) / CATEGORIES_FILE).write_text(json.dumps(
      [{"label": label, "id": c["id"], "name": c["name"]} for label, c in enumerate(categories)]))
  # Read back from its folder, as every later run opens it: a data source of the builder that
  # wrote it does not pickle, and Grain's worker processes need to receive it.
  return tfds.builder(f"{name}:{version}", data_dir=str(data_dir)), reports


def _with_progress(examples, total, description, progress):
  if not progress:
    return examples
  import tqdm
  return tqdm.tqdm(examples, total=total, desc=f"preparing {description}", unit="image",
                   dynamic_ncols=True)


def category_ids(builder):
  """label -> the dataset's own category id, as prepared (for evaluation and export)."""
  entries = json.loads((paths.user_path(builder.data_dir) / CATEGORIES_FILE).read_text())
  return [entry["id"] for entry in sorted(entries, key=lambda e: e["label"])]
