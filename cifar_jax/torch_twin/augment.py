"""The augmentations of cifar_jax.augment on NCHW float tensors in [0, 1] (torch only)."""

import torch

from cifar_jax import datasets
from cifar_jax.augment import JITTER, PAD

_GREY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def random_crop(x, generator, pad: int = PAD):
    """Crops each image at a random offset from the image zero-padded by `pad`."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)
    rows = (offsets[:, 0, None] + torch.arange(h))[:, None, :, None]
    cols = (offsets[:, 1, None] + torch.arange(w))[:, None, None, :]
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None],
                  rows, cols]


def random_flip(x, generator):
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def _grey(x):
    w = torch.tensor(_GREY, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _rgb_to_hsv(x):
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    v = maxc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    dc = delta.clamp_min(1e-12)
    h = torch.where(maxc == r, (g - b) / dc,
                    torch.where(maxc == g, 2.0 + (b - r) / dc, 4.0 + (r - g) / dc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, v], 1)


def _hsv_to_rgb(x):
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = torch.zeros_like(x)
    for k, (rr, gg, bb) in enumerate(choices):
        m = (i == k).unsqueeze(1)
        out = torch.where(m, torch.stack([rr, gg, bb], 1), out)
    return out


def _shift_hue(x, delta):
    hsv = _rgb_to_hsv(x)
    return _hsv_to_rgb(torch.cat([(hsv[:, :1] + delta) % 1.0, hsv[:, 1:]], 1)).clamp(0, 1)


def color_jitter(x, generator):
    """torchvision ColorJitter(0.2, 0.2, 0.2, 0.1) per image, the four ops in random order."""
    n = x.shape[0]
    u = lambda lo, hi: (lo + (hi - lo) * torch.rand(n, generator=generator)).view(n, 1, 1, 1)  # noqa: E731
    b = u(1 - JITTER["brightness"], 1 + JITTER["brightness"])
    c = u(1 - JITTER["contrast"], 1 + JITTER["contrast"])
    s = u(1 - JITTER["saturation"], 1 + JITTER["saturation"])
    h = u(-JITTER["hue"], JITTER["hue"])
    ops = [
        lambda y: (y * b).clamp(0, 1),
        lambda y: (c * y + (1 - c) * _grey(y).mean((1, 2, 3), keepdim=True)).clamp(0, 1),
        lambda y: (s * y + (1 - s) * _grey(y)).clamp(0, 1),
        lambda y: _shift_hue(y, h),
    ]
    orders = torch.stack([torch.randperm(4, generator=generator) for _ in range(n)])
    for pos in range(4):
        x = _apply_per_image(ops, orders[:, pos], x)
    return x


def _apply_per_image(ops, which, x):
    """Applies ops[which[i]] to image i (each op is computed batched, then selected)."""
    out = x.clone()
    for k, op in enumerate(ops):
        m = which == k
        if m.any():
            out[m] = op(x)[m]
    return out


def normalize(x, info: datasets.DatasetInfo = datasets.CIFAR10):
    mean = torch.tensor(info.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(info.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def augment(images_uint8_nhwc, mode: str, generator,
            info: datasets.DatasetInfo = datasets.CIFAR10):
    """uint8 NHWC numpy/tensor batch -> normalised NCHW float tensor, like cifar_jax.augment."""
    x = torch.as_tensor(images_uint8_nhwc).permute(0, 3, 1, 2).float() / 255.0
    if mode in ("basic", "advanced"):
        x = random_flip(random_crop(x, generator), generator)
    if mode == "advanced":
        x = color_jitter(x, generator)
    return normalize(x, info)
