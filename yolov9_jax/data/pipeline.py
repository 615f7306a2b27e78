"""Training batches on Grain: worker processes build blocks of batches from a random-access source.

The training batch at step N is a pure function of (seed, N). Grain gives the order: each epoch
is a Grain shuffle (``MapDataset.range(n).shuffle(seed).repeat()``, a new permutation per epoch,
any position computable directly) and each process reads its own slice of that stream
(``[process_index::process_count]``: the processes' samples are disjoint and together cover each
epoch). Mosaic partners and every augmentation parameter come from stateless generators keyed by
(seed, step, slot). A resumed run asks for step N directly; nothing is replayed, so Grain's
iterator state need not be saved with the checkpoint. ``to_global_array`` assembles the
per-process batches into one ``jax.Array`` on the mesh.

Grain runs the work: ``TrainPipeline.__call__`` maps the block builder over block numbers and
``mp_prefetch`` hands whole blocks to ``config.workers`` worker processes (no GIL between them;
results come back in order, so the worker count never changes a batch). A block is
``batches_per_block`` consecutive batches: its images are decoded once in the worker that builds
it, and mosaic/mixup partners are drawn from them (see ``TrainPipeline``).

A source example is a dict with "image" (H, W, 3) uint8, "image_id" (or TFDS coco/2017's
"image/id") and "objects": {"bbox" (N, 4) ymin, xmin, ymax, xmax normalised, "label" (N,),
"is_crowd" (N,)}, as ``coco_format.prepare`` writes it and TFDS's ``coco/2017`` has it (prepared
with ``--file_format=array_record`` for random access).
"""
import dataclasses
import logging
import os

from absl import flags
import cv2
import grain
import jax
import ml_collections
import numpy as np

from yolov9_jax import sharding
from yolov9_jax.data import transforms

# Block numbers run to here: a training stream has no end of its own (train.py stops it).
_BLOCKS_WITHOUT_END = 2**62


