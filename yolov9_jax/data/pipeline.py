"""Training and evaluation batches from a random-access source (a TFDS ArrayRecord data source).

The training batch at step N is a pure function of (seed, N): the epoch permutation, the mosaic
partners and every augmentation parameter come from stateless generators keyed by (seed, step,
slot). A resumed run asks for step N directly; nothing is replayed. Each process builds only its
own slots of the global batch (processes get disjoint slices of every epoch's permutation), and
``to_global_array`` assembles the per-process parts into one ``jax.Array`` on the mesh.

A source example is a dict with "image" (H, W, 3) uint8, "image_id" (or TFDS coco/2017's
"image/id") and "objects": {"bbox" (N, 4) ymin, xmin, ymax, xmax normalised, "label" (N,),
"is_crowd" (N,)}, as ``coco_format.prepare`` writes it and TFDS's ``coco/2017`` has it (prepared
with ``--file_format=array_record`` for random access).
"""
import concurrent.futures
import dataclasses
import functools
import logging

import jax
import ml_collections
import numpy as np
import tensorflow as tf
from jax.sharding import NamedSharding, PartitionSpec

from yolov9_jax.data import transforms


def default_config() -> ml_collections.ConfigDict:
  """The official training augmentation (hyp.scratch-high.yaml) and batching settings."""
  return ml_collections.ConfigDict(dict(
      image_size=640,
      max_boxes=300,        # M: box slots per image; overflow is counted, never silently cut
      mosaic=1.0,           # probability of the 4-image mosaic path
      mixup=0.15,           # probability of blending in a second mosaic (mosaic path only)
      scale=0.9,            # random affine scale in [1 - scale, 1 + scale]
      translate=0.1,        # random affine translation, fraction of the image size
      hsv=(0.015, 0.7, 0.4),  # hue, saturation, value gains: 1 + U(-1, 1) * these
      fliplr=0.5,
      close_mosaic_epochs=15,  # the last N epochs train without mosaic and mixup
      cache_images=False,   # keep decoded, resized images in RAM (the official --cache ram):
                            # decoding and resizing dominate the CPU cost; use when they fit
      workers=4,            # threads building samples (TF ops release the GIL)
      prefetch_batches=2,
      seed=0,
  ))


@dataclasses.dataclass
class PipelineCounters:
  """What the pipeline had to work around, for the training log."""
  samples_unreadable: int = 0  # replaced by the next example of the permutation
  boxes_over_max: int = 0       # boxes beyond max_boxes after augmentation (not trained on)


def _boxes_px(example):
  """The example's non-crowd boxes as x1, y1, x2, y2 pixels and their labels."""
  height, width = example["image"].shape[:2]
  objects = example["objects"]
  bbox = np.asarray(objects["bbox"], np.float32).reshape(-1, 4)
  keep = ~np.asarray(objects.get("is_crowd", np.zeros(len(bbox), bool)), bool).reshape(-1)
  boxes = bbox[keep][:, [1, 0, 3, 2]] * np.float32([width, height, width, height])
  return boxes, np.asarray(objects["label"], np.int32).reshape(-1)[keep]


_IMAGE = tf.TensorSpec([None, None, 3], tf.uint8)
_BOXES = tf.TensorSpec([None, 4], tf.float32)
_SCALE = tf.TensorSpec([], tf.float32)
_PAIR = tf.TensorSpec([2], tf.float32)


def _resize_long_side(image, boxes, size):
  """The official load_image: long side to ``size``, truncating, bilinear."""
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  ratio = size / tf.cast(tf.maximum(height, width), tf.float32)
  new_hw = tf.cast(tf.cast(tf.stack([height, width]), tf.float32) * ratio, tf.int32)

  def resize():
    resized = tf.image.resize(image, new_hw, method="bilinear")
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)

  # Most COCO images already have a 640 px long side: like the official loader, skip the resize.
  return tf.cond(tf.equal(ratio, 1.0), lambda: image, resize), boxes * ratio


def _moved_boxes(boxes, matrix, scale, size):
  """Boxes through the affine matrix, and which of them the official filter keeps."""
  moved = transforms.transform_boxes(boxes, matrix, (size, size))
  return moved, transforms.box_candidates(boxes, moved, scale)


def _affine(image, boxes, scale, translate_xy, size):
  matrix = transforms.affine_matrix(tf.shape(image)[:2], (size, size), scale, translate_xy)
  return (transforms.warp_affine(image, matrix, (size, size)),
          *_moved_boxes(boxes, matrix, scale, size))


def _mosaic_affine(im0, b0, im1, b1, im2, b2, im3, b3, centre_xy, scale, translate_xy, size):
  image, boxes, matrix = transforms.mosaic_affine(
      [im0, im1, im2, im3], [b0, b1, b2, b3], centre_xy, size, scale, translate_xy, size)
  return (image, *_moved_boxes(boxes, matrix, scale, size))


def _letterbox_affine(image, boxes, scale, translate_xy, size):
  letterboxed, boxes, _ = transforms.letterbox(image, boxes, (size, size))
  return _affine(letterboxed, boxes, scale, translate_xy, size)


