"""The official augmentations keep boxes on the pixels they cover (FACTS.md §7)."""
import numpy as np
import tensorflow as tf

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
    images.append(tf.constant(_image_with_filled_boxes(height, width, boxes, box_colours)))
    boxes_list.append(tf.constant(boxes))
    colours += box_colours

  centre = tf.constant([600, 700])
  canvas, boxes = transforms.mosaic(images, boxes_list, centre, 640)
  assert canvas.shape == (1280, 1280, 3)
  matrix = transforms.affine_matrix((1280, 1280), (640, 640), 0.8, (0.05, -0.04))
  fused, fused_canvas_boxes, _ = transforms.mosaic_affine(images, boxes_list, centre, 640, 0.8,
                                                          (0.05, -0.04), 640)
  for warped in (transforms.warp_affine(canvas, matrix, (640, 640)), fused):  # both routes
    warped_boxes = transforms.transform_boxes(boxes, matrix, (640, 640))
    np.testing.assert_allclose(transforms.transform_boxes(fused_canvas_boxes, matrix, (640, 640)),
                               warped_boxes)
    keep = transforms.box_candidates(boxes, warped_boxes, 0.8).numpy()
    flipped, flipped_boxes = transforms.horizontal_flip(warped, warped_boxes)

    assert 0 < keep.sum() < len(colours)  # the centre cuts some boxes away, not all
    interiors = _interior_colours(flipped.numpy(), flipped_boxes.numpy()[keep])
    for interior, colour in zip(interiors, np.asarray(colours)[keep]):
      assert interior == {tuple(colour)}, (interior, colour)


def test_letterbox_pads_grey_with_the_official_rounding_and_maps_boxes():
  image = tf.fill((100, 200, 3), tf.constant(7, tf.uint8))
  boxes = tf.constant([[10.0, 20.0, 110.0, 70.0]])
  out, out_boxes, transform = transforms.letterbox(image, boxes, (63, 96))
  out = out.numpy()
  assert transform.ratio.numpy() == np.float32(0.48)
  np.testing.assert_array_equal(transform.pad_xy, [0, 7])  # 15 px of padding: 7 above, 8 below
  assert (out[:7] == 114).all() and (out[-8:] == 114).all() and (out[7:55] == 7).all()
  np.testing.assert_allclose(out_boxes, [[4.8, 16.6, 52.8, 40.6]], rtol=1e-6)
  back = (out_boxes.numpy() - np.tile(transform.pad_xy, 2)) / transform.ratio.numpy()
  np.testing.assert_allclose(back, boxes, rtol=1e-5)


def test_letterbox_without_scale_up_keeps_small_images_small():
  image = tf.zeros((30, 40, 3), tf.uint8)
  out, _, transform = transforms.letterbox(image, tf.zeros((0, 4)), (64, 64), scale_up=False)
  assert transform.ratio.numpy() == 1.0 and out.shape == (64, 64, 3)
  np.testing.assert_array_equal(transform.pad_xy, [12, 17])


def test_box_candidates_follow_the_official_rule():
  before = tf.constant([[0, 0, 100, 100], [0, 0, 100, 100], [0, 0, 100, 100], [0, 0, 300, 3]], tf.float32)
  after = tf.constant([[0, 0, 50, 50], [0, 0, 2, 50], [0, 0, 15, 15], [0, 0, 300, 2.5]], tf.float32)
  keep = transforms.box_candidates(before, after, scale=0.5).numpy()
  # kept; too thin (2 px); under 10 % of the scaled area; aspect ratio 120 > 100
  np.testing.assert_array_equal(keep, [True, False, False, False])


def test_hsv_jitter_identity_and_full_desaturation():
  image = tf.constant(np.random.default_rng(0).integers(0, 256, (8, 8, 3)), tf.uint8)
  same = transforms.hsv_jitter(image, tf.constant([1.0, 1.0, 1.0]))
  assert np.abs(same.numpy().astype(int) - image.numpy()).max() <= 1
  grey = transforms.hsv_jitter(image, tf.constant([1.0, 0.0, 1.0])).numpy()
  assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()


def test_mixup_truncates_like_the_official_cast():
  a = tf.fill((2, 2, 3), tf.constant(100, tf.uint8))
  b = tf.fill((2, 2, 3), tf.constant(201, tf.uint8))
  assert (transforms.mixup(a, b, 0.5).numpy() == 150).all()


def test_fused_mosaic_affine_equals_the_canvas_route_away_from_the_seams():
  rng = np.random.default_rng(1)
  images = [tf.constant(rng.integers(0, 256, (h, w, 3), np.uint8))
            for h, w in [(480, 640), (640, 427), (512, 512), (300, 640)]]
  boxes = [tf.constant([[10.0, 20.0, 100.0, 200.0]]) for _ in images]
  centre = tf.constant([600, 700])
  for scale, translate in [(0.8, (0.05, -0.04)), (1.7, (-0.1, 0.1)), (0.15, (0.0, 0.0))]:
    canvas, canvas_boxes = transforms.mosaic(images, boxes, centre, 640)
    matrix = transforms.affine_matrix((1280, 1280), (640, 640), scale, translate)
    reference = transforms.warp_affine(canvas, matrix, (640, 640)).numpy().astype(int)
    fused, fused_boxes, fused_matrix = transforms.mosaic_affine(images, boxes, centre, 640, scale,
                                                                translate, 640)
    np.testing.assert_allclose(fused_matrix, matrix, rtol=1e-6)
    np.testing.assert_allclose(fused_boxes, canvas_boxes)
    # Only one-pixel lines differ: the two seams and the images' own borders, where the canvas
    # route blends neighbours (or the grey fill) bilinearly; on noise images those differ fully.
    differs = np.abs(reference - fused.numpy().astype(int)).max(-1) > 2
    assert differs.mean() < 0.004
