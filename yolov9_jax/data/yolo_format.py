"""YOLO-format datasets (the official repository's and Ultralytics' layout) as COCO dicts, which
``coco_format.prepare_splits`` then writes as a TFDS dataset like any other source.

The data YAML: ``path`` (the dataset root; relative to the YAML's folder, default that folder),
``train``, ``val`` and optionally ``test`` (each an image folder, a ``.txt`` file listing image
paths, or a list of those; relative to the root), ``names`` (a list, or a mapping from class index
to name) and optionally ``nc``. An image's labels are the file found, as the official loader finds
it, by replacing the last ``images`` folder of its path with ``labels`` and its suffix with
``.txt``; a missing file means no objects.

A label line is ``class cx cy w h`` normalised to the (EXIF-oriented) image, or a polygon ``class
x1 y1 x2 y2 x3 y3 ...`` whose box is its extent. Each line is read by its own number of fields, so a
file may mix both (the official loader reads a box line in a file that has polygons as a
two-point polygon, a box from its corners (cx, cy) and (w, h); that misreading is not copied).
Category ids are the YOLO class indices. Errors name the file and line.
"""
import os

import yaml
from PIL import Image

from yolov9_jax.data.coco_format import EXIF_ORIENTATION
from yolov9_jax.paths import user_path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_ORIENTATIONS_SWAPPING_SIDES = (5, 6, 7, 8)
# The YAML's split keys -> the TFDS split names train.py's configs use.
SPLITS = {"train": "train", "val": "validation", "test": "test"}


def class_names(dataset_yaml):
  """The ``names`` of a YOLO dataset YAML, a list or a {class index: name} mapping, as a list."""
  return _names(_read_yaml(dataset_yaml), dataset_yaml)


def _read_yaml(dataset_yaml):
  path = user_path(dataset_yaml)
  if not path.is_file():
    raise FileNotFoundError(f"data YAML {path} does not exist")
  try:
    content = yaml.safe_load(path.read_text())
  except yaml.YAMLError as error:
    raise ValueError(f"{path}: not valid YAML ({error})") from error
  if not isinstance(content, dict):
    raise ValueError(f"{path}: expected a mapping with train, val and names, got {type(content).__name__}")
  return content


def _names(content, dataset_yaml):
  if "names" not in content:
    raise ValueError(f"{dataset_yaml}: no 'names' (the class names: a list, or a mapping from "
                     "class index to name)")
  names = content["names"]
  if isinstance(names, dict):
    if sorted(names) != list(range(len(names))):
      raise ValueError(f"{dataset_yaml}: 'names' must map the class indices 0..{len(names) - 1}, "
                       f"got keys {sorted(names, key=str)}")
    names = [names[i] for i in range(len(names))]
  if not isinstance(names, list) or not names:
    raise ValueError(f"{dataset_yaml}: 'names' must be a non-empty list or mapping")
  names = [str(name) for name in names]
  if "nc" in content and content["nc"] != len(names):
    raise ValueError(f"{dataset_yaml}: nc is {content['nc']} but 'names' has {len(names)} names")
  return names


class DataYaml:
  """A YOLO data YAML read and checked: ``names``, ``root``, and ``splits`` = {TFDS split name:
  sorted image paths}. Every referenced folder or list must exist and hold images."""

  def __init__(self, dataset_yaml):
    self.yaml_path = user_path(dataset_yaml)
    content = _read_yaml(self.yaml_path)
    self.names = _names(content, self.yaml_path)
    root = user_path(content.get("path") or ".")
    if not os.fspath(root).startswith("/") and "://" not in os.fspath(root):
      root = self.yaml_path.parent / root
    self.root = root
    for key in ("train", "val"):
      if not content.get(key):
        raise ValueError(f"{self.yaml_path}: no '{key}' (an image folder, a .txt list of images, "
                         "or a list of those, relative to 'path')")
    self.splits = {}
    for key, split in SPLITS.items():
      if content.get(key):
        self.splits[split] = self._images(key, content[key])

  def _images(self, key, entries):
    entries = entries if isinstance(entries, list) else [entries]
    found = []
    for entry in entries:
      path = self.root / str(entry)
      if path.is_dir():
        # walk(), not rglob: epath refuses recursive patterns (on cloud storage, one request per level).
        found += [folder / name for folder, _, names in path.walk() for name in names
                  if (folder / name).suffix.lower() in IMAGE_SUFFIXES]
      elif path.is_file() and path.suffix == ".txt":
        for line in path.read_text().splitlines():
          line = line.strip()
          if line:  # official lists: paths relative to the list's folder ("./images/x.jpg")
            found.append(user_path(line) if line.startswith("/") or "://" in line else path.parent / line)
      else:
        raise FileNotFoundError(f"{self.yaml_path}: '{key}' points at {path}, which is neither an "
                                "image folder nor a .txt list of images")
    if not found:
      raise ValueError(f"{self.yaml_path}: split '{key}' ({entries}) has no images "
                       f"(suffixes {', '.join(IMAGE_SUFFIXES)})")
    return sorted(found)

  def to_coco(self, split):
    """The COCO dict of one split (file names relative to ``root`` where they lie under it)."""
    return images_to_coco(self.splits[split], self.root, self.names)