def _colour_and_flip_image(image, hsv_gains, flip):
  image = transforms.hsv_jitter(image, hsv_gains)
  return tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)


def _graph(fn, size, *specs):
  """``fn`` as one TF graph for any image size (no retracing), with the output size fixed."""
  return tf.function(functools.partial(fn, size=size), input_signature=list(specs))


@functools.lru_cache(maxsize=None)
def _graphs(size):
  """The per-sample TF graphs for output size ``size``, shared by every pipeline of that size
  (the XLA colour graph takes seconds to compile)."""
  return {
      "resize_long_side": _graph(_resize_long_side, size, _IMAGE, _BOXES),
      "mosaic_affine": _graph(_mosaic_affine, size, *[_IMAGE, _BOXES] * 4,
                              tf.TensorSpec([2], tf.int32), _SCALE, _PAIR),
      "letterbox_affine": _graph(_letterbox_affine, size, _IMAGE, _BOXES, _SCALE, _PAIR),
      # XLA fuses the per-pixel HSV arithmetic: 5 ms instead of 32 ms at 640x640. The image
      # shape is fixed, so it compiles once; boxes (of varying count) are flipped in numpy.
      "colour_and_flip_image": tf.function(
          _colour_and_flip_image, jit_compile=True,
          input_signature=[tf.TensorSpec([size, size, 3], tf.uint8),
                           tf.TensorSpec([3], tf.float32), tf.TensorSpec([], tf.bool)]),
  }


