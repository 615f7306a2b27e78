"""Evaluation of a detector on a dataset by the official protocol (FACTS.md §8), jitted and sharded.

One jitted function per (model, thresholds, mesh) takes a batch of letterboxed uint8 images,
normalises them on the device, runs the fused main branch (``inference.inference_model``) and
``nms.non_max_suppression``; nothing goes back to the host in between. Batches are sharded over the
mesh's "data" axis; in a multi-process job every process evaluates its own shard of the dataset
and process 0 scores all predictions in one COCO evaluation (pycocotools). Detections stay arrays
(``predictions.Predictions``) until pycocotools needs COCO result dicts.

Batches follow the official ``val.py``: images sorted by aspect ratio, each batch padded to its
own rectangle of up to ``image_size`` + 32 px (``data.eval_batches``); the detector compiles
once per distinct batch shape, before the loop. ``rectangular=False`` pads every batch to an
``image_size`` square instead (one compilation, less padding at 640: faster, slightly different
numbers). The resize, the padding colour and the mapping back to original pixels are the
official ones in both.
"""
import dataclasses
import functools
import json
import time

import grain
import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from yolov9_jax import models, sharding
from yolov9_jax.data import eval_batches, pipeline
from yolov9_jax.evaluation import coco_metrics, inference
from yolov9_jax.evaluation.predictions import Predictions

# The official val.py's confusion matrix: detections above this score, matched above this IoU.
CONFUSION_SCORE_THRESHOLD = 0.25
CONFUSION_IOU_THRESHOLD = 0.45


@dataclasses.dataclass
class EvalResult:
  """What an evaluation measured. ``metrics`` are on every process; the predictions and the
  per-class fields are filled on process 0 only (other processes of a multi-process job get empty
  ones)."""
  metrics: dict               # coco_metrics.STAT_NAMES -> float, and "table" (pycocotools' printout)
  predictions: Predictions    # every process's detections, boxes in original pixels
  class_names: list           # in label order
  per_class_ap: dict          # class name -> {"AP", "AP50"}; nan where a class has no ground truth
  pr_recall: np.ndarray       # (101,) COCOeval's recall points
  pr_precision: np.ndarray    # (K, 101) precision at IoU 0.5 per class, all areas, 100 detections
  confusion_matrix: np.ndarray  # (K + 1, K + 1) counts [predicted, true]; index K is background
  images: int                 # images evaluated (padding excluded)
  images_per_second: float    # pipeline + network + NMS + results, after compilation
  compile_seconds: float      # compilation (or cache hits) of every batch shape, and one batch each
  batch_shapes: tuple         # the distinct (height, width) input shapes, one compilation each
  candidates_dropped: int     # NMS candidates cut by the cap, over all images


@functools.lru_cache(maxsize=16)
def detector(fused_architecture, num_classes, mesh, conf_threshold, iou_threshold, max_det,
             multi_label, dtype="float32"):
  """jitted (fused variables, images (B, S, S, 3) uint8 RGB) -> ``nms.Detections``, boxes in
  letterboxed input pixels, the batch split over ``mesh`` (``sharding.batch_sharding``). Cached, so repeated
  evaluations (every epoch) reuse the compiled function."""
  model = models.build(fused_architecture, num_classes=num_classes, dtype=dtype, fused=True)
  batch_sharded = sharding.batch_sharding(mesh)
  detect = inference.detection_function(model, conf_threshold, iou_threshold, max_det, multi_label)
  return jax.jit(detect, in_shardings=(sharding.replicated(mesh), batch_sharded),
                 out_shardings=batch_sharded)


def prepare_detector(model_name, variables, mesh, conf_threshold, iou_threshold, max_det,
                     multi_label, dtype="float32"):
  """(jitted detector, fused variables replicated on ``mesh``, number of classes) for the
  training variables {"params", "batch_stats"} of ``model_name``."""
  model, fused_variables = inference.inference_model(model_name, variables, dtype)
  detect = detector(model.architecture, model.num_classes, mesh, conf_threshold, iou_threshold,
                    max_det, multi_label, dtype)
  replicated = jax.device_put(fused_variables, sharding.replicated(mesh))
  return detect, replicated, model.num_classes


