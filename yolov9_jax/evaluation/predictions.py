"""An evaluation's detections as arrays, one row per detection: the image it belongs to, its box
in that image's original pixels, its score and its label (the model's class index). COCO result
dicts are made from them only where pycocotools or a predictions.json file needs them."""
import dataclasses

import numpy as np

from yolov9_jax.evaluation import coco_metrics


@dataclasses.dataclass(frozen=True)
class Predictions:
  image_ids: np.ndarray       # (N,) int64: the dataset's id of each detection's image
  boxes_xyxy_px: np.ndarray   # (N, 4) float64: x1, y1, x2, y2 in the original image's pixels
  scores: np.ndarray          # (N,) float32
  labels: np.ndarray          # (N,) int32: the model's class index; category_ids[label] is the id

  @classmethod
  def empty(cls):
    return cls(np.zeros(0, np.int64), np.zeros((0, 4), np.float64), np.zeros(0, np.float32),
               np.zeros(0, np.int32))

  @classmethod
  def of_image(cls, image_id, boxes_xyxy_px, scores, labels):
    """One image's detections (any number of rows)."""
    boxes = np.asarray(boxes_xyxy_px, np.float64).reshape(-1, 4)
    return cls(np.full(len(boxes), image_id, np.int64), boxes,
               np.asarray(scores, np.float32).reshape(-1), np.asarray(labels, np.int32).reshape(-1))

  @classmethod
  def concatenate(cls, parts):
    """The rows of ``parts`` in order."""
    parts = [cls.empty(), *parts]
    return cls(*(np.concatenate([getattr(p, f.name) for p in parts])
                 for f in dataclasses.fields(cls)))

  def __len__(self):
    return len(self.image_ids)

  def select(self, rows):
    """The detections at ``rows`` (indices or a boolean mask), in that order."""
    return Predictions(*(getattr(self, f.name)[rows] for f in dataclasses.fields(self)))

  def by_image(self):
    """{image id: that image's detections}, each in its original row order."""
    order = np.argsort(self.image_ids, kind="stable")
    ids, starts = np.unique(self.image_ids[order], return_index=True)
    ends = [*starts[1:], len(order)]
    return {int(i): self.select(order[start:end]) for i, start, end in zip(ids, starts, ends)}

  def to_coco(self, category_ids):
    """COCO result dicts (the official rounding), ``category_ids[label]`` the dataset's ids."""
    return coco_metrics.to_coco_results(self.image_ids, self.boxes_xyxy_px, self.scores,
                                        self.labels, category_ids)