class TrainPipeline:
  """Training batches of this process: ``batch(step)`` or iterate from ``start_step``.

  A batch: "images" (b, S, S, 3) uint8 (normalise on the device), "boxes" (b, M, 4) x1, y1, x2, y2
  pixels, "classes" (b, M) int32, "valid" (b, M) bool, with b = global_batch_size / processes.
  """

  def __init__(self, source, config, global_batch_size, steps_per_epoch=None, total_epochs=None,
               process_index=None, process_count=None):
    self.source, self.config = source, config
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % self.process_count:
      raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                       f"{self.process_count} processes")
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // self.process_count
    self.steps_per_epoch = steps_per_epoch or max(len(source) // global_batch_size, 1)
    self.total_epochs = total_epochs
    self.counters = PipelineCounters()
    self._permutations = {}
    self._image_cache = {}
    self._executor = concurrent.futures.ThreadPoolExecutor(config.workers)
    graphs = _graphs(config.image_size)
    self._resize_long_side = graphs["resize_long_side"]
    self._mosaic_affine = graphs["mosaic_affine"]
    self._letterbox_affine = graphs["letterbox_affine"]
    self._colour_and_flip_image = graphs["colour_and_flip_image"]

  def _permutation(self, epoch):
    if epoch not in self._permutations:
      self._permutations = {epoch: np.random.default_rng([self.config.seed, epoch]).permutation(
          len(self.source))}
    return self._permutations[epoch]

  def sample_indices(self, step):
    """Dataset indices of this process's slots at ``step`` (global position step * G + slot)."""
    first = step * self.global_batch_size + self.process_index * self.local_batch_size
    positions = np.arange(first, first + self.local_batch_size)
    epochs = positions // len(self.source)
    return np.array([self._permutation(e)[p % len(self.source)] for e, p in zip(epochs, positions)])

  def _load(self, index):
    """Image (long side = image_size) and boxes of ``index``; an unreadable example is replaced
    by the next one (deterministically) and counted."""
    if index in self._image_cache:
      return self._image_cache[index]
    loaded = self._decode_and_resize(index)
    if self.config.cache_images:
      self._image_cache[index] = loaded
    return loaded

  def _decode_and_resize(self, index):
    for offset in range(len(self.source)):
      try:
        example = self.source[(index + offset) % len(self.source)]
        boxes, labels = _boxes_px(example)
        image, boxes = self._resize_long_side(example["image"], boxes)
        return image, boxes, labels
      except Exception as error:  # noqa: BLE001  any bad record: skip it, count it, go on
        logging.warning("example %d is unreadable (%s); using the next one", index + offset, error)
        self.counters.samples_unreadable += 1
    raise RuntimeError("no readable example in the source")

  def _mosaic(self, rng, index):
    cfg = self.config
    indices = np.concatenate([[index], rng.integers(0, len(self.source), 3)])
    rng.shuffle(indices)
    loaded = [self._load(i) for i in indices]
    centre = rng.uniform(cfg.image_size / 2, cfg.image_size * 3 / 2, 2).astype(np.int32)
    scale = rng.uniform(1 - cfg.scale, 1 + cfg.scale)
    translate = rng.uniform(-cfg.translate, cfg.translate, 2)
    args = [t for image, boxes, _ in loaded for t in (image, boxes)]
    image, boxes, keep = self._mosaic_affine(*args, centre, np.float32(scale),
                                             translate.astype(np.float32))
    labels = np.concatenate([labels for _, _, labels in loaded])
    return image.numpy(), boxes.numpy()[keep.numpy()], labels[keep.numpy()]

  def _sample(self, step, slot, index, use_mosaic):
    cfg = self.config
    rng = np.random.default_rng([cfg.seed, step, self.process_index * self.local_batch_size + slot])
    if use_mosaic and rng.uniform() < cfg.mosaic:
      image, boxes, labels = self._mosaic(rng, index)
      if rng.uniform() < cfg.mixup:
        other_image, other_boxes, other_labels = self._mosaic(rng, rng.integers(len(self.source)))
        image = transforms.mixup(image, other_image, np.float32(rng.beta(32.0, 32.0))).numpy()
        boxes = np.concatenate([boxes, other_boxes])
        labels = np.concatenate([labels, other_labels])
    else:
      image, boxes, labels = self._load(index)
      image, boxes, keep = self._letterbox_affine(
          image, boxes, np.float32(rng.uniform(1 - cfg.scale, 1 + cfg.scale)),
          rng.uniform(-cfg.translate, cfg.translate, 2).astype(np.float32))
      image, boxes, labels = image.numpy(), boxes.numpy()[keep.numpy()], labels[keep.numpy()]
    gains = (1 + rng.uniform(-1, 1, 3) * np.asarray(cfg.hsv)).astype(np.float32)
    flip = bool(rng.uniform() < cfg.fliplr)
    image = self._colour_and_flip_image(image, gains, flip).numpy()
    boxes = boxes.reshape(-1, 4).astype(np.float32)
    if flip:
      boxes = np.stack([cfg.image_size - boxes[:, 2], boxes[:, 1],
                        cfg.image_size - boxes[:, 0], boxes[:, 3]], axis=1)
    return image, boxes, labels

  def batch(self, step):
    cfg = self.config
    epoch = step // self.steps_per_epoch
    use_mosaic = self.total_epochs is None or epoch < self.total_epochs - cfg.close_mosaic_epochs
    indices = self.sample_indices(step)
    samples = list(self._executor.map(
        lambda args: self._sample(step, args[0], args[1], use_mosaic), enumerate(indices)))
    size, max_boxes = cfg.image_size, cfg.max_boxes
    out = {"images": np.stack([image for image, _, _ in samples]),
           "boxes": np.zeros((len(samples), max_boxes, 4), np.float32),
           "classes": np.zeros((len(samples), max_boxes), np.int32),
           "valid": np.zeros((len(samples), max_boxes), bool)}
    assert out["images"].shape[1:] == (size, size, 3)
    for i, (_, boxes, labels) in enumerate(samples):
      n = min(len(boxes), max_boxes)
      self.counters.boxes_over_max += len(boxes) - n
      out["boxes"][i, :n], out["classes"][i, :n], out["valid"][i, :n] = boxes[:n], labels[:n], True
    return out

  def __call__(self, start_step=0):
    """Batches from ``start_step`` on, built ``prefetch_batches`` ahead in the background."""
    pending = concurrent.futures.ThreadPoolExecutor(1)
    step = start_step
    queue = [pending.submit(self.batch, s) for s in range(step, step + self.config.prefetch_batches)]
    while True:
      yield queue.pop(0).result()
      step += 1
      queue.append(pending.submit(self.batch, step + self.config.prefetch_batches - 1))


def eval_batches(source, batch_size, image_size, process_index=None, process_count=None):
  """Letterboxed evaluation batches of this process's examples (a contiguous shard), the last
  batch padded: "images", "image_id", "original_hw" (b, 2), "ratio" (b,), "pad_xy" (b, 2) — a
  box maps back to original pixels as (box - pad) / ratio — and "example_valid" (b,) bool."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  shard = np.array_split(np.arange(len(source)), process_count)[process_index]
  for first in range(0, len(shard), batch_size):
    indices = shard[first:first + batch_size]
    out = {"images": np.full((batch_size, image_size, image_size, 3), transforms.FILL_VALUE, np.uint8),
           "image_id": np.zeros(batch_size, np.int64), "original_hw": np.zeros((batch_size, 2), np.int32),
           "ratio": np.ones(batch_size, np.float32), "pad_xy": np.zeros((batch_size, 2), np.float32),
           "example_valid": np.zeros(batch_size, bool)}
    for i, index in enumerate(indices):
      example = source[int(index)]
      image, _, letterbox = transforms.letterbox(
          tf.constant(example["image"]), tf.zeros((0, 4)), (image_size, image_size))
      out["images"][i] = image.numpy()
      out["image_id"][i] = int(example["image_id"] if "image_id" in example else example["image/id"])
      out["original_hw"][i] = example["image"].shape[:2]
      out["ratio"][i], out["pad_xy"][i] = letterbox.ratio.numpy(), letterbox.pad_xy.numpy()
      out["example_valid"][i] = True
    yield out


def to_global_array(local_batch, mesh, data_axis="data"):
  """Per-process batches -> global ``jax.Array``s sharded along the batch over ``data_axis``."""
  sharding = NamedSharding(mesh, PartitionSpec(data_axis))
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def prefetch_to_device(batches, mesh, size=2, data_axis="data"):
  """Keeps ``size`` global batches already transferred to the devices."""
  queue = []
  for batch in batches:
    queue.append(to_global_array(batch, mesh, data_axis))
    if len(queue) > size:
      yield queue.pop(0)
  yield from queue
