"""Image and box transforms of the official YOLOv9 recipe (FACTS.md §7), on numpy with OpenCV.

The official code augments with OpenCV; using the same calls (``resize``, ``warpAffine``, HSV
look-up tables) gives the same pixels and is 2-3x faster per core than the TensorFlow ops this
replaced. Each transform is a pure function of its inputs and explicit parameters, so that the
pipeline can draw the parameters from stateless seeds (the batch at step N is a function of
(seed, N)). Images are uint8 HWC RGB; boxes are float32 (N, 4) x1, y1, x2, y2 in pixels of the
image they come with. Grain's worker processes run them in parallel.
"""
from typing import NamedTuple

import cv2
import numpy as np

FILL_VALUE = 114  # the official grey for padding and warped-in borders
_FILL_RGB = (FILL_VALUE,) * 3


class Letterbox(NamedTuple):
  """How a letterboxed image relates to the original: box_px_letterboxed = box_px * ratio + pad."""
  ratio: float
  pad_xy: np.ndarray  # (2,) float32: left, top padding in letterboxed pixels


def _boxes(boxes_xyxy_px):
  return np.asarray(boxes_xyxy_px, np.float32).reshape(-1, 4)


def resize_long_side(image, boxes_xyxy_px, size, interpolation=cv2.INTER_LINEAR):
  """The official ``load_image``: long side to ``size`` (new sides truncated), bilinear; an
  image whose long side already is ``size`` (most of COCO at 640) is returned as it is."""
  height, width = image.shape[:2]
  ratio = size / max(height, width)
  if ratio == 1:
    return image, _boxes(boxes_xyxy_px)
  resized = cv2.resize(image, (int(width * ratio), int(height * ratio)), interpolation=interpolation)
  return resized, _boxes(boxes_xyxy_px) * np.float32(ratio)


def letterbox(image, boxes_xyxy_px, out_hw, scale_up=True):
  """Resize keeping the aspect ratio, then pad with grey 114 to ``out_hw`` (official rounding:
  an odd padding puts the extra pixel at the bottom / right)."""
  out_h, out_w = out_hw
  height, width = image.shape[:2]
  ratio = min(out_h / height, out_w / width)
  if not scale_up:
    ratio = min(ratio, 1.0)
  new_w, new_h = int(round(width * ratio)), int(round(height * ratio))
  if (new_w, new_h) != (width, height):
    image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
  pad_w, pad_h = (out_w - new_w) / 2, (out_h - new_h) / 2
  top, left = int(round(pad_h - 0.1)), int(round(pad_w - 0.1))
  padded = cv2.copyMakeBorder(image, top, out_h - new_h - top, left, out_w - new_w - left,
                              cv2.BORDER_CONSTANT, value=_FILL_RGB)
  pad_xy = np.array([left, top], np.float32)
  boxes = _boxes(boxes_xyxy_px) * np.float32(ratio) + np.tile(pad_xy, 2)
  return padded, boxes, Letterbox(float(ratio), pad_xy)


def mosaic(images, boxes_list, centre_xy, tile_size):
  """Four images on a (2 tile_size)^2 grey canvas with the official corner rule: image i has its
  bottom-right, bottom-left, top-right, top-left corner at ``centre_xy`` (ints), cropped where it
  would leave the canvas.

  Returns (canvas uint8, boxes (N, 4)): the four images' boxes in order, moved to canvas pixels
  and clipped to it (the caller concatenates the classes in the same order).
  """
  canvas_size = 2 * tile_size
  canvas = np.full((canvas_size, canvas_size, 3), FILL_VALUE, np.uint8)
  xc, yc = int(centre_xy[0]), int(centre_xy[1])
  moved = []
  for i, (image, boxes) in enumerate(zip(images, boxes_list)):
    h, w = image.shape[:2]
    left_of_centre, above_centre = i in (0, 2), i in (0, 1)
    x1, x2 = (max(xc - w, 0), xc) if left_of_centre else (xc, min(xc + w, canvas_size))
    y1, y2 = (max(yc - h, 0), yc) if above_centre else (yc, min(yc + h, canvas_size))
    source_x1 = w - (x2 - x1) if left_of_centre else 0
    source_y1 = h - (y2 - y1) if above_centre else 0
    canvas[y1:y2, x1:x2] = image[source_y1:source_y1 + y2 - y1, source_x1:source_x1 + x2 - x1]
    offset = np.array([x1 - source_x1, y1 - source_y1] * 2, np.float32)
    moved.append(np.clip(_boxes(boxes) + offset, 0, canvas_size))
  return canvas, np.concatenate(moved)


