"""A picture of what the model will see: augmented samples with their boxes and class names."""
import math

import numpy as np
from PIL import Image, ImageDraw

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
    tile = Image.fromarray(np.asarray(image, np.uint8))
    draw = ImageDraw.Draw(tile)
    for box, label in zip(batch["boxes"][i][batch["valid"][i]], batch["classes"][i][batch["valid"][i]]):
      colour = _PALETTE[int(label) % len(_PALETTE)]
      draw.rectangle([float(v) for v in box], outline=colour, width=2)
      draw.text((float(box[0]) + 3, float(box[1]) + 1), str(class_names[int(label)]), fill=colour)
    grid.paste(tile, ((i % columns) * width, (i // columns) * height))
  return grid


def save_batch_grid(batch, class_names, path, max_images=16):
  batch_grid(batch, class_names, max_images).save(path)
  return path
