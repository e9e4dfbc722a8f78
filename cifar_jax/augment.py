"""On-device augmentation and normalisation of uint8 image batches (pure, jittable).

Modes (`level` in `augment` is the mode's index, data rather than code, so that trials that
differ in augmentation share one compiled step):
  none      normalise only
  basic     torchvision RandomCrop(32, padding=4) (zero padding) + RandomHorizontalFlip()
  advanced  basic + ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.1), with
            torchvision's semantics (multiplicative brightness, blends with the grey image,
            the four operations in a random order per image); colour maths from dm-pix.
"""

from typing import Optional

import dm_pix as pix
import jax
import jax.numpy as jnp

from cifar_jax import datasets
from cifar_jax.datasets import DatasetInfo

AUGMENTATIONS = ("none", "basic", "advanced")
PAD = 4
JITTER = dict(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.1)


def random_crop(key, images, pad: int = PAD):
    """Crops each image at a random offset from the image zero-padded by `pad` on each side."""
    n, h, w, c = images.shape
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(key, (n, 2), 0, 2 * pad + 1)
    crop = lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c))  # noqa: E731
    return jax.vmap(crop)(padded, offsets)


def random_flip(key, images):
    """Mirrors each image left-right with probability 1/2."""
    flip = jax.random.bernoulli(key, 0.5, (images.shape[0], 1, 1, 1))
    return jnp.where(flip, images[:, :, ::-1, :], images)


def _blend(image, other, factor):
    return jnp.clip(factor * image + (1.0 - factor) * other, 0.0, 1.0)


def _jitter_one(key, image):
    """torchvision ColorJitter on one float image in [0, 1]."""
    kb, kc, ks, kh, korder = jax.random.split(key, 5)
    b = jax.random.uniform(kb, (), minval=1 - JITTER["brightness"], maxval=1 + JITTER["brightness"])
    c = jax.random.uniform(kc, (), minval=1 - JITTER["contrast"], maxval=1 + JITTER["contrast"])
    s = jax.random.uniform(ks, (), minval=1 - JITTER["saturation"], maxval=1 + JITTER["saturation"])
    h = jax.random.uniform(kh, (), minval=-JITTER["hue"], maxval=JITTER["hue"])
    ops = (
        lambda im: jnp.clip(im * b, 0.0, 1.0),
        lambda im: _blend(im, jnp.mean(pix.rgb_to_grayscale(im)), c),
        lambda im: _blend(im, pix.rgb_to_grayscale(im, keep_dims=True), s),
        lambda im: jnp.clip(pix.adjust_hue(im, h), 0.0, 1.0),
    )
    order = jax.random.permutation(korder, len(ops))
    for i in range(len(ops)):
        image = jax.lax.switch(order[i], ops, image)
    return image


def color_jitter(key, images):
    """Per-image colour jitter of float images in [0, 1]."""
    keys = jax.random.split(key, images.shape[0])
    return jax.vmap(_jitter_one)(keys, images)


def resize(images, size: int):
    """[N, H, W, 3] images -> [N, size, size, 3] float32 (bilinear, antialiased when it
    shrinks, as torchvision's Resize), values in the input's range."""
    n, _, _, c = images.shape
    return jax.image.resize(images.astype(jnp.float32), (n, size, size, c), "bilinear",
                            antialias=True)


def normalize(images, dtype=jnp.float32, info: DatasetInfo = datasets.CIFAR10,
              size: Optional[int] = None):
    """uint8 or [0, 1] float images -> standardised with the data set's channel statistics
    (resized to `size` x `size` first where that differs: config.data.image_size)."""
    if size is not None and size != images.shape[1]:
        images = resize(images, size) / (255.0 if images.dtype == jnp.uint8 else 1.0)
    if images.dtype == jnp.uint8:
        images = images.astype(jnp.float32) / 255.0
    mean = jnp.asarray(info.mean, jnp.float32)
    std = jnp.asarray(info.std, jnp.float32)
    return ((images - mean) / std).astype(dtype)


def augmentation_index(mode: str) -> int:
    if mode not in AUGMENTATIONS:
        raise ValueError(f"Unknown augmentation {mode!r}; valid: {', '.join(AUGMENTATIONS)}.")
    return AUGMENTATIONS.index(mode)


def augment(key, images, level, dtype=jnp.float32, info: DatasetInfo = datasets.CIFAR10,
            size: int = 32):
    """uint8 [N, 32, 32, 3] -> augmented `dtype` images, normalised with `info`'s statistics
    (resized to `size` x `size` first where that differs, the crop's padding scaled with it).

    `level` is an index into AUGMENTATIONS (a mode name is accepted too), possibly traced:
    crop and flip apply from 'basic' on, colour jitter from 'advanced' on.
    """
    if isinstance(level, str):
        level = augmentation_index(level)
    k_crop, k_flip, k_jitter = jax.random.split(key, 3)
    if size != images.shape[1]:
        images = resize(images, size)  # float32 in [0, 255]
    moved = random_flip(k_flip, random_crop(k_crop, images, PAD * size // 32))
    images = jnp.where(level >= 1, moved, images).astype(jnp.float32) / 255.0
    images = jax.lax.cond(level >= 2, lambda x: color_jitter(k_jitter, x), lambda x: x, images)
    return normalize(images, dtype, info)
