"""Image and box transforms of the official YOLOv9 recipe (FACTS.md §7), as TensorFlow ops.

Each transform is a pure function of its inputs and explicit parameters, so that the tf.data
pipeline can draw the parameters from stateless seeds (the batch at step N is a function of
(seed, N)). Images are uint8 HWC RGB; boxes are float32 (N, 4) x1, y1, x2, y2 in pixels of the
image they come with.
"""
from typing import NamedTuple

import tensorflow as tf

FILL_VALUE = 114  # the official grey for padding and warped-in borders


class Letterbox(NamedTuple):
  """How a letterboxed image relates to the original: box_px_letterboxed = box_px * ratio + pad."""
  ratio: tf.Tensor  # scalar float32
  pad_xy: tf.Tensor  # (2,) float32: left, top padding in letterboxed pixels


def letterbox(image, boxes_xyxy_px, out_hw, scale_up=True):
  """Resize keeping the aspect ratio, then pad with grey 114 to ``out_hw`` (official rounding:
  an odd padding puts the extra pixel at the bottom / right)."""
  out_h, out_w = out_hw
  height = tf.cast(tf.shape(image)[0], tf.float32)
  width = tf.cast(tf.shape(image)[1], tf.float32)
  ratio = tf.minimum(out_h / height, out_w / width)
  if not scale_up:
    ratio = tf.minimum(ratio, 1.0)
  new_h = tf.cast(tf.round(height * ratio), tf.int32)
  new_w = tf.cast(tf.round(width * ratio), tf.int32)
  resized = tf.image.resize(image, tf.stack([new_h, new_w]), method="bilinear")
  resized = tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)
  top = tf.cast(tf.round(tf.cast(out_h - new_h, tf.float32) / 2 - 0.1), tf.int32)
  left = tf.cast(tf.round(tf.cast(out_w - new_w, tf.float32) / 2 - 0.1), tf.int32)
  padded = tf.pad(resized, [[top, out_h - new_h - top], [left, out_w - new_w - left], [0, 0]],
                  constant_values=FILL_VALUE)
  padded = tf.ensure_shape(padded, (out_h, out_w, 3))
  pad_xy = tf.cast(tf.stack([left, top]), tf.float32)
  boxes = boxes_xyxy_px * ratio + tf.tile(pad_xy, [2])
  return padded, boxes, Letterbox(ratio, pad_xy)


def _placements(hw_list, centre_xy, canvas):
  """Where each of 4 images goes on the mosaic canvas: (canvas y1, y2, x1, x2, source y1, x1)
  with the official corner rule: image i has its bottom-right, bottom-left, top-right, top-left
  corner at the centre."""
  xc, yc = centre_xy[0], centre_xy[1]
  out = []
  for i, (h, w) in enumerate(hw_list):
    left_of_centre = i in (0, 2)
    above_centre = i in (0, 1)
    x1 = tf.maximum(xc - w, 0) if left_of_centre else xc
    x2 = xc if left_of_centre else tf.minimum(xc + w, canvas)
    y1 = tf.maximum(yc - h, 0) if above_centre else yc
    y2 = yc if above_centre else tf.minimum(yc + h, canvas)
    source_x1 = w - (x2 - x1) if left_of_centre else 0
    source_y1 = h - (y2 - y1) if above_centre else 0
    out.append((y1, y2, x1, x2, source_y1, source_x1))
  return out


def mosaic(images, boxes_list, centre_xy, tile_size):
  """Four images on a (2 tile_size)^2 grey canvas around ``centre_xy`` (int32 (2,)).

  Returns (canvas uint8, boxes (N, 4)): the four images' boxes in order, moved to canvas pixels
  and clipped to it (the caller concatenates the classes in the same order).
  """
  canvas_size = 2 * tile_size
  canvas = tf.fill((canvas_size, canvas_size, 3), tf.constant(FILL_VALUE, tf.uint8))
  hw_list = [(tf.shape(im)[0], tf.shape(im)[1]) for im in images]
  moved = []
  for image, boxes, (y1, y2, x1, x2, sy1, sx1) in zip(
      images, boxes_list, _placements(hw_list, centre_xy, canvas_size)):
    piece = image[sy1:sy1 + (y2 - y1), sx1:sx1 + (x2 - x1)]
    paddings = [[y1, canvas_size - y2], [x1, canvas_size - x2], [0, 0]]
    inside = tf.pad(tf.ones_like(piece[..., :1], tf.bool), paddings, constant_values=False)
    canvas = tf.where(inside, tf.pad(piece, paddings), canvas)
    offset = tf.cast(tf.stack([x1 - sx1, y1 - sy1] * 2), tf.float32)
    moved.append(tf.clip_by_value(boxes + offset, 0.0, float(canvas_size)))
  return tf.ensure_shape(canvas, (canvas_size, canvas_size, 3)), tf.concat(moved, 0)


