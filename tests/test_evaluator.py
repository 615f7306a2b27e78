"""The evaluator: perfect predictions score 1 through its result path, sharding changes nothing,
weights files load back or fail with a message naming the problem; eval.py and detect.py end to
end on a tiny shapes set."""
import csv
import dataclasses
import importlib.util
import json
import pathlib

import flax
import jax
import numpy as np
import pytest
from conftest import REPO_ROOT
from PIL import Image

from yolov9_jax import sharding, weights
from yolov9_jax.data import coco_format, eval_batches, shapes
from yolov9_jax.evaluation import evaluator, nms

SIZE = 64
CLASS_NAMES = [c["name"] for c in shapes.CATEGORIES]


@pytest.fixture(scope="module")
def shapes_dataset(tmp_path_factory):
  """12 shapes images (about 64 x 80) prepared as the "validation" split: (builder, raw dir)."""
  root = tmp_path_factory.mktemp("shapes_eval")
  annotations = shapes.generate(root / "raw", num_images=12, image_hw=(64, 80), seed=1)
  builder, _ = coco_format.prepare(annotations, root / "raw" / "images", root / "tfds",
                                   "shapes_eval", split="validation")
  return builder, root / "raw"


@pytest.fixture(scope="module")
def gelan_t_3_classes(gelan_t_20_classes):
  """gelan-t variables for the 3 shapes classes, drawn in numpy in the 20-class fixture's layout
  (the class convs cut to 3; the class branch is 64 wide either way): LeCun-scaled kernels and
  random biases, so that an untrained model gives varied boxes and scores on every image (the
  freshly initialised model gives nearly constant ones)."""
  rng = np.random.default_rng(0)

  def draw(path, value):
    name, shape = path[-1].key, np.shape(value)
    if path[-2].key.startswith("cv3_") and path[-2].key.endswith("_2"):  # a class conv
      shape = shape[:-1] + (3,)
    if name == "kernel":
      return rng.normal(0, np.sqrt(1 / np.prod(shape[:-1])), shape).astype(np.float32)
    if name == "bias" and path[-2].key.startswith("cv2_"):  # box distances: 16 bins per side
      # Weight on the low bins: boxes of a few strides, not all clipped to the whole image.
      return (-0.5 * np.tile(np.arange(16), 4) + rng.normal(0, 0.5, shape)).astype(np.float32)
    if name in ("bias", "mean"):
      return rng.normal(0, 0.5, shape).astype(np.float32)
    return np.ones(shape, np.float32)  # BatchNorm scale and running variance

  return jax.tree_util.tree_map_with_path(draw, gelan_t_20_classes[1])


def _ground_truth_as_detections(batch, recorded, max_det=20):
  """``nms.Detections`` (numpy) holding each image's ground truth in letterboxed pixels, score 1."""
  size = len(batch["image_id"])
  boxes, scores = np.zeros((size, max_det, 4), np.float32), np.zeros((size, max_det), np.float32)
  classes, count = np.zeros((size, max_det), np.int32), np.zeros(size, np.int32)
  for i in np.flatnonzero(batch["example_valid"]):
    image_id = int(batch["image_id"][i])
    height, width = recorded.images_hw[image_id]
    bbox, labels, _ = recorded.objects[image_id]
    y1, x1, y2, x2 = (bbox * [height, width, height, width]).T
    original = np.stack([x1, y1, x2, y2], axis=1)
    count[i] = len(labels)
    boxes[i, :count[i]] = original * batch["ratio"][i] + np.tile(batch["pad_xy"][i], 2)
    scores[i, :count[i]] = 1.0
    classes[i, :count[i]] = labels
  return nms.Detections(boxes, scores, classes, count, np.zeros(size, np.int32))


