"""scripts/per_frame_j.py: the validation J of docs/training.md, frame by frame."""
import os
import sys

import pytest

from hmmn_ops.commands.segment import DEFAULT_WEIGHTS

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import per_frame_j  # noqa: E402

SMALL = ["--videos", "2", "--frames", "4", "--height", "48", "--width", "64", "--threads", "1"]


def test_curves_and_plot(tmp_path, capsys):
    plot = tmp_path / "j.png"
    assert per_frame_j.main([DEFAULT_WEIGHTS, DEFAULT_WEIGHTS, "--labels", "a", "b", "--memory-masks", "soft", "hard",
                             "--plot", str(plot)] + SMALL) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split(":")[0]: line for line in lines if ": mean J" in line}
    assert set(rows) == {"a", "b", "copy frame 0's mask"}
    for row in rows.values():  # a mean, then one J per frame 1..3, each in [0, 1]
        values = [float(x) for x in row.split("per frame:")[1].split()]
        assert len(values) == 3 and all(0 <= x <= 1 for x in values)
        mean = float(row.split("per frame:")[0].split()[-1])
        assert mean == pytest.approx(sum(values) / 3, abs=0.006)
    assert plot.is_file() and not (tmp_path / "j.png.tmp.png").exists()


def test_argument_counts_must_match(capsys):
    with pytest.raises(SystemExit):
        per_frame_j.main([DEFAULT_WEIGHTS, "--labels", "a", "b"] + SMALL)
    assert "--labels: expected 1 values" in capsys.readouterr().err
