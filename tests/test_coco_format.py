"""Preparing a COCO-format dataset: sparse ids, bad images and boxes, read back through TFDS."""
import json

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from yolov9_jax.data import coco_format

CATEGORIES = [{"id": 1, "name": "person"}, {"id": 5, "name": "airplane"}, {"id": 90, "name": "toothbrush"}]


def _write_fixture(root):
  """Seven images covering the bad cases; returns the annotations path."""
  images_dir = root / "images"
  images_dir.mkdir()
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (40, 60, 3), np.uint8)
  Image.fromarray(rgb).save(images_dir / "rgb.jpg", quality=95)
  Image.fromarray(rgb[..., 0]).save(images_dir / "gray.png")
  Image.fromarray(np.dstack([rgb, np.full((40, 60), 128, np.uint8)])).save(images_dir / "alpha.png")
  Image.fromarray(rgb).convert("CMYK").save(images_dir / "cmyk.jpg")
  exif = Image.Exif()
  exif[0x0112] = 6  # stored 40x60 landscape, displayed rotated 90 degrees: 60 high, 40 wide
  Image.fromarray(rgb).save(images_dir / "exif.jpg", exif=exif)
  (images_dir / "truncated.jpg").write_bytes((images_dir / "rgb.jpg").read_bytes()[:300])
  Image.fromarray(rgb).save(images_dir / "background.png")
  names = ["rgb.jpg", "gray.png", "alpha.png", "cmyk.jpg", "exif.jpg", "truncated.jpg", "background.png"]
  images = [{"id": 10 + i, "file_name": n, "height": 40, "width": 60} for i, n in enumerate(names)]
  annotations = [
      {"id": 1, "image_id": 10, "category_id": 90, "bbox": [5, 5, 20, 10], "iscrowd": 0},
      {"id": 2, "image_id": 10, "category_id": 1, "bbox": [50, 30, 20, 20], "iscrowd": 0},  # clipped
      {"id": 3, "image_id": 10, "category_id": 5, "bbox": [10, 10, 0, 5], "iscrowd": 0},   # empty
      {"id": 4, "image_id": 11, "category_id": 5, "bbox": [0, 0, 30, 20], "iscrowd": 1},   # crowd
      {"id": 5, "image_id": 12, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 0},
      {"id": 6, "image_id": 13, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 0},
      {"id": 7, "image_id": 14, "category_id": 5, "bbox": [2, 30, 20, 25], "iscrowd": 0},
      {"id": 8, "image_id": 15, "category_id": 5, "bbox": [2, 3, 20, 25], "iscrowd": 0},
  ]
  path = root / "instances.json"
  path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
  return path, images_dir


def test_prepare_reads_back_with_contiguous_labels_and_sanitised_images(tmp_path):
  annotations, images_dir = _write_fixture(tmp_path)
  builder, report = coco_format.prepare(annotations, images_dir, tmp_path / "tfds", "fixture_coco")
  assert report.skipped_unreadable == ["truncated.jpg"]
  assert (report.images, report.converted_to_rgb, report.exif_rotated) == (6, 3, 1)
  assert (report.boxes, report.boxes_clipped, report.boxes_dropped_empty, report.crowd_boxes) == (6, 1, 1, 1)
  assert report.without_annotations == 1

  assert coco_format.category_ids(builder) == [1, 5, 90]
  reread = tfds.builder("fixture_coco", data_dir=tmp_path / "tfds")
  assert reread.info.features["objects"]["label"].names == ["person", "airplane", "toothbrush"]
  source = reread.as_data_source(split="train")  # random access, as the mosaic needs
  examples = {int(source[i]["image_id"]): source[i] for i in range(len(source))}
  assert sorted(examples) == [10, 11, 12, 13, 14, 16]
  assert all(e["image"].shape[-1] == 3 for e in examples.values())
  first = examples[10]["objects"]
  np.testing.assert_array_equal(first["label"], [2, 0])  # ids 90 and 1 -> labels 2 and 0
  np.testing.assert_array_equal(first["category_id"], [90, 1])
  np.testing.assert_allclose(first["bbox"][1], [30 / 40, 50 / 60, 1.0, 1.0], rtol=1e-6)  # clipped
  assert np.asarray(examples[11]["objects"]["is_crowd"]).tolist() == [True]
  assert examples[14]["image"].shape == (60, 40, 3)  # EXIF orientation applied
  np.testing.assert_allclose(examples[14]["objects"]["bbox"][0], [30 / 60, 2 / 40, 55 / 60, 22 / 40], rtol=1e-6)
  assert len(examples[16]["objects"]["label"]) == 0


def test_unknown_category_ids_are_named_at_prepare_time(tmp_path):
  annotations, images_dir = _write_fixture(tmp_path)
  coco = json.loads(annotations.read_text())
  coco["annotations"][0]["category_id"] = 77
  coco["annotations"][1]["category_id"] = 3
  annotations.write_text(json.dumps(coco))
  with pytest.raises(ValueError, match=r"category ids \[3, 77\]"):
    coco_format.prepare(annotations, images_dir, tmp_path / "tfds", "fixture_bad")


def test_yolo_format_folder_takes_the_same_route(tmp_path):
  from yolov9_jax.data import yolo_format
  (tmp_path / "images" / "a").mkdir(parents=True)
  (tmp_path / "labels" / "a").mkdir(parents=True)
  Image.fromarray(np.zeros((50, 100, 3), np.uint8)).save(tmp_path / "images" / "a" / "one.jpg")
  Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "images" / "two.png")
  (tmp_path / "labels" / "a" / "one.txt").write_text(
      "1 0.5 0.5 0.2 0.4\n0 0.1 0.1 0.3 0.1 0.3 0.5 0.1 0.5\n")  # a box, then a polygon
  (tmp_path / "data.yaml").write_text("names: {0: cat, 1: dog}\n")
  names = yolo_format.class_names(tmp_path / "data.yaml")
  coco = yolo_format.to_coco(tmp_path / "images", tmp_path / "labels", names)
  builder, report = coco_format.prepare(coco, tmp_path / "images", tmp_path / "tfds", "fixture_yolo")
  assert (report.images, report.boxes, report.without_annotations) == (2, 2, 1)
  assert coco_format.category_ids(builder) == [0, 1]
  source = builder.as_data_source(split="train")
  one = next(source[i] for i in range(len(source)) if source[i]["image"].shape == (50, 100, 3))
  np.testing.assert_array_equal(one["objects"]["label"], [1, 0])
  np.testing.assert_allclose(one["objects"]["bbox"], [[0.3, 0.4, 0.7, 0.6], [0.1, 0.1, 0.5, 0.3]],
                             rtol=1e-6)


def test_yolo_labels_with_an_unknown_class_are_named(tmp_path):
  from yolov9_jax.data import yolo_format
  (tmp_path / "images").mkdir()
  (tmp_path / "labels").mkdir()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / "x.png")
  (tmp_path / "labels" / "x.txt").write_text("7 0.5 0.5 0.5 0.5\n")
  # The label file and line are named, before anything is written.
  with pytest.raises(ValueError, match=r"x\.txt:1: class 7 is outside the 1 classes"):
    yolo_format.to_coco(tmp_path / "images", tmp_path / "labels", ["only"])
