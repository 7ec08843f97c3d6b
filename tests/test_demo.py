"""`hmmn-vos demo` with the packaged weights on a tiny held-out set: files, summary line, refusals."""
import os
import re

import numpy as np
import pytest
from PIL import Image

from hmmn_ops.cli import main
from hmmn_ops.commands.demo import DEMO_SEED0
from hmmn_ops.commands.segment import DEFAULT_WEIGHTS
from hmmn_ops.data import load_mask

pytestmark = pytest.mark.slow
LAST_LINE = re.compile(r"^J&F (\d\.\d{3}) J (\d\.\d{3}) F (\d\.\d{3}) ms/frame (\d+\.\d)$")


def test_packaged_weights_are_there():
    from hmmn_ops.models import load_model

    assert os.path.isfile(DEFAULT_WEIGHTS), "the package ships hmmn_ops/weights/hmmn.pt"
    assert os.path.getsize(DEFAULT_WEIGHTS) < 8 * 2**20, "a few MB at most"
    assert load_model(DEFAULT_WEIGHTS).config.memory_masks == "hard"  # what docs/training.md measured


def test_demo_tiny_set(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--sequences", "2", "--frames", "5", "--height", "64", "--width", "96",
            "--threads", "1", "--quiet"]
    assert main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert any("hard memory masks" in line for line in lines)  # the shipped weights' setting, said
    m = LAST_LINE.match(lines[-1])
    assert m, lines[-1]
    jf, j, f, ms = map(float, m.groups())
    assert jf == pytest.approx((j + f) / 2, abs=1e-3) and 0 <= jf <= 1 and ms > 0
    names = (out / "data" / "ImageSets" / "2017" / "demo.txt").read_text().split()
    assert names == [f"demo{DEMO_SEED0}", f"demo{DEMO_SEED0 + 1}"]
    for name in names:  # every frame segmented, labels within the sequence's objects
        first = load_mask(out / "data" / "Annotations" / "64p" / name / "00000.png")[0]
        masks = sorted(os.listdir(out / "results" / name))
        assert masks == [f"{i:05d}.png" for i in range(5)]
        labels = load_mask(out / "results" / name / "00000.png")[0]
        np.testing.assert_array_equal(labels, first)  # the given annotation is the output on frame 0
        assert load_mask(out / "results" / name / "00004.png")[0].max() <= first.max()
    with Image.open(out / "overlay.png") as strip:  # 2 sequences x 5 frames, 2-pixel gaps
        assert strip.size == (5 * 96 + 4 * 2, 2 * 64 + 2)
    csv = (out / "results" / "global_results-demo.csv").read_text().splitlines()
    assert csv[0].startswith("J&F-Mean") and float(csv[1].split(",")[0]) == pytest.approx(jf, abs=1e-3)


def test_demo_refuses_training_seeds(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--seed", "5", "--sequences", "1", "--quiet"]) == 2
    assert "overlap the training video_seeds" in capsys.readouterr().err


def test_demo_missing_weights(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--weights", str(tmp_path / "none.pt")]) == 2
    assert "weights not found" in capsys.readouterr().err
