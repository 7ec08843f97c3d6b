"""Geometric augmentations for training clips, on numpy arrays (Pillow does the warping).

One affine warp does everything (rotation, shear, zoom, translation, flip and the crop to the
output size): the image is resampled bilinearly, the labels with nearest neighbour so they
stay labels. Matrices map input pixel coordinates (x, y, 1) to output ones.

- `random_affine`: the static-image pretraining transform of STM / KMN / HMMN (each of the 3
  frames of a clip made from one image gets its own).
- `random_crop`: the main-training transform (one per clip: zoom, crop, horizontal flip).
- `hide_and_seek`: KMN's Hide-and-Seek: the image is cut into square patches on the grid of
  the key map (stride 16) and each patch is hidden with probability p. A hidden patch is
  filled with the image's mean colour and its labels become background, so an object cut by
  a patch has an exactly known straight boundary (why KMN uses it).
"""
import math

import numpy as np
from PIL import Image

__all__ = ["affine", "warp", "random_affine", "random_crop", "hide_and_seek"]


def affine(in_size, out_size, *, rotation=0.0, shear=0.0, scale=1.0, translate=(0.0, 0.0), flip=False):
    """3x3 matrix: input centre -> output centre, then flip, rotate (degrees), shear (degrees,
    along x), scale, and shift by `translate` (x, y) output pixels. Sizes are (H, W)."""
    (ih, iw), (oh, ow) = in_size, out_size
    to_origin = np.array([[1, 0, -(iw - 1) / 2], [0, 1, -(ih - 1) / 2], [0, 0, 1]], np.float64)
    mirror = np.diag([-1.0 if flip else 1.0, 1.0, 1.0])
    a = math.radians(rotation)
    rot = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    sh = np.array([[1, math.tan(math.radians(shear)), 0], [0, 1, 0], [0, 0, 1]])
    zoom = np.diag([scale, scale, 1.0])
    place = np.array([[1, 0, (ow - 1) / 2 + translate[0]], [0, 1, (oh - 1) / 2 + translate[1]], [0, 0, 1]])
    return place @ zoom @ sh @ rot @ mirror @ to_origin


def warp(image, labels, matrix, out_size):
    """Warp (H, W, 3) uint8 `image` and (H, W) integer `labels` (values < 256) by `matrix`.

    Returns ((h, w, 3) uint8, (h, w) int64). Outside the input: the image's mean colour, label 0.
    """
    image = np.asarray(image)
    labels = np.asarray(labels)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image: expected (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if labels.shape != image.shape[:2]:
        raise ValueError(f"labels: expected shape {image.shape[:2]} (the image's H, W), got {labels.shape}")
    oh, ow = out_size
    # Pillow asks, for each output pixel, where to read the input, in coordinates where pixel i
    # spans [i, i + 1]; ours put pixel centres on integers, hence the half-pixel shifts.
    half = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])
    inv = np.linalg.inv(half @ np.asarray(matrix, np.float64) @ np.linalg.inv(half))
    coeffs = tuple(inv[:2].reshape(-1))
    fill = tuple(int(c) for c in image.reshape(-1, 3).mean(0).round())
    img = Image.fromarray(image).transform((ow, oh), Image.AFFINE, coeffs, resample=Image.BILINEAR, fillcolor=fill)
    lab = Image.fromarray(labels.astype(np.uint8)).transform((ow, oh), Image.AFFINE, coeffs, resample=Image.NEAREST, fillcolor=0)
    return np.asarray(img), np.asarray(lab).astype(np.int64)


def _cover(in_size, out_size):
    """The scale at which the input just covers the output."""
    return max(out_size[0] / in_size[0], out_size[1] / in_size[1])


def _slack(in_size, out_size, scale):
    """How far (x, y) the scaled input can shift and still cover the output (the crop range)."""
    return (max(0.0, (in_size[1] * scale - out_size[1]) / 2), max(0.0, (in_size[0] * scale - out_size[0]) / 2))


def random_affine(rng, in_size, out_size, rotation=20.0, shear=10.0, zoom=(0.9, 1.1), translate=0.1):
    """Random pretraining warp: rotation in +-`rotation` degrees, shear in +-`shear` degrees,
    zoom in `zoom` times the covering scale, a random crop of the covered area and a shift of
    up to `translate` x output size."""
    scale = _cover(in_size, out_size) * rng.uniform(*zoom)
    sx, sy = _slack(in_size, out_size, scale)
    shift = (rng.uniform(-sx, sx) + rng.uniform(-translate, translate) * out_size[1],
             rng.uniform(-sy, sy) + rng.uniform(-translate, translate) * out_size[0])
    return affine(in_size, out_size, rotation=rng.uniform(-rotation, rotation), shear=rng.uniform(-shear, shear), scale=scale, translate=shift)


def random_crop(rng, in_size, out_size, zoom=(1.0, 1.3), flip=0.5):
    """Random main-training warp: zoom in `zoom` times the covering scale, a random crop, and a
    horizontal flip with probability `flip`."""
    scale = _cover(in_size, out_size) * rng.uniform(*zoom)
    sx, sy = _slack(in_size, out_size, scale)
    return affine(in_size, out_size, scale=scale, translate=(rng.uniform(-sx, sx), rng.uniform(-sy, sy)), flip=bool(rng.uniform() < flip))


def hide_and_seek(image, labels, p, rng, patch=16):
    """Hide each `patch` x `patch` cell of the grid anchored at (0, 0) with probability `p`.

    Returns new (image, labels): hidden cells get the image's mean colour and label 0.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p: expected a probability in [0, 1], got {p}")
    if patch < 1:
        raise ValueError(f"patch: expected >= 1, got {patch}")
    h, w = labels.shape
    if p == 0.0:
        return image, labels
    hidden = rng.uniform(size=(math.ceil(h / patch), math.ceil(w / patch))) < p
    cover = np.repeat(np.repeat(hidden, patch, 0), patch, 1)[:h, :w]
    image = image.copy()
    labels = labels.copy()
    image[cover] = image.reshape(-1, 3).mean(0).round().astype(image.dtype)
    labels[cover] = 0
    return image, labels
