"""A user's own dataset in one command: a YOLO data YAML or COCO JSONs are prepared on first use,
reused while unchanged and prepared again when they change; bad input is an error naming the
file (and line); the prepare CLI; train.py, eval.py and detect.py on the same specification, with
official-layout weights to fine-tune from."""
import json
import os
import pathlib
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from configs import common  # noqa: E402
from yolov9_jax.data import prepare, sources, yolo_format  # noqa: E402

NAMES = ["cat", "dog", "bird"]


def write_yolo_set(root, train_images=6, val_images=3, size_hw=(48, 64)):
  """images/{train,val} with labels/{train,val} (one or two boxes each) and data.yaml."""
  rng = np.random.default_rng(0)
  for split, count in (("train", train_images), ("val", val_images)):
    (root / "images" / split).mkdir(parents=True)
    (root / "labels" / split).mkdir(parents=True)
    for index in range(count):
      Image.fromarray(rng.integers(0, 255, (*size_hw, 3), dtype=np.uint8)).save(
          root / "images" / split / f"{index}.jpg")
      lines = [f"{(index + k) % len(NAMES)} 0.5 0.5 0.4 0.3" for k in range(1 + index % 2)]
      (root / "labels" / split / f"{index}.txt").write_text("\n".join(lines) + "\n")
  (root / "data.yaml").write_text(
      f"path: .\ntrain: images/train\nval: images/val\nnc: {len(NAMES)}\nnames: {NAMES}\n")
  return root / "data.yaml"


def data_config(**fields):
  config = ml_collections.ConfigDict(common.base().data.to_dict())
  config.update(**fields)
  return config


def test_a_yolo_yaml_is_prepared_once_reused_and_prepared_again_when_it_changes(tmp_path):
  data_yaml = write_yolo_set(tmp_path / "set")
  config = data_config(source="yolo", path=str(data_yaml), data_dir=str(tmp_path / "cache"))
  said = []
  record = prepare.ensure_prepared(config, progress=False, log=said.append)
  assert record["reports"]["train"]["images"] == 6 and record["reports"]["validation"]["boxes"] == 4
  assert any(line.startswith("preparing yolo dataset") for line in said)
  data = sources.open_datasets(config)
  assert (len(data.train), len(data.eval), data.class_names) == (6, 3, NAMES)
  assert data.category_ids == [0, 1, 2]
  said.clear()
  again = prepare.ensure_prepared(config, progress=False, log=said.append)
  assert again == record and "unchanged" in said[0]
  # A label edited: prepared again, and the new box is in the data.
  (tmp_path / "set" / "labels" / "val" / "0.txt").write_text("2 0.5 0.5 0.2 0.2\n1 0.3 0.3 0.1 0.1\n")
  said.clear()
  changed = prepare.ensure_prepared(config, progress=False, log=said.append)
  assert changed["fingerprint"] != record["fingerprint"] and "changed" in said[0]
  assert changed["reports"]["validation"]["boxes"] == 5
  assert sum(len(e["objects"]["label"]) for e in sources.open_datasets(config).eval) == 5


def test_mixed_box_and_polygon_lines_a_list_file_and_names_as_a_mapping(tmp_path):
  root = tmp_path / "set"
  (root / "images").mkdir(parents=True)
  (root / "labels").mkdir()
  for name in ("a", "b"):
    Image.fromarray(np.zeros((50, 100, 3), np.uint8)).save(root / "images" / f"{name}.png")
  (root / "labels" / "a.txt").write_text("1 0.5 0.5 0.2 0.4\n0 0.1 0.1 0.3 0.1 0.3 0.5 0.1 0.5\n")
  (root / "train.txt").write_text("./images/a.png\n./images/b.png\n")
  (root / "data.yaml").write_text("train: train.txt\nval: [images]\nnames: {0: cat, 1: dog}\n")
  data = yolo_format.DataYaml(root / "data.yaml")
  assert data.names == ["cat", "dog"] and len(data.splits["train"]) == 2
  coco = data.to_coco("train")
  assert [image["file_name"] for image in coco["images"]] == ["images/a.png", "images/b.png"]
  np.testing.assert_allclose([a["bbox"] for a in coco["annotations"]],
                             [[40, 15, 20, 20], [10, 5, 20, 20]])
  assert [a["category_id"] for a in coco["annotations"]] == [1, 0]


