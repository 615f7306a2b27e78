"""Training/eval batches: static shapes, determinism per (seed, step), process shards, bad input."""
import multiprocessing
import os
import signal
import sys

import cloudpickle
import numpy as np
import pytest

from yolov9_jax import sharding
from yolov9_jax.data import coco_format, eval_batches, pipeline, shapes

SIZE = 128

# Grain's worker processes get the sources defined here by value: they cannot import this file.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def shapes_source(tmp_path_factory):
  root = tmp_path_factory.mktemp("shapes")
  annotations = shapes.generate(root / "raw", num_images=24, image_hw=(96, 128), seed=0)
  builder, report = coco_format.prepare(annotations, root / "raw" / "images", root / "tfds",
                                        "shapes_fixture")
  assert report.images == 24 and not report.skipped_unreadable
  return builder.as_data_source(split="train")


def _config(**overrides):
  config = pipeline.default_config()
  config.update(dict(image_size=SIZE, max_boxes=40, workers=2, seed=3), **overrides)
  return config


def test_batches_have_static_shapes_and_boxes_inside_the_image(shapes_source):
  batch = pipeline.TrainPipeline(shapes_source, _config(), global_batch_size=4).batch(0)
  assert batch["images"].shape == (4, SIZE, SIZE, 3) and batch["images"].dtype == np.uint8
  assert batch["boxes"].shape == (4, 40, 4) and batch["classes"].shape == batch["valid"].shape == (4, 40)
  boxes = batch["boxes"][batch["valid"]]
  assert len(boxes) > 0
  assert (boxes >= 0).all() and (boxes <= SIZE).all()
  assert ((boxes[:, 2] - boxes[:, 0]) > 2).all() and ((boxes[:, 3] - boxes[:, 1]) > 2).all()
  assert set(batch["classes"][batch["valid"]]) <= {0, 1, 2}


def _assert_same_batches(expected, actual):
  assert len(expected) == len(actual)
  for step, (want, got) in enumerate(zip(expected, actual)):
    assert want.keys() == got.keys()
    for key, value in want.items():
      np.testing.assert_array_equal(value, got[key], err_msg=f"batch {step}, {key}")


def _first_batches(train, count, start_step=0):
  batches = train(start_step)
  try:
    return [next(batches) for _ in range(count)]
  finally:
    train.close()


def test_the_batch_at_a_step_depends_only_on_seed_and_step_with_0_1_or_2_workers(shapes_source):
  """Blocks of 2 batches, steps 0..4: three blocks, the last one cut; with worker processes the
  blocks come from different processes in turn."""
  reference = [pipeline.TrainPipeline(shapes_source, _config(workers=0, batches_per_block=2),
                                      global_batch_size=4).batch(step) for step in range(5)]
  for workers in (0, 1, 2):
    train = pipeline.TrainPipeline(shapes_source, _config(workers=workers, batches_per_block=2),
                                   global_batch_size=4)
    _assert_same_batches(reference, _first_batches(train, 5))
  assert not np.array_equal(reference[0]["images"], reference[1]["images"])
  other_seed = pipeline.TrainPipeline(shapes_source, _config(seed=4, batches_per_block=2),
                                      global_batch_size=4).batch(0)
  assert not np.array_equal(other_seed["images"], reference[0]["images"])


def test_a_resumed_run_gets_the_batches_of_an_uninterrupted_one(shapes_source):
  """Resuming at step 3 (inside the second block of two) replays nothing and changes nothing."""
  def pipeline_with_2_workers():
    return pipeline.TrainPipeline(shapes_source, _config(workers=2, batches_per_block=2),
                                  global_batch_size=4)
  uninterrupted = _first_batches(pipeline_with_2_workers(), 7)
  _assert_same_batches(uninterrupted[3:], _first_batches(pipeline_with_2_workers(), 4, start_step=3))


def test_two_processes_get_disjoint_shards_that_cover_each_epoch(shapes_source):
  per_process = [pipeline.TrainPipeline(shapes_source, _config(), global_batch_size=8,
                                        process_index=p, process_count=2) for p in range(2)]
  steps_per_epoch = per_process[0].steps_per_epoch
  assert steps_per_epoch == 3
  for epoch in range(2):
    seen = [np.concatenate([p.sample_indices(epoch * steps_per_epoch + s) for s in range(steps_per_epoch)])
            for p in per_process]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(np.concatenate(seen)) == list(range(24))
  assert per_process[1].batch(0)["images"].shape == (4, SIZE, SIZE, 3)


def test_more_boxes_than_slots_are_counted_not_silently_cut(shapes_source):
  train = pipeline.TrainPipeline(shapes_source, _config(max_boxes=1, mixup=1.0), global_batch_size=4)
  batch = train.batch(0)
  assert batch["valid"].sum(axis=1).max() == 1
  assert train.counters.boxes_over_max > 0


def test_last_epochs_train_without_mosaic(shapes_source, monkeypatch):
  train = pipeline.TrainPipeline(shapes_source, _config(close_mosaic_epochs=2), global_batch_size=4,
                                 total_epochs=2)
  monkeypatch.setattr(pipeline._Sample, "_mosaic", None)  # the mosaic path must not run
  batch = train.batch(0)
  assert batch["images"].shape == (4, SIZE, SIZE, 3) and batch["valid"].any()


