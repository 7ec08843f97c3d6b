"""Region similarity J and boundary accuracy F, exactly as the DAVIS benchmark defines them.

Definitions follow the davis2017-evaluation code (`db_eval_iou`, `f_measure`, `_seg2bmap`,
`db_statistics`), re-implemented with numpy/scipy only:

- J is the intersection over union of two binary masks; 1 when both are empty.
- F compares 1-pixel boundary maps (`boundary_map`): a pixel is a boundary pixel when it
  differs from its east, south or south-east neighbour (on the last row only east counts,
  on the last column only south, and the bottom-right pixel never is). A boundary pixel of
  one mask is matched when the other mask has a boundary pixel within `bound_pix` pixels
  (Euclidean, i.e. dilation by `skimage.morphology.disk(bound_pix)`), where
  `bound_pix = ceil(bound_th * image diagonal)` (bound_th < 1) or `bound_th` pixels
  (bound_th >= 1). precision = matched predicted / predicted boundary pixels, recall =
  matched ground-truth / ground-truth boundary pixels, F = 2PR / (P + R), 0 when P + R = 0.
  Empty boundaries: none predicted and some expected: P = 1, R = 0 (F = 0); some predicted
  and none expected: P = 0, R = 1 (F = 0); none on either side: F = 1.
- Per object statistics over frames (`statistics`): Mean, Recall (fraction of frames > 0.5)
  and Decay (mean of the first quarter of the frames minus the mean of the last quarter,
  with the benchmark's overlapping quarters).

The dilation is computed as a nearest-neighbour query between boundary pixels (a k-d tree):
the same matches as the benchmark's dilation, in a few milliseconds per 480p frame.

Whole sets: `evaluate_sequence` (arrays in memory), `evaluate_davis` (a results folder against
a DAVIS set, in parallel), `write_results_csv` (the benchmark's CSV files), `format_results`.
"""
import math
import os
import warnings
from typing import NamedTuple

import numpy as np
from scipy.spatial import cKDTree

__all__ = [
    "jaccard", "boundary_f", "boundary_map", "statistics", "Statistics", "evaluate_sequence",
    "evaluate_davis", "write_results_csv", "format_results",
]


def _pair(gt, pred):
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"gt and pred: expected the same shape, got gt {gt.shape} and pred {pred.shape}")
    if gt.ndim not in (2, 3):
        raise ValueError(f"gt: expected shape (H, W) or (N, H, W), got {gt.shape}")
    return gt != 0, pred != 0


def jaccard(gt, pred):
    """Intersection over union of boolean masks (H, W) -> float, or (N, H, W) -> (N,) float64.

    Both masks empty gives 1.0 (the benchmark's convention).
    """
    gt, pred = _pair(gt, pred)
    inter = np.count_nonzero(gt & pred, axis=(-2, -1))
    union = np.count_nonzero(gt | pred, axis=(-2, -1))
    j = np.where(union == 0, 1.0, inter / np.maximum(union, 1))
    return float(j) if j.ndim == 0 else j


def boundary_map(mask):
    """The benchmark's 1-pixel boundary map (`_seg2bmap`) of a boolean (H, W) mask."""
    seg = np.asarray(mask) != 0
    if seg.ndim != 2:
        raise ValueError(f"mask: expected shape (H, W), got {seg.shape}")
    east = np.zeros_like(seg)
    south = np.zeros_like(seg)
    south_east = np.zeros_like(seg)
    east[:, :-1] = seg[:, 1:]
    south[:-1, :] = seg[1:, :]
    south_east[:-1, :-1] = seg[1:, 1:]
    b = (seg ^ east) | (seg ^ south) | (seg ^ south_east)
    # The image border is not an edge: the last row compares east only, the last column south only.
    b[-1, :] = seg[-1, :] ^ east[-1, :]
    b[:, -1] = seg[:, -1] ^ south[:, -1]
    b[-1, -1] = False
    return b


