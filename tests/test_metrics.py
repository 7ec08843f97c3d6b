"""J, F and their statistics against hand-computed cases and a literal re-statement of the
DAVIS benchmark (dilation by a disk), plus `hmmn-vos eval` on a tiny generated set."""
import math
import os
import shutil

import numpy as np
import pytest
from scipy import ndimage

from hmmn_ops.metrics import boundary_f, boundary_map, evaluate_sequence, jaccard, statistics


def square(h, w, y0, x0, size):
    m = np.zeros((h, w), bool)
    m[y0 : y0 + size, x0 : x0 + size] = True
    return m


def dot(h, w, y, x):
    m = np.zeros((h, w), bool)
    m[y, x] = True
    return m


# ----------------------------------------------------------------------------- J


def test_jaccard_hand_cases():
    assert jaccard(np.zeros((4, 4)), np.zeros((4, 4))) == 1.0  # both empty
    assert jaccard(square(8, 8, 2, 2, 3), np.zeros((8, 8))) == 0.0
    assert jaccard(dot(5, 5, 2, 2), dot(5, 5, 2, 2)) == 1.0
    assert jaccard(dot(5, 5, 2, 2), dot(5, 5, 2, 3)) == 0.0
    # 10x10 square shifted by 2 columns: intersection 80, union 120
    assert jaccard(square(20, 20, 5, 5, 10), square(20, 20, 5, 7, 10)) == pytest.approx(2 / 3)


def test_jaccard_batch_and_errors():
    gt = np.stack([square(20, 20, 5, 5, 10), np.zeros((20, 20), bool)])
    pred = np.stack([square(20, 20, 5, 7, 10), np.zeros((20, 20), bool)])
    np.testing.assert_allclose(jaccard(gt, pred), [2 / 3, 1.0])
    with pytest.raises(ValueError, match="same shape"):
        jaccard(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match=r"\(H, W\) or \(N, H, W\)"):
        jaccard(np.zeros(4), np.zeros(4))


# ----------------------------------------------------------------------------- boundary maps


def test_boundary_map_one_pixel_object():
    # The benchmark's boundaries sit half a pixel towards the origin: a 2x2 block up-left.
    expected = np.zeros((5, 5), bool)
    expected[1:3, 1:3] = True
    np.testing.assert_array_equal(boundary_map(dot(5, 5, 2, 2)), expected)


def test_boundary_map_at_the_image_border():
    # Object = the right-most column. The image border is no edge: the last column compares
    # south only, so only the column to its left (which sees it east) is boundary.
    seg = np.zeros((4, 4), bool)
    seg[:, 3] = True
    expected = np.zeros((4, 4), bool)
    expected[:, 2] = True
    np.testing.assert_array_equal(boundary_map(seg), expected)
    # Object = the bottom row: only the row above it.
    seg = np.zeros((4, 4), bool)
    seg[3, :] = True
    expected = np.zeros((4, 4), bool)
    expected[2, :] = True
    np.testing.assert_array_equal(boundary_map(seg), expected)
    # A one-pixel object in the bottom-right corner: its west and north neighbours and the
    # north-west one; the corner itself never is.
    expected = np.zeros((4, 4), bool)
    expected[2:4, 2:4] = True
    expected[3, 3] = False
    np.testing.assert_array_equal(boundary_map(dot(4, 4, 3, 3)), expected)
    # A full mask has no boundary at all.
    assert not boundary_map(np.ones((4, 4), bool)).any()


# ----------------------------------------------------------------------------- F


def test_boundary_f_empty_conventions():
    empty, obj = np.zeros((10, 10), bool), square(10, 10, 3, 3, 4)
    assert boundary_f(empty, empty) == 1.0
    assert boundary_f(obj, empty) == 0.0  # nothing predicted: P = 1, R = 0
    assert boundary_f(empty, obj) == 0.0  # nothing expected: P = 0, R = 1
    # The border is no edge: a full mask against an empty one has no boundary on either side.
    assert boundary_f(np.ones((6, 6), bool), empty[:6, :6]) == 1.0
    assert jaccard(np.ones((6, 6), bool), empty[:6, :6]) == 0.0