def _resample_rectangle(image, scale, offset_xy, row_range, col_range):
  """Bilinear samples of ``image`` for output rows/cols [start, stop), where output position p
  reads source position (p - offset) / scale (pixel centres at integers, as OpenCV's warpAffine);
  114 outside the image. Shape (rows, cols, 3) float32; either may be 0."""
  height = tf.maximum(tf.cast(tf.shape(image)[0], tf.float32) - 1, 1.0)
  width = tf.maximum(tf.cast(tf.shape(image)[1], tf.float32) - 1, 1.0)
  rows, cols = row_range[1] - row_range[0], col_range[1] - col_range[0]
  first_y = (tf.cast(row_range[0], tf.float32) - offset_xy[1]) / scale
  first_x = (tf.cast(col_range[0], tf.float32) - offset_xy[0]) / scale
  last_y = first_y + tf.cast(tf.maximum(rows - 1, 0), tf.float32) / scale
  last_x = first_x + tf.cast(tf.maximum(cols - 1, 0), tf.float32) / scale
  box = tf.stack([first_y / height, first_x / width, last_y / height, last_x / width])
  crop = tf.stack([tf.maximum(rows, 1), tf.maximum(cols, 1)])
  sample = tf.image.crop_and_resize(image[None], box[None], [0], crop,
                                    extrapolation_value=float(FILL_VALUE))[0]
  return sample[:rows, :cols]


def mosaic_affine(images, boxes_list, centre_xy, tile_size, scale, translate_xy_fraction, out_size):
  """``mosaic`` followed by ``warp_affine`` with ``affine_matrix`` (scale and translation only),
  without building the canvas. Such a warp keeps the four mosaic quadrants axis-aligned, so they
  tile the output as a 2x2 grid and each image is sampled only over its own rectangle (about 15x
  less work). Pixels equal the two-step result except on one-pixel lines along the seams and the
  images' borders, where the canvas route blends neighbours (or the grey fill) bilinearly.

  Returns (image uint8 (out_size, out_size, 3), canvas boxes (N, 4), the matrix) for
  ``transform_boxes`` / ``box_candidates``.
  """
  canvas_size = 2 * tile_size
  matrix = affine_matrix((canvas_size, canvas_size), (out_size, out_size), scale, translate_xy_fraction)
  # The output row / column where the canvas centre's pixel boundary falls.
  positions = tf.range(out_size, dtype=tf.float32)
  centre = tf.cast(centre_xy, tf.float32)
  col_split = tf.reduce_sum(tf.cast((positions - matrix[0, 2]) / scale < centre[0] - 0.5, tf.int32))
  row_split = tf.reduce_sum(tf.cast((positions - matrix[1, 2]) / scale < centre[1] - 0.5, tf.int32))
  ranges = [((0, row_split), (0, col_split)), ((0, row_split), (col_split, out_size)),
            ((row_split, out_size), (0, col_split)), ((row_split, out_size), (col_split, out_size))]
  hw_list = [(tf.shape(im)[0], tf.shape(im)[1]) for im in images]
  quadrants, moved = [], []
  for image, boxes, (y1, _, x1, _, sy1, sx1), (row_range, col_range) in zip(
      images, boxes_list, _placements(hw_list, centre_xy, canvas_size), ranges):
    offset = tf.cast(tf.stack([x1 - sx1, y1 - sy1]), tf.float32)  # image origin on the canvas
    quadrants.append(_resample_rectangle(image, scale, matrix[:2, 2] + scale * offset,
                                         row_range, col_range))
    moved.append(tf.clip_by_value(boxes + tf.tile(offset, [2]), 0.0, float(canvas_size)))
  out = tf.concat([tf.concat(quadrants[:2], 1), tf.concat(quadrants[2:], 1)], 0)
  image = tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)
  return tf.ensure_shape(image, (out_size, out_size, 3)), tf.concat(moved, 0), matrix


