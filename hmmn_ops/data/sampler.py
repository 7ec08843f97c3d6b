"""Training clips as torch Datasets: static-image pretraining and main training on videos.

Both return, per index, a dict of tensors for a clip of `num_frames` (3) frames:

    frames       float32 (T, 3, S, S) in [0, 1]          (no normalisation: the model's job)
    labels       int64   (T, S, S)    0 = background, 1..K the selected objects
    masks        float32 (T, M + 1, S, S) one-hot of labels; channel 0 background, channels
                                      above K are zero (M = max_objects, so batches stack)
    num_objects  int64   ()           K, 1..M (0 only if no object could be found at all)
    frame_ids    int64   (T,)         which frames of the video (ImageClips: zeros)
    name         str                  video name

Clips are deterministic by (seed, epoch, index): a resumed run sees the same clips. The
trainer's ramps are plain attributes (`max_skip` of VideoClips, `p_hide` of ImageClips,
`epoch` of both via `set_epoch`): set them before creating the DataLoader iterator for the
epoch. DataLoader workers hold a copy of the dataset, so with `persistent_workers=True` a
change made later does not reach them.
"""
import numpy as np
import torch

from .augment import hide_and_seek, random_affine, random_crop, warp
from .synthetic import SyntheticConfig, SyntheticVideo

__all__ = ["VideoClips", "ImageClips", "SyntheticImages", "occlusion_frame_ids"]

HIDDEN = 0.5  # an object shows less than this share of its largest area in the video: hidden


