"""A user's own dataset in one command: a YOLO data YAML or COCO JSONs are prepared on first use,
reused while unchanged and prepared again when they change; bad input is an error naming the
file (and line); the prepare CLI; train.py, eval.py and detect.py on the same specification, with
official-layout weights to fine-tune from."""
import json
import pathlib
import re
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


# The test sizes: gelan-t at 64 px on the CPU, one step of 8 (one image per simulated device).
_SMALL_RUN = ["--config.model.dtype=float32", "--config.augment.image_size=64",
              "--config.augment.max_boxes=16", "--config.augment.workers=0",
              "--config.augment.close_mosaic_epochs=0", "--config.train.batch_size=8",
              "--config.train.epochs=1", "--config.train.log_every_steps=1",
              "--config.optimizer.nominal_batch_size=8", "--config.eval.batch_size=8",
              "--config.eval.num_images_logged=2"]


def _readme_commands():
  """The commands of README's "Train on your data" section, as argument lists."""
  import re
  import shlex
  text = (REPO_ROOT / "README.md").read_text()
  section = text[text.index("## Train on your data"):]
  block = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)
  return [shlex.split(line) for line in re.sub(r"\\\n\s*", " ", block).splitlines() if line.strip()]


def _run(args, expect_failure=False):
  done = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                        timeout=900)
  if expect_failure:
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
  else:
    assert done.returncode == 0, f"{args[0]}: {done.stdout[-2000:]}\n{done.stderr[-4000:]}"
  return done


def _with_bad_bits(images_dir):
  """An unreadable image among the good ones (skipped and reported)."""
  (images_dir / "broken.jpg").write_bytes(b"not a jpeg at all")


def _exported_names(prefix):
  import safetensors
  with safetensors.safe_open(f"{prefix}.safetensors", framework="np") as file:
    return json.loads(file.metadata()["class_names"])


