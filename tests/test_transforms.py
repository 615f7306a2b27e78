"""The official augmentations keep boxes on the pixels they cover (FACTS.md §7)."""
import numpy as np

from yolov9_jax.data import transforms


def _image_with_filled_boxes(height, width, boxes, colours):
  """Black image; each box's pixels painted in its colour (boxes in pixel-edge coordinates)."""
  image = np.zeros((height, width, 3), np.uint8)
  for (x1, y1, x2, y2), colour in zip(boxes, colours):
    image[int(y1):int(y2), int(x1):int(x2)] = colour
  return image


def _interior_colours(image, boxes, margin=3):
  """The set of colours inside each box, shrunk by ``margin`` px (bilinear blurs the edges)."""
  out = []
  for x1, y1, x2, y2 in np.round(boxes).astype(int):
    patch = image[y1 + margin:y2 - margin, x1 + margin:x2 - margin].reshape(-1, 3)
    out.append({tuple(c) for c in patch})
  return out


def test_boxes_stay_on_their_pixels_through_mosaic_affine_and_flip():
  rng = np.random.default_rng(0)
  sizes = [(320, 480), (400, 300), (480, 640), (256, 256)]
  images, boxes_list, colours = [], [], []
  colour_id = 0
  for height, width in sizes:
    boxes, box_colours = [], []
    for row in range(2):  # two non-overlapping boxes per image, one in each half
      x1 = rng.uniform(0, width / 2 - 90)
      y1 = rng.uniform(row * height / 2, (row + 1) * height / 2 - 90)
      boxes.append([x1, y1, x1 + rng.uniform(60, 90), y1 + rng.uniform(60, 90)])
      colour_id += 1
      box_colours.append((40 * (colour_id % 6) + 30, 25 * colour_id % 250 + 5, 200))
    boxes = np.floor(np.asarray(boxes, np.float32))
    images.append(_image_with_filled_boxes(height, width, boxes, box_colours))
    boxes_list.append(boxes)
    colours += box_colours

  canvas, boxes = transforms.mosaic(images, boxes_list, (600, 700), 640)
  assert canvas.shape == (1280, 1280, 3)
  matrix = transforms.affine_matrix((1280, 1280), (640, 640), 0.8, (0.05, -0.04))
  warped = transforms.warp_affine(canvas, matrix, (640, 640))
  warped_boxes = transforms.transform_boxes(boxes, matrix, (640, 640))
  keep = transforms.box_candidates(boxes, warped_boxes, 0.8)
  flipped, flipped_boxes = transforms.horizontal_flip(warped, warped_boxes)

  assert 0 < keep.sum() < len(colours)  # the centre cuts some boxes away, not all
  interiors = _interior_colours(flipped, flipped_boxes[keep])
  for interior, colour in zip(interiors, np.asarray(colours)[keep]):
    assert interior == {tuple(colour)}, (interior, colour)


def test_letterbox_pads_grey_with_the_official_rounding_and_maps_boxes():
  image = np.full((100, 200, 3), 7, np.uint8)
  boxes = np.array([[10.0, 20.0, 110.0, 70.0]])
  out, out_boxes, transform = transforms.letterbox(image, boxes, (63, 96))
  assert transform.ratio == 0.48
  np.testing.assert_array_equal(transform.pad_xy, [0, 7])  # 15 px of padding: 7 above, 8 below
  assert (out[:7] == 114).all() and (out[-8:] == 114).all() and (out[7:55] == 7).all()
  np.testing.assert_allclose(out_boxes, [[4.8, 16.6, 52.8, 40.6]], rtol=1e-6)
  back = (out_boxes - np.tile(transform.pad_xy, 2)) / transform.ratio
  np.testing.assert_allclose(back, boxes, rtol=1e-5)


def test_letterbox_without_scale_up_keeps_small_images_small():
  image = np.zeros((30, 40, 3), np.uint8)
  out, _, transform = transforms.letterbox(image, np.zeros((0, 4)), (64, 64), scale_up=False)
  assert transform.ratio == 1.0 and out.shape == (64, 64, 3)
  np.testing.assert_array_equal(transform.pad_xy, [12, 17])


def test_box_candidates_follow_the_official_rule():
  before = np.array([[0, 0, 100, 100], [0, 0, 100, 100], [0, 0, 100, 100], [0, 0, 300, 3]])
  after = np.array([[0, 0, 50, 50], [0, 0, 2, 50], [0, 0, 15, 15], [0, 0, 300, 2.5]])
  keep = transforms.box_candidates(before, after, scale=0.5)
  # kept; too thin (2 px); under 10 % of the scaled area; aspect ratio 120 > 100
  np.testing.assert_array_equal(keep, [True, False, False, False])


def test_hsv_jitter_uses_opencv_hue_units_and_the_official_tables():
  image = np.random.default_rng(0).integers(0, 256, (8, 8, 3)).astype(np.uint8)
  grey = transforms.hsv_jitter(image, [1.0, 0.0, 1.0])  # saturation 0: every channel = V = max
  np.testing.assert_array_equal(grey, np.repeat(image.max(-1, keepdims=True), 3, -1))
  assert not transforms.hsv_jitter(image, [1.0, 1.0, 0.0]).any()  # value 0: black
  # OpenCV hue is 0..179: green (60) times 2 is blue (120); 1.5 times blue is 180 = 0, red.
  green, blue = np.array([[[0, 255, 0]]], np.uint8), np.array([[[0, 0, 255]]], np.uint8)
  np.testing.assert_array_equal(transforms.hsv_jitter(green, [2.0, 1.0, 1.0]), blue)
  np.testing.assert_array_equal(transforms.hsv_jitter(blue, [1.5, 1.0, 1.0]), [[[255, 0, 0]]])


def test_mixup_truncates_like_the_official_cast():
  a = np.full((2, 2, 3), 100, np.uint8)
  b = np.full((2, 2, 3), 201, np.uint8)
  assert (transforms.mixup(a, b, 0.5) == 150).all()
