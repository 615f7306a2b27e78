"""Building blocks: PyTorch's BatchNorm semantics, padding, pooling and resizing quirks."""
import jax
import jax.numpy as jnp
import numpy as np

from yolov9_jax.models import heads, layers


def test_batchnorm_trains_on_biased_variance_and_tracks_the_unbiased_one():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 5, 4)) * 3 + 1
  bn = layers.BatchNorm()
  variables = bn.init(jax.random.PRNGKey(0), x, train=False)
  y, updates = bn.apply(variables, x, train=True, mutable=["batch_stats"])
  flat = np.asarray(x).reshape(-1, 4)
  mean, biased_var, unbiased_var = flat.mean(0), flat.var(0), flat.var(0, ddof=1)
  np.testing.assert_allclose(y, (np.asarray(x) - mean) / np.sqrt(biased_var + 1e-3), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.03 * mean, rtol=1e-5)
  np.testing.assert_allclose(updates["batch_stats"]["var"], 0.97 + 0.03 * unbiased_var, rtol=1e-5)
  # Eval mode uses the running statistics: mean 0, var 1 at init.
  np.testing.assert_allclose(bn.apply(variables, x, train=False), x / np.sqrt(1 + 1e-3), rtol=1e-6)


def test_stride_2_conv_pads_symmetrically_like_pytorch():
  # A 3x3 stride-2 conv with a kernel that picks the top-left tap: with PyTorch's (1, 1) padding
  # output (0, 0) reads the padding (zero) and output (1, 1) reads input (1, 1).
  conv = layers.Conv(1, 3, 2)
  x = jnp.arange(16.0).reshape(1, 4, 4, 1)
  variables = conv.init(jax.random.PRNGKey(0), x, train=False)
  kernel = np.zeros((3, 3, 1, 1), np.float32)
  kernel[0, 0] = 1
  variables = {"params": {**variables["params"], "conv": {"kernel": jnp.asarray(kernel)}},
               "batch_stats": {"bn": {"mean": jnp.zeros(1), "var": jnp.full(1, 1 - 1e-3)}}}
  pre_activation = layers.Conv(1, 3, 2, activation=False).apply(variables, x, train=False)
  np.testing.assert_allclose(pre_activation[0, :, :, 0], [[0, 0], [0, 5]], atol=1e-6)


def test_adown_halves_sides_with_unpadded_average_then_strided_ops():
  x = jax.random.uniform(jax.random.PRNGKey(0), (1, 8, 12, 4))
  adown = layers.ADown(6)
  y = adown.apply(adown.init(jax.random.PRNGKey(1), x, train=False), x, train=False)
  assert y.shape == (1, 4, 6, 6)


def test_max_pool_padding_never_wins():
  x = -jnp.ones((1, 4, 4, 1))
  np.testing.assert_array_equal(layers._max_pool(x, 5, 1), x)


def test_resize_nearest_matches_pytorch_floor_rule():
  x = jnp.arange(6.0).reshape(1, 2, 3, 1)
  y = layers.resize_nearest(x, 4, 6)
  np.testing.assert_array_equal(y[0, :, :, 0], np.repeat(np.repeat(np.arange(6.0).reshape(2, 3), 2, 0), 2, 1))
  np.testing.assert_array_equal(layers.resize_nearest(x, 2, 3), x)


def test_head_widths_follow_the_p3_input():
  assert heads.head_widths(512, 80) == (128, 512)   # yolov9-c aux head
  assert heads.head_widths(256, 80) == (64, 256)    # yolov9-c main head
  assert heads.head_widths(64, 80) == (64, 128)     # t
  assert heads.head_widths(64, 8) == (64, 64)       # class width max(ch, min(2 nc, 128))


def test_decode_turns_bin_logits_into_pixel_boxes_around_anchor_centres():
  num_classes = 2
  maps = []
  for size in (4, 2, 1):
    m = np.full((1, size, size, 64 + num_classes), -50.0, np.float32)
    box = m[..., :64].reshape(1, size, size, 4, 16)
    box[..., 2] = 50.0  # every side at distance 2 bins
    m[..., :64] = box.reshape(1, size, size, 64)
    m[..., 64:] = 0.0
    maps.append(jnp.asarray(m))
  decoded = heads.decode(maps)
  assert decoded.shape == (1, 16 + 4 + 1, 4 + num_classes)
  # Anchor 5 = level P3 (stride 8), row 1, column 1: centre (1.5, 1.5) grid units = 12 px.
  np.testing.assert_allclose(decoded[0, 5, :4], [12, 12, 32, 32], atol=1e-4)
  # The last anchor is P5's only cell: centre 16 px, box 4 grid units * 32 px.
  np.testing.assert_allclose(decoded[0, -1, :4], [16, 16, 128, 128], atol=1e-3)
  np.testing.assert_allclose(decoded[0, :, 4:], 0.5)