def test_readmes_commands_train_eval_detect_and_export_a_yolo_and_a_coco_dataset(
    tmp_path, gelan_t_20_classes, a_subprocess_slot):
  """Only the command line, as a user runs it: README's three commands on a YOLO folder (with an
  unreadable image, a box beyond the edge, a polygon line), fine-tuning from official-layout
  weights of another number of classes; then the same on COCO JSONs with sparse ids; export.py
  of each run. Predictions carry the dataset's own category ids, detections its class names."""
  from yolov9_jax import interop
  _, variables = gelan_t_20_classes
  official = interop.export_official_weights("gelan-t", variables, tmp_path / "gelan-t")[0]
  assert official.suffix == ".pt"
  data_yaml = write_yolo_set(tmp_path / "set", train_images=9, val_images=4)
  _with_bad_bits(tmp_path / "set" / "images" / "train")
  with (tmp_path / "set" / "labels" / "train" / "1.txt").open("a") as labels:
    labels.write("1 0.9 0.9 0.4 0.4\n")  # beyond the right and bottom edges: clipped
    labels.write("2 0.1 0.1 0.4 0.1 0.4 0.4 0.1 0.4\n")  # a polygon line among box lines
  train_command, eval_command, detect_command = _readme_commands()
  workdir, photos = tmp_path / "runs" / "custom", tmp_path / "set" / "images" / "val"
  replacements = {"data.yaml": str(data_yaml), "gelan-c.pt": str(official), "gelan-c": "gelan-t",
                  "runs/custom": str(workdir), "photos/": str(photos)}

  def as_here(command):
    words = []
    for word in command[1:]:
      for readme_value, here in replacements.items():
        word = word.replace(readme_value, here)
      words.append(word)
    return words

  cache = f"--config.data.data_dir={tmp_path / 'cache'}"
  # A label line of a class beyond nc: a message with the file and line, before anything runs.
  bad_labels = tmp_path / "set" / "labels" / "val" / "0.txt"
  good_labels = bad_labels.read_text()
  bad_labels.write_text(good_labels + "5 0.5 0.5 0.1 0.1\n")
  failed = _run(as_here(train_command) + [cache] + _SMALL_RUN, expect_failure=True)
  assert f"{bad_labels}:2: class 5 is outside the 3 classes" in failed.stderr
  bad_labels.write_text(good_labels)

  trained = _run(as_here(train_command) + [cache] + _SMALL_RUN)
  assert "preparing yolo dataset" in trained.stdout
  assert "train: 9 images" in trained.stdout and "unreadable images skipped: 1" in trained.stdout
  assert "re-initialised:" in trained.stdout  # 20 classes in the file, 3 in the data
  report = json.loads((workdir / prepare.PREPARED_FILE).read_text())["reports"]
  assert report["train"]["skipped_unreadable"] == ["images/train/broken.jpg"]
  assert report["train"]["boxes_clipped"] >= 1

  evaluated = _run(as_here(eval_command))
  assert "unchanged" in evaluated.stdout and "preparing yolo" not in evaluated.stdout  # reused
  predictions = json.loads((workdir / "eval" / "predictions.json").read_text())
  assert predictions and {p["category_id"] for p in predictions} <= {0, 1, 2}
  detected = _run(as_here(detect_command) + ["--conf_threshold=0.001", "--max_det=5"])
  assert "4 images" in detected.stdout
  records = json.loads((workdir / "detect" / "detections.json").read_text())["images"]
  assert sum(len(r["detections"]) for r in records) > 0
  assert {d["name"] for r in records for d in r["detections"]} <= set(NAMES)
  assert all(pathlib.Path(r["annotated"]).is_file() for r in records)
  _run(["export.py", f"--checkpoint={workdir}", "--architecture=gelan-t",
        f"--output={tmp_path / 'exported' / 'custom'}"])
  assert _exported_names(tmp_path / "exported" / "custom") == NAMES

  # COCO JSONs with sparse category ids (3, 7, 11) and an unreadable image. Three classes as in
  # the YOLO set: the same programs, which the compilation cache then holds (minutes less in CI).
  _coco_set(tmp_path / "coco")
  for split in ("train", "val"):
    coco = json.loads((tmp_path / "coco" / f"{split}.json").read_text())
    coco["categories"].append({"id": 11, "name": "bird"})
    coco["annotations"].append({"id": 50, "image_id": 100, "category_id": 11,
                                "bbox": [30, 20, 12, 10], "area": 120, "iscrowd": 0})
    (tmp_path / "coco" / f"{split}.json").write_text(json.dumps(coco))
  for index in range(4, 9):  # 8 readable train images: one step of 8
    Image.fromarray(np.full((40, 60, 3), 20 * index, np.uint8)).save(tmp_path / "coco" / "train" / f"{index}.png")
  train_json = json.loads((tmp_path / "coco" / "train.json").read_text())
  train_json["images"] += [{"id": 100 + i, "file_name": f"{i}.png", "width": 60, "height": 40}
                           for i in range(4, 9)]
  train_json["images"].append({"id": 999, "file_name": "broken.jpg", "width": 60, "height": 40})
  _with_bad_bits(tmp_path / "coco" / "train")
  (tmp_path / "coco" / "train.json").write_text(json.dumps(train_json))
  coco_run = tmp_path / "runs" / "coco"
  coco_fields = ["--config.data.source=coco",
                 f"--config.data.train_annotations={tmp_path / 'coco' / 'train.json'}",
                 f"--config.data.train_images={tmp_path / 'coco' / 'train'}",
                 f"--config.data.eval_annotations={tmp_path / 'coco' / 'val.json'}",
                 f"--config.data.eval_images={tmp_path / 'coco' / 'val'}"]
  trained = _run(["train.py", "--config=configs/custom.py:gelan-t", f"--workdir={coco_run}",
                  f"--config.model.init_from={official}", cache] + coco_fields + _SMALL_RUN)
  assert "preparing coco dataset" in trained.stdout and "unreadable images skipped: 1" in trained.stdout
  # eval.py with the dataset named as train.py names it (--config and its fields).
  _run(["eval.py", "--config=configs/custom.py:gelan-t", f"--weights={coco_run}", cache,
        f"--out_dir={coco_run / 'eval'}", "--image_size=64"] + coco_fields)
  predictions = json.loads((coco_run / "eval" / "predictions.json").read_text())
  assert predictions and {p["category_id"] for p in predictions} <= {3, 7, 11}
  _run(["detect.py", f"--weights={coco_run}", f"--out_dir={coco_run / 'detect'}",
        "--conf_threshold=0.001", str(tmp_path / "coco" / "val")])
  records = json.loads((coco_run / "detect" / "detections.json").read_text())["images"]
  assert {d["name"] for r in records for d in r["detections"]} <= {"cat", "dog", "bird"}
  _run(["export.py", f"--checkpoint={coco_run}", "--architecture=gelan-t",
        f"--output={tmp_path / 'exported' / 'coco'}"])
  assert _exported_names(tmp_path / "exported" / "coco") == ["cat", "dog", "bird"]


