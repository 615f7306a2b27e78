"""COCO results and metrics: perfect predictions score 1, a hand-computed case, id maps, mapping back."""
import json

import numpy as np

from yolov9_jax.data import shapes, transforms
from yolov9_jax.evaluation import coco_metrics


def _ground_truth_as_results(annotations):
  return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
           "score": 1.0} for a in annotations]


def test_ground_truth_fed_as_predictions_gives_ap_1(tmp_path):
  path = shapes.generate(tmp_path, num_images=20, image_hw=(96, 96), seed=0)
  annotations = json.loads(path.read_text())["annotations"]
  metrics = coco_metrics.coco_metrics(path, _ground_truth_as_results(annotations))
  assert metrics["AP"] == metrics["AP50"] == metrics["AP75"] == 1.0
  assert "Average Precision" in metrics["table"]


def test_a_false_positive_ranked_first_halves_the_ap(tmp_path):
  coco = {"images": [{"id": 1, "width": 100, "height": 100, "file_name": "a.png"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 40, 40],
                           "area": 1600, "iscrowd": 0}],
          "categories": [{"id": 3, "name": "thing"}]}
  path = tmp_path / "gt.json"
  path.write_text(json.dumps(coco))
  results = [{"image_id": 1, "category_id": 3, "bbox": [60, 60, 30, 30], "score": 0.9},
             {"image_id": 1, "category_id": 3, "bbox": [10, 10, 40, 40], "score": 0.8}]
  # Precision 1/2 at the only recall level reached (1.0), at every IoU threshold: AP = 0.5.
  np.testing.assert_allclose(coco_metrics.coco_metrics(path, results)["AP"], 0.5)


def test_labels_round_trip_through_the_coco_91_id_map():
  ids = coco_metrics.COCO80_TO_91
  assert len(ids) == 80 == len(set(ids)) and ids[0] == 1 and ids[-1] == 90
  labels = np.arange(80)
  back = np.array([ids.index(ids[label]) for label in labels])
  np.testing.assert_array_equal(back, labels)
  result = coco_metrics.to_coco_results([7], np.array([[1.0, 2.0, 11.0, 22.0]]), np.array([0.5]),
                                        np.array([11]), category_ids=ids)
  assert result == [{"image_id": 7, "category_id": 13, "bbox": [1.0, 2.0, 10.0, 20.0], "score": 0.5}]


def test_boxes_map_back_for_wide_and_tall_images():
  for original_hw in ((100, 300), (300, 100)):
    box = np.array([[5.0, 7.0, 60.0, 90.0]], np.float32)
    _, letterboxed, transform = transforms.letterbox(
        np.zeros(original_hw + (3,), np.uint8), box, (128, 128))
    back = coco_metrics.boxes_to_original(letterboxed, transform.ratio, transform.pad_xy,
                                          original_hw)
    np.testing.assert_allclose(back, box, atol=1e-3)
