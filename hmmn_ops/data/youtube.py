"""YouTube-VOS-format folders (one split: train, valid or test).

    SPLIT/JPEGImages/<video>/00000.jpg 00005.jpg ...
    SPLIT/Annotations/<video>/00000.png ...   sparse: only some frames are annotated, and an
                                             object may first appear in a later frame
    SPLIT/meta.json                           optional: {"videos": {video: {"objects":
                                             {"1": {"frames": ["00000", ...]}, ...}}}}

Objects of a video and the frame where each first appears come from meta.json when it is
there, otherwise from the annotations themselves (read once, on first use).
"""
import json
import os

from .video import Sequence, SequenceSet

__all__ = ["YouTubeVOS"]


class YouTubeVOS(SequenceSet):
    """The videos of one YouTube-VOS split folder. `len(ds)`, `ds[i]` or `ds["video"]`, iteration."""

    def __init__(self, root, sequences=None):
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"YouTube-VOS split folder not found: {root}")
        frame_root, mask_root = os.path.join(root, "JPEGImages"), os.path.join(root, "Annotations")
        if not os.path.isdir(frame_root):
            splits = [s for s in ("train", "valid", "test") if os.path.isdir(os.path.join(root, s, "JPEGImages"))]
            hint = f"; pass one split folder, e.g. {os.path.join(root, splits[0])}" if splits else ""
            raise FileNotFoundError(f"YouTube-VOS frames folder not found: {frame_root}{hint}")
        if not os.path.isdir(mask_root):
            raise FileNotFoundError(f"YouTube-VOS annotations folder not found: {mask_root}")
        self.root = root
        meta = self._read_meta(os.path.join(root, "meta.json"))
        names = sorted(meta) if meta is not None else sorted(n for n in os.listdir(mask_root) if not n.startswith("."))
        if sequences is not None:
            unknown = sorted(set(sequences) - set(names))
            if unknown:
                raise ValueError(f"sequences: {unknown} are not videos of {root}")
            names = [n for n in names if n in set(sequences)]
        if not names:
            raise ValueError(f"no annotated video in {mask_root}")
        self._sequences = {}
        for name in names:
            first = None if meta is None else self._first_frames(name, meta[name])
            self._sequences[name] = Sequence.from_folders(
                name, os.path.join(frame_root, name), os.path.join(mask_root, name), first_frames=first, objects_from="all"
            )
        self._list = list(self._sequences.values())

    @staticmethod
    def _read_meta(path):
        if not os.path.isfile(path):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)["videos"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: expected JSON {{\"videos\": {{video: {{\"objects\": ...}}}}}} ({e})") from None

    @staticmethod
    def _first_frames(name, entry):
        first = {}
        for key, obj in entry.get("objects", {}).items():
            frames = obj.get("frames") if isinstance(obj, dict) else None
            if not frames:
                raise ValueError(f"meta.json: video {name!r} object {key} lists no frames")
            first[int(key)] = frames[0]
        return first

    def _where(self):
        return self.root

    def __repr__(self):
        return f"YouTubeVOS({self.root!r}, videos={len(self)})"
