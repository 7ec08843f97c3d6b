"""DAVIS-format folders: reader and layout.

    ROOT/JPEGImages/480p/<sequence>/00000.jpg ...
    ROOT/Annotations/480p/<sequence>/00000.png ...   palette PNGs, 0 = background, 1..K objects
    ROOT/ImageSets/2017/val.txt                      one sequence name per line

The reader checks the layout up front (folders, the set file, frame/annotation names and
counts) and reads pixels only when asked. Objects of a sequence are the labels 1..max of its
first annotation, as the DAVIS benchmark counts them.
"""
import os

from .video import Sequence, SequenceSet

__all__ = ["DAVIS", "davis_paths"]


def davis_paths(root, resolution="480p"):
    """(frames folder, annotations folder, image sets folder) of a DAVIS root."""
    return (
        os.path.join(root, "JPEGImages", resolution),
        os.path.join(root, "Annotations", resolution),
        os.path.join(root, "ImageSets"),
    )


def _imset_file(root, imset):
    """`imset` is a path relative to ROOT/ImageSets ("2017/val.txt"), or an existing file."""
    candidates = [os.path.join(root, "ImageSets", imset)]
    if not imset.endswith(".txt"):
        candidates.append(os.path.join(root, "ImageSets", imset + ".txt"))
    candidates.append(imset)
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"image set {imset!r} not found (looked for {candidates[0]}); expected a text file with one "
        f"sequence name per line, e.g. --imset 2017/val.txt for ROOT/ImageSets/2017/val.txt"
    )


class DAVIS(SequenceSet):
    """The sequences of one DAVIS image set. `len(davis)`, `davis[i]` or `davis["name"]`, iteration.

    Each sequence must have either one annotation per frame (train/val) or only the first
    frame's (test-dev); anything else is reported as a broken folder. `sequences` restricts the
    set to those names.
    """

    def __init__(self, root, imset="2017/val.txt", resolution="480p", sequences=None):
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"DAVIS root not found: {root}")
        frame_root, mask_root, _ = davis_paths(root, resolution)
        for folder, what in ((frame_root, "frames (JPEGImages/<resolution>)"), (mask_root, "annotations (Annotations/<resolution>)")):
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"DAVIS {what} folder not found: {folder}")
        self.root, self.resolution = root, resolution
        self.imset_file = _imset_file(root, imset)
        self.set_name = os.path.splitext(os.path.basename(self.imset_file))[0]
        with open(self.imset_file, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
        if sequences is not None:
            unknown = sorted(set(sequences) - set(names))
            if unknown:
                raise ValueError(f"sequences: {unknown} are not in {self.imset_file}")
            names = [n for n in names if n in set(sequences)]
        if not names:
            raise ValueError(f"image set {self.imset_file} lists no sequence")
        self._sequences = {}
        for name in names:
            seq = Sequence.from_folders(name, os.path.join(frame_root, name), os.path.join(mask_root, name))
            n, m = len(seq), len(seq.mask_paths)
            if not (m == n or (m == 1 and 0 in seq.mask_paths)):
                raise ValueError(
                    f"sequence {name!r}: {m} annotations for {n} frames in {os.path.join(mask_root, name)}; "
                    "a DAVIS sequence has one annotation per frame (train/val) or only the first frame's (test-dev)"
                )
            if 0 not in seq.mask_paths:
                raise ValueError(f"sequence {name!r}: the first frame has no annotation in {os.path.join(mask_root, name)}")
            self._sequences[name] = seq
        self._list = list(self._sequences.values())

    def _where(self):
        return self.imset_file

    def __repr__(self):
        return f"DAVIS({self.root!r}, set={self.set_name!r}, sequences={len(self)})"