def affine_matrix(in_hw, out_hw, scale, translate_xy_fraction):
  """The official random_perspective matrix without rotation/shear/perspective (their strengths
  are 0 in hyp.scratch-high): move the input centre to the origin, scale, then move to
  (0.5 + t) x output size. (3, 3) float64, input pixels -> output pixels."""
  tx = (0.5 + translate_xy_fraction[0]) * out_hw[1]
  ty = (0.5 + translate_xy_fraction[1]) * out_hw[0]
  return np.array([[scale, 0.0, tx - scale * in_hw[1] / 2],
                   [0.0, scale, ty - scale * in_hw[0] / 2],
                   [0.0, 0.0, 1.0]])


def warp_affine(image, matrix, out_hw):
  """OpenCV's bilinear warp (as the official code), grey 114 outside the input."""
  return cv2.warpAffine(image, matrix[:2], (out_hw[1], out_hw[0]), flags=cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_CONSTANT, borderValue=_FILL_RGB)


def transform_boxes(boxes_xyxy_px, matrix, out_hw):
  """Boxes through an affine matrix: corners mapped, min/max, clipped to the output."""
  boxes = _boxes(boxes_xyxy_px)
  corners = boxes[:, [0, 1, 2, 1, 0, 3, 2, 3]].reshape(-1, 4, 2)
  mapped = corners @ matrix[:2, :2].T.astype(np.float32) + matrix[:2, 2].astype(np.float32)
  limit = np.array([out_hw[1], out_hw[0]], np.float32)
  return np.concatenate([np.clip(mapped.min(1), 0, limit), np.clip(mapped.max(1), 0, limit)], 1)


def box_candidates(boxes_before_px, boxes_after_px, scale, min_side_px=2.0, min_area_ratio=0.1,
                   max_aspect=100.0):
  """The official rule for keeping a box after augmentation: sides > 2 px, at least 10 % of its
  scaled area left (0.01 with polygons, which we don't use), aspect ratio below 100."""
  eps = 1e-16
  before, after = _boxes(boxes_before_px), _boxes(boxes_after_px)
  w1, h1 = (before[:, 2] - before[:, 0]) * scale, (before[:, 3] - before[:, 1]) * scale
  w2, h2 = after[:, 2] - after[:, 0], after[:, 3] - after[:, 1]
  aspect = np.maximum(w2 / (h2 + eps), h2 / (w2 + eps))
  return ((w2 > min_side_px) & (h2 > min_side_px) & (w2 * h2 / (w1 * h1 + eps) > min_area_ratio) &
          (aspect < max_aspect))


_LEVELS = np.arange(256, dtype=np.float64)


def hsv_jitter(image, gains_hsv):
  """The official augment_hsv: OpenCV's uint8 HSV (H in 0..179), look-up tables that multiply
  hue (cyclically), saturation and value by ``gains_hsv`` (3,), back to RGB."""
  hue, sat, val = cv2.split(cv2.cvtColor(image, cv2.COLOR_RGB2HSV))
  lut_hue = ((_LEVELS * gains_hsv[0]) % 180).astype(np.uint8)
  lut_sat = np.clip(_LEVELS * gains_hsv[1], 0, 255).astype(np.uint8)
  lut_val = np.clip(_LEVELS * gains_hsv[2], 0, 255).astype(np.uint8)
  hsv = cv2.merge((cv2.LUT(hue, lut_hue), cv2.LUT(sat, lut_sat), cv2.LUT(val, lut_val)))
  return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def horizontal_flip(image, boxes_xyxy_px):
  boxes = _boxes(boxes_xyxy_px)
  width = np.float32(image.shape[1])
  flipped = np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
  return cv2.flip(image, 1), flipped


def mixup(image_a, image_b, ratio):
  """The official blend img_a * r + img_b * (1 - r), truncated to uint8; labels are concatenated
  by the caller."""
  return (image_a * float(ratio) + image_b * (1 - float(ratio))).astype(np.uint8)