@pytest.mark.parametrize("case, expected", [
    ("no names", r"data.yaml: no 'names'"),
    ("missing folder", r"data.yaml: 'val' points at .*images/nowhere, which is neither"),
    ("empty split", r"data.yaml: split 'val' .* has no images"),
    ("nc mismatch", r"data.yaml: nc is 5 but 'names' has 3 names"),
    ("wrong fields", r"labels/train/0.txt:2: expected 'class cx cy w h' or a polygon .* 6 fields"),
    ("class beyond nc", r"labels/train/0.txt:1: class 3 is outside the 3 classes \(0..2\)"),
    ("not a number", r"labels/train/0.txt:1: expected an integer class and numbers"),
])
def test_bad_yolo_input_names_the_file_and_line(tmp_path, case, expected):
  data_yaml = write_yolo_set(tmp_path / "set", train_images=2, val_images=1)
  labels = tmp_path / "set" / "labels" / "train" / "0.txt"
  if case == "no names":
    data_yaml.write_text("train: images/train\nval: images/val\n")
  elif case == "missing folder":
    data_yaml.write_text(f"train: images/train\nval: images/nowhere\nnames: {NAMES}\n")
  elif case == "empty split":
    (tmp_path / "set" / "images" / "empty").mkdir()
    data_yaml.write_text(f"train: images/train\nval: images/empty\nnames: {NAMES}\n")
  elif case == "nc mismatch":
    data_yaml.write_text(f"train: images/train\nval: images/val\nnc: 5\nnames: {NAMES}\n")
  elif case == "wrong fields":
    labels.write_text("0 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2 0.2 0.1\n")
  elif case == "class beyond nc":
    labels.write_text("3 0.5 0.5 0.2 0.2\n")
  else:
    labels.write_text("cat 0.5 0.5 0.2 0.2\n")
  config = data_config(source="yolo", path=str(data_yaml), data_dir=str(tmp_path / "cache"))
  with pytest.raises((ValueError, FileNotFoundError), match=expected):
    prepare.ensure_prepared(config, progress=False, log=lambda _: None)


def _coco_set(root):
  """A COCO-format set with sparse category ids (3 and 7), train and val JSONs."""
  splits = {}
  for split, count in (("train", 4), ("val", 2)):
    (root / split).mkdir(parents=True)
    images, annotations = [], []
    for index in range(count):
      Image.fromarray(np.full((40, 60, 3), 30 * index, np.uint8)).save(root / split / f"{index}.png")
      images.append({"id": 100 + index, "file_name": f"{index}.png", "width": 60, "height": 40})
      annotations.append({"id": index + 1, "image_id": 100 + index, "category_id": (3, 7)[index % 2],
                          "bbox": [10, 10, 20, 15], "area": 300, "iscrowd": 0})
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]}
    (root / f"{split}.json").write_text(json.dumps(coco))
    splits[split] = coco
  return splits


def test_coco_jsons_keep_their_sparse_ids_and_bad_json_is_named(tmp_path):
  _coco_set(tmp_path / "set")
  fields = dict(source="coco", data_dir=str(tmp_path / "cache"),
                train_annotations=str(tmp_path / "set" / "train.json"),
                train_images=str(tmp_path / "set" / "train"),
                eval_annotations=str(tmp_path / "set" / "val.json"),
                eval_images=str(tmp_path / "set" / "val"))
  config = data_config(**fields)
  prepare.ensure_prepared(config, progress=False, log=lambda _: None)
  data = sources.open_datasets(config)
  assert (data.class_names, data.category_ids) == (["cat", "dog"], [3, 7])
  assert data.eval_annotations == fields["eval_annotations"]  # the official numbers: its own JSON
  bad = json.loads((tmp_path / "set" / "val.json").read_text())
  bad["annotations"][0]["image_id"] = 999
  (tmp_path / "set" / "val.json").write_text(json.dumps(bad))
  with pytest.raises(ValueError, match=r"val.json: 1 image ids referenced by annotations are not "
                     r"in 'images' \(first: image_id 999 of annotation id 1"):
    prepare.ensure_prepared(config, progress=False, log=lambda _: None)
  (tmp_path / "set" / "val.json").write_text(json.dumps({**bad, "images": [], "annotations": []}))
  with pytest.raises(ValueError, match=r"val.json: 'images' is empty"):
    prepare.ensure_prepared(config, progress=False, log=lambda _: None)
  with pytest.raises(ValueError, match=r"data.source='coco' needs data.train_images"):
    prepare.ensure_prepared(data_config(**{**fields, "train_images": ""}), log=lambda _: None)


def test_the_prepare_command_shows_progress_and_prints_the_settings_to_train_with(tmp_path):
  data_yaml = write_yolo_set(tmp_path / "set")
  result = subprocess.run(
      [sys.executable, "-m", "yolov9_jax.data.prepare", "--source=yolo", f"--path={data_yaml}",
       f"--data_dir={tmp_path / 'cache'}"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "preparing" in result.stderr and "6/6" in result.stderr  # the progress bar
  name = prepare.dataset_name(data_config(source="yolo", path=str(data_yaml)))
  assert (f"--config.data.source=tfds --config.data.name={name} "
          f"--config.data.data_dir={tmp_path / 'cache'}") in result.stdout
  assert "train: 6 images, 9 boxes" in result.stdout
  bad = subprocess.run([sys.executable, "-m", "yolov9_jax.data.prepare", "--source=yolo",
                        f"--path={tmp_path / 'missing.yaml'}"], cwd=REPO_ROOT, capture_output=True,
                       text=True, timeout=300)
  assert bad.returncode == 1 and "prepare: data YAML" in bad.stderr and "Traceback" not in bad.stderr