def default_workers():
  """Worker processes for a host: its cores less one for the training loop, at most 32 (a
  worker holds its own copy of the libraries, ~0.3 GB; 32 cores make ~2,000 mosaic images/s)."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return int(min(max((cores or 1) - 1, 1), 32))


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
      cache_images=False,   # keep every decoded, resized image in RAM (the official --cache ram);
                            # each worker process keeps its own copy
      workers=default_workers(),  # Grain worker processes building batches; 0: in this process
      batches_per_block=4,  # K: a worker builds K consecutive batches at once (one task)
      mosaic_partners_from_block=True,  # partners from the block's own images (one decode per
                                        # image); False: from anywhere (official, ~4 decodes)
      prefetch_blocks=1,    # blocks each worker keeps ready
      seed=0,
  ))


@dataclasses.dataclass
class PipelineCounters:
  """What the pipeline had to work around, for the training log."""
  samples_unreadable: int = 0  # replaced by the next example of the permutation
  boxes_over_max: int = 0       # boxes beyond max_boxes after augmentation (not trained on)


COUNTER_KEYS = tuple(field.name for field in dataclasses.fields(PipelineCounters))


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


class _Decoded:
  """Images decoded for one block (or kept for the run with ``cache_images``): dataset index ->
  (image with long side = image_size, boxes x1, y1, x2, y2 pixels, labels)."""

  def __init__(self, builder):
    self.builder = builder
    self.images = builder.image_cache if builder.config.cache_images else {}
    self.decodes = 0      # what the block cost in reads of the source
    self.unreadable = 0

  def __call__(self, index):
    loaded = self.images.get(index)
    if loaded is None:
      loaded = self.images[index] = self._decode_and_resize(index)
    return loaded

  def _decode_and_resize(self, index):
    """An unreadable example is replaced by the next one (deterministically) and counted."""
    source = self.builder.source
    for offset in range(len(source)):
      self.decodes += 1
      try:
        example = source[(index + offset) % len(source)]
        boxes, labels = _boxes_px(example)
        image, boxes = transforms.resize_long_side(np.asarray(example["image"]), boxes,
                                                   self.builder.config.image_size)
        return image, boxes, labels
      except Exception as error:  # noqa: BLE001  any bad record: skip it, count it, go on
        logging.warning("example %d is unreadable (%s); using the next one", index + offset, error)
        self.unreadable += 1
    raise RuntimeError("no readable example in the source")


class _BlockBuilder:
  """Builds batches and blocks of batches: what Grain sends to each worker process (so it holds
  only the source, the settings and the sample order, all picklable)."""

  def __init__(self, source, config, global_batch_size, steps_per_epoch, total_epochs,
               process_index, process_count):
    self.source, self.config = source, config
    self.process_index, self.process_count = process_index, process_count
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.steps_per_epoch, self.total_epochs = steps_per_epoch, total_epochs
    # Position q of this process's stream is position q * process_count + process_index of the
    # global one: the global batch at step N is positions [N G, (N + 1) G) of the epoch shuffles.
    self.stream = (grain.MapDataset.range(len(source)).shuffle(seed=config.seed).repeat()
                   [process_index::process_count])
    self.image_cache = {}

  def sample_indices(self, step):
    first = step * self.local_batch_size
    return np.array([self.stream[q] for q in range(first, first + self.local_batch_size)])

  def block_steps(self, block):
    count = self.config.batches_per_block
    return range(block * count, (block + 1) * count)

  def block(self, block):
    """Batches ``block_steps(block)`` stacked: every array (K, b, ...), and per batch the counters
    (K,) of what it had to work around."""
    steps = self.block_steps(block)
    decoded = _Decoded(self)
    indices = {step: self.sample_indices(step) for step in steps}
    partner_pool = np.concatenate(list(indices.values()))
    batches = [self.batch(step, indices[step], partner_pool, decoded) for step in steps]
    return {key: np.stack([batch[key] for batch in batches]) for key in batches[0]}

  def batch(self, step, indices=None, partner_pool=None, decoded=None):
    """The batch at ``step`` with its counters ("samples_unreadable", "boxes_over_max" ())."""
    cfg = self.config
    indices = self.sample_indices(step) if indices is None else indices
    if partner_pool is None:
      block = step // cfg.batches_per_block
      partner_pool = np.concatenate([self.sample_indices(s) for s in self.block_steps(block)])
    decoded = _Decoded(self) if decoded is None else decoded
    unreadable_before = decoded.unreadable
    epoch = step // self.steps_per_epoch
    use_mosaic = self.total_epochs is None or epoch < self.total_epochs - cfg.close_mosaic_epochs
    samples = [_Sample(self, decoded, partner_pool, step, slot).build(index, use_mosaic)
               for slot, index in enumerate(indices)]
    size, max_boxes = cfg.image_size, cfg.max_boxes
    out = {"images": np.stack([image for image, _, _ in samples]),
           "boxes": np.zeros((len(samples), max_boxes, 4), np.float32),
           "classes": np.zeros((len(samples), max_boxes), np.int32),
           "valid": np.zeros((len(samples), max_boxes), bool)}
    assert out["images"].shape[1:] == (size, size, 3)
    boxes_over_max = 0
    for i, (_, boxes, labels) in enumerate(samples):
      n = min(len(boxes), max_boxes)
      boxes_over_max += len(boxes) - n
      out["boxes"][i, :n], out["classes"][i, :n], out["valid"][i, :n] = boxes[:n], labels[:n], True
    out["samples_unreadable"] = np.int64(decoded.unreadable - unreadable_before)
    out["boxes_over_max"] = np.int64(boxes_over_max)
    return out


class _Sample:
  """One training image: its random draws come from the key (seed, step, global slot) alone."""

  def __init__(self, builder, decoded, partner_pool, step, slot):
    self.config, self.decoded, self.partner_pool = builder.config, decoded, partner_pool
    self.source_size = len(builder.source)
    self.rng = np.random.default_rng(
        [builder.config.seed, step, builder.process_index * builder.local_batch_size + slot])

  def _partner(self):
    if self.config.mosaic_partners_from_block:
      return int(self.partner_pool[self.rng.integers(len(self.partner_pool))])
    return int(self.rng.integers(0, self.source_size))

  def _mosaic(self, index):
    """FACTS.md §7.2: four images on the 2S canvas, then the random scale/translate warp to S."""
    cfg, rng, size = self.config, self.rng, self.config.image_size
    indices = [index] + [self._partner() for _ in range(3)]
    rng.shuffle(indices)
    loaded = [self.decoded(i) for i in indices]
    centre = rng.uniform(size / 2, size * 3 / 2, 2).astype(np.int32)
    scale = rng.uniform(1 - cfg.scale, 1 + cfg.scale)
    translate = rng.uniform(-cfg.translate, cfg.translate, 2)
    canvas, boxes = transforms.mosaic([im for im, _, _ in loaded], [b for _, b, _ in loaded],
                                      centre, size)
    labels = np.concatenate([labels for _, _, labels in loaded])
    matrix = transforms.affine_matrix(canvas.shape[:2], (size, size), scale, translate)
    return (transforms.warp_affine(canvas, matrix, (size, size)),
            *_moved_boxes(boxes, labels, matrix, scale, size))

  def _letterbox_affine(self, index):
    """FACTS.md §7.3, the close-mosaic epochs: letterbox, then the same random warp."""
    cfg, rng, size = self.config, self.rng, self.config.image_size
    image, boxes, labels = self.decoded(index)
    image, boxes, _ = transforms.letterbox(image, boxes, (size, size))
    scale = rng.uniform(1 - cfg.scale, 1 + cfg.scale)
    matrix = transforms.affine_matrix((size, size), (size, size), scale,
                                      rng.uniform(-cfg.translate, cfg.translate, 2))
    return (transforms.warp_affine(image, matrix, (size, size)),
            *_moved_boxes(boxes, labels, matrix, scale, size))

  def build(self, index, use_mosaic):
    cfg, rng = self.config, self.rng
    if use_mosaic and rng.uniform() < cfg.mosaic:
      image, boxes, labels = self._mosaic(index)
      if rng.uniform() < cfg.mixup:
        other_image, other_boxes, other_labels = self._mosaic(self._partner())
        image = transforms.mixup(image, other_image, rng.beta(32.0, 32.0))
        boxes = np.concatenate([boxes, other_boxes])
        labels = np.concatenate([labels, other_labels])
    else:
      image, boxes, labels = self._letterbox_affine(index)
    gains = 1 + rng.uniform(-1, 1, 3) * np.asarray(cfg.hsv)
    image = transforms.hsv_jitter(image, gains)
    if rng.uniform() < cfg.fliplr:
      image, boxes = transforms.horizontal_flip(image, boxes)
    return image, boxes, labels


def _let_grain_read_its_flags():
  """Grain reads its settings from absl flags, which only an absl program (train.py) has parsed;
  elsewhere (a notebook, a test, a spawned worker) their defaults stand."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _init_worker(worker_index, worker_count):
  del worker_index, worker_count
  # OpenCV would start its own threads in every worker; the worker processes are the parallelism.
  cv2.setNumThreads(1)
  _let_grain_read_its_flags()


