import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifar_jax import augment, datasets


def _batch(n=16, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3)), jnp.uint8)


@pytest.mark.parametrize("mode", augment.AUGMENTATIONS)
def test_shapes_and_dtype(mode):
    out = jax.jit(augment.augment, static_argnums=3)(jax.random.PRNGKey(0), _batch(),
                                                     augment.augmentation_index(mode),
                                                     jnp.bfloat16)
    assert out.shape == (16, 32, 32, 3) and out.dtype == jnp.bfloat16


def test_level_as_data_matches_each_mode():
    """One compiled function serves every mode: the level is a traced argument."""
    key, x = jax.random.PRNGKey(4), _batch()
    traced = jax.jit(augment.augment)
    outs = [traced(key, x, augment.augmentation_index(m)) for m in augment.AUGMENTATIONS]
    expected = [augment.normalize(x)]
    k_crop, k_flip, k_jitter = jax.random.split(key, 3)
    moved = augment.random_flip(k_flip, augment.random_crop(k_crop, x)).astype(jnp.float32) / 255
    expected += [augment.normalize(moved), augment.normalize(augment.color_jitter(k_jitter, moved))]
    for out, want in zip(outs, expected):
        np.testing.assert_allclose(out, want, atol=1e-5)  # jit vs eager rounding
    assert not np.allclose(outs[1], outs[2])


def test_none_is_normalisation_only():
    x = _batch()
    out = augment.augment(jax.random.PRNGKey(0), x, "none")
    expected = (np.asarray(x) / 255.0 - np.array(datasets.CIFAR10.mean)) / np.array(datasets.CIFAR10.std)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_flip_really_mirrors():
    x = _batch(64)
    out = augment.random_flip(jax.random.PRNGKey(1), x)
    flipped = [bool(jnp.all(o == i[:, ::-1])) for o, i in zip(out, x)]
    same = [bool(jnp.all(o == i)) for o, i in zip(out, x)]
    assert all(f or s for f, s in zip(flipped, same))
    assert 10 < sum(flipped) < 54  # about half


def test_crops_stay_within_padded_image():
    x = _batch(200, seed=3) | jnp.uint8(1)  # no zero pixels: padding shows up as zeros
    out = np.asarray(augment.random_crop(jax.random.PRNGKey(2), x))
    padded = np.pad(np.asarray(x), ((0, 0), (4, 4), (4, 4), (0, 0)))
    offsets = set()
    for o, p in zip(out, padded):
        found = [(i, j) for i in range(9) for j in range(9)
                 if np.array_equal(p[i:i + 32, j:j + 32], o)]
        assert len(found) == 1  # every crop is a 32x32 window of the padded image
        offsets.add(found[0])
    assert len(offsets) > 30  # offsets vary over the 9x9 range
    assert {i for i, _ in offsets} >= {0, 8} and {j for _, j in offsets} >= {0, 8}


def test_color_jitter_ranges():
    x = jnp.asarray(np.random.default_rng(0).uniform(0.2, 0.8, (32, 32, 32, 3)), jnp.float32)
    out = augment.color_jitter(jax.random.PRNGKey(0), x)
    assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    assert not np.allclose(out, x)
    # Brightness alone bounds the mean ratio by 0.8..1.2; all four together keep it near.
    ratio = np.asarray(out.mean(axis=(1, 2, 3)) / x.mean(axis=(1, 2, 3)))
    assert np.all(ratio > 0.6) and np.all(ratio < 1.4)


def test_normalisation_statistics():
    # Half the pixels at mean - std, half at mean + std (per channel): these images have the
    # CIFAR channel statistics, so they must normalise to mean 0 and std 1.
    mean, std = np.array(datasets.CIFAR10.mean), np.array(datasets.CIFAR10.std)
    signs = np.where(np.random.default_rng(0).permutation(2 * 32 * 32 * 8) % 2, 1, -1)
    raw = mean + signs.reshape(16, 32, 32, 1) * std
    x = jnp.asarray(np.round(raw * 255), jnp.uint8)
    out = np.asarray(augment.normalize(x))
    np.testing.assert_allclose(out.mean(axis=(0, 1, 2)), 0, atol=0.01)
    np.testing.assert_allclose(out.std(axis=(0, 1, 2)), 1, atol=0.01)


def test_unknown_mode():
    with pytest.raises(ValueError, match="none, basic, advanced"):
        augment.augment(jax.random.PRNGKey(0), _batch(), "heavy")
    with pytest.raises(ValueError, match="none, basic, advanced"):
        augment.augmentation_index("strong")
