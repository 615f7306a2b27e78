"""Evaluation batches by the official validation protocol (FACTS.md §8.2), rectangular or square.

Rectangular (the official ``val.py`` default, ``rect=True``): the images are sorted by aspect
ratio h/w and cut into batches of the global batch size; each batch gets one input shape, the
smallest rectangle (sides multiples of 32, plus half a stride of margin) that holds its images
with their long side at ``image_size``: at 640 up to 672 px. Square: every batch is an
``image_size`` square letterbox in dataset order (one input shape: one compilation, faster).

Every image is resized so that its long side is ``image_size`` (INTER_AREA when shrinking,
INTER_LINEAR when enlarging) and padded, centred, with grey 114 to its batch's shape; the
official ``scale_boxes`` parameters (ratio = resized height / original height, the half paddings)
come with it, so that a box maps back to original pixels as (box - pad) / ratio.

A global batch is split over the processes of a multi-process job by rows: process p builds rows
[p b, (p + 1) b) of every global batch (b = batch size / processes), so all processes run the
same sequence of input shapes.
"""
import dataclasses

import cv2
import grain
import numpy as np

from yolov9_jax.data import transforms
from yolov9_jax.models.yolo import INPUT_MULTIPLE, check_image_size

RECT_PAD_STRIDES = 0.5  # the official val loader's margin, in strides


def rectangular_batch_shapes(images_hw, batch_size, image_size, stride=INPUT_MULTIPLE,
                             pad=RECT_PAD_STRIDES):
  """The official rectangular batching of images with sizes ``images_hw`` (N, 2) pixels.

  Returns (order, shapes_hw): ``order`` sorts the images by aspect ratio h/w (numpy's default
  argsort, the official call, so images of equal ratio are ordered as there too), and
  ``shapes_hw`` (number of batches, 2) int is the input height and width of batch k, which holds
  the images ``order[k * batch_size:(k + 1) * batch_size]``. A batch of landscape images only
  (h/w < 1) is ``image_size`` + margin wide and as high as its tallest image needs, a batch of
  portrait images only the transpose, and a mixed batch square.
  """
  images_hw = np.asarray(images_hw, np.float64).reshape(-1, 2)
  aspect = images_hw[:, 0] / images_hw[:, 1]
  order = aspect.argsort()
  aspect = aspect[order]
  count = -(-len(aspect) // batch_size)
  relative = np.ones((count, 2))  # (h, w) in units of image_size
  for k in range(count):
    in_batch = aspect[k * batch_size:(k + 1) * batch_size]
    if in_batch.max() < 1:
      relative[k] = in_batch.max(), 1
    elif in_batch.min() > 1:
      relative[k] = 1, 1 / in_batch.min()
  shapes_hw = np.ceil(relative * image_size / stride + pad).astype(int) * stride
  return order, shapes_hw


@dataclasses.dataclass(frozen=True)
class EvalPlan:
  """Which dataset indices each global batch holds, and its input shape."""
  batch_size: int                  # global
  image_size: int                  # the long side of every image after resizing
  indices: tuple                   # per batch: (at most batch_size,) int dataset indices
  shapes_hw: tuple                 # per batch: (height, width) input pixels

  def __len__(self):
    return len(self.indices)

  @property
  def distinct_shapes(self):
    """The input shapes, each once, in order of first use (one compilation each)."""
    return tuple(dict.fromkeys(self.shapes_hw))


def make_plan(images_hw, batch_size, image_size, rectangular=True):
  """The batches of a dataset whose image ``k`` is ``images_hw[k]`` (height, width) pixels:
  rectangular (the official protocol) or ``image_size`` squares in dataset order."""
  check_image_size(image_size)
  count = len(images_hw)
  if rectangular:
    order, shapes_hw = rectangular_batch_shapes(images_hw, batch_size, image_size)
    shapes_hw = [tuple(int(v) for v in shape) for shape in shapes_hw]
  else:
    order, shapes_hw = np.arange(count), [(image_size, image_size)] * -(-count // batch_size)
  indices = tuple(order[first:first + batch_size] for first in range(0, count, batch_size))
  return EvalPlan(batch_size, image_size, indices, tuple(shapes_hw))


def letterbox_for_eval(image, image_size, out_hw):
  """The official validation transform of one image: long side to ``image_size`` (truncated
  sides; INTER_AREA when shrinking), then centred grey padding to ``out_hw`` without scaling.
  Returns (image, ratio, pad_xy): ratio = resized height / original height and pad_xy the half
  paddings (floats), the official ``scale_boxes`` parameters."""
  height = image.shape[0]
  shrinking = max(image.shape[:2]) > image_size
  resized, _ = transforms.resize_long_side(
      image, np.zeros((0, 4)), image_size, cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
  if resized.shape[0] > out_hw[0] or resized.shape[1] > out_hw[1]:
    raise ValueError(f"an image resized to {resized.shape[:2]} does not fit the batch shape {out_hw}")
  padded, _, _ = transforms.letterbox(resized, np.zeros((0, 4)), out_hw, scale_up=False)
  pad_xy = (np.array(out_hw[::-1], np.float32) - np.array(resized.shape[1::-1], np.float32)) / 2
  return padded, resized.shape[0] / height, pad_xy


def example_image_id(example):
  """The image id of a source example (ours: "image_id"; TFDS coco/2017: "image/id")."""
  return int(example["image_id"] if "image_id" in example else example["image/id"])


def batches(source, plan, process_index=0, process_count=1, read_ahead=2):
  """This process's rows of every global batch of ``plan``: "images" (b, H, W, 3) uint8 with
  (H, W) the batch's shape, "image_id" (b,), "original_hw" (b, 2), "ratio" (b,), "pad_xy" (b, 2)
  and "example_valid" (b,) bool (False on padding rows, past the end of the dataset).

  An iterator over Grain's map of ``plan``'s batches, ``read_ahead`` of them built ahead in
  threads while the caller runs the model (decoding and OpenCV release the GIL)."""
  if plan.batch_size % process_count:
    raise ValueError(f"evaluation batch size {plan.batch_size} is not divisible by the "
                     f"{process_count} processes")
  rows = plan.batch_size // process_count

  def batch(k):
    (height, width), indices = plan.shapes_hw[k], plan.indices[k]
    mine = indices[process_index * rows:(process_index + 1) * rows]
    out = {"images": np.full((rows, height, width, 3), transforms.FILL_VALUE, np.uint8),
           "image_id": np.zeros(rows, np.int64), "original_hw": np.zeros((rows, 2), np.int32),
           "ratio": np.ones(rows, np.float32), "pad_xy": np.zeros((rows, 2), np.float32),
           "example_valid": np.zeros(rows, bool)}
    for i, index in enumerate(mine):
      example = source[int(index)]
      image = np.asarray(example["image"])
      out["images"][i], out["ratio"][i], out["pad_xy"][i] = letterbox_for_eval(
          image, plan.image_size, (height, width))
      out["image_id"][i] = example_image_id(example)
      out["original_hw"][i] = image.shape[:2]
      out["example_valid"][i] = True
    return out

  read = grain.ReadOptions(num_threads=read_ahead, prefetch_buffer_size=read_ahead)
  return iter(grain.MapDataset.range(len(plan)).map(batch).to_iter_dataset(read))