@pytest.mark.parametrize("rectangular", [True, False], ids=["rectangular", "square"])
def test_ground_truth_fed_as_predictions_gives_ap_1_and_a_diagonal_confusion_matrix(
    shapes_dataset, rectangular):
  """Boxes placed in each batch's letterboxed pixels map back to the original ones exactly (AP 1)
  with either protocol's batch shapes."""
  builder, _ = shapes_dataset
  category_ids = coco_format.category_ids(builder)
  recorded = evaluator.RecordingSource(builder.as_data_source(split="validation"))
  parts, image_ids = [], []
  plan = eval_batches.make_plan(evaluator.images_hw(recorded), 5, SIZE, rectangular)
  assert (len(plan.distinct_shapes) > 1) == rectangular
  for batch in eval_batches.batches(recorded, plan):
    batch_predictions, batch_ids, _ = evaluator.detections_to_predictions(
        _ground_truth_as_detections(batch, recorded), batch)
    parts.append(batch_predictions)
    image_ids += batch_ids
  predictions = evaluator.Predictions.concatenate(parts)
  # The recording survives the arrays that processes exchange.
  images_hw, objects = evaluator.RecordingSource.from_rows(*recorded.rows())
  assert images_hw == recorded.images_hw and objects.keys() == recorded.objects.keys()
  for image_id, (bbox, labels, crowd) in objects.items():
    np.testing.assert_array_equal(bbox, recorded.objects[image_id][0])
    np.testing.assert_array_equal(labels, recorded.objects[image_id][1])
    np.testing.assert_array_equal(crowd, recorded.objects[image_id][2])
  ground_truth = evaluator.ground_truth_from_examples(images_hw, objects, category_ids, CLASS_NAMES)
  assert ground_truth == evaluator.ground_truth_from_examples(
      recorded.images_hw, recorded.objects, category_ids, CLASS_NAMES)
  assert sorted(image_ids) == list(range(1, 13)) and len(predictions) == len(ground_truth["annotations"])
  scored = evaluator.score(predictions, image_ids, ground_truth, category_ids, CLASS_NAMES)
  assert scored["metrics"]["AP"] == scored["metrics"]["AP50"] == 1.0
  assert all(ap == {"AP": 1.0, "AP50": 1.0} for ap in scored["per_class_ap"].values())
  per_class_truths = np.bincount([a["category_id"] - 1 for a in ground_truth["annotations"]],
                                 minlength=3)
  np.testing.assert_array_equal(scored["confusion_matrix"], np.diag([*per_class_truths, 0]))
  assert (scored["pr_precision"][:, -1] == 1.0).all()  # precision 1 up to recall 1

  # One detection relabelled: a confusion between two classes, and AP below 1.
  labels = predictions.labels.copy()
  labels[0] = (labels[0] + 1) % 3
  scored = evaluator.score(dataclasses.replace(predictions, labels=labels), image_ids,
                           ground_truth, category_ids, CLASS_NAMES)
  matrix = scored["confusion_matrix"]
  assert matrix[labels[0], predictions.labels[0]] == 1
  assert matrix.sum() == len(predictions) and scored["metrics"]["AP"] < 1.0


def test_evaluation_sharded_over_8_devices_equals_one_device(shapes_dataset, gelan_t_3_classes):
  builder, _ = shapes_dataset
  source = builder.as_data_source(split="validation")
  category_ids = coco_format.category_ids(builder)
  one_device = sharding.make_mesh(jax.devices()[:1])
  runs = [evaluator.evaluate("gelan-t", gelan_t_3_classes, source, category_ids,
                             class_names=CLASS_NAMES, image_size=SIZE, batch_size=8, mesh=mesh,
                             progress=False)
          for mesh in (one_device, sharding.make_mesh())]
  assert len(jax.devices()) == 8
  single, sharded = runs
  assert single.images == sharded.images == 12  # 12 images in 2 batches of 8, the last padded
  assert len(single.predictions) > 12 * 10  # the untrained model detects plenty in every image

  def table(result):
    ordered = sorted(result.predictions.to_coco(category_ids),
                     key=lambda r: (r["image_id"], -r["score"], r["category_id"]))
    return (np.array([(r["image_id"], r["category_id"]) for r in ordered]),
            np.array([r["bbox"] + [r["score"]] for r in ordered]))

  (single_ids, single_values), (sharded_ids, sharded_values) = table(single), table(sharded)
  np.testing.assert_array_equal(sharded_ids, single_ids)
  np.testing.assert_allclose(sharded_values, single_values, atol=2e-3)
  for name in ("AP", "AP50", "AR100"):
    assert sharded.metrics[name] == pytest.approx(single.metrics[name], abs=1e-3)
  np.testing.assert_array_equal(sharded.confusion_matrix, single.confusion_matrix)
  assert set(sharded.per_class_ap) == set(CLASS_NAMES)
  assert len(single.batch_shapes) > 1  # rectangles by default: 2 batches of their own shapes