def host_rows(array):
  """This process's rows of a batch-sharded global array, as numpy (all rows in one process)."""
  shards = sorted(array.addressable_shards, key=lambda shard: shard.index[0].start or 0)
  return np.concatenate([np.asarray(shard.data) for shard in shards])


def _gather_rows(arrays):
  """Every process's rows of ``arrays`` (numpy arrays of any dtypes, one first dimension),
  concatenated in process order. Sent as raw bytes, so that float64 boxes and int64 ids arrive
  exact (JAX would narrow them to 32 bits). An all-gather: JAX has no public gather to one
  process for host data; only process 0 keeps what the callers here gather."""
  arrays = [np.ascontiguousarray(a) for a in arrays]
  if jax.process_count() == 1:
    return arrays
  counts = np.asarray(multihost_utils.process_allgather(np.int32(len(arrays[0])))).reshape(-1)
  gathered = []
  for array in arrays:
    row_size = int(np.prod(array.shape[1:], dtype=np.int64))
    padded = np.zeros((max(int(counts.max()), 1), row_size * array.dtype.itemsize), np.uint8)
    padded[:len(array)] = array.reshape(len(array), row_size).view(np.uint8)
    everything = np.asarray(multihost_utils.process_allgather(padded))
    rows = np.concatenate([everything[p, :count] for p, count in enumerate(counts)])
    gathered.append(rows.view(array.dtype).reshape(-1, *array.shape[1:]))
  return gathered


def _share_from_main(value):
  """Process 0's ``value`` (anything JSON can hold) on every process."""
  if jax.process_count() == 1:
    return value
  payload = np.frombuffer(json.dumps(value).encode(), np.uint8)
  size = int(multihost_utils.broadcast_one_to_all(np.int32(payload.size)))
  padded = np.zeros(max(size, 1), np.uint8)
  if jax.process_index() == 0:
    padded[:size] = payload
  return json.loads(np.asarray(multihost_utils.broadcast_one_to_all(padded))[:size].tobytes())


class RecordingSource:
  """The source, noting each example's ground truth as the evaluation reads it (one decode)."""

  def __init__(self, source):
    self.source = source
    self.images_hw = {}  # image id -> (height, width) pixels
    self.objects = {}    # image id -> (bbox (N, 4) ymin, xmin, ymax, xmax normalised, labels, crowd)

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    example = self.source[index]
    image_id = eval_batches.example_image_id(example)
    self.images_hw[image_id] = tuple(int(v) for v in np.shape(example["image"])[:2])
    objects = example["objects"]
    self.objects[image_id] = (np.asarray(objects["bbox"], np.float64).reshape(-1, 4),
                              np.asarray(objects["label"]).reshape(-1),
                              np.asarray(objects["is_crowd"]).reshape(-1))
    return example

  def rows(self):
    """What was recorded as arrays: (image ids (M,), heights and widths (M, 2), each object's
    image id (O,), bbox (O, 4) normalised ymin, xmin, ymax, xmax, label (O,), is_crowd (O,))."""
    ids = sorted(self.images_hw)
    objects = [self.objects[i] for i in ids]
    return (np.asarray(ids, np.int64), np.asarray([self.images_hw[i] for i in ids], np.int64).reshape(-1, 2),
            np.concatenate([np.zeros(0, np.int64)] + [np.full(len(o[1]), i, np.int64)
                                                      for i, o in zip(ids, objects)]),
            np.concatenate([np.zeros((0, 4))] + [o[0] for o in objects]),
            np.concatenate([np.zeros(0, np.int64)] + [o[1].astype(np.int64) for o in objects]),
            np.concatenate([np.zeros(0, np.int64)] + [o[2].astype(np.int64) for o in objects]))

  @staticmethod
  def from_rows(image_ids, hw, object_image_ids, bbox, labels, crowd):
    """``rows()``'s arrays (of one or many processes) -> (images_hw, objects) as recorded."""
    images_hw = {int(i): (int(h), int(w)) for i, (h, w) in zip(image_ids, hw)}
    objects = {int(i): (bbox[object_image_ids == i], labels[object_image_ids == i],
                        crowd[object_image_ids == i]) for i in image_ids}
    return images_hw, objects