def test_boundary_f_one_pixel_objects_and_the_disk():
    a, b = dot(8, 8, 2, 2), dot(8, 8, 4, 4)
    # Boundary blocks {1,2}x{1,2} and {3,4}x{3,4}. Radius 2: only (2,2)-(3,3) (distance
    # sqrt 2) match; (1,2)-(3,3) is sqrt 5 > 2 (a square window would accept it).
    assert boundary_f(a, b, bound_th=2) == pytest.approx(0.25)
    assert boundary_f(a, b, bound_th=3) == 1.0  # farthest pair: (1,1)-(3,3), sqrt 8 < 3
    # blocks in columns {1, 2} and {5, 6}: only columns 2 and 5 are within 3 of the other block
    assert boundary_f(a, dot(8, 8, 2, 6), bound_th=3) == 0.5
    assert boundary_f(a, dot(8, 8, 2, 7), bound_th=3) == 0.0  # columns {6, 7}: 4 apart at best


def test_boundary_f_default_tolerance_is_ceil_diagonal():
    # 480x854: ceil(0.008 * 979.6) = 8 pixels.
    gt = square(480, 854, 100, 100, 200)
    assert boundary_f(gt, square(480, 854, 100, 108, 200)) == 1.0
    assert boundary_f(gt, square(480, 854, 100, 109, 200)) < 1.0
    assert boundary_f(gt, square(480, 854, 100, 109, 200), bound_th=9) == 1.0


def test_boundary_f_bad_threshold():
    m = square(10, 10, 2, 2, 3)
    with pytest.raises(ValueError, match="bound_th"):
        boundary_f(m, m, bound_th=2.5)
    with pytest.raises(ValueError, match="bound_th"):
        boundary_f(m, m, bound_th=-0.1)


def benchmark_f(gt, pred, bound_th=0.008):
    """The benchmark's f_measure written out literally: dilation by skimage's disk."""
    r = bound_th if bound_th >= 1 else math.ceil(bound_th * np.linalg.norm(gt.shape))
    ax = np.arange(-r, r + 1)
    disk = (ax[:, None] ** 2 + ax[None, :] ** 2) <= r * r
    fg, gb = boundary_map(pred), boundary_map(gt)
    n_fg, n_gt = fg.sum(), gb.sum()
    if n_fg == 0 and n_gt > 0:
        p, rc = 1, 0
    elif n_fg > 0 and n_gt == 0:
        p, rc = 0, 1
    elif n_fg == 0 and n_gt == 0:
        p, rc = 1, 1
    else:
        p = (fg & ndimage.binary_dilation(gb, disk)).sum() / n_fg
        rc = (gb & ndimage.binary_dilation(fg, disk)).sum() / n_gt
    return 0.0 if p + rc == 0 else 2 * p * rc / (p + rc)


@pytest.mark.parametrize("shape,bound_th", [((37, 53), 0.008), ((60, 45), 0.05), ((31, 31), 4), ((9, 70), 1)])
def test_boundary_f_matches_literal_benchmark(shape, bound_th):
    rng = np.random.default_rng(sum(shape))
    for _ in range(6):
        # blobs touching the border, thin parts and holes: smoothed noise thresholded
        gt = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0) > 0.1
        pred = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0) > 0.1
        pred = pred if rng.uniform() < 0.7 else ndimage.shift(gt, (1, 2), order=0)
        assert boundary_f(gt, pred, bound_th) == pytest.approx(benchmark_f(gt, pred, bound_th), abs=1e-12)
    stack = np.stack([gt, pred])
    np.testing.assert_allclose(boundary_f(stack, stack[::-1], bound_th), [benchmark_f(gt, pred, bound_th), benchmark_f(pred, gt, bound_th)])


# ----------------------------------------------------------------------------- statistics


def test_statistics_hand_case():
    v = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    s = statistics(v)
    assert s.mean == pytest.approx(0.65)
    assert s.recall == pytest.approx(5 / 8)  # 0.5 is not > 0.5
    # bin edges round(linspace(1, 8, 5)) - 1 = [0, 2, 4, 5, 7]: first bin v[0:3], last v[5:8]
    assert s.decay == pytest.approx(0.9 - 0.4)


def test_statistics_long_sequence_and_single_frame():
    v = np.linspace(1, 0, 300)  # past 255 frames the benchmark's uint8 edges would wrap
    ids = (np.round(np.linspace(1, 300, 5) + 1e-10) - 1).astype(int)
    assert statistics(v).decay == pytest.approx(v[ids[0] : ids[1] + 1].mean() - v[ids[3] : ids[4] + 1].mean())
    assert statistics([0.7]) == (0.7, 1.0, 0.0)
    with pytest.raises(ValueError, match="per_frame"):
        statistics([])


