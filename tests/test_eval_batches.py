"""Evaluation batches: the official rectangular batch shapes, the letterbox into them, process rows."""
import math

import numpy as np
import pytest

from yolov9_jax.data import eval_batches, transforms


def _official_batch_shape_of_each_image(images_hw, batch_size, image_size):
  """FACTS.md §8.2 read image by image: the images in ascending order of h/w (numpy's default
  argsort) fill batches of ``batch_size``; a batch whose ratios are all below 1 is
  [largest ratio, 1] x image_size, all above 1 [1, 1 / smallest ratio] x image_size, else
  square; each side becomes ceil(side / 32 + 0.5) x 32. Returns {image index: (h, w)}."""
  ratios = [h / w for h, w in images_hw]
  sorted_images = list(np.argsort(np.array(ratios, np.float64)))
  shape_of = {}
  for position, image in enumerate(sorted_images):
    first = position - position % batch_size
    batch = [ratios[j] for j in sorted_images[first:first + batch_size]]
    if all(r < 1 for r in batch):
      relative = (max(batch), 1.0)
    elif all(r > 1 for r in batch):
      relative = (1.0, 1 / min(batch))
    else:
      relative = (1.0, 1.0)
    shape_of[int(image)] = tuple(math.ceil(side * image_size / 32 + 0.5) * 32 for side in relative)
  return shape_of


def _aspect_sets():
  rng = np.random.default_rng(0)
  coco_like = [(480, 640), (427, 640), (640, 480), (640, 427), (640, 640), (375, 500), (500, 375),
               (333, 500), (612, 612), (240, 320)]
  yield "coco-like with ties", [coco_like[i] for i in rng.integers(0, len(coco_like), 203)], 32, 640
  yield "all landscape", [(int(h), 640) for h in rng.integers(200, 639, 70)], 16, 640
  yield "all portrait", [(640, int(w)) for w in rng.integers(150, 639, 45)], 8, 640
  yield "random", [tuple(int(v) for v in hw) for hw in rng.integers(20, 2000, (97, 2))], 32, 640
  yield "square only", [(100, 100)] * 9, 4, 128
  yield "one image", [(300, 200)], 32, 320
  yield "extreme ratios", [(10, 1000), (1000, 10), (11, 1000), (999, 10)], 2, 256


@pytest.mark.parametrize("name,images_hw,batch_size,image_size", list(_aspect_sets()),
                         ids=[s[0] for s in _aspect_sets()])
def test_rectangular_batch_shapes_follow_the_official_rule(name, images_hw, batch_size, image_size):
  plan = eval_batches.make_plan(images_hw, batch_size, image_size, rectangular=True)
  expected = _official_batch_shape_of_each_image(images_hw, batch_size, image_size)
  got = {int(i): shape for indices, shape in zip(plan.indices, plan.shapes_hw) for i in indices}
  assert got == expected
  assert sorted(got) == list(range(len(images_hw)))  # every image once
  assert all(len(indices) == batch_size for indices in plan.indices[:-1])
  for indices, (height, width) in zip(plan.indices, plan.shapes_hw):
    assert height % 32 == width % 32 == 0 and max(height, width) <= image_size + 32
    for index in indices:  # each image, long side at image_size, fits its batch's shape
      h, w = images_hw[index]
      ratio = image_size / max(h, w)
      assert int(h * ratio) <= height and int(w * ratio) <= width


def test_coco_at_640_batch_32_gives_672_wide_landscape_batches():
  plan = eval_batches.make_plan([(480, 640)] * 40, 32, 640)
  assert plan.shapes_hw == ((512, 672), (512, 672)) and plan.distinct_shapes == ((512, 672),)
  square = eval_batches.make_plan([(480, 640)] * 40, 32, 640, rectangular=False)
  assert square.shapes_hw == ((640, 640), (640, 640))
  assert [list(i) for i in square.indices] == [list(range(32)), list(range(32, 40))]
  with pytest.raises(ValueError, match="not a multiple of 32"):
    eval_batches.make_plan([(480, 640)], 32, 630)


@pytest.mark.parametrize("original_hw,out_hw", [((480, 640), (512, 672)), ((427, 640), (480, 672)),
                                               ((640, 427), (672, 480)), ((300, 200), (352, 256)),
                                               ((1280, 960), (672, 512)), ((481, 640), (640, 640))])
def test_the_letterbox_puts_the_resized_image_in_the_middle_of_the_batch_shape(original_hw, out_hw):
  height, width = original_hw
  image_size = 640 if max(original_hw) >= 480 else 256
  image = np.random.default_rng(0).integers(0, 256, (height, width, 3)).astype(np.uint8)
  padded, ratio, pad_xy = eval_batches.letterbox_for_eval(image, image_size, out_hw)
  assert padded.shape == (*out_hw, 3)
  resized_h, resized_w = int(height * image_size / max(original_hw)), int(width * image_size / max(original_hw))
  assert ratio == resized_h / height
  np.testing.assert_array_equal(pad_xy, [(out_hw[1] - resized_w) / 2, (out_hw[0] - resized_h) / 2])
  top, left = round(pad_xy[1] - 0.1), round(pad_xy[0] - 0.1)  # the official split of odd paddings
  outside = np.ones(out_hw, bool)
  outside[top:top + resized_h, left:left + resized_w] = False
  assert (padded[outside] == transforms.FILL_VALUE).all()
  assert (padded[~outside] != transforms.FILL_VALUE).any()
  # The official scale_boxes takes the content's corners back to the original image's.
  corners = (np.array([left, top, left + resized_w, top + resized_h]) - np.tile(pad_xy, 2)) / ratio
  np.testing.assert_allclose(corners, [0, 0, width, height], atol=1 / ratio)


class _Source:
  def __init__(self, images_hw):
    self.images_hw = images_hw

  def __len__(self):
    return len(self.images_hw)

  def __getitem__(self, index):
    return {"image": np.zeros((*self.images_hw[index], 3), np.uint8), "image_id": 100 + index}


def test_processes_take_their_rows_of_every_global_batch():
  images_hw = [(48, 64), (64, 48), (64, 64), (40, 64), (64, 40)] * 3  # 15 images
  plan = eval_batches.make_plan(images_hw, 8, 64)
  per_process = [list(eval_batches.batches(_Source(images_hw), plan, p, 4)) for p in range(4)]
  assert [len(b) for b in per_process] == [2] * 4  # the same number of steps everywhere
  for k, (indices, shape) in enumerate(zip(plan.indices, plan.shapes_hw)):
    rows = np.concatenate([per_process[p][k]["image_id"] for p in range(4)])
    valid = np.concatenate([per_process[p][k]["example_valid"] for p in range(4)])
    assert rows[valid].tolist() == [100 + int(i) for i in indices]
    assert all(per_process[p][k]["images"].shape == (2, *shape, 3) for p in range(4))
  assert valid.sum() == 7 and not valid[-1]  # the last global batch is padded
  with pytest.raises(ValueError, match="not divisible by the 3 processes"):
    next(eval_batches.batches(_Source(images_hw), plan, 0, 3))
