"""Exported detectors (StableHLO, TF SavedModel, TFLite, ONNX) give eval.py's jitted detector's
detections in their own runtimes; bad requests are clear errors; detect.py runs an exported file.

The weights: gelan-t, 3 classes, at 64 px, made to see the images (``variables``); at CONF every
image has more candidates than max_det, and at a threshold just above one image's best score that
image alone has no detections (both asserted on the jitted detector first,
so that the cases stay what they claim)."""
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
import jax  # noqa: E402
from yolov9_jax import models, sharding  # noqa: E402
from yolov9_jax.deploy import formats, runtimes, spec as spec_lib  # noqa: E402
from yolov9_jax.evaluation import evaluator, inference  # noqa: E402

SIZE, MAX_DET, CONF, IOU = 64, 5, 0.3, 0.7
NAMES = ("cat", "dog", "bird")
# float32 formats: the bounds. float16 weights (TFLite) move scores by ~1e-3.
BOX_TOLERANCE_PX, SCORE_TOLERANCE = 0.01, 1e-4


@pytest.fixture(scope="module")
def images():
  """Eight (the test devices): noise, noise, a black image, a smooth gradient and four more noise
  images."""
  rng = np.random.default_rng(0)
  noise = rng.integers(0, 256, (6, SIZE, SIZE, 3), dtype=np.uint8)
  black = np.zeros((1, SIZE, SIZE, 3), np.uint8)
  ramp = np.broadcast_to(np.linspace(0, 255, SIZE, dtype=np.uint8)[None, :, None, None],
                         (1, SIZE, SIZE, 3)).transpose(0, 2, 1, 3)
  return np.concatenate([noise[:2], black, np.ascontiguousarray(ramp), noise[2:]])


@pytest.fixture(scope="module")
def variables(images):
  """Fresh weights keep almost nothing of the input after 30 layers (BatchNorm statistics of 0 and
  1): the statistics are set to the images' own (100 train-mode passes), and the class layers are
  scaled up, so that boxes and scores differ between images and anchors."""
  model = models.build("gelan-t", num_classes=len(NAMES))
  variables = models.init_variables("gelan-t", len(NAMES), seed=0, image_size=SIZE)

  @jax.jit
  def calibrated_statistics(variables, images):
    def one_pass(_, statistics):
      _, updated = model.apply({"params": variables["params"], "batch_stats": statistics}, images,
                               train=True, mutable=["batch_stats"])
      return updated["batch_stats"]
    return jax.lax.fori_loop(0, 100, one_pass, variables["batch_stats"])

  variables = {"params": variables["params"],
               "batch_stats": calibrated_statistics(variables, images.astype(np.float32) / 255)}
  head = variables["params"][f"model_{len(models.ARCHITECTURES['gelan-t']) - 1}"]
  for level in range(3):
    layer = head[f"cv3_{level}_2"]
    layer["kernel"], layer["bias"] = layer["kernel"] * 30, layer["bias"] + 4
  return variables


def _jitted_detections(variables, images, conf_threshold):
  """eval.py's jitted detector on ``images``: {output: numpy}, and the candidates it dropped."""
  mesh = sharding.make_mesh()
  detect, fused, _ = evaluator.prepare_detector("gelan-t", variables, mesh, conf_threshold, IOU,
                                                MAX_DET, multi_label=False)
  detections = detect(fused, images)
  result = {"boxes_xyxy_px": detections.boxes_xyxy_px, "scores": detections.scores,
            "classes": detections.classes, "count": detections.count}
  assert int(np.asarray(detections.candidates_dropped).max()) == 0
  return {name: np.asarray(value) for name, value in result.items()}


@pytest.fixture(scope="module")
def reference(variables, images):
  """The jitted detections at CONF: every image has more candidates than max_det."""
  result = _jitted_detections(variables, images, CONF)
  assert (result["count"] == MAX_DET).all()
  return result


def _settings(**changes):
  return {"class_names": NAMES, "image_size": SIZE, "batch_size": None, "conf_threshold": CONF,
          "iou_threshold": IOU, "max_det": MAX_DET, "multi_label": False, "nms": True,
          **changes}


def _assert_same_detections(got, expected, box_tolerance=BOX_TOLERANCE_PX,
                            score_tolerance=SCORE_TOLERANCE):
  np.testing.assert_array_equal(got["count"], expected["count"])
  np.testing.assert_array_equal(got["classes"], expected["classes"])  # same classes, same order
  np.testing.assert_allclose(got["boxes_xyxy_px"], expected["boxes_xyxy_px"], rtol=0,
                             atol=box_tolerance)
  np.testing.assert_allclose(got["scores"], expected["scores"], rtol=0, atol=score_tolerance)


