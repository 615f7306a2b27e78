"""``shapes``: a synthetic detection set, generated locally and deterministically, in COCO format.

Coloured circles, squares and triangles of many sizes on textured backgrounds; objects overlap
and touch the image edges, and about one image in ten holds none. Written as a COCO instances
JSON plus PNG images, so it travels the same route as any COCO-format dataset and can be scored
with pycocotools.
"""
import json
import pathlib

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES = ({"id": 1, "name": "circle"}, {"id": 2, "name": "square"},
              {"id": 3, "name": "triangle"})
EMPTY_IMAGE_FRACTION = 0.1


def _background(rng, height, width):
  """A smooth colour gradient plus noise, so that the model cannot find objects by flatness."""
  ys, xs = np.mgrid[0:height, 0:width] / max(height, width)
  start, slope_x, slope_y = rng.uniform(40, 200, 3), rng.uniform(-60, 60, 3), rng.uniform(-60, 60, 3)
  image = start + xs[..., None] * slope_x + ys[..., None] * slope_y
  image += rng.normal(0, rng.uniform(4, 20), (height, width, 3))
  return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def _draw_object(draw, mask_draw, rng, category_id, height, width):
  size = rng.uniform(0.06, 0.5) * min(height, width)
  # Centres may lie near or past the border: objects get cut by the image edges.
  cx, cy = rng.uniform(-0.1, 1.1) * width, rng.uniform(-0.1, 1.1) * height
  colour = tuple(int(c) for c in rng.integers(0, 256, 3))
  if category_id == 1:
    shape = [cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2]
    for d in (draw, mask_draw):
      d.ellipse(shape, fill=colour if d is draw else 255)
  elif category_id == 2:
    aspect = rng.uniform(0.6, 1.6)
    shape = [cx - size / 2, cy - size * aspect / 2, cx + size / 2, cy + size * aspect / 2]
    for d in (draw, mask_draw):
      d.rectangle(shape, fill=colour if d is draw else 255)
  else:
    angle = rng.uniform(0, 2 * np.pi)
    corners = [(cx + size / 2 * np.cos(angle + k * 2 * np.pi / 3),
                cy + size / 2 * np.sin(angle + k * 2 * np.pi / 3)) for k in range(3)]
    for d in (draw, mask_draw):
      d.polygon(corners, fill=colour if d is draw else 255)


def generate(out_dir, num_images=256, image_hw=(256, 256), max_objects=8, seed=0):
  """Writes ``out_dir/images/*.png`` and ``out_dir/annotations.json``; returns the JSON's path.

  Each image's content depends only on (seed, image index). Image sizes vary around ``image_hw``
  (0.75x to 1.25x per side) so that letterboxing is exercised.
  """
  out_dir = pathlib.Path(out_dir)  # local: generated on this machine's disk (cv2.imwrite)
  (out_dir / "images").mkdir(parents=True, exist_ok=True)
  images, annotations = [], []
  for index in range(num_images):
    rng = np.random.default_rng([seed, index])
    height = int(image_hw[0] * rng.uniform(0.75, 1.25))
    width = int(image_hw[1] * rng.uniform(0.75, 1.25))
    image = _background(rng, height, width)
    draw = ImageDraw.Draw(image)
    num_objects = 0 if rng.uniform() < EMPTY_IMAGE_FRACTION else int(rng.integers(1, max_objects + 1))
    for _ in range(num_objects):
      category_id = int(rng.integers(1, len(CATEGORIES) + 1))
      mask = Image.new("L", (width, height), 0)
      _draw_object(draw, ImageDraw.Draw(mask), rng, category_id, height, width)
      bbox = mask.getbbox()  # the object's visible extent in the image: (x1, y1, x2, y2) edges
      if bbox is None:  # wholly outside the image
        continue
      x1, y1, x2, y2 = bbox
      annotations.append({"id": len(annotations) + 1, "image_id": index + 1,
                          "category_id": category_id, "bbox": [x1, y1, x2 - x1, y2 - y1],
                          "area": int(np.count_nonzero(np.asarray(mask))), "iscrowd": 0})
    file_name = f"{index:06d}.png"
    image.save(out_dir / "images" / file_name)
    images.append({"id": index + 1, "file_name": file_name, "height": height, "width": width})
  path = out_dir / "annotations.json"
  path.write_text(json.dumps({"images": images, "annotations": annotations,
                              "categories": list(CATEGORIES)}))
  return path


def as_jpegs(annotations_path, out_dir, long_side=640, quality=90):
  """A copy of a generated set as COCO-like JPEGs: each image resized to ``long_side`` pixels on
  its long side (as nearly every COCO image is), boxes scaled to match. Returns the new JSON's
  path (``out_dir/annotations.json``); the images lie beside it. The benchmarks' data."""
  annotations_path = pathlib.Path(annotations_path)  # local: written by ``generate``
  out_dir = pathlib.Path(out_dir)  # local: generated on this machine's disk
  coco = json.loads(annotations_path.read_text())
  out_dir.mkdir(parents=True, exist_ok=True)
  ratios = {}
  for info in coco["images"]:
    with Image.open(annotations_path.parent / "images" / info["file_name"]) as image:
      ratio = long_side / max(image.size)
      size = (round(image.width * ratio), round(image.height * ratio))
      info.update(file_name=info["file_name"].rsplit(".", 1)[0] + ".jpg", width=size[0],
                  height=size[1])
      image.resize(size, Image.BILINEAR).save(out_dir / info["file_name"], quality=quality)
      ratios[info["id"]] = ratio
  for annotation in coco["annotations"]:
    annotation["bbox"] = [v * ratios[annotation["image_id"]] for v in annotation["bbox"]]
  path = out_dir / "annotations.json"
  path.write_text(json.dumps(coco))
  return path
