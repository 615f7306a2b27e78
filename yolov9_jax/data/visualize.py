"""Pictures of boxes on images: augmented training samples, and detections."""
import math

import numpy as np
from PIL import Image, ImageDraw

from yolov9_jax import paths

_PALETTE = [(255, 56, 56), (72, 249, 10), (0, 194, 255), (255, 157, 151), (146, 204, 23),
            (255, 178, 29), (207, 210, 49), (61, 219, 134), (26, 147, 52), (0, 212, 187)]


def batch_grid(batch, class_names, max_images=16):
  """A PIL image tiling up to ``max_images`` of a training batch (numpy, as the pipeline gives
  it), each box drawn in its class colour with the class name."""
  images = batch["images"][:max_images]
  count, height, width = images.shape[:3]
  columns = math.ceil(math.sqrt(count))
  rows = math.ceil(count / columns)
  grid = Image.new("RGB", (columns * width, rows * height), (255, 255, 255))
  for i, image in enumerate(images):
    valid = batch["valid"][i]
    tile = draw_boxes(image, batch["boxes"][i][valid], batch["classes"][i][valid], class_names)
    grid.paste(tile, ((i % columns) * width, (i // columns) * height))
  return grid


def draw_boxes(image, boxes_xyxy_px, labels, class_names, scores=None):
  """A PIL copy of ``image`` (H, W, 3 uint8 RGB) with each box (x1, y1, x2, y2 pixels) drawn in
  its class colour, labelled with the class name (and the score, when given)."""
  picture = Image.fromarray(np.asarray(image, np.uint8))
  draw = ImageDraw.Draw(picture)
  line_width = max(1, round(max(picture.size) / 320))
  for k, (box, label) in enumerate(zip(boxes_xyxy_px, labels)):
    colour = _PALETTE[int(label) % len(_PALETTE)]
    name = str(class_names[int(label)]) if class_names is not None else str(int(label))
    text = name if scores is None else f"{name} {float(scores[k]):.2f}"
    draw.rectangle([float(v) for v in box], outline=colour, width=line_width)
    draw.text((float(box[0]) + 3, float(box[1]) + 1), text, fill=colour)
  return picture


def save_batch_grid(batch, class_names, path, max_images=16):
  """Writes ``batch_grid`` as a PNG to ``path`` (local or remote)."""
  with paths.user_path(path).open("wb") as file:
    batch_grid(batch, class_names, max_images).save(file, format="PNG")
  return path
