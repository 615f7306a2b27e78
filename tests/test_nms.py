"""On-device NMS against the official non_max_suppression (shared/spec/golden/nms.npz)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from yolov9_jax.evaluation import nms


@pytest.fixture(scope="module")
def golden(spec_dir):
  return np.load(spec_dir / "golden" / "nms.npz")


@pytest.mark.parametrize("setting", ["eval", "detect", "sparse"])
def test_detections_equal_official_in_content_and_order(golden, setting):
  settings = json.loads(str(golden["settings_json"]))[setting]
  run = jax.jit(lambda p: nms.non_max_suppression(
      p, settings["conf_thres"], settings["iou_thres"], settings["max_det"],
      multi_label=settings["multi_label"]))
  detections = run(jnp.asarray(golden["pred"]))
  for image in range(golden["pred"].shape[0]):
    official = golden[f"{setting}_{image}"]
    count = int(detections.count[image])
    assert count == len(official), (setting, image)
    assert int(detections.candidates_dropped[image]) == 0
    np.testing.assert_allclose(detections.boxes_xyxy_px[image, :count], official[:, :4], atol=1e-3)
    np.testing.assert_allclose(detections.scores[image, :count], official[:, 4], atol=1e-6)
    np.testing.assert_array_equal(detections.classes[image, :count], official[:, 5].astype(int))
    assert not np.asarray(detections.scores[image, count:]).any()


def test_candidate_cap_is_counted_not_silent(golden):
  detections = jax.jit(lambda p: nms.non_max_suppression(p, 0.001, 0.7, 300, max_candidates=100))(
      jnp.asarray(golden["pred"]))
  above = (golden["pred"][..., 4:] > 0.001).sum(axis=(1, 2))
  np.testing.assert_array_equal(detections.candidates_dropped, np.maximum(above - 100, 0))
  assert (np.asarray(detections.candidates_dropped) > 0).all()
  assert (np.asarray(detections.count) <= 100).all()


def test_overlapping_boxes_of_different_classes_are_both_kept():
  box = [50.0, 50.0, 20.0, 20.0]
  predictions = jnp.array([[box + [0.9, 0.0], box + [0.0, 0.8], box + [0.85, 0.0]]])
  detections = nms.non_max_suppression(predictions, 0.25, 0.45, max_det=5, multi_label=False)
  assert int(detections.count[0]) == 2
  np.testing.assert_array_equal(detections.classes[0, :2], [0, 1])
  np.testing.assert_allclose(detections.boxes_xyxy_px[0, 0], [40, 40, 60, 60])
