"""The synthetic ``shapes`` set: deterministic, valid COCO, with the hard cases it promises."""
import json

import numpy as np
from PIL import Image
from pycocotools.coco import COCO

from yolov9_jax.data import shapes


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path):
  first = shapes.generate(tmp_path / "a", num_images=6, image_hw=(64, 96), seed=1)
  second = shapes.generate(tmp_path / "b", num_images=6, image_hw=(64, 96), seed=1)
  other = shapes.generate(tmp_path / "c", num_images=6, image_hw=(64, 96), seed=2)
  assert first.read_text() == second.read_text() != other.read_text()
  for name in sorted(p.name for p in (tmp_path / "a" / "images").iterdir()):
    assert (tmp_path / "a" / "images" / name).read_bytes() == (tmp_path / "b" / "images" / name).read_bytes()


def test_annotations_are_valid_coco_with_empty_images_and_edge_boxes(tmp_path):
  path = shapes.generate(tmp_path, num_images=60, image_hw=(64, 64), seed=0)
  coco = COCO(str(path))
  assert sorted(coco.getCatIds()) == [1, 2, 3]
  assert [c["name"] for c in coco.loadCats([1, 2, 3])] == ["circle", "square", "triangle"]
  empty = [i for i in coco.getImgIds() if not coco.getAnnIds(imgIds=[i])]
  assert 0 < len(empty) < 20
  touching_edge = 0
  for annotation in json.loads(path.read_text())["annotations"]:
    info = coco.loadImgs([annotation["image_id"]])[0]
    x, y, w, h = annotation["bbox"]
    assert w > 0 and h > 0 and x >= 0 and y >= 0
    assert x + w <= info["width"] and y + h <= info["height"]
    touching_edge += x == 0 or y == 0 or x + w == info["width"] or y + h == info["height"]
  assert touching_edge > 0


def test_images_have_the_recorded_sizes_and_rgb_pixels(tmp_path):
  path = shapes.generate(tmp_path, num_images=4, image_hw=(64, 96), seed=0)
  for info in json.loads(path.read_text())["images"]:
    image = Image.open(tmp_path / "images" / info["file_name"])
    assert image.mode == "RGB" and image.size == (info["width"], info["height"])
    assert np.asarray(image).std() > 5  # textured, not flat