def _bound_pix(bound_th, shape):
    if bound_th < 0:
        raise ValueError(f"bound_th: expected >= 0, got {bound_th}")
    if bound_th >= 1:
        if bound_th != int(bound_th):
            # skimage's disk() of a non-integer radius is an off-centre even-sized grid.
            raise ValueError(f"bound_th: a value >= 1 is a radius in pixels and must be an integer, got {bound_th}")
        return float(bound_th)
    return float(math.ceil(bound_th * math.hypot(shape[0], shape[1])))


def _matched(points, targets, radius):
    """How many of `points` have a point of `targets` within `radius` (Euclidean)."""
    dist, _ = cKDTree(targets).query(points, k=1, distance_upper_bound=radius + 0.5)
    # Integer offsets: sqrt of an integer is exact when it is a square, so `<=` matches the
    # disk x^2 + y^2 <= r^2 exactly.
    return int(np.count_nonzero(dist <= radius))


def _f_frame(gt, pred, radius):
    fg = np.argwhere(boundary_map(pred))
    gtb = np.argwhere(boundary_map(gt))
    n_fg, n_gt = len(fg), len(gtb)
    if n_fg == 0 and n_gt == 0:
        return 1.0
    if n_fg == 0 or n_gt == 0:
        return 0.0  # (P, R) = (1, 0) or (0, 1)
    precision = _matched(fg, gtb, radius) / n_fg
    recall = _matched(gtb, fg, radius) / n_gt
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def boundary_f(gt, pred, bound_th=0.008):
    """Boundary F-measure of boolean masks (H, W) -> float, or (N, H, W) -> (N,) float64.

    `bound_th` < 1 is a fraction of the image diagonal (tolerance ceil(bound_th * diagonal)
    pixels); >= 1 is the tolerance in pixels (an integer).
    """
    gt, pred = _pair(gt, pred)
    radius = _bound_pix(bound_th, gt.shape[-2:])
    if gt.ndim == 2:
        return _f_frame(gt, pred, radius)
    return np.array([_f_frame(g, p, radius) for g, p in zip(gt, pred)], dtype=np.float64)


class Statistics(NamedTuple):
    mean: float
    recall: float
    decay: float