def affine_matrix(in_hw, out_hw, scale, translate_xy_fraction):
  """The official random_perspective matrix without rotation/shear/perspective: move the input
  centre to the origin, scale, then move to (0.5 + t) x output size. (3, 3) float32."""
  in_h, in_w = tf.cast(in_hw[0], tf.float32), tf.cast(in_hw[1], tf.float32)
  tx = (0.5 + translate_xy_fraction[0]) * float(out_hw[1])
  ty = (0.5 + translate_xy_fraction[1]) * float(out_hw[0])
  return tf.stack([[scale, 0.0, tx - scale * in_w / 2],
                   [0.0, scale, ty - scale * in_h / 2],
                   [0.0, 0.0, 1.0]])


def warp_affine(image, matrix, out_hw):
  """Bilinear warp of uint8 HWC by a (3, 3) input->output matrix, grey 114 outside."""
  inverse = tf.linalg.inv(matrix)
  transform = tf.reshape(inverse, [-1])[:8][None]
  warped = tf.raw_ops.ImageProjectiveTransformV3(
      images=tf.cast(image[None], tf.float32), transforms=transform,
      output_shape=tf.constant(out_hw, tf.int32), fill_value=float(FILL_VALUE),
      interpolation="BILINEAR", fill_mode="CONSTANT")[0]
  return tf.cast(tf.clip_by_value(tf.round(warped), 0, 255), tf.uint8)


def transform_boxes(boxes_xyxy_px, matrix, out_hw):
  """Boxes through an axis-aligned affine matrix: corners mapped, min/max, clipped to the output."""
  corners = tf.reshape(tf.gather(boxes_xyxy_px, [0, 1, 2, 1, 0, 3, 2, 3], axis=1), (-1, 4, 2))
  mapped = tf.einsum("ij,nkj->nki", matrix[:2, :2], corners) + matrix[:2, 2]
  low, high = tf.reduce_min(mapped, 1), tf.reduce_max(mapped, 1)
  limit = tf.constant([out_hw[1], out_hw[0]], tf.float32)
  return tf.concat([tf.clip_by_value(low, 0.0, limit), tf.clip_by_value(high, 0.0, limit)], 1)


def box_candidates(boxes_before_px, boxes_after_px, scale, min_side_px=2.0, min_area_ratio=0.1,
                   max_aspect=100.0):
  """The official rule for keeping a box after augmentation: sides > 2 px, at least 10 % of its
  scaled area left (0.01 with polygons, which we don't use), aspect ratio below 100."""
  eps = 1e-16
  w1 = (boxes_before_px[:, 2] - boxes_before_px[:, 0]) * scale
  h1 = (boxes_before_px[:, 3] - boxes_before_px[:, 1]) * scale
  w2 = boxes_after_px[:, 2] - boxes_after_px[:, 0]
  h2 = boxes_after_px[:, 3] - boxes_after_px[:, 1]
  aspect = tf.maximum(w2 / (h2 + eps), h2 / (w2 + eps))
  return ((w2 > min_side_px) & (h2 > min_side_px) & (w2 * h2 / (w1 * h1 + eps) > min_area_ratio) &
          (aspect < max_aspect))


def hsv_jitter(image, gains_hsv):
  """Multiply hue (cyclically), saturation and value by ``gains_hsv`` (3,), as the official
  look-up tables do (H in [0, 1) here rather than OpenCV's 0..179)."""
  hsv = tf.image.rgb_to_hsv(tf.cast(image, tf.float32) / 255.0)
  hue = tf.math.floormod(hsv[..., 0] * gains_hsv[0], 1.0)
  sat = tf.clip_by_value(hsv[..., 1] * gains_hsv[1], 0.0, 1.0)
  val = tf.clip_by_value(hsv[..., 2] * gains_hsv[2], 0.0, 1.0)
  rgb = tf.image.hsv_to_rgb(tf.stack([hue, sat, val], -1))
  return tf.cast(tf.clip_by_value(tf.round(rgb * 255.0), 0, 255), tf.uint8)


def horizontal_flip(image, boxes_xyxy_px):
  width = tf.cast(tf.shape(image)[1], tf.float32)
  flipped = tf.stack([width - boxes_xyxy_px[:, 2], boxes_xyxy_px[:, 1],
                      width - boxes_xyxy_px[:, 0], boxes_xyxy_px[:, 3]], axis=1)
  return tf.reverse(image, [1]), flipped  # ~10x faster than a negative-stride slice


def mixup(image_a, image_b, ratio):
  """The official blend img_a * r + img_b * (1 - r), truncated to uint8; labels are concatenated
  by the caller."""
  blended = tf.cast(image_a, tf.float32) * ratio + tf.cast(image_b, tf.float32) * (1 - ratio)
  return tf.cast(blended, tf.uint8)