@pytest.mark.parametrize("export_format", ["stablehlo", "saved_model", "onnx"])
def test_a_dynamic_batch_export_gives_the_jitted_detections_at_batch_1_and_4(
    export_format, variables, images, reference, tmp_path):
  spec, written = formats.export_detector(export_format, "gelan-t", variables, _settings(),
                                          str(tmp_path / "model"))
  detector = runtimes.load(written[0])
  assert detector.spec == spec and detector.spec.class_names == NAMES
  _assert_same_detections(detector(images), reference)
  for first, batch_size in [(0, 4), (4, 4)] + [(i, 1) for i in range(4)]:
    expected = {name: value[first:first + batch_size] for name, value in reference.items()}
    _assert_same_detections(detector(images[first:first + batch_size]), expected)


def _empty_image_threshold(variables, images):
  """(image, threshold): the image whose best score is the lowest, and a threshold between that
  score and the next lowest: that image alone has no detections."""
  model, fused = inference.inference_model("gelan-t", variables)
  scores = np.asarray(model.apply(fused, images.astype(np.float32) / 255, train=False)["main"])
  best = scores[..., 4:].max(axis=(1, 2))
  lowest, next_lowest = np.argsort(best)[:2]
  assert best[next_lowest] - best[lowest] > 1e-3, best  # far beyond the score tolerance
  return int(lowest), float((best[lowest] + best[next_lowest]) / 2)


def test_an_image_without_detections_beside_ones_with_them_in_every_format(variables, images,
                                                                           tmp_path):
  empty, threshold = _empty_image_threshold(variables, images)
  expected = _jitted_detections(variables, images, threshold)
  assert expected["count"][empty] == 0 and (np.delete(expected["count"], empty) > 0).all()
  for export_format in ("stablehlo", "saved_model", "onnx", "tflite"):
    _, written = formats.export_detector(
        export_format, "gelan-t", variables,
        _settings(conf_threshold=threshold, batch_size=8 if export_format == "tflite" else None),
        str(tmp_path / export_format))
    _assert_same_detections(runtimes.load(written[0])(images), expected)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_tflite_float32_gives_the_jitted_detections(batch_size, variables, images, reference,
                                                    tmp_path):
  spec, written = formats.export_detector("tflite", "gelan-t", variables,
                                          _settings(batch_size=batch_size), str(tmp_path / "m"))
  detector = runtimes.load(written[0])
  assert detector.spec == spec and detector.spec.batch_size == batch_size
  for first in range(0, 4, batch_size):
    expected = {name: value[first:first + batch_size] for name, value in reference.items()}
    _assert_same_detections(detector(images[first:first + batch_size]), expected)
  with pytest.raises(ValueError, match="takes uint8 images of shape"):
    detector(images[:batch_size].astype(np.float32))


def test_tflite_float16_stays_within_its_stated_bounds(variables, images, reference, tmp_path):
  """float16 weights (the computation stays float32): the same detections, counts and classes,
  boxes within 0.05 px and scores within 2e-3 here (the bounds docs/deploy.md states)."""
  _, written = formats.export_detector("tflite", "gelan-t", variables,
                                       _settings(batch_size=4, dtype="float16"), str(tmp_path / "h"))
  half = runtimes.load(written[0])
  full_size = formats.export_detector("tflite", "gelan-t", variables, _settings(batch_size=4),
                                      str(tmp_path / "f"))[1][0]
  assert pathlib.Path(written[0]).stat().st_size < 0.6 * pathlib.Path(full_size).stat().st_size
  for first in (0, 4):
    expected = {name: value[first:first + 4] for name, value in reference.items()}
    _assert_same_detections(half(images[first:first + 4]), expected, box_tolerance=0.05,
                            score_tolerance=2e-3)