def ground_truth_from_examples(images_hw, objects, category_ids, class_names):
  """A COCO instances dict from examples' normalised boxes: bbox in original pixels, area = the
  box's area. COCO's own annotations give segment areas instead, which decide the small / medium /
  large split: AP_small etc. match the official numbers only with the official instances JSON."""
  images, annotations = [], []
  for image_id in sorted(images_hw):
    height, width = images_hw[image_id]
    images.append({"id": image_id, "height": height, "width": width})
    bbox, labels, crowd = objects[image_id]
    for (y1, x1, y2, x2), label, is_crowd in zip(bbox * [height, width, height, width], labels, crowd):
      annotations.append({
          "id": len(annotations) + 1,  # pycocotools treats id 0 as "no match"
          "image_id": image_id, "category_id": int(category_ids[int(label)]),
          "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
          "area": float((x2 - x1) * (y2 - y1)), "iscrowd": int(is_crowd)})
  categories = [{"id": int(i), "name": str(name)} for i, name in zip(category_ids, class_names)]
  return {"images": images, "annotations": annotations, "categories": categories}


def _box_iou_xyxy(boxes_a, boxes_b):
  """(N, M) IoU of two sets of x1, y1, x2, y2 boxes."""
  top_left = np.maximum(boxes_a[:, None, :2], boxes_b[None, :, :2])
  bottom_right = np.minimum(boxes_a[:, None, 2:], boxes_b[None, :, 2:])
  inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=-1)
  area_a = np.prod(boxes_a[:, 2:] - boxes_a[:, :2], axis=-1)
  area_b = np.prod(boxes_b[:, 2:] - boxes_b[:, :2], axis=-1)
  return inter / np.maximum(area_a[:, None] + area_b[None] - inter, 1e-9)


def _xywh_to_xyxy(boxes_xywh):
  boxes = np.asarray(boxes_xywh, np.float64).reshape(-1, 4)
  return np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)


def confusion_matrix(coco, predictions, image_ids, category_ids,
                     score_threshold=CONFUSION_SCORE_THRESHOLD, iou_threshold=CONFUSION_IOU_THRESHOLD):
  """(K + 1, K + 1) counts [predicted label, true label] as the official val.py plots them:
  ``predictions`` (a ``Predictions``) above ``score_threshold`` matched one-to-one with non-crowd
  ground truth of any class at IoU > ``iou_threshold``, best IoU first; unmatched detections
  count against background (column K), missed objects as background predictions (row K)."""
  label_of = {int(c): label for label, c in enumerate(category_ids)}
  background = len(category_ids)
  matrix = np.zeros((background + 1, background + 1), np.int64)
  per_image = predictions.select(predictions.scores > score_threshold).by_image()
  for image_id in map(int, image_ids):
    truths = [a for a in coco.imgToAnns.get(image_id, [])
              if not a.get("iscrowd", 0) and a["category_id"] in label_of]
    true_labels = np.array([label_of[a["category_id"]] for a in truths], np.int64)
    detections = per_image.get(image_id, Predictions.empty())
    predicted_labels = detections.labels.astype(np.int64)
    iou = _box_iou_xyxy(detections.boxes_xyxy_px, _xywh_to_xyxy([a["bbox"] for a in truths]))
    predicted_index, true_index = np.nonzero(iou > iou_threshold)
    order = np.argsort(-iou[predicted_index, true_index], kind="stable")
    matched_predicted, matched_true = set(), set()
    for p, t in zip(predicted_index[order], true_index[order]):
      if p not in matched_predicted and t not in matched_true:
        matched_predicted.add(p)
        matched_true.add(t)
        matrix[predicted_labels[p], true_labels[t]] += 1
    for p, label in enumerate(predicted_labels):
      matrix[label, background] += p not in matched_predicted
    for t, label in enumerate(true_labels):
      matrix[background, label] += t not in matched_true
  return matrix