def label_path(image_path):
  """The official loader's label file of an image: the last ``/images/`` folder of its path
  becomes ``/labels/``, the suffix ``.txt``."""
  text = os.fspath(image_path)
  if "/images/" in text:
    head, tail = text.rsplit("/images/", 1)
    text = f"{head}/labels/{tail}"
  return user_path(os.path.splitext(text)[0] + ".txt")


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


def read_labels(label_file, num_classes):
  """[(class, x1, y1, x2, y2)] normalised, from a label file; ValueError naming file and line."""
  boxes = []
  for line_number, line in enumerate(label_file.read_text().splitlines(), start=1):
    values = line.split()
    if not values:
      continue
    where = f"{label_file}:{line_number}"
    if len(values) < 5 or len(values) % 2 == 0:
      raise ValueError(f"{where}: expected 'class cx cy w h' or a polygon 'class x1 y1 x2 y2 x3 "
                       f"y3 ...', got {len(values)} fields: {line!r}")
    try:
      label, coords = int(values[0]), [float(v) for v in values[1:]]
    except ValueError:
      raise ValueError(f"{where}: expected an integer class and numbers, got {line!r}") from None
    if not 0 <= label < num_classes:
      raise ValueError(f"{where}: class {label} is outside the {num_classes} classes "
                       f"(0..{num_classes - 1}) of the data YAML's names")
    if len(coords) == 4:
      cx, cy, w, h = coords
      boxes.append((label, cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
    else:
      boxes.append((label, min(coords[0::2]), min(coords[1::2]), max(coords[0::2]), max(coords[1::2])))
  return boxes


def images_to_coco(image_paths, root, names):
  """A COCO instances dict for ``image_paths`` with the labels the official loader would find
  (file names relative to ``root`` where the images lie under it)."""
  root_text = os.fspath(root).rstrip("/") + "/"
  entries = []
  for path in image_paths:
    text = os.fspath(path)
    entries.append((path, text[len(root_text):] if text.startswith(root_text) else text, label_path(path)))
  return _to_coco(entries, names)


def to_coco(images_dir, labels_dir, names):
  """A COCO instances dict for every image under ``images_dir`` (sorted, recursively), with the
  boxes of the matching ``labels_dir/<relative path>.txt`` (a missing file: no objects)."""
  images_dir, labels_dir = user_path(images_dir), user_path(labels_dir)
  paths = sorted(folder / name for folder, _, files in images_dir.walk() for name in files
                 if (folder / name).suffix.lower() in IMAGE_SUFFIXES)
  return _to_coco([(path, str(path.relative_to(images_dir)),
                    (labels_dir / path.relative_to(images_dir)).with_suffix(".txt")) for path in paths], names)


def _to_coco(entries, names):
  """``entries``: (image path, COCO file name, label file) per image, in image id order."""
  images, annotations = [], []
  for image_id, (path, file_name, label_file) in enumerate(entries, start=1):
    size = _oriented_size(path)
    width, height = size or (0, 0)
    images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
    if size is None or not label_file.exists():
      continue
    for label, x1, y1, x2, y2 in read_labels(label_file, len(names)):
      annotations.append({
          "id": len(annotations) + 1, "image_id": image_id, "category_id": label,
          "bbox": [x1 * width, y1 * height, (x2 - x1) * width, (y2 - y1) * height], "iscrowd": 0})
  categories = [{"id": i, "name": name} for i, name in enumerate(names)]
  return {"images": images, "annotations": annotations, "categories": categories}
