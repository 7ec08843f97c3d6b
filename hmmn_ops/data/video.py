"""One video on disk: frame files and (possibly sparse) annotation files, read on access.

`Sequence` is what the DAVIS and YouTube-VOS readers hand out and what the training samplers
and the evaluation read: `len(seq)` frames, `seq.frame(i)` (H, W, 3) uint8, `seq.mask(i)`
(H, W) int64 or None when frame i has no annotation, `seq.objects` {object id: index of the
first annotated frame where it appears}. Nothing is decoded before it is asked for.
"""
import os

import numpy as np

from .palette import image_size, load_image, load_mask

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png")


def list_files(folder, extensions, what):
    """Sorted file names in `folder` with one of `extensions`; a clear error if there are none."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{what} folder not found: {folder}")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(extensions) and not n.startswith("."))
    if not names:
        raise FileNotFoundError(f"{what} folder has no {'/'.join(extensions)} files: {folder}")
    return names


def stem(name):
    return os.path.splitext(name)[0]


class Sequence:
    """A lazily read video. Build it with `Sequence.from_folders` or through a dataset reader.

    frame_paths: list of T image paths in temporal order. mask_paths: {frame index: PNG path}
    for the annotated frames. objects: {id: first frame index} or None to find them in the
    annotations on first use (`objects_from="first"`: the first annotation's labels 1..max, the
    DAVIS convention; `"all"`: every label of every annotation, YouTube-VOS's sparse case).
    """

    def __init__(self, name, frame_paths, mask_paths, objects=None, objects_from="first"):
        if not frame_paths:
            raise ValueError(f"sequence {name!r}: no frames")
        if objects_from not in ("first", "all"):
            raise ValueError(f"objects_from: expected 'first' or 'all', got {objects_from!r}")
        self.name = name
        self.frame_paths = list(frame_paths)
        self.mask_paths = dict(sorted(mask_paths.items()))
        self._objects = None if objects is None else dict(sorted(objects.items()))
        self._objects_from = objects_from
        self._size = None

    @classmethod
    def from_folders(cls, name, frame_dir, mask_dir, *, first_frames=None, objects_from="first"):
        """Pair frames and annotations by file stem (00000.jpg <-> 00000.png).

        first_frames: optional {object id: stem of the frame where it first appears}.
        """
        frames = list_files(frame_dir, FRAME_EXTENSIONS, f"sequence {name!r}: frame")
        masks = list_files(mask_dir, (".png",), f"sequence {name!r}: annotation")
        index = {stem(n): i for i, n in enumerate(frames)}
        orphans = [m for m in masks if stem(m) not in index]
        if orphans:
            raise ValueError(
                f"sequence {name!r}: {len(orphans)} annotation(s) without a frame of the same name "
                f"(first: {os.path.join(mask_dir, orphans[0])}); frames are in {frame_dir}"
            )
        mask_paths = {index[stem(m)]: os.path.join(mask_dir, m) for m in masks}
        objects = None
        if first_frames is not None:
            unknown = {k: s for k, s in first_frames.items() if s not in index}
            if unknown:
                raise ValueError(f"sequence {name!r}: objects {unknown} first appear in frames that are not in {frame_dir}")
            objects = {int(k): index[s] for k, s in first_frames.items()}
        return cls(name, [os.path.join(frame_dir, f) for f in frames], mask_paths, objects, objects_from)

    def __len__(self):
        return len(self.frame_paths)

    def __repr__(self):
        return f"Sequence({self.name!r}, frames={len(self)}, annotated={len(self.mask_paths)})"

    @property
    def annotated(self):
        """Sorted indices of the frames that have an annotation."""
        return list(self.mask_paths)

    @property
    def size(self):
        """(H, W) of the first frame (read from the file header only)."""
        if self._size is None:
            self._size = image_size(self.frame_paths[0])
        return self._size

    def _check_size(self, array, path):
        if array.shape[:2] != self.size:
            h, w = array.shape[:2]
            raise ValueError(
                f"{path}: size {w}x{h} differs from the sequence's first frame "
                f"{self.size[1]}x{self.size[0]} ({self.frame_paths[0]})"
            )
        return array

    def frame(self, i):
        """Frame i as (H, W, 3) uint8 RGB."""
        path = self.frame_paths[i]
        return self._check_size(load_image(path), path)

    def mask(self, i):
        """Annotation of frame i as (H, W) int64 labels, or None when frame i is not annotated."""
        i = range(len(self))[i]  # negative indices and bounds, as for frames
        path = self.mask_paths.get(i)
        if path is None:
            return None
        return self._check_size(load_mask(path)[0], path)

    def frames(self):
        """All frames, (T, H, W, 3) uint8."""
        return np.stack([self.frame(i) for i in range(len(self))])

    def masks(self):
        """All annotations, (T, H, W) int64; raises if a frame has none."""
        missing = [i for i in range(len(self)) if i not in self.mask_paths]
        if missing:
            raise ValueError(f"sequence {self.name!r}: {len(missing)} frame(s) have no annotation (first: {self.frame_paths[missing[0]]})")
        return np.stack([self.mask(i) for i in range(len(self))])

    @property
    def objects(self):
        """{object id: index of the first annotated frame where it appears}."""
        if self._objects is None:
            if not self.mask_paths:
                raise ValueError(f"sequence {self.name!r}: no annotation, so no objects")
            if self._objects_from == "first":
                first = next(iter(self.mask_paths))
                labels = self.mask(first)
                top = int(labels[labels != 255].max(initial=0))  # 255 is void
                self._objects = {k: first for k in range(1, top + 1)}
            else:
                found = {}
                for i in self.mask_paths:
                    for k in np.unique(self.mask(i)):
                        if 0 < k < 255:
                            found.setdefault(int(k), i)
                self._objects = dict(sorted(found.items()))
        return self._objects

    @property
    def num_objects(self):
        return len(self.objects)


class SequenceSet:
    """Sequences by name (``set["bear"]``) or position (``set[0]``), in order; subclasses fill
    ``self._sequences`` (name -> Sequence) and ``self._list`` (its values), and say where a name
    was looked up (``_where``)."""

    def _where(self):
        return "the set"

    @property
    def names(self):
        return list(self._sequences)

    def __len__(self):
        return len(self._sequences)

    def __iter__(self):
        return iter(self._list)

    def __getitem__(self, key):
        if isinstance(key, str):
            try:
                return self._sequences[key]
            except KeyError:
                raise KeyError(f"{key!r} is not in {self._where()}") from None
        return self._list[key]

