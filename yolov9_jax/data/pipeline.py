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
import logging

import jax
import ml_collections
import cv2
import numpy as np

from yolov9_jax import sharding
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
      cache_images=False,   # keep every decoded, resized image in RAM (the official --cache ram)
      mosaic_partner_window=1024,  # mosaic/mixup partners from this process's last N images, kept
                                   # decoded (~1 GB at 640); 0: from anywhere (official, 4x decodes)
      workers=4,            # threads building samples (OpenCV and decoding release the GIL)
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


def _moved_boxes(boxes, labels, matrix, scale, size):
  """Boxes and labels through the warp, filtered by the official box-candidate rule."""
  moved = transforms.transform_boxes(boxes, matrix, (size, size))
  keep = transforms.box_candidates(boxes, moved, scale)
  return moved[keep], labels[keep]


class TrainPipeline:
  """Training batches of this process: ``batch(step)`` or iterate from ``start_step``.

  A batch: "images" (b, S, S, 3) uint8 (normalise on the device), "boxes" (b, M, 4) x1, y1, x2, y2
  pixels, "classes" (b, M) int32, "valid" (b, M) bool, with b = global_batch_size / processes.

  Mosaic and mixup partners: the official code draws them from the whole dataset, so each
  training image costs four or five decodes. With ``mosaic_partner_window`` = W > 0 they are drawn
  from the W most recent images of this process's sample stream (the current batch included),
  which are kept decoded: about one decode per training image. The stream is a random
  permutation, so a partner is still a uniformly random image of the dataset; W = 0 restores the
  official draw. Which partner a sample gets depends only on (seed, step), never on what happens
  to be decoded, so a resumed run gets the same batches; it decodes the window once on the way
  (at most W extra decodes).
  """

  def __init__(self, source, config, global_batch_size, steps_per_epoch=None, total_epochs=None,
               process_index=None, process_count=None):
    self.source, self.config = source, config
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % self.process_count:
      raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                       f"{self.process_count} processes")
    if len(source) == 0:
      raise ValueError("the training source has no examples")
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // self.process_count
    self.steps_per_epoch = steps_per_epoch or max(len(source) // global_batch_size, 1)
    self.total_epochs = total_epochs
    self.counters = PipelineCounters()
    self._permutations = {}
    self._image_cache = {}  # dataset index -> (image, boxes, labels), long side = image_size
    # OpenCV would start its own threads inside each worker; the workers are the parallelism.
    cv2.setNumThreads(1)
    self._executor = concurrent.futures.ThreadPoolExecutor(config.workers)

  def close(self):
    self._executor.shutdown(wait=False, cancel_futures=True)

  def _permutation(self, epoch):
    if epoch not in self._permutations:
      self._permutations = {epoch: np.random.default_rng([self.config.seed, epoch]).permutation(
          len(self.source))}
    return self._permutations[epoch]

  def _index_at(self, local_position):
    """The dataset index at this process's ``local_position``-th sample (step * b + slot), which
    is global position step * G + process_index * b + slot of the epoch permutations."""
    step, slot = divmod(int(local_position), self.local_batch_size)
    position = step * self.global_batch_size + self.process_index * self.local_batch_size + slot
    epoch, offset = divmod(position, len(self.source))
    return int(self._permutation(epoch)[offset])

  def sample_indices(self, step):
    """Dataset indices of this process's slots at ``step`` (global position step * G + slot)."""
    first = step * self.local_batch_size
    return np.array([self._index_at(q) for q in range(first, first + self.local_batch_size)])

  def _window(self, step):
    """This process's stream positions [first, last) that mosaic partners of ``step`` come from."""
    last = (step + 1) * self.local_batch_size
    return max(0, last - self.config.mosaic_partner_window), last

  def _partner(self, rng, step):
    window = self.config.mosaic_partner_window
    if window <= 0:
      return int(rng.integers(0, len(self.source)))
    return self._index_at(rng.integers(*self._window(step)))

  def _load(self, index):
    """Image (long side = image_size) and boxes of ``index``; an unreadable example is replaced
    by the next one (deterministically) and counted."""
    loaded = self._image_cache.get(index)
    if loaded is None:
      loaded = self._decode_and_resize(index)
      if self.config.cache_images or self.config.mosaic_partner_window > 0:
        self._image_cache[index] = loaded
    return loaded

  def _evict(self, step):
    """Keeps what the next step can use: everything with ``cache_images``, else the window."""
    if self.config.cache_images:
      return
    first, last = self._window(step + 1)
    keep = {self._index_at(q) for q in range(first, last - self.local_batch_size)}
    for index in list(self._image_cache):
      if index not in keep:
        del self._image_cache[index]

  def _decode_and_resize(self, index):
    for offset in range(len(self.source)):
      try:
        example = self.source[(index + offset) % len(self.source)]
        boxes, labels = _boxes_px(example)
        image, boxes = transforms.resize_long_side(np.asarray(example["image"]), boxes,
                                                   self.config.image_size)
        return image, boxes, labels
      except Exception as error:  # noqa: BLE001  any bad record: skip it, count it, go on
        logging.warning("example %d is unreadable (%s); using the next one", index + offset, error)
        self.counters.samples_unreadable += 1
    raise RuntimeError("no readable example in the source")

  def _mosaic(self, rng, step, index):
    """FACTS.md §7.2: four images on the 2S canvas, then the random scale/translate warp to S."""
    cfg, size = self.config, self.config.image_size
    indices = [index] + [self._partner(rng, step) for _ in range(3)]
    rng.shuffle(indices)
    loaded = [self._load(i) for i in indices]
    centre = rng.uniform(size / 2, size * 3 / 2, 2).astype(np.int32)
    scale = rng.uniform(1 - cfg.scale, 1 + cfg.scale)
    translate = rng.uniform(-cfg.translate, cfg.translate, 2)
    canvas, boxes = transforms.mosaic([im for im, _, _ in loaded], [b for _, b, _ in loaded],
                                      centre, size)
    labels = np.concatenate([labels for _, _, labels in loaded])
    matrix = transforms.affine_matrix(canvas.shape[:2], (size, size), scale, translate)
    return (transforms.warp_affine(canvas, matrix, (size, size)),
            *_moved_boxes(boxes, labels, matrix, scale, size))

  def _letterbox_affine(self, rng, index):
    """FACTS.md §7.3, the close-mosaic epochs: letterbox, then the same random warp."""
    cfg, size = self.config, self.config.image_size
    image, boxes, labels = self._load(index)
    image, boxes, _ = transforms.letterbox(image, boxes, (size, size))
    scale = rng.uniform(1 - cfg.scale, 1 + cfg.scale)
    matrix = transforms.affine_matrix((size, size), (size, size), scale,
                                      rng.uniform(-cfg.translate, cfg.translate, 2))
    return (transforms.warp_affine(image, matrix, (size, size)),
            *_moved_boxes(boxes, labels, matrix, scale, size))

  def _sample(self, step, slot, index, use_mosaic):
    cfg = self.config
    rng = np.random.default_rng([cfg.seed, step, self.process_index * self.local_batch_size + slot])
    if use_mosaic and rng.uniform() < cfg.mosaic:
      image, boxes, labels = self._mosaic(rng, step, index)
      if rng.uniform() < cfg.mixup:
        other_image, other_boxes, other_labels = self._mosaic(rng, step, self._partner(rng, step))
        image = transforms.mixup(image, other_image, rng.beta(32.0, 32.0))
        boxes = np.concatenate([boxes, other_boxes])
        labels = np.concatenate([labels, other_labels])
    else:
      image, boxes, labels = self._letterbox_affine(rng, index)
    gains = 1 + rng.uniform(-1, 1, 3) * np.asarray(cfg.hsv)
    image = transforms.hsv_jitter(image, gains)
    if rng.uniform() < cfg.fliplr:
      image, boxes = transforms.horizontal_flip(image, boxes)
    return image, boxes, labels

  def batch(self, step):
    cfg = self.config
    epoch = step // self.steps_per_epoch
    use_mosaic = self.total_epochs is None or epoch < self.total_epochs - cfg.close_mosaic_epochs
    indices = self.sample_indices(step)
    if use_mosaic and cfg.mosaic_partner_window > 0:
      # This batch's own images join the partner window: decode each once, before any sample
      # asks for it as a partner.
      list(self._executor.map(self._load, indices))
    samples = list(self._executor.map(
        lambda args: self._sample(step, args[0], args[1], use_mosaic), enumerate(indices)))
    self._evict(step)
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
    try:
      while True:
        yield queue.pop(0).result()
        step += 1
        queue.append(pending.submit(self.batch, step + self.config.prefetch_batches - 1))
    finally:
      pending.shutdown(wait=False, cancel_futures=True)


def to_global_array(local_batch, mesh):
  """Per-process batches -> global ``jax.Array``s split along the batch (``sharding.batch_sharding``)."""
  split = sharding.batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(split, x), local_batch)


def prefetch_to_device(batches, mesh, size=2):
  """Keeps ``size`` global batches already transferred to the devices."""
  queue = []
  for batch in batches:
    queue.append(to_global_array(batch, mesh))
    if len(queue) > size:
      yield queue.pop(0)
  yield from queue