def test_the_square_protocol_gives_the_numbers_it_gave_before_the_rectangles(shapes_dataset,
                                                                             gelan_t_3_classes):
  """Before the rectangular protocol (commit 6b4c66b) every batch was an image_size square: that
  evaluation of these weights gave 3,024 detections, AP 0.0022375, AP50 0.0100102 (measured)."""
  builder, _ = shapes_dataset
  result = evaluator.evaluate("gelan-t", gelan_t_3_classes, builder.as_data_source(split="validation"),
                              coco_format.category_ids(builder), class_names=CLASS_NAMES,
                              image_size=SIZE, batch_size=8, rectangular=False, progress=False)
  assert result.batch_shapes == ((SIZE, SIZE),)
  assert len(result.predictions) == 3024
  assert result.metrics["AP"] == pytest.approx(0.002237546920651585, abs=1e-6)
  assert result.metrics["AP50"] == pytest.approx(0.010010206738495135, abs=1e-6)


def test_weights_load_back_from_msgpack_and_npz_and_mismatches_are_named(tmp_path,
                                                                          gelan_t_3_classes):
  msgpack_path = tmp_path / "weights.msgpack"
  msgpack_path.write_bytes(flax.serialization.to_bytes(gelan_t_3_classes))
  npz_path = tmp_path / "weights.npz"
  np.savez(npz_path, **flax.traverse_util.flatten_dict(gelan_t_3_classes, sep="/"))
  for path in (msgpack_path, npz_path):
    loaded = weights.load(path, "gelan-t")[0]
    jax.tree.map(np.testing.assert_array_equal, loaded, gelan_t_3_classes)
  with pytest.raises(ValueError, match="has 3 classes, expected 80"):
    weights.load(msgpack_path, "gelan-t", num_classes=80)
  with pytest.raises(ValueError, match="not a gelan-s checkpoint|does not fit gelan-s"):
    weights.load(msgpack_path, "gelan-s")
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing.msgpack")):
    weights.load(tmp_path / "missing.msgpack", "gelan-t")



def test_official_pytorch_weights_load_through_interop(tmp_path, gelan_t_3_classes):
  from yolov9_jax import interop
  if not hasattr(interop, "save_torch_state_dict"):
    pytest.skip("this version has no PyTorch checkpoint files (interop.save_torch_state_dict)")
  path = tmp_path / "gelan-t.pt"
  interop.save_torch_state_dict(path, interop.to_torch_state_dict("gelan-t", gelan_t_3_classes))
  loaded = weights.load(path, "gelan-t", num_classes=3)[0]
  jax.tree.map(np.testing.assert_array_equal, loaded, gelan_t_3_classes)
  with pytest.raises(ValueError, match="yolov9-t"):
    weights.load(path, "yolov9-t")

# The entry points, run in this process (they reuse the compiled detector).

def _script(name):
  """The module of the repository-root script ``name``.py (eval.py, detect.py)."""
  spec = importlib.util.spec_from_file_location(f"{name}_script", REPO_ROOT / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory, gelan_t_3_classes):
  path = tmp_path_factory.mktemp("weights") / "gelan-t-shapes.msgpack"
  path.write_bytes(flax.serialization.to_bytes(gelan_t_3_classes))
  return path


