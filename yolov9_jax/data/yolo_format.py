"""YOLO-format datasets (``images/``, ``labels/*.txt``, a YAML with class names) as COCO dicts,
which ``coco_format.prepare`` then writes as a TFDS dataset like any other source.

A label line is ``class cx cy w h`` normalised to the (EXIF-oriented) image, or ``class x1 y1 x2
y2 ...`` for a polygon, whose box is its extent. Category ids are the YOLO class indices.
"""

import yaml
from PIL import Image

from yolov9_jax.data.coco_format import EXIF_ORIENTATION
from yolov9_jax.paths import user_path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_ORIENTATIONS_SWAPPING_SIDES = (5, 6, 7, 8)


def class_names(dataset_yaml):
  """The ``names`` of a YOLO dataset YAML, a list or a {class index: name} mapping, as a list."""
  names = yaml.safe_load(user_path(dataset_yaml).read_text())["names"]
  return [names[i] for i in sorted(names)] if isinstance(names, dict) else list(names)


def _oriented_size(path):
  """(width, height) as displayed: labelling tools and the official loader see EXIF-rotated
  images. None when the file cannot be read (the preparer skips and counts it)."""
  try:
    with Image.open(path) as image:
      width, height = image.size
      if image.getexif().get(EXIF_ORIENTATION, 1) in _ORIENTATIONS_SWAPPING_SIDES:
        width, height = height, width
      return width, height
  except (OSError, SyntaxError, ValueError):
    return None


def to_coco(images_dir, labels_dir, names):
  """A COCO instances dict for every image under ``images_dir`` (sorted, recursively), with the
  boxes of the matching ``labels_dir/<relative path>.txt`` (a missing file: no objects)."""
  images_dir, labels_dir = user_path(images_dir), user_path(labels_dir)
  images, annotations = [], []
  # walk(), not rglob: epath refuses recursive patterns (on cloud storage, one request per level).
  paths = sorted(folder / name for folder, _, names in images_dir.walk() for name in names
                 if (folder / name).suffix.lower() in IMAGE_SUFFIXES)
  for image_id, path in enumerate(paths, start=1):
    relative = path.relative_to(images_dir)
    size = _oriented_size(path)
    width, height = size or (0, 0)
    images.append({"id": image_id, "file_name": str(relative), "width": width, "height": height})
    label_file = (labels_dir / relative).with_suffix(".txt")
    if size is None or not label_file.exists():
      continue
    for line_number, line in enumerate(label_file.read_text().splitlines(), start=1):
      values = line.split()
      if not values:
        continue
      if len(values) < 5 or len(values) % 2 == 0:
        raise ValueError(f"{label_file}:{line_number}: expected 'class cx cy w h' or a polygon "
                         f"'class x1 y1 x2 y2 ...', got {line!r}")
      coords = [float(v) for v in values[1:]]
      if len(coords) == 4:
        cx, cy, w, h = coords
        x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
      else:
        x1, x2 = min(coords[0::2]), max(coords[0::2])
        y1, y2 = min(coords[1::2]), max(coords[1::2])
      annotations.append({
          "id": len(annotations) + 1, "image_id": image_id, "category_id": int(values[0]),
          "bbox": [x1 * width, y1 * height, (x2 - x1) * width, (y2 - y1) * height], "iscrowd": 0})
  categories = [{"id": i, "name": name} for i, name in enumerate(names)]
  return {"images": images, "annotations": annotations, "categories": categories}