class TrainPipeline:
  """Training batches of this process: ``batch(step)`` or iterate from ``start_step``.

  A batch: "images" (b, S, S, 3) uint8 (normalise on the device), "boxes" (b, M, 4) x1, y1, x2, y2
  pixels, "classes" (b, M) int32, "valid" (b, M) bool, with b = global_batch_size / processes.

  Mosaic and mixup partners: the official code draws them from the whole dataset, so each
  training image costs four or five decodes. With ``mosaic_partners_from_block`` they are drawn
  from the images of the same block (K = ``batches_per_block`` consecutive batches of this process,
  K b images), which its worker has decoded anyway: one decode per training image, with any number
  of worker processes and no memory shared between them. The sample order is a random
  permutation, so a partner is still a uniformly random image of the dataset; what changes is
  that the four images of a mosaic are trained on within K steps of each other. Which partner a
  sample gets depends only on (seed, step), so a resumed run gets the same batches (it builds the
  first block's earlier batches once and drops them).
  """

  def __init__(self, source, config, global_batch_size, steps_per_epoch=None, total_epochs=None,
               process_index=None, process_count=None):
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
      raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                       f"{process_count} processes")
    if len(source) == 0:
      raise ValueError("the training source has no examples")
    self.config = config
    self.builder = _BlockBuilder(source, config, global_batch_size,
                                 steps_per_epoch or max(len(source) // global_batch_size, 1),
                                 total_epochs, process_index, process_count)
    self.steps_per_epoch = self.builder.steps_per_epoch
    self.local_batch_size = self.builder.local_batch_size
    self.counters = PipelineCounters()
    self._iterators = []

  def sample_indices(self, step):
    """Dataset indices of this process's slots at ``step``."""
    return self.builder.sample_indices(step)

  def _counted(self, batch):
    for key in COUNTER_KEYS:
      setattr(self.counters, key, getattr(self.counters, key) + int(batch.pop(key)))
    return batch

  def batch(self, step):
    """The batch at ``step``, built here (the same as ``__call__`` gives at that step)."""
    return self._counted(self.builder.batch(step))

  def blocks(self, first_block=0):
    """Grain's iterator over blocks from ``first_block`` on, built by the worker processes."""
    cfg = self.config
    blocks = grain.MapDataset.range(first_block, _BLOCKS_WITHOUT_END).map(self.builder.block)
    # One block built ahead in a thread, in each worker or here.
    stream = blocks.to_iter_dataset(grain.ReadOptions(num_threads=1,
                                                      prefetch_buffer_size=cfg.prefetch_blocks))
    if cfg.workers > 0:
      _let_grain_read_its_flags()
      stream = stream.mp_prefetch(
          grain.MultiprocessingOptions(num_workers=cfg.workers,
                                       per_worker_buffer_size=cfg.prefetch_blocks),
          worker_init_fn=_init_worker)
    iterator = iter(stream)
    self._iterators.append(iterator)
    return iterator

  def __call__(self, start_step=0):
    """Batches from ``start_step`` on. A worker process that dies raises Grain's RuntimeError
    ("terminated unexpectedly") here rather than leaving training waiting."""
    first_block, skip = divmod(start_step, self.config.batches_per_block)
    iterator = self.blocks(first_block)
    try:
      for block in iterator:
        for k in range(skip, self.config.batches_per_block):
          yield self._counted({key: value[k] for key, value in block.items()})
        skip = 0
    finally:
      self._close(iterator)

  def _close(self, iterator):
    if iterator in self._iterators:
      self._iterators.remove(iterator)
      close = getattr(iterator, "close", None)
      if close is not None:
        close()

  def close(self):
    """Stops the worker processes of every open iterator."""
    for iterator in list(self._iterators):
      self._close(iterator)


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