def test_eval_script_prints_the_coco_table_and_writes_results_and_plots(
    shapes_dataset, weights_file, tmp_path, capsys):
  builder, raw = shapes_dataset
  data_dir = raw.parent / "tfds"
  out_dir = tmp_path / "eval"
  result = _script("eval").main([
      "eval.py", "--model=gelan-t", f"--weights={weights_file}", f"--data_dir={data_dir}",
      "--dataset=shapes_eval", "--split=validation", f"--image_size={SIZE}", "--batch_size=8",
      f"--out_dir={out_dir}"])
  printed = capsys.readouterr().out
  assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in printed
  assert "triangle" in printed and "images/s" in printed
  predictions = json.loads((out_dir / "predictions.json").read_text())
  assert predictions == result.predictions.to_coco([1, 2, 3]) and len(predictions) > 12 * 10
  assert set(predictions[0]) == {"image_id", "category_id", "bbox", "score"}
  assert {p["category_id"] for p in predictions} <= {1, 2, 3}
  rows = list(csv.DictReader((out_dir / "per_class_ap.csv").open()))
  assert [row["class"] for row in rows] == CLASS_NAMES
  metrics = json.loads((out_dir / "metrics.json").read_text())
  assert metrics["images"] == 12 and metrics["AP"] == result.metrics["AP"]
  # The official rectangles by default: these images sorted by h/w fill 2 batches of 8.
  hw = [np.shape(e["image"])[:2] for e in builder.as_data_source(split="validation")]
  assert metrics["rectangular"] and metrics["batch_shapes_hw"] == [
      list(shape) for shape in eval_batches.make_plan(hw, 8, SIZE).distinct_shapes]
  assert metrics["batch_shapes_hw"] != [[SIZE, SIZE]]
  for picture in ("pr_curve.png", "confusion_matrix.png"):
    with Image.open(out_dir / picture) as image:
      assert image.format == "PNG" and min(image.size) > 300


def test_eval_script_names_a_missing_weights_file_or_dataset(shapes_dataset, weights_file, tmp_path):
  _, raw = shapes_dataset
  data_dir = raw.parent / "tfds"
  common = ["eval.py", "--model=gelan-t", "--split=validation", f"--out_dir={tmp_path}"]
  script = _script("eval")
  with pytest.raises(FileNotFoundError, match=f"weights file or checkpoint directory {tmp_path / 'nope.msgpack'} does not"):
    script.main(common + [f"--weights={tmp_path / 'nope.msgpack'}",
                          f"--data_dir={data_dir}", "--dataset=shapes_eval"])
  with pytest.raises(FileNotFoundError, match=f"no prepared dataset 'missing' under {tmp_path}"):
    script.main(common + [f"--weights={weights_file}", f"--data_dir={tmp_path}", "--dataset=missing"])
  with pytest.raises(ValueError, match="has no split 'test'"):
    script.main(common + [f"--weights={weights_file}", f"--data_dir={data_dir}",
                          "--dataset=shapes_eval", "--split=test"])


def test_detect_script_writes_annotated_images_and_detections_in_original_pixels(
    shapes_dataset, weights_file, tmp_path):
  _, raw = shapes_dataset
  out_dir = tmp_path / "detect"
  _script("detect").main([
      "detect.py", "--model=gelan-t", f"--weights={weights_file}",
      "--class_names=circle,square,triangle", f"--image_size={SIZE}", "--batch_size=8",
      f"--out_dir={out_dir}", str(raw / "images")])
  written = json.loads((out_dir / "detections.json").read_text())
  sizes = {i["file_name"]: (i["height"], i["width"])
           for i in json.loads((raw / "annotations.json").read_text())["images"]}
  assert [pathlib.Path(r["file"]).name for r in written["images"]] == sorted(sizes)
  assert written["unreadable"] == []
  detections = [d for r in written["images"] for d in r["detections"]]
  assert detections and all(d["score"] > 0.25 and d["name"] in CLASS_NAMES for d in detections)
  for record in written["images"]:
    height, width = sizes[pathlib.Path(record["file"]).name]
    assert (record["height"], record["width"]) == (height, width)
    for d in record["detections"]:
      x1, y1, x2, y2 = d["box_xyxy_px"]
      assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height
    with Image.open(record["annotated"]) as picture:
      assert picture.size == (width, height)


def test_detect_inputs_are_files_folders_and_globs(shapes_dataset):
  _, raw = shapes_dataset
  detect = _script("detect")
  images = raw / "images"
  paths = detect.image_paths([str(images / "000003.png"), str(images), str(images / "00001*.png")])
  assert paths[0].name == "000003.png" and len(paths) == 1 + 12 + 2
  with pytest.raises(FileNotFoundError, match="no image files at '.*nothing_here'"):
    detect.image_paths([str(raw / "nothing_here")])