def statistics(per_frame):
    """Mean, Recall (fraction > 0.5) and Decay of one object's per-frame J or F values.

    Decay splits the frames into 4 overlapping bins as the benchmark does (bin edges
    `round(linspace(1, n, 5)) - 1`, each bin running to its right edge inclusive) and returns
    mean(first bin) - mean(last bin). NaN frames are left out of the means and count as
    misses in Recall, as in the benchmark.
    """
    v = np.asarray(per_frame, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"per_frame: expected a non-empty 1-D array, got shape {v.shape}")
    # The benchmark casts these edges to uint8, which wraps past 255 frames; plain ints are meant.
    ids = (np.round(np.linspace(1, len(v), 5) + 1e-10) - 1).astype(np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices give NaN, as in the benchmark
        mean = float(np.nanmean(v))
        recall = float(np.mean(v > 0.5))  # a NaN frame counts as a miss, as in the benchmark
        decay = float(np.nanmean(v[ids[0] : ids[1] + 1]) - np.nanmean(v[ids[3] : ids[4] + 1]))
    return Statistics(mean, recall, decay)


def evaluate_sequence(gt_labels, pred_labels, num_objects=None, skip_first_last=True, bound_th=0.008):
    """Per-object, per-frame J and F of one sequence under the semi-supervised protocol.

    gt_labels, pred_labels: (T, H, W) integer label maps (0 = background, 255 in the ground
    truth is void and counts as background, as in the benchmark). Objects 1..num_objects,
    by default the largest label of the first ground-truth frame. With `skip_first_last` the
    first frame (the given annotation) and the last frame are left out, as the benchmark does.
    A predicted label above num_objects raises ValueError. Returns (J, F), each (K, T').
    """
    gt = np.asarray(gt_labels)
    pred = np.asarray(pred_labels)
    if gt.ndim != 3:
        raise ValueError(f"gt_labels: expected shape (T, H, W), got {gt.shape}")
    if pred.shape != gt.shape:
        raise ValueError(f"pred_labels: expected shape {gt.shape} (as gt_labels), got {pred.shape}")
    gt = np.where(gt == 255, 0, gt)
    if num_objects is None:
        num_objects = int(gt[0].max())
    if skip_first_last:
        if gt.shape[0] < 3:
            raise ValueError(f"gt_labels: the semi-supervised protocol skips the first and last frames, so it needs >= 3 frames, got {gt.shape[0]}")
        gt, pred = gt[1:-1], pred[1:-1]
    top = int(pred.max()) if pred.size else 0
    if top > num_objects:
        raise ValueError(f"pred_labels: label {top} found, but the sequence has {num_objects} objects (labels 0..{num_objects})")
    j = np.zeros((num_objects, gt.shape[0]))
    f = np.zeros((num_objects, gt.shape[0]))
    for k in range(1, num_objects + 1):
        gk, pk = gt == k, pred == k
        j[k - 1] = jaccard(gk, pk)
        f[k - 1] = boundary_f(gk, pk, bound_th)
    return j, f


# ----------------------------------------------------------------------------- whole data set

GLOBAL_COLUMNS = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")
SEQUENCE_COLUMNS = ("Sequence", "J-Mean", "F-Mean")


def _result_paths(seq, results):
    """Result PNG paths of the frames the protocol scores (all but the first and the last)."""
    folder = os.path.join(results, seq.name)
    stems = [os.path.splitext(os.path.basename(p))[0] for p in seq.frame_paths]
    return {i: os.path.join(folder, stems[i] + ".png") for i in range(1, len(seq) - 1)}


def _evaluate_one(job):
    seq, results, bound_th = job
    from .data.palette import load_mask

    gt = seq.masks()
    paths = _result_paths(seq, results)
    pred = np.zeros_like(gt)
    for i, path in paths.items():
        labels = load_mask(path)[0]
        if labels.shape != gt.shape[1:]:
            raise ValueError(f"{path}: size {labels.shape[1]}x{labels.shape[0]}, expected {gt.shape[2]}x{gt.shape[1]} as the annotation {seq.mask_paths[i]}")
        pred[i] = labels
    try:
        j, f = evaluate_sequence(gt, pred, num_objects=seq.num_objects, bound_th=bound_th)
    except ValueError as e:
        raise ValueError(f"sequence {seq.name!r} (results in {os.path.join(results, seq.name)}): {e}") from None
    return seq.name, j, f


def evaluate_davis(results, davis_root, imset="2017/val.txt", resolution="480p", workers=None, progress=False, bound_th=0.008):
    """Score a results folder (RESULTS/<sequence>/<frame>.png label PNGs) against a DAVIS set.

    Semi-supervised protocol as the benchmark: per sequence, objects 1..max of the first
    annotation; first and last frames left out; per object Mean, Recall and Decay of J and F;
    global numbers are means over all objects, J&F-Mean = (J-Mean + F-Mean) / 2. Sequences are
    scored in `workers` processes (default: all cores, at most one per sequence).

    Returns {"set": name, "global": {column: value}, "per_object": [{"Sequence": "seq_k",
    "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"}], "per_frame":
    {sequence: (J (K, T-2), F (K, T-2))}}.
    """
    from .data.davis import DAVIS

    dataset = DAVIS(davis_root, imset, resolution)
    results = os.fspath(results)
    if not os.path.isdir(results):
        raise FileNotFoundError(f"results folder not found: {results}")
    for seq in dataset:
        if len(seq.mask_paths) != len(seq):
            raise ValueError(f"sequence {seq.name!r}: {len(seq.mask_paths)} annotations for {len(seq)} frames; evaluation needs every frame annotated")
        if len(seq) < 3:
            raise ValueError(f"sequence {seq.name!r}: {len(seq)} frames; the protocol skips the first and last, so it needs >= 3")
    missing = [p for seq in dataset for p in _result_paths(seq, results).values() if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"results folder {results} lacks {len(missing)} mask(s), e.g. {', '.join(missing[:3])}; expected one label PNG "
            f"per frame as RESULTS/<sequence>/<frame>.png for every sequence of {dataset.imset_file} (first and last frames may be absent)"
        )
    jobs = [(seq, results, bound_th) for seq in dataset]
    workers = min(workers or os.cpu_count() or 1, len(jobs))
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc="J&F", unit="seq", disable=not progress)
    scores = {}
    if workers > 1:
        import multiprocessing

        with multiprocessing.get_context().Pool(workers) as pool:
            for name, j, f in pool.imap_unordered(_evaluate_one, jobs):
                scores[name] = (j, f)
                bar.update()
    else:
        for job in jobs:
            name, j, f = _evaluate_one(job)
            scores[name] = (j, f)
            bar.update()
    bar.close()

    per_object = []
    for seq in dataset:  # set order, whatever order the workers finished in
        j, f = scores[seq.name]
        for k in range(j.shape[0]):
            js, fs = statistics(j[k]), statistics(f[k])
            per_object.append({"Sequence": f"{seq.name}_{k + 1}", "J-Mean": js.mean, "J-Recall": js.recall, "J-Decay": js.decay,
                               "F-Mean": fs.mean, "F-Recall": fs.recall, "F-Decay": fs.decay})
    g = {c: float(np.mean([o[c] for o in per_object])) if per_object else math.nan for c in GLOBAL_COLUMNS[1:]}
    g = {"J&F-Mean": (g["J-Mean"] + g["F-Mean"]) / 2, **g}
    return {"set": dataset.set_name, "global": g, "per_object": per_object, "per_frame": {n: scores[n] for n in dataset.names}}


