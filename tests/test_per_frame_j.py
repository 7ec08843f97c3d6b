"""scripts/per_frame_j.py: the validation J of docs/training.md, frame by frame."""
import os
import sys

import numpy as np
import pytest

from hmmn_ops.commands.segment import DEFAULT_WEIGHTS

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import per_frame_j  # noqa: E402

SMALL = ["--videos", "2", "--frames", "4", "--height", "48", "--width", "64", "--threads", "1"]


def test_curves_and_plot(tmp_path, capsys):
    plot = tmp_path / "j.png"
    assert per_frame_j.main([DEFAULT_WEIGHTS, DEFAULT_WEIGHTS, "--labels", "a", "b", "--memory-masks", "soft", "hard",
                             "--plot", str(plot), "--errors"] + SMALL) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split(":")[0]: line for line in lines if ": mean J" in line}
    assert set(rows) == {"a", "b", "copy frame 0's mask"}
    for row in rows.values():  # a mean, then one J per frame 1..3, each in [0, 1]
        values = [float(x) for x in row.split("per frame:")[1].split()]
        assert len(values) == 3 and all(0 <= x <= 1 for x in values)
        mean = float(row.split("per frame:")[0].split()[-1])
        assert mean == pytest.approx(sum(values) / 3, abs=0.006)
    assert plot.is_file() and not (tmp_path / "j.png.tmp.png").exists()
    errors = [line for line in lines if line.strip().startswith("errors of")]
    assert [e.split()[2].rstrip(":") for e in errors] == ["a", "b"] and all("twin" in e for e in errors)
    assert sum(line.strip().startswith("losses of") for line in lines) == 2


def test_errors_are_shares_that_add_up():
    import numpy as np
    from hmmn_ops.data import SyntheticConfig
    from hmmn_ops.models import load_model

    config = SyntheticConfig(height=48, width=64, num_frames=4)
    j, copy, errors = per_frame_j.per_frame_j(load_model(DEFAULT_WEIGHTS), range(3), config, 5)
    assert j[0] == 1 and copy[0] == 1 and all(0 <= x <= 1 for x in np.r_[j, copy])
    assert set(errors) == {"lost", "missed", "losses", "found again", "lost at the end", "situations",
                           *per_frame_j.ERROR_KINDS}
    shares = ("lost", "missed", "found again", "lost at the end")
    assert all(0 <= errors[k] <= 1 for k in shares) and all(errors[k] >= 0 for k in ("losses", *per_frame_j.ERROR_KINDS))
    situations = errors["situations"]
    assert set(situations) == set(per_frame_j.SITUATIONS)
    assert sum(share for share, _ in situations.values()) == pytest.approx(1)
    # every object is scored on every frame, so the pairs' mean J is the mean of the frames' J
    assert sum(share * j for share, j in situations.values() if share) == pytest.approx(j[1:].mean())


def test_situations_of_an_object():
    layout = [{"role": "target", "twin": 0}, {"role": "distractor", "twin": 1}, {"role": "occluder", "twin": 0}]
    obj = np.zeros((20, 30), bool)
    obj[5:10, 5:10] = True
    instances = np.zeros((20, 30), np.int32)
    instances[obj] = 1
    roles = lambda inst: per_frame_j._nearby_roles(obj, inst, layout, 1)
    assert roles(instances) == set()  # itself does not count
    far, near = instances.copy(), instances.copy()
    far[5:10, 9 + per_frame_j.NEAR + 1:] = 2  # the twin, NEAR + 1 pixels right of the object (columns 5-9)
    near[5:10, 9 + per_frame_j.NEAR:] = 2  # NEAR pixels right
    assert roles(far) == set() and roles(near) == {"twin"}
    near[0, 5] = 3  # an occluder 5 pixels above the object's top row: not near
    assert roles(near) == {"twin"}
    near[1, 5] = 3  # 4 pixels above
    assert roles(near) == {"twin", "other"}
    assert per_frame_j.situation_of(obj, 25, set()) == "clear"
    assert per_frame_j.situation_of(obj, 51, {"twin"}) == "hidden"  # 25 of 51 pixels: less than half
    assert per_frame_j.situation_of(obj, 50, {"twin", "other"}) == "twin near"
    assert per_frame_j.situation_of(obj, 50, {"other"}) == "other near"


def test_losses_count_falls_and_recoveries():
    assert per_frame_j.losses_of([1.0, 0.9, 0.8]) == (0, 0)
    assert per_frame_j.losses_of([1.0, 0.1, 0.0, 0.6, 0.1, 0.3]) == (2, 1)  # found again after the first only
    assert per_frame_j.losses_of([1.0, 0.1, 0.4, 0.1]) == (2, 0)  # 0.4 is not found, and a second fall
    assert per_frame_j.losses_of([0.1, 0.0, 0.9]) == (0, 0)  # never above 0.2: no fall


def test_argument_counts_must_match(capsys):
    with pytest.raises(SystemExit):
        per_frame_j.main([DEFAULT_WEIGHTS, "--labels", "a", "b"] + SMALL)
    assert "--labels: expected 1 values" in capsys.readouterr().err


def test_set_overrides_the_model_config(capsys):
    assert per_frame_j.main([DEFAULT_WEIGHTS, "--set", "kernel=none", "input_scale=1.5"] + SMALL) == 0
    assert "mean J" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        per_frame_j.main([DEFAULT_WEIGHTS, "--set", "kernel"] + SMALL)
    assert "--set: expected FIELD=VALUE" in capsys.readouterr().err
    with pytest.raises(ValueError, match="HMMNConfig.kernel"):
        per_frame_j.main([DEFAULT_WEIGHTS, "--set", "kernel=gauss"] + SMALL)