def _size(size):
    size = (size, size) if isinstance(size, int) else tuple(size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size: expected a positive int or (H, W), got {size}")
    return size


class _Clips(torch.utils.data.Dataset):
    def __init__(self, source, size, num_frames, max_objects, samples_per_epoch, seed, tries=10):
        if len(source) == 0:
            raise ValueError("expected at least one video or image, got an empty source")
        if num_frames < 1:
            raise ValueError(f"num_frames: expected >= 1, got {num_frames}")
        if not 1 <= max_objects <= 254:
            raise ValueError(f"max_objects: expected 1..254, got {max_objects}")
        self.source = source
        self.size = _size(size)
        self.num_frames = num_frames
        self.max_objects = max_objects
        self.samples_per_epoch = samples_per_epoch
        self.seed = seed
        self.epoch = 0
        self.tries = tries
        # an object must show this many pixels in the first frame to be picked
        self.min_pixels = max(4, self.size[0] * self.size[1] // 2000)

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __len__(self):
        return self.samples_per_epoch or len(self.source)

    def _sample(self, rng, index):
        """(list of T (S, S, 3) uint8 frames, list of T (S, S) int64 labels, frame ids, name,
        the label of an object the clip must include or None)."""
        raise NotImplementedError

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"index: expected 0 <= index < {len(self)}, got {index}")
        rng = np.random.default_rng([self.seed, self.epoch, index])
        for _ in range(self.tries):  # re-draw until the first frame shows an object
            frames, labels, ids, name, focus = self._sample(rng, index)
            chosen = self._choose_objects(labels[0], rng, focus)
            if chosen:
                break
        return self._pack(frames, labels, chosen, ids, name)

    def _choose_objects(self, first, rng, focus=None):
        """Objects visible in the first frame, at random; `focus` first if it is one of them."""
        counts = np.bincount(first.ravel(), minlength=256)
        present = [k for k in range(1, 255) if counts[k] >= self.min_pixels]  # 255 is void
        rng.shuffle(present)
        if focus in present:
            present.remove(focus)
            present.insert(0, focus)
        return present[: self.max_objects]

    def _pack(self, frames, labels, chosen, ids, name):
        lut = np.zeros(256, np.int64)
        lut[np.asarray(chosen, np.int64)] = np.arange(1, len(chosen) + 1)
        lab = torch.from_numpy(lut[np.stack(labels)])
        img = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float().div_(255.0)
        masks = torch.nn.functional.one_hot(lab, self.max_objects + 1).permute(0, 3, 1, 2).float()
        return {
            "frames": img,
            "labels": lab,
            "masks": masks,
            "num_objects": torch.tensor(len(chosen), dtype=torch.int64),
            "frame_ids": torch.as_tensor(ids, dtype=torch.int64),
            "name": name,
        }


class VideoClips(_Clips):
    """Main training: `num_frames` frames of a video in temporal order, up to `max_objects` objects.

    videos: a list of sequences with `len(v)`, `v.frame(i)`, `v.mask(i)`, `v.annotated`, `v.name`
    (a `DAVIS` or `YouTubeVOS` reader, `SyntheticVideos`, or a list mixing their items). Only
    annotated frames are sampled. Consecutive sampled frames are 1 to `max_skip + 1` annotated
    frames apart (`max_skip` = 0: neighbours; the trainer ramps it 0 -> 25). One random zoom,
    crop and flip (`zoom`, `flip`) is shared by the clip's frames. Objects are picked at random
    among those visible in the first frame of the crop. Index i uses video i % len(videos).

    `occlusions` (ours, default 0) is the probability that a clip is instead built around an
    occlusion (`occlusion_frame_ids`): an object seen in full, then hidden for a while, then
    back, so that training shows the model an object it must find again after losing it. The
    clip then includes that object. A video without such an occlusion gives an ordinary clip.
    """

    def __init__(self, videos, size=384, num_frames=3, max_skip=0, max_objects=3, samples_per_epoch=None,
                 seed=0, zoom=(1.0, 1.3), flip=0.5, occlusions=0.0):
        super().__init__(videos, size, num_frames, max_objects, samples_per_epoch, seed)
        if not 0 <= occlusions <= 1:
            raise ValueError(f"occlusions: expected a probability in [0, 1], got {occlusions}")
        self.max_skip = max_skip
        self.zoom, self.flip = zoom, flip
        self.occlusions = occlusions

    def _frame_ids(self, rng, annotated):
        n, t = len(annotated), self.num_frames
        if self.max_skip < 0:
            raise ValueError(f"max_skip: expected >= 0, got {self.max_skip}")
        if n < t:  # too short a video: some frames repeat, still in order
            return [annotated[i] for i in np.sort(rng.integers(0, n, t))]
        largest = min(int(self.max_skip) + 1, (n - 1) // max(t - 1, 1)) if t > 1 else 1
        gaps = rng.integers(1, max(largest, 1) + 1, t - 1)
        start = int(rng.integers(0, n - int(gaps.sum())))
        positions = start + np.concatenate([[0], np.cumsum(gaps)])
        return [annotated[int(p)] for p in positions]

    def _sample(self, rng, index):
        video = self.source[index % len(self.source)]
        ids, focus = None, None
        if self.occlusions > 0 and rng.uniform() < self.occlusions:  # no draw at 0: old runs replay
            masks = np.stack([video.mask(i) for i in video.annotated])
            picked = occlusion_frame_ids(masks, self.num_frames, rng, max_gap=int(self.max_skip) + 1)
            if picked is not None:
                positions, focus = picked
                ids = [video.annotated[p] for p in positions]
        if ids is None:
            ids = self._frame_ids(rng, video.annotated)
        first = video.frame(ids[0])
        matrix = random_crop(rng, first.shape[:2], self.size, zoom=self.zoom, flip=self.flip)
        frames, labels = [], []
        for i in ids:
            f, m = warp(video.frame(i), video.mask(i), matrix, self.size)
            frames.append(f)
            labels.append(m)
        return frames, labels, ids, video.name, focus


def occlusion_frame_ids(masks, num_frames, rng, max_gap=2):
    """Frames of a clip around an occlusion: (sorted positions into `masks`, object label), or
    None if no object of the video is hidden and then seen again.

    masks: (N, H, W) int labels of the video's annotated frames. An object is *hidden* on a
    frame where it shows less than `HIDDEN` of its largest area in the video. The clip's first
    frame shows the object (not hidden) at most `max_gap` frames before a spell of hidden
    frames; one or more frames of the spell follow, then its first frame with the object back,
    then (if `num_frames` leaves room) frames after that, 1 to `max_gap` apart.
    """
    n = len(masks)
    if num_frames < 3 or n < 3:
        return None
    labels = np.unique(masks)
    labels = labels[(labels > 0) & (labels < 255)]
    counts = np.stack([(masks == k).reshape(n, -1).sum(1) for k in labels]) if len(labels) else np.zeros((0, n))
    spells = []  # (row of counts, first hidden, first back)
    for row, c in enumerate(counts):
        hidden = c < HIDDEN * c.max()
        t = 1
        while t < n:
            if hidden[t] and not hidden[t - 1]:
                u = t
                while u < n and hidden[u]:
                    u += 1
                if u < n:
                    spells.append((row, t, u))
                t = u
            t += 1
    if not spells:
        return None
    row, t, u = spells[rng.integers(len(spells))]
    c = counts[row]
    before = [p for p in range(max(0, t - max_gap), t) if c[p] >= HIDDEN * c.max()]
    first = int(rng.choice(before))  # before[-1] == t - 1 always qualifies
    # frames after the return, as many as fit: the rest go to the hidden spell
    after = []
    for _ in range(num_frames - 3):
        nxt = (after[-1] if after else u) + int(rng.integers(1, max_gap + 1))
        if nxt >= n:
            break
        after.append(nxt)
    wanted = num_frames - 2 - len(after)  # hidden frames
    spell = np.arange(t, u)
    if len(spell) < wanted:  # a short spell: more frames after the return, 1 apart
        extra = [p for p in range(u + 1, n) if p not in after][: wanted - len(spell)]
        after = sorted(after + extra)
        wanted = num_frames - 2 - len(after)
        if len(spell) < wanted:
            return None
    hidden = np.sort(rng.choice(spell, wanted, replace=False))  # wanted >= 1: after holds <= num_frames - 3
    positions = [first, *map(int, hidden), u, *after]
    return positions, int(labels[row])


class ImageClips(_Clips):
    """Static-image pretraining: `num_frames` random affine warps of one image (STM/KMN/HMMN).

    images: a list whose items are (image (H, W, 3) uint8, labels (H, W) int) pairs, e.g.
    `SyntheticImages`. Each frame gets its own rotation, shear, zoom, translation and crop
    (`rotation`, `shear`, `zoom`, `translate`, see `augment.random_affine`), then Hide-and-Seek
    with probability `p_hide` per 16x16 patch (`hide_patch`, the key map's stride; the trainer
    ramps p_hide 0 -> 0.5).
    """

    def __init__(self, images, size=384, num_frames=3, max_objects=3, samples_per_epoch=None, seed=0,
                 p_hide=0.0, hide_patch=16, rotation=20.0, shear=10.0, zoom=(0.9, 1.1), translate=0.1):
        super().__init__(images, size, num_frames, max_objects, samples_per_epoch, seed)
        self.p_hide, self.hide_patch = p_hide, hide_patch
        self.affine_args = dict(rotation=rotation, shear=shear, zoom=zoom, translate=translate)

    def _sample(self, rng, index):
        image, labels = self.source[index % len(self.source)]
        image, labels = np.asarray(image), np.asarray(labels)
        frames, masks = [], []
        for _ in range(self.num_frames):
            matrix = random_affine(rng, image.shape[:2], self.size, **self.affine_args)
            f, m = warp(image, labels, matrix, self.size)
            f, m = hide_and_seek(f, m, self.p_hide, rng, self.hide_patch)
            frames.append(f)
            masks.append(m)
        return frames, masks, [0] * self.num_frames, f"image{index % len(self.source)}", None


class SyntheticImages:
    """Still images for pretraining: frame 0 of the synthetic video of each seed, as
    (image (H, W, 3) uint8, labels (H, W) int64) pairs."""

    def __init__(self, seeds, config=None):
        self.seeds = [int(s) for s in seeds]
        self.config = (config or SyntheticConfig()).replace(num_frames=1)

    def __len__(self):
        return len(self.seeds)

    def __getitem__(self, i):
        image, labels = SyntheticVideo(self.seeds[i], self.config).render(0)
        return image, labels.astype(np.int64)