class _EditedSource:
  """``source`` with every example passed through ``edit(index, example)``."""

  def __init__(self, source, edit):
    self.source, self.edit = source, edit

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    return self.edit(index, dict(self.source[index]))


def _truncated_at_zero(index, example):
  if index == 0:
    raise OSError("image file is truncated")
  return example


def test_an_unreadable_example_is_replaced_and_counted(shapes_source):
  in_process = pipeline.TrainPipeline(_EditedSource(shapes_source, _truncated_at_zero),
                                      _config(mosaic=0.0, workers=0), global_batch_size=24)
  batch = in_process.batch(0)  # one epoch in one batch: example 0 is in it
  assert batch["images"].shape[0] == 24
  assert in_process.counters.samples_unreadable == 1


def test_worker_processes_replace_unreadable_examples_and_report_them(shapes_source):
  """The counts come back from the workers with each batch: one bad example per epoch."""
  train = pipeline.TrainPipeline(_EditedSource(shapes_source, _truncated_at_zero),
                                 _config(mosaic=0.0, workers=2, batches_per_block=1),
                                 global_batch_size=24)
  batches = _first_batches(train, 3)
  assert [b["images"].shape[0] for b in batches] == [24] * 3
  assert train.counters.samples_unreadable == 3


def _killed_at_five_in_a_worker(index, example):
  if index == 5 and multiprocessing.current_process().name != "MainProcess":
    os.kill(os.getpid(), signal.SIGKILL)  # a worker killed mid-task (out of memory, a segfault)
  return example


def test_a_worker_that_dies_stops_training_with_an_error_not_a_hang(shapes_source):
  train = pipeline.TrainPipeline(_EditedSource(shapes_source, _killed_at_five_in_a_worker),
                                 _config(mosaic=0.0, workers=2), global_batch_size=24)
  with pytest.raises(RuntimeError, match="terminated unexpectedly"):
    _first_batches(train, 4)


def test_process_batches_become_one_global_array_on_the_mesh(shapes_source):
  train = pipeline.TrainPipeline(shapes_source, _config(workers=0), global_batch_size=8)
  mesh = sharding.make_mesh()
  batch = next(pipeline.prefetch_to_device(train(), mesh))
  assert batch["images"].shape == (8, SIZE, SIZE, 3)
  assert len(batch["images"].sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(batch["boxes"]), train.batch(0)["boxes"])


def test_a_grid_of_augmented_samples_is_saved_with_boxes_drawn(shapes_source, tmp_path):
  from PIL import Image

  from yolov9_jax.data import visualize
  batch = pipeline.TrainPipeline(shapes_source, _config(), global_batch_size=4).batch(0)
  path = visualize.save_batch_grid(batch, ["circle", "square", "triangle"], tmp_path / "train_batch0.png")
  grid = np.asarray(Image.open(path))
  assert grid.shape == (2 * SIZE, 2 * SIZE, 3)
  assert not np.array_equal(grid[:SIZE, :SIZE], batch["images"][0])  # boxes were drawn on it


def test_ram_cache_gives_the_same_batches(shapes_source):
  plain = pipeline.TrainPipeline(shapes_source, _config(), global_batch_size=4)
  cached = pipeline.TrainPipeline(shapes_source, _config(cache_images=True), global_batch_size=4)
  for step in (0, 1, 0):
    for key, value in plain.batch(step).items():
      np.testing.assert_array_equal(value, cached.batch(step)[key], err_msg=key)
  assert 0 < len(cached.builder.image_cache) <= 24


class _CountingSource(_EditedSource):
  def __init__(self, source):
    super().__init__(source, lambda index, example: example)
    self.read = []

  def __getitem__(self, index):
    self.read.append(index)
    return super().__getitem__(index)


def test_mosaic_partners_come_from_the_block_decoded_once(shapes_source):
  """With blocks of 2 batches of 4, a block reads exactly its own 8 images, once each; the
  official draw reads about four images per training image."""
  block_source, official_source = _CountingSource(shapes_source), _CountingSource(shapes_source)
  blocks = 3
  from_block = pipeline.TrainPipeline(block_source, _config(workers=0, batches_per_block=2),
                                      global_batch_size=4)
  for block in range(blocks):
    before = len(block_source.read)
    from_block.builder.block(block)
    read = block_source.read[before:]
    own = np.concatenate([from_block.sample_indices(step) for step in (2 * block, 2 * block + 1)])
    assert sorted(read) == sorted(set(own.tolist())) and len(read) == len(set(read))
  official = pipeline.TrainPipeline(official_source,
                                    _config(workers=0, batches_per_block=2,
                                            mosaic_partners_from_block=False), global_batch_size=4)
  for block in range(blocks):
    official.builder.block(block)
  assert len(official_source.read) > 2.5 * blocks * 8


def _keyed_like_tfds_coco_2017(index, example):
  example["image/id"] = example.pop("image_id")
  return example


def test_tfds_coco_2017_keys_are_read(shapes_source):
  source = _EditedSource(shapes_source, _keyed_like_tfds_coco_2017)
  plan = eval_batches.make_plan(np.zeros((len(source), 2)), 4, SIZE, rectangular=False)
  batch = next(eval_batches.batches(source, plan))
  assert batch["image_id"].tolist() == [int(shapes_source[i]["image_id"]) for i in range(4)]
  assert pipeline.TrainPipeline(source, _config(), global_batch_size=4).batch(0)["valid"].any()
