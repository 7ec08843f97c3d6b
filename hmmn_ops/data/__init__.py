"""Video object segmentation data: palette masks, DAVIS / YouTube-VOS readers, synthetic videos,
augmentations and training clip samplers. See docs/data.md."""
from .augment import hide_and_seek, random_affine, random_crop, warp
from .davis import DAVIS
from .palette import davis_palette, load_image, load_mask, overlay, save_mask
from .sampler import ImageClips, SyntheticImages, VideoClips, occlusion_frame_ids
from .synthetic import SyntheticConfig, SyntheticVideo, SyntheticVideos, synthetic_video, write_davis
from .video import Sequence
from .youtube import YouTubeVOS

__all__ = [
    "DAVIS", "YouTubeVOS", "Sequence",
    "davis_palette", "load_image", "load_mask", "save_mask", "overlay",
    "SyntheticConfig", "SyntheticVideo", "SyntheticVideos", "synthetic_video", "write_davis",
    "VideoClips", "ImageClips", "SyntheticImages", "occlusion_frame_ids",
    "warp", "random_affine", "random_crop", "hide_and_seek",
]
