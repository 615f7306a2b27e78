"""Training/eval batches: static shapes, determinism per (seed, step), process shards, bad input."""
import numpy as np
import pytest

from yolov9_jax import sharding
from yolov9_jax.data import coco_format, eval_batches, pipeline, shapes

SIZE = 128


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


def test_the_batch_at_a_step_depends_only_on_seed_and_step(shapes_source):
  first = pipeline.TrainPipeline(shapes_source, _config(), global_batch_size=4)
  second = pipeline.TrainPipeline(shapes_source, _config(), global_batch_size=4)
  resumed = next(second(start_step=5))  # a resumed run: step 5 straight away, nothing replayed
  for key, value in first.batch(5).items():
    np.testing.assert_array_equal(value, resumed[key], err_msg=key)
  assert not np.array_equal(first.batch(6)["images"], resumed["images"])
  other_seed = pipeline.TrainPipeline(shapes_source, _config(seed=4), global_batch_size=4).batch(5)
  assert not np.array_equal(other_seed["images"], resumed["images"])


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


def test_last_epochs_train_without_mosaic(shapes_source):
  train = pipeline.TrainPipeline(shapes_source, _config(close_mosaic_epochs=2), global_batch_size=4,
                                 total_epochs=2)
  train._mosaic = None  # the mosaic path must not run: calling it would raise
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
  train = pipeline.TrainPipeline(_EditedSource(shapes_source, _truncated_at_zero), _config(mosaic=0.0),
                                 global_batch_size=24)
  batch = train.batch(0)  # one epoch in one batch: example 0 is in it
  assert batch["images"].shape[0] == 24
  assert train.counters.samples_unreadable == 1


def test_process_batches_become_one_global_array_on_the_mesh(shapes_source):
  train = pipeline.TrainPipeline(shapes_source, _config(), global_batch_size=8)
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
  assert 0 < len(cached._image_cache) <= 24


class _CountingSource(_EditedSource):
  def __init__(self, source):
    super().__init__(source, lambda index, example: example)
    self.reads = 0

  def __getitem__(self, index):
    self.reads += 1
    return super().__getitem__(index)


def test_mosaic_partners_come_from_the_decoded_window(shapes_source):
  window, official = (_CountingSource(shapes_source) for _ in range(2))
  steps = 6
  windowed = pipeline.TrainPipeline(window, _config(mosaic_partner_window=8, mixup=0.0),
                                    global_batch_size=4)
  for step in range(steps):
    windowed.batch(step)
    assert len(windowed._image_cache) <= 8
  everywhere = pipeline.TrainPipeline(official, _config(mosaic_partner_window=0, mixup=0.0),
                                      global_batch_size=4)
  for step in range(steps):
    everywhere.batch(step)
  assert window.reads <= steps * 4  # one decode per training image
  assert official.reads > 2.5 * steps * 4  # four per mosaic, minus repeats within a batch
  # Partners of step 3 are among the images of steps 2 and 3 (the last 8 of the stream).
  rng = np.random.default_rng(0)
  recent = set(windowed.sample_indices(2)) | set(windowed.sample_indices(3))
  assert {windowed._partner(rng, 3) for _ in range(50)} <= recent


def _keyed_like_tfds_coco_2017(index, example):
  example["image/id"] = example.pop("image_id")
  return example


def test_tfds_coco_2017_keys_are_read(shapes_source):
  source = _EditedSource(shapes_source, _keyed_like_tfds_coco_2017)
  plan = eval_batches.make_plan(np.zeros((len(source), 2)), 4, SIZE, rectangular=False)
  batch = next(eval_batches.batches(source, plan))
  assert batch["image_id"].tolist() == [int(shapes_source[i]["image_id"]) for i in range(4)]
  assert pipeline.TrainPipeline(source, _config(), global_batch_size=4).batch(0)["valid"].any()
