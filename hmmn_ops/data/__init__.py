"""Video object segmentation data: palette masks, DAVIS / YouTube-VOS readers, synthetic videos,
augmentations and training clip samplers. See docs/data.md.

Each name is imported from its module on first use (PEP 562), so that importing
``hmmn_ops.data._io`` (atomic writes, which the models use too) needs none of the VOS
application's packages (pillow, ...: ``pip install 'hmmn_ops[vos]'``).
"""
import importlib

_MODULES = {
    "_io": ("FileFormatError",),
    "augment": ("hide_and_seek", "random_affine", "random_crop", "warp"),
    "davis": ("DAVIS",),
    "palette": ("davis_palette", "load_image", "load_mask", "overlay", "save_mask"),
    "sampler": ("ImageClips", "SyntheticImages", "VideoClips", "occlusion_frame_ids"),
    "synthetic": ("SyntheticConfig", "SyntheticVideo", "SyntheticVideos", "synthetic_video", "write_davis"),
    "video": ("Sequence",),
    "youtube": ("YouTubeVOS",),
}
_HOME = {name: module for module, names in _MODULES.items() for name in names}

__all__ = sorted(_HOME)


def __getattr__(name):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)


def __dir__():
    return sorted(set(globals()) | set(_HOME))
