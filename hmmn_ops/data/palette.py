"""Palette PNG masks as DAVIS and YouTube-VOS store them, and an overlay for pictures.

A mask is an (H, W) array of object indices: 0 is background, 1..K the objects (255 is
"void" in some sets). On disk it is a palette ('P') PNG: the pixel values are the indices,
the palette only colours them. An RGB PNG is refused: its colours would have to be guessed
back into indices, and a guess that is off by one shade silently loses an object.
"""
import os

import numpy as np
from PIL import Image

from ._io import atomic_path, reading

__all__ = ["davis_palette", "load_mask", "save_mask", "overlay", "load_image", "image_size"]


def davis_palette():
    """The (256, 3) uint8 palette of the DAVIS annotations (the PASCAL VOC colour map).

    Index 0 is black, 1 red (128, 0, 0), 2 green (0, 128, 0), 3 (128, 128, 0), 4 (0, 0, 128), ...
    """
    palette = np.zeros((256, 3), np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):  # spread the bits of the index over the high bits of r, g, b
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette[i] = (r, g, b)
    return palette


def load_mask(path):
    """Read a label mask. Returns (labels int64 (H, W), palette uint8 (256, 3) or None).

    Palette ('P') PNGs give their indices and palette; single-channel images ('L', 'I', '1')
    give their values as labels and no palette. RGB/RGBA images raise ValueError, a corrupt
    or truncated file FileFormatError (a ValueError) naming it.
    """
    with reading(path, "mask image"), Image.open(path) as img:
        mode = img.mode
        pixels = np.asarray(img) if mode in ("P", "L", "I", "I;16", "1") else None
        flat = img.getpalette() if mode == "P" else None
    if mode == "P":
        palette = np.zeros(256 * 3, np.uint8)
        palette[: min(len(flat or []), 768)] = (flat or [])[:768]
        return pixels.astype(np.int64), palette.reshape(256, 3)
    if pixels is not None:
        return pixels.astype(np.int64), None
    raise ValueError(
        f"{os.fspath(path)}: mask is an image of mode {mode!r}; expected a palette ('P') PNG whose pixel values "
        "are object indices (0 = background, 1..K objects), as DAVIS and YouTube-VOS store them. "
        "Convert it: map each colour to its object index and save the (H, W) index array with "
        "hmmn_ops.data.save_mask(path, labels)."
    )


def _check_palette(palette):
    palette = np.asarray(palette)
    if palette.ndim == 1 and palette.size % 3 == 0:
        palette = palette.reshape(-1, 3)
    if palette.ndim != 2 or palette.shape[1] != 3 or not 1 <= palette.shape[0] <= 256:
        raise ValueError(f"palette: expected shape (N <= 256, 3), got {tuple(palette.shape)}")
    if palette.min() < 0 or palette.max() > 255:
        raise ValueError(f"palette: expected values in [0, 255], got [{palette.min()}, {palette.max()}]")
    full = np.zeros((256, 3), np.uint8)
    full[: len(palette)] = palette
    return full


def save_mask(path, labels, palette=None, comment=None):
    """Write `labels` ((H, W) integers in [0, 255]) as a palette PNG, atomically.

    `palette` is (N <= 256, 3) values in [0, 255]; default: `davis_palette()`. `comment`: a
    text stored in the PNG (a "comment" text chunk, read back as ``Image.open(path).info``).
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels: expected shape (H, W), got {tuple(labels.shape)}")
    if labels.dtype != bool and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels: expected an integer or bool array, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"labels: expected values in [0, 255], got [{labels.min()}, {labels.max()}]")
    palette = davis_palette() if palette is None else _check_palette(palette)
    img = Image.fromarray(labels.astype(np.uint8))  # 'L'; putpalette turns it into 'P'
    img.putpalette(palette.reshape(-1).tolist())
    info = None
    if comment is not None:
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text("comment", comment)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG", pnginfo=info)


def load_image(path):
    """Read a frame as an (H, W, 3) uint8 RGB array (greyscale and RGBA are converted); a
    corrupt or truncated file raises FileFormatError (a ValueError) naming it."""
    with reading(path, "image"), Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def image_size(path):
    """(H, W) of an image, from its header only (so a truncated file is found when decoded)."""
    with reading(path, "image"), Image.open(path) as img:
        return img.height, img.width


def _boundary(labels):
    """Pixels whose label differs from a 4-neighbour (both sides of each edge)."""
    edge = np.zeros(labels.shape, bool)
    dy = labels[1:] != labels[:-1]
    dx = labels[:, 1:] != labels[:, :-1]
    edge[1:] |= dy
    edge[:-1] |= dy
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    return edge


def overlay(image, labels, palette=None, alpha=0.5):
    """Blend object colours over `image` for viewing. Returns (H, W, 3) uint8.

    image: (H, W, 3) uint8, or float in [0, 1]; labels: (H, W) integers; palette: (N, 3),
    default `davis_palette()`. Objects are tinted with weight `alpha` and outlined in full colour.
    """
    image = np.asarray(image)
    labels = np.asarray(labels)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image: expected shape (H, W, 3), got {tuple(image.shape)}")
    if labels.shape != image.shape[:2]:
        raise ValueError(f"labels: expected shape {tuple(image.shape[:2])} (the image's H, W), got {tuple(labels.shape)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: expected a value in [0, 1], got {alpha}")
    if np.issubdtype(image.dtype, np.floating):
        image = np.clip(image * 255.0 + 0.5, 0, 255)
    image = image.astype(np.float32)
    palette = davis_palette() if palette is None else _check_palette(palette)
    colours = palette[np.clip(labels, 0, 255).astype(np.intp)].astype(np.float32)
    fg = (labels > 0)[..., None]
    out = np.where(fg, (1.0 - alpha) * image + alpha * colours, image)
    edge = (_boundary(labels) & (labels > 0))[..., None]
    out = np.where(edge, colours, out)
    return (out + 0.5).astype(np.uint8)
