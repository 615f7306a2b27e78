"""GELAN building blocks in Flax linen, NHWC, numerically equal to the official PyTorch modules.

Submodule names mirror the official ``state_dict`` names with '.' written as '_' (``cv2_0`` is the
official ``cv2.0``), so that ``yolov9_jax.interop`` maps weights by name alone. All padding is
explicit and symmetric: PyTorch pads stride-2 3x3 convs by (1, 1), where XLA's 'SAME' would pad
(0, 1) and shift every feature map by half a pixel.
"""
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# The official code sets these on every BatchNorm2d after construction (FACTS.md §3.1). PyTorch's
# momentum 0.03 weights the new batch statistic: running = 0.97 * running + 0.03 * batch.
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.03

Dtype = Any


def torch_default_kernel_init(key, shape, dtype=jnp.float32):
  """PyTorch's Conv2d default: U(-b, b) with b = 1/sqrt(fan_in); shape (kh, kw, in/groups, out)."""
  fan_in = shape[0] * shape[1] * shape[2]
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def torch_default_bias_init(fan_in):
  """PyTorch's Conv2d bias default: U(-b, b) with the weight's b = 1/sqrt(fan_in)."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def form(module):
  """The compute dtype and fused flag a block hands to its children."""
  return {"dtype": module.dtype, "fused": module.fused}


class BatchNorm(nn.Module):
  """BatchNorm2d with PyTorch's semantics over NHWC inputs.

  Training normalises with the biased batch variance and updates the running variance with the
  unbiased one, as PyTorch does (Flax's BatchNorm uses the biased one for both). Statistics are
  computed in at least float32 whatever the compute dtype. Under ``jax.jit`` with a batch-sharded
  input the means are global, i.e. this is synchronised BatchNorm without an axis name.
  """
  epsilon: float = BN_EPSILON
  momentum: float = BN_MOMENTUM
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    stats_dtype = jnp.promote_types(x.dtype, jnp.float32)
    if train:
      xs = x.astype(stats_dtype)
      mean = jnp.mean(xs, axis=(0, 1, 2))
      var = jnp.mean(jnp.square(xs - mean), axis=(0, 1, 2))
      if not self.is_initializing():
        count = x.shape[0] * x.shape[1] * x.shape[2]
        unbiased_var = var * (count / max(count - 1, 1))
        running_mean.value = ((1 - self.momentum) * running_mean.value +
                              self.momentum * mean).astype(running_mean.value.dtype)
        running_var.value = ((1 - self.momentum) * running_var.value +
                             self.momentum * unbiased_var).astype(running_var.value.dtype)
    else:
      mean = running_mean.value.astype(stats_dtype)
      var = running_var.value.astype(stats_dtype)
    multiplier = scale.astype(stats_dtype) * jax.lax.rsqrt(var + self.epsilon)
    offset = bias.astype(stats_dtype) - mean * multiplier
    return (x * multiplier.astype(self.dtype) + offset.astype(self.dtype)).astype(self.dtype)


def biased_conv_1x1(features, in_features, groups=1, bias_init=None, dtype=jnp.float32, name=None):
  """A bare 1x1 conv with bias (CBLinear and the heads' last layers); PyTorch's default init
  unless ``bias_init`` is given."""
  return nn.Conv(
      features, (1, 1), feature_group_count=groups, use_bias=True, dtype=dtype,
      param_dtype=jnp.float32, kernel_init=torch_default_kernel_init,
      bias_init=bias_init or torch_default_bias_init(in_features // groups), name=name)


class Conv(nn.Module):
  """The official ``Conv`` block: conv (no bias) -> BatchNorm -> SiLU (or no activation)."""
  features: int
  kernel_size: int = 1
  stride: int = 1
  groups: int = 1
  activation: bool = True
  dtype: Dtype = jnp.float32
  fused: bool = False  # inference form: BatchNorm folded into the convs (see evaluation.inference)

  @nn.compact
  def __call__(self, x, train: bool):
    pad = self.kernel_size // 2
    x = nn.Conv(
        self.features, (self.kernel_size, self.kernel_size), strides=(self.stride, self.stride),
        padding=((pad, pad), (pad, pad)), feature_group_count=self.groups, use_bias=self.fused,
        dtype=self.dtype, param_dtype=jnp.float32, kernel_init=torch_default_kernel_init,
        name="conv")(x)
    if not self.fused:
      x = BatchNorm(dtype=self.dtype, name="bn")(x, train)
    return nn.silu(x) if self.activation else x


class RepConvN(nn.Module):
  """SiLU(conv-BN 3x3 + conv-BN 1x1); no identity branch. Fused: one 3x3 conv with bias."""
  features: int
  dtype: Dtype = jnp.float32
  fused: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    if self.fused:
      return nn.silu(Conv(self.features, 3, activation=False, dtype=self.dtype, fused=True,
                          name="conv")(x, train))
    branch_3x3 = Conv(self.features, 3, activation=False, dtype=self.dtype, name="conv1")(x, train)
    branch_1x1 = Conv(self.features, 1, activation=False, dtype=self.dtype, name="conv2")(x, train)
    return nn.silu(branch_3x3 + branch_1x1)


class RepNBottleneck(nn.Module):
  """x + Conv3x3(RepConvN(x)); the residual applies when input and output widths agree."""
  features: int
  dtype: Dtype = jnp.float32
  fused: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    y = RepConvN(self.features, **form(self), name="cv1")(x, train)
    y = Conv(self.features, 3, **form(self), name="cv2")(y, train)
    return x + y if x.shape[-1] == self.features else y


class RepNCSP(nn.Module):
  """CSP block: cv3(concat[bottlenecks(cv1(x)), cv2(x)]) with hidden width features // 2."""
  features: int
  num_bottlenecks: int
  dtype: Dtype = jnp.float32
  fused: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    hidden = self.features // 2
    a = Conv(hidden, 1, **form(self), name="cv1")(x, train)
    for j in range(self.num_bottlenecks):
      a = RepNBottleneck(hidden, **form(self), name=f"m_{j}")(a, train)
    b = Conv(hidden, 1, **form(self), name="cv2")(x, train)
    return Conv(self.features, 1, **form(self), name="cv3")(jnp.concatenate([a, b], -1), train)


class RepNCSPELAN4(nn.Module):
  """GELAN's main block. Official args (c2, c3, c4, c5) = (features, split_width, block_width, depth)."""
  features: int
  split_width: int
  block_width: int
  depth: int
  dtype: Dtype = jnp.float32
  fused: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    y = Conv(self.split_width, 1, **form(self), name="cv1")(x, train)
    y0, y1 = jnp.split(y, 2, axis=-1)
    y2 = RepNCSP(self.block_width, self.depth, **form(self), name="cv2_0")(y1, train)
    y2 = Conv(self.block_width, 3, **form(self), name="cv2_1")(y2, train)
    y3 = RepNCSP(self.block_width, self.depth, **form(self), name="cv3_0")(y2, train)
    y3 = Conv(self.block_width, 3, **form(self), name="cv3_1")(y3, train)
    return Conv(self.features, 1, **form(self), name="cv4")(
        jnp.concatenate([y0, y1, y2, y3], -1), train)


class ELAN1(nn.Module):
  """The light ELAN block of the t/s models: plain 3x3 convs instead of RepNCSP stages."""
  features: int
  split_width: int
  block_width: int
  dtype: Dtype = jnp.float32
  fused: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    y = Conv(self.split_width, 1, **form(self), name="cv1")(x, train)
    y0, y1 = jnp.split(y, 2, axis=-1)
    y2 = Conv(self.block_width, 3, **form(self), name="cv2")(y1, train)
    y3 = Conv(self.block_width, 3, **form(self), name="cv3")(y2, train)
    return Conv(self.features, 1, **form(self), name="cv4")(
        jnp.concatenate([y0, y1, y2, y3], -1), train)


def _avg_pool_2x2_stride_1(x):
  # The official down-sampling blocks smooth with an unpadded 2x2 stride-1 average pool: H -> H-1.
  # (Keyword arguments: jax2onnx's stand-in for Flax's pools takes no positional window.)
  return nn.avg_pool(x, window_shape=(2, 2), strides=(1, 1), padding="VALID")


def _same_padding(length, size, stride):
  """(before, after) padding of XLA's "SAME" for one dimension."""
  total = max((-(-length // stride) - 1) * stride + size - length, 0)
  return total // 2, total - total // 2


def _max_pool(x, size, stride):
  # Flax pads max-pools with -inf, as PyTorch's implicit padding does: padding never wins.
  pad = size // 2
  padding = ((pad, pad), (pad, pad))
  if all(_same_padding(length, size, stride) == (pad, pad) for length in x.shape[1:3]):
    # The same pads, named: exporters convert "SAME" pools (jax2onnx 0.17 mangles explicit pads).
    padding = "SAME"
  return nn.max_pool(x, window_shape=(size, size), strides=(stride, stride), padding=padding)


class AConv(nn.Module):
  """Down-sampling of the t/s/m models: 2x2 stride-1 average pool, then a 3x3 stride-2 Conv."""
  features: int
  dtype: Dtype = jnp.float32
  fused: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    return Conv(self.features, 3, 2, **form(self), name="cv1")(_avg_pool_2x2_stride_1(x), train)


class ADown(nn.Module):
  """Down-sampling of the c/e models: average pool, then half the channels through a 3x3
  stride-2 Conv and half through a 3x3 stride-2 max-pool and a 1x1 Conv."""
  features: int
  dtype: Dtype = jnp.float32
  fused: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    x1, x2 = jnp.split(_avg_pool_2x2_stride_1(x), 2, axis=-1)
    x1 = Conv(self.features // 2, 3, 2, **form(self), name="cv1")(x1, train)
    x2 = Conv(self.features // 2, 1, **form(self), name="cv2")(_max_pool(x2, 3, 2), train)
    return jnp.concatenate([x1, x2], -1)


class SPPELAN(nn.Module):
  """Spatial pyramid pooling: three chained 5x5 stride-1 max-pools, concatenated, then a 1x1 Conv."""
  features: int
  hidden: int
  dtype: Dtype = jnp.float32
  fused: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    pyramid = [Conv(self.hidden, 1, **form(self), name="cv1")(x, train)]
    for _ in range(3):
      pyramid.append(_max_pool(pyramid[-1], 5, 1))
    return Conv(self.features, 1, **form(self), name="cv5")(jnp.concatenate(pyramid, -1), train)


class CBLinear(nn.Module):
  """PGI's reversible link: one 1x1 conv with bias, split into slices of the given widths."""
  widths: Sequence[int]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    del train
    y = biased_conv_1x1(sum(self.widths), x.shape[-1], dtype=self.dtype, name="conv")(x)
    split_points = [sum(self.widths[:j + 1]) for j in range(len(self.widths) - 1)]
    return tuple(jnp.split(y, split_points, axis=-1))


def resize_nearest(x, height, width):
  """PyTorch's ``interpolate(mode='nearest')`` on NHWC: source index = floor(dst * in / out)."""
  rows = (jnp.arange(height) * x.shape[1]) // height
  cols = (jnp.arange(width) * x.shape[2]) // width
  return x[:, rows][:, :, cols]


def cb_fuse(cb_slices, target):
  """PGI's fusion: the target plus every CBLinear slice, nearest-resized to the target's size."""
  out = target
  for y in cb_slices:
    out = out + resize_nearest(y, target.shape[1], target.shape[2]).astype(target.dtype)
  return out


def upsample_nearest_2x(x):
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
