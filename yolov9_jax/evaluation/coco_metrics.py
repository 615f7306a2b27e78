"""Detections to COCO results, and COCO metrics with pycocotools (the official protocol's scorer)."""
import contextlib
import io
import json

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from yolov9_jax import paths

# COCO's 80 training classes -> the dataset's category ids 1..90 (with gaps), in label order.
COCO80_TO_91 = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24,
                25, 27, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49,
                50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74,
                75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90)
STAT_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
              "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large")


def boxes_to_original(boxes_xyxy_px, ratio, pad_xy, original_hw):
  """Letterboxed-image boxes (..., 4) -> original-image pixels, clipped to the image."""
  boxes = (np.asarray(boxes_xyxy_px, np.float64) - np.tile(pad_xy, 2)) / ratio
  height, width = original_hw
  return np.clip(boxes, 0, [width, height, width, height])


def to_coco_results(image_ids, boxes_xyxy_px, scores, labels, category_ids):
  """Detections, one row each (image id, box in original pixels, score, label), as COCO result
  dicts; ``category_ids[label]`` is the dataset's own id (e.g. ``COCO80_TO_91``)."""
  return [{"image_id": int(image_id), "category_id": int(category_ids[int(label)]),
           "bbox": [round(float(x1), 3), round(float(y1), 3),
                    round(float(x2 - x1), 3), round(float(y2 - y1), 3)],
           "score": round(float(score), 5)}
          for image_id, (x1, y1, x2, y2), score, label in zip(image_ids, boxes_xyxy_px, scores, labels)]


def load_ground_truth(ground_truth):
  """A pycocotools ``COCO`` from an instances JSON path (local or remote) or a loaded dict."""
  if not isinstance(ground_truth, dict):
    ground_truth = json.loads(paths.user_path(ground_truth).read_text())
  with contextlib.redirect_stdout(io.StringIO()):
    coco = COCO()
    coco.dataset = ground_truth
    coco.createIndex()
    return coco


def coco_evaluation(ground_truth, results, image_ids=None):
  """(the evaluated, accumulated ``COCOeval``, or None without results; pycocotools' printout).
  ``ground_truth``: an instances JSON path, its dict or a ``COCO``; ``image_ids``: the images
  evaluated (the official ``params.imgIds``), all of the ground truth's when None."""
  coco = ground_truth if isinstance(ground_truth, COCO) else load_ground_truth(ground_truth)
  if not results:
    return None, "no detections"
  with contextlib.redirect_stdout(io.StringIO()) as printed:
    # loadRes adds keys (area, id, segmentation) to the dicts it is given: hand it copies.
    evaluation = COCOeval(coco, coco.loadRes([dict(r) for r in results]), "bbox")
    if image_ids is not None:
      evaluation.params.imgIds = sorted(int(i) for i in image_ids)
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
  return evaluation, printed.getvalue()


def coco_metrics(annotations_json, results, image_ids=None):
  """The 12 COCO box metrics of ``results`` against the ground truth (JSON path or dict), as a
  dict (pycocotools' own printout is captured and returned as "table")."""
  evaluation, table = coco_evaluation(annotations_json, results, image_ids)
  if evaluation is None:
    return {**dict.fromkeys(STAT_NAMES, 0.0), "table": table}
  return {**dict(zip(STAT_NAMES, map(float, evaluation.stats))), "table": table}