def write_results_csv(folder, evaluation):
    """Write global_results-<set>.csv and per-sequence_results-<set>.csv (the benchmark's files,
    columns and 3-decimal format) into `folder`, atomically. Returns the two paths."""
    from .data._io import write_text

    name = evaluation["set"]
    g = evaluation["global"]
    global_csv = ",".join(GLOBAL_COLUMNS) + "\n" + ",".join(f"{g[c]:.3f}" for c in GLOBAL_COLUMNS) + "\n"
    rows = [",".join(SEQUENCE_COLUMNS)] + [f"{o['Sequence']},{o['J-Mean']:.3f},{o['F-Mean']:.3f}" for o in evaluation["per_object"]]
    paths = (os.path.join(folder, f"global_results-{name}.csv"), os.path.join(folder, f"per-sequence_results-{name}.csv"))
    write_text(paths[0], global_csv)
    write_text(paths[1], "\n".join(rows) + "\n")
    return paths


def format_results(evaluation):
    """The printed table: global numbers, then J-Mean and F-Mean per object."""
    g = evaluation["global"]
    width = max([len("Sequence")] + [len(o["Sequence"]) for o in evaluation["per_object"]])
    lines = [f"Global results for {evaluation['set']}:", "  ".join(f"{c:>8}" for c in GLOBAL_COLUMNS),
             "  ".join(f"{g[c]:>8.3f}" for c in GLOBAL_COLUMNS), "", f"Per object results for {evaluation['set']}:",
             f"{'Sequence':<{width}}  {'J-Mean':>6}  {'F-Mean':>6}"]
    lines += [f"{o['Sequence']:<{width}}  {o['J-Mean']:>6.3f}  {o['F-Mean']:>6.3f}" for o in evaluation["per_object"]]
    return "\n".join(lines)