@pytest.mark.parametrize("command", [["train.py"], ["eval.py"], ["detect.py"], ["export.py"],
                                     ["-m", "yolov9_jax.bench"], ["-m", "yolov9_jax.tpu_plan"],
                                     ["-m", "yolov9_jax.data.prepare"]])
def test_every_entry_point_takes_help_in_the_one_flag_style(command):
  """absl flags everywhere: ``--name=value``, booleans as ``--name`` / ``--noname``; ``--help``
  lists them (absl's app.run, in train.py and export.py, exits 1 after its help)."""
  done = subprocess.run([sys.executable, *command, "--help"], cwd=REPO_ROOT, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode in ((0, 1) if command[0] in ("train.py", "export.py") else (0,)), done.stderr[-2000:]
  assert "Traceback" not in done.stderr, done.stderr[-2000:]
  assert re.search(r"^\s+--[a-z_]+: ", done.stdout, re.MULTILINE), done.stdout[-2000:]


def test_eval_and_detect_name_what_they_miss(tmp_path):
  """Without a dataset (a --config, a workdir as --weights, or --data_dir with --dataset) or a
  model, eval.py and detect.py say what to give."""
  import importlib.util
  weights_file = tmp_path / "w.msgpack"
  weights_file.write_bytes(b"")
  scripts = {}
  for name in ("eval", "detect"):
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO_ROOT / f"{name}.py")
    scripts[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scripts[name])
  with pytest.raises(ValueError, match="eval.py needs --model"):
    scripts["eval"].main(["eval.py", f"--weights={weights_file}"])
  with pytest.raises(ValueError, match="eval.py needs a dataset: --config"):
    scripts["eval"].main(["eval.py", "--model=gelan-t", f"--weights={weights_file}"])
  with pytest.raises(ValueError, match="--dataset and --data_dir go together"):
    scripts["eval"].main(["eval.py", "--model=gelan-t", f"--weights={weights_file}", "--dataset=x"])
  with pytest.raises(ValueError, match="detect.py needs --weights, images"):
    scripts["detect"].main(["detect.py"])
  (tmp_path / "photo.jpg").write_bytes(b"")
  with pytest.raises(ValueError, match="detect.py needs --model"):
    scripts["detect"].main(["detect.py", f"--weights={weights_file}", str(tmp_path / "photo.jpg")])
  # A config names the dataset; its YAML must exist (the error names it).
  with pytest.raises(FileNotFoundError, match="nowhere.yaml"):
    scripts["eval"].main(["eval.py", "--config=configs/custom.py:gelan-t",
                          f"--config.data.path={tmp_path / 'nowhere.yaml'}",
                          f"--config.data.data_dir={tmp_path / 'cache'}", f"--weights={weights_file}"])