def _per_class(evaluation, category_ids, class_names):
  """({name: {"AP", "AP50"}}, precision at IoU 0.5 (K, 101)) from COCOeval's accumulated table."""
  num_classes = len(category_ids)
  precision_at_50 = np.full((num_classes, 101), -1.0)
  per_class_ap = {str(name): {"AP": float("nan"), "AP50": float("nan")} for name in class_names}
  if evaluation is None:
    return per_class_ap, precision_at_50
  # precision: (IoU thresholds, recall points, categories, area ranges, max detections);
  # area range 0 is "all", the last max-detections setting is 100 (COCO's headline numbers).
  precision = evaluation.eval["precision"][:, :, :, 0, -1]
  column_of = {int(c): k for k, c in enumerate(evaluation.params.catIds)}
  for label, (category_id, name) in enumerate(zip(category_ids, class_names)):
    if int(category_id) not in column_of:
      continue
    table = precision[:, :, column_of[int(category_id)]]
    precision_at_50[label] = table[0]
    if (table > -1).any():
      per_class_ap[str(name)] = {"AP": float(table[table > -1].mean()),
                                 "AP50": float(table[0][table[0] > -1].mean())}
  return per_class_ap, precision_at_50


def images_hw(source, threads=4):
  """(len(source), 2) int: every example's image height and width in pixels, on every process
  (each process reads its own contiguous part, decoding in ``threads`` of Grain's threads)."""
  part = np.array_split(np.arange(len(source)), jax.process_count())[jax.process_index()]
  read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=4 * threads)
  local = list(grain.MapDataset.source(part).map(
      lambda i: np.shape(source[int(i)]["image"])[:2]).to_iter_dataset(read))
  return _gather_rows([np.asarray(local, np.int64).reshape(-1, 2)])[0]


def evaluate(model_name, variables, source, category_ids, *, class_names=None, image_size=640,
             batch_size=32, ground_truth=None, mesh=None, conf_threshold=0.001, iou_threshold=0.7,
             max_det=300, dtype="float32", rectangular=True, source_images_hw=None,
             progress=True) -> EvalResult:
  """COCO evaluation of ``model_name``'s training variables ({"params", "batch_stats"}) on
  ``source`` (a random-access source, e.g. ``builder.as_data_source("validation")``).

  ``category_ids[label]`` is the dataset's id of each label (``coco_format.category_ids`` or
  ``coco_metrics.COCO80_TO_91``). ``batch_size`` is global, divisible by the mesh's devices.
  ``ground_truth``: an instances JSON path or dict; when None it is built from the source's own
  boxes (``ground_truth_from_examples``), whose areas are box areas: real COCO numbers (the
  small/medium/large split) need the official instances JSON, whose areas are segment areas.
  Defaults are the official evaluation settings (conf 0.001, IoU 0.7, 300 detections) and its
  rectangular batches; ``rectangular=False``: ``image_size`` squares. ``source_images_hw``
  ((N, 2) heights and widths of the source's images, as ``images_hw`` gives them) saves the
  reading pass that the rectangular batches need: pass it when evaluating a source repeatedly.
  """
  mesh = sharding.make_mesh() if mesh is None else mesh
  sharding.check_batch_size(batch_size, mesh.size, "batch_size")
  detect, fused_variables, num_classes = prepare_detector(
      model_name, variables, mesh, conf_threshold, iou_threshold, max_det, multi_label=True,
      dtype=dtype)
  if len(category_ids) != num_classes:
    raise ValueError(f"category_ids has {len(category_ids)} entries, the model {num_classes} "
                     "classes")
  class_names = [str(c) for c in category_ids] if class_names is None else list(class_names)
  local_batch_size = batch_size // jax.process_count()
  reader = RecordingSource(source) if ground_truth is None else source
  if rectangular and source_images_hw is None:
    source_images_hw = images_hw(reader)
  plan = eval_batches.make_plan(
      np.zeros((len(source), 2)) if source_images_hw is None else source_images_hw, batch_size,
      image_size, rectangular)

  compile_start = time.perf_counter()  # each batch shape compiled (or read from the cache) once
  for height, width in plan.distinct_shapes:
    jax.block_until_ready(detect(fused_variables, pipeline.to_global_array(
        np.zeros((local_batch_size, height, width, 3), np.uint8), mesh)))
  compile_seconds = time.perf_counter() - compile_start

  parts, image_ids, candidates_dropped = [], [], 0

  def collect(detections, batch):
    nonlocal candidates_dropped
    batch_predictions, batch_ids, dropped = detections_to_predictions(
        jax.tree.map(host_rows, detections), batch)
    parts.append(batch_predictions)
    image_ids.extend(batch_ids)
    candidates_dropped += dropped

  start = time.perf_counter()
  batches = eval_batches.batches(reader, plan, jax.process_index(), jax.process_count())
  pending = None
  show = progress and jax.process_index() == 0
  for batch in tqdm(batches, total=len(plan), disable=not show, desc="evaluating",
                    unit="batch"):
    detections = detect(fused_variables, pipeline.to_global_array(batch["images"], mesh))
    if pending is not None:  # the host works on the previous batch while the device runs this one
      collect(*pending)
    pending = (detections, batch)
  if pending is not None:
    collect(*pending)
  seconds = time.perf_counter() - start

  predictions = Predictions(*_gather_rows(dataclasses.astuple(Predictions.concatenate(parts))))
  image_ids = np.sort(_gather_rows([np.asarray(image_ids, np.int64)])[0])
  dropped = _gather_rows([np.asarray([candidates_dropped], np.int64)])[0]
  recorded = None if ground_truth is not None else _gather_rows(reader.rows())
  common = dict(class_names=class_names, images=len(image_ids),
                images_per_second=len(image_ids) / max(seconds, 1e-9),
                compile_seconds=compile_seconds, batch_shapes=plan.distinct_shapes,
                candidates_dropped=int(dropped.sum()))
  scored = None
  if jax.process_index() == 0:  # one COCO evaluation, on process 0
    if ground_truth is None:
      ground_truth = ground_truth_from_examples(*RecordingSource.from_rows(*recorded),
                                                category_ids, class_names)
    scored = score(predictions, image_ids, ground_truth, category_ids, class_names)
  # Every process gets the metrics: callers decide on them together (e.g. the best checkpoint).
  metrics = _share_from_main(None if scored is None else scored["metrics"])
  if scored is None:
    return EvalResult(metrics=metrics, predictions=Predictions.empty(), per_class_ap={},
                      pr_recall=np.linspace(0, 1, 101), pr_precision=np.zeros((0, 101)),
                      confusion_matrix=np.zeros((0, 0), np.int64), **common)
  return EvalResult(predictions=predictions, **scored, **common)