def test_evaluate_sequence_protocol():
    gt = np.zeros((4, 10, 10), np.int64)
    gt[:, 2:6, 2:6] = 1
    gt[:, 7:9, 7:9] = 2
    gt[1, 0, 0] = 255  # void counts as background
    pred = gt.copy()
    pred[1, 0, 0] = 0
    pred[0] = 0  # first and last frames are not scored
    pred[3] = 0
    pred[2][gt[2] == 2] = 0  # object 2 missed in frame 2
    j, f = evaluate_sequence(gt, pred)
    np.testing.assert_array_equal(j, [[1, 1], [1, 0]])
    np.testing.assert_array_equal(f, [[1, 1], [1, 0]])
    with pytest.raises(ValueError, match="label 3"):
        evaluate_sequence(gt, np.where(gt == 1, 3, pred))
    with pytest.raises(ValueError, match=">= 3 frames"):
        evaluate_sequence(gt[:2], pred[:2])


# ----------------------------------------------------------------------------- hmmn-vos eval


@pytest.fixture(scope="module")
def tiny_davis(tmp_path_factory):
    from hmmn_ops.data import SyntheticConfig, write_davis

    root = tmp_path_factory.mktemp("davis")
    write_davis(root, [3, 4], SyntheticConfig(height=48, width=64, num_frames=5, p_leave=0.0), set_name="val")
    return root


def run_eval(*argv):
    from hmmn_ops.cli import main

    return main(["eval", *argv])


def read_csv(path):
    with open(path) as f:
        rows = [line.strip().split(",") for line in f if line.strip()]
    return rows[0], rows[1:]


def test_eval_command_ground_truth_scores_one(tiny_davis, tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(tiny_davis / "Annotations" / "480p", results)
    assert run_eval("--results", str(results), "--davis", str(tiny_davis), "--imset", "2017/val.txt", "--workers", "2", "--no-progress") == 0
    header, rows = read_csv(results / "global_results-val.csv")
    assert header == ["J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"]
    assert rows == [["1.000", "1.000", "1.000", "0.000", "1.000", "1.000", "0.000"]]
    header, rows = read_csv(results / "per-sequence_results-val.csv")
    assert header == ["Sequence", "J-Mean", "F-Mean"]
    assert rows and all(r[1:] == ["1.000", "1.000"] for r in rows)
    assert rows[0][0] == "synth00003_1"
    assert "J&F-Mean" in capsys.readouterr().out
    assert not [n for n in os.listdir(results) if n.endswith(".tmp")]


def test_eval_command_scores_a_wrong_object(tiny_davis, tmp_path):
    from hmmn_ops.data import load_mask, save_mask
    from hmmn_ops.metrics import evaluate_davis

    results = tmp_path / "results"
    shutil.copytree(tiny_davis / "Annotations" / "480p", results)
    seq = results / "synth00003"
    for name in sorted(os.listdir(seq)):  # erase object 1 everywhere
        labels, palette = load_mask(seq / name)
        save_mask(seq / name, np.where(labels == 1, 0, labels), palette)
    ev = evaluate_davis(results, tiny_davis, "2017/val.txt", workers=1)
    first = ev["per_object"][0]
    assert first["Sequence"] == "synth00003_1" and first["J-Mean"] == 0.0 and first["F-Mean"] == 0.0
    assert all(o["J-Mean"] == 1.0 for o in ev["per_object"][1:])
    n = len(ev["per_object"])
    assert ev["global"]["J-Mean"] == pytest.approx((n - 1) / n)
    assert ev["per_frame"]["synth00003"][0].shape[1] == 3  # 5 frames, first and last skipped


def test_eval_command_missing_frames_and_rgb(tiny_davis, tmp_path, capsys):
    from PIL import Image

    results = tmp_path / "results"
    shutil.copytree(tiny_davis / "Annotations" / "480p", results)
    os.remove(results / "synth00004" / "00002.png")
    assert run_eval("--results", str(results), "--davis", str(tiny_davis), "--no-progress") == 2
    err = capsys.readouterr().err
    assert "lacks 1 mask" in err and os.path.join("synth00004", "00002.png") in err
    Image.new("RGB", (64, 48)).save(results / "synth00004" / "00002.png")
    assert run_eval("--results", str(results), "--davis", str(tiny_davis), "--workers", "1", "--no-progress") == 2
    assert "palette ('P') PNG" in capsys.readouterr().err