def test_raw_onnx_outputs_are_the_models_boxes_and_scores(variables, images, tmp_path):
  """--nms=false: every anchor's xyxy boxes and class scores, for a user's own NMS."""
  _, written = formats.export_detector("onnx", "gelan-t", variables, _settings(nms=False),
                                       str(tmp_path / "raw"))
  raw = runtimes.load(written[0])(images)
  model, fused = inference.inference_model("gelan-t", variables)
  predictions = np.asarray(model.apply(fused, images.astype(np.float32) / 255, train=False)["main"])
  anchors = sum((SIZE // stride) ** 2 for stride in (8, 16, 32))
  assert raw["boxes_xyxy_px"].shape == (len(images), anchors, 4)
  centre, size = predictions[..., :2], predictions[..., 2:4]
  np.testing.assert_allclose(raw["boxes_xyxy_px"],
                             np.concatenate([centre - size / 2, centre + size / 2], -1), atol=1e-3)
  np.testing.assert_allclose(raw["class_scores"], predictions[..., 4:], atol=1e-5)


def test_bad_requests_are_clear_errors(variables, tmp_path):
  cases = [("webp", _settings(), "unknown format 'webp'"),
           ("onnx", _settings(image_size=100), "multiple of 32"),
           ("tflite", _settings(), "tflite needs a fixed --batch_size"),
           ("onnx", _settings(dtype="float16"), "float16 is for tflite"),
           ("tflite", _settings(batch_size=1, image_size=1280, multi_label=True),
            "multi-label NMS over"),
           ("onnx", _settings(class_names=("a", "b")), "2 class names, the model 3 classes")]
  for export_format, settings, message in cases:
    with pytest.raises(ValueError, match=message):
      formats.export_detector(export_format, "gelan-t", variables, settings, str(tmp_path / "x"))
  assert not list(tmp_path.iterdir())  # nothing half-written
  with pytest.raises(ValueError, match="not an exported detector"):
    runtimes.load(tmp_path)


def test_export_py_writes_an_onnx_that_detect_py_runs(variables, images, tmp_path,
                                                      a_subprocess_slot):
  """The command line: export.py --format=onnx from a weights file, then detect.py
  --weights=model.onnx on two pictures: the class names come from the file's metadata."""
  import flax
  weights = tmp_path / "weights.msgpack"
  weights.write_bytes(flax.serialization.msgpack_serialize(variables))
  run = [sys.executable, "export.py", f"--checkpoint={weights}", "--architecture=gelan-t",
         "--format=onnx", f"--output={tmp_path / 'exported' / 'gelan-t'}", f"--image_size={SIZE}",
         "--batch_size=0", f"--conf_threshold={CONF}", f"--max_det={MAX_DET}",
         f"--class_names={','.join(NAMES)}"]
  done = subprocess.run(run, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  onnx_file = tmp_path / "exported" / "gelan-t.onnx"
  assert done.stdout.split() == [str(onnx_file)]
  pictures = tmp_path / "pictures"
  pictures.mkdir()
  for i in (0, 2):
    Image.fromarray(images[i]).save(pictures / f"{i}.png")
  done = subprocess.run([sys.executable, "detect.py", f"--weights={onnx_file}",
                         f"--out_dir={tmp_path / 'out'}", str(pictures)], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  records = json.loads((tmp_path / "out" / "detections.json").read_text())["images"]
  by_file = {pathlib.Path(r["file"]).name: r["detections"] for r in records}
  for found in by_file.values():  # parity itself is the tests' above
    assert 0 < len(found) <= MAX_DET and {d["name"] for d in found} <= set(NAMES)
    assert all(d["score"] > CONF and 0 <= min(d["box_xyxy_px"]) <= max(d["box_xyxy_px"]) <= SIZE
               for d in found)
  assert "onnxruntime" in done.stdout
  assert (tmp_path / "out" / "0.png").is_file()
  bad = subprocess.run([sys.executable, "export.py", f"--checkpoint={weights}",
                        "--architecture=gelan-t", "--format=coreml", f"--output={tmp_path / 'y'}"],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 1 and "unknown --format 'coreml'" in bad.stderr
  assert "Traceback" not in bad.stderr


def test_an_80_class_onnx_runs_in_onnxruntime(tmp_path):
  """80 classes put boolean selects in the graph that 3 do not; onnxruntime 1.31 has no boolean
  Where, so the NMS gathers take no out-of-range fill. The ONNX file loads, runs and matches."""
  variables = models.init_variables("gelan-t", 80, seed=0, image_size=SIZE)
  images = np.random.default_rng(1).integers(0, 256, (1, SIZE, SIZE, 3), dtype=np.uint8)
  settings = {**_settings(class_names=None, conf_threshold=0.0), "batch_size": 1}
  _, written = formats.export_detector("onnx", "gelan-t", variables, settings,
                                       str(tmp_path / "eighty"))
  model, fused = inference.inference_model("gelan-t", variables)
  exported = runtimes.load(written[0])
  expected = jax.jit(spec_lib.detector_function(model, fused, exported.spec))(images)
  got = exported(images)
  assert int(expected["count"][0]) > 0
  _assert_same_detections(got, {name: np.asarray(value) for name, value in expected.items()})