def detections_to_predictions(detections, batch):
  """(``Predictions`` in original pixels, image ids, NMS candidates dropped) of one evaluation
  batch: ``detections`` (``nms.Detections`` as numpy, letterboxed pixels) for ``batch`` (as
  ``eval_batches.batches`` gives it; padding rows are skipped)."""
  parts, image_ids = [], []
  valid = batch["example_valid"]
  for i in np.flatnonzero(valid):
    count = int(detections.count[i])
    boxes = coco_metrics.boxes_to_original(detections.boxes_xyxy_px[i, :count], batch["ratio"][i],
                                           batch["pad_xy"][i], batch["original_hw"][i])
    parts.append(Predictions.of_image(int(batch["image_id"][i]), boxes, detections.scores[i, :count],
                                      detections.classes[i, :count]))
    image_ids.append(int(batch["image_id"][i]))
  return (Predictions.concatenate(parts), image_ids,
          int(np.asarray(detections.candidates_dropped)[valid].sum()))


def score(predictions, image_ids, ground_truth, category_ids, class_names):
  """The EvalResult fields computed from ``predictions``: metrics (pycocotools over
  ``image_ids``), per_class_ap, pr_recall, pr_precision and confusion_matrix."""
  coco = coco_metrics.load_ground_truth(ground_truth)
  unknown = sorted(set(image_ids) - set(coco.getImgIds()))
  if unknown:
    raise ValueError(f"{len(unknown)} evaluated image ids are not in the ground truth's images "
                     f"(e.g. {unknown[:5]}): the annotations do not belong to this split")
  evaluation, table = coco_metrics.coco_evaluation(coco, predictions.to_coco(category_ids),
                                                   image_ids)
  stats = np.zeros(len(coco_metrics.STAT_NAMES)) if evaluation is None else evaluation.stats
  per_class_ap, precision_at_50 = _per_class(evaluation, category_ids, class_names)
  return dict(metrics={**dict(zip(coco_metrics.STAT_NAMES, map(float, stats))), "table": table},
              per_class_ap=per_class_ap, pr_recall=np.linspace(0, 1, 101),
              pr_precision=precision_at_50,
              confusion_matrix=confusion_matrix(coco, predictions, image_ids, category_ids))
