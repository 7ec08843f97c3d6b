"""`hmmn-vos segment`: DAVIS round trip, --frames with late objects, torchrun sharding, errors."""
import os

import numpy as np
import pytest
from PIL import Image

from hmmn_ops.cli import main
from hmmn_ops.commands import segment
from hmmn_ops.data import load_mask, save_mask
from hmmn_ops.data.synthetic import SyntheticConfig, write_davis
from hmmn_ops.models import HMMN, save_checkpoint

TINY = dict(backbone="tiny", key_dims=(16, 16, 8), value_dims=(32, 16, 8), decoder_dim=32)
H, W = 40, 60


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    save_checkpoint(path, HMMN(**TINY))
    return str(path)


@pytest.fixture(scope="module")
def davis(tmp_path_factory):
    root = tmp_path_factory.mktemp("davis")
    names = write_davis(root, seeds=[3, 4], config=SyntheticConfig(height=H, width=W, num_frames=4, objects=(2, 2)))
    return str(root), names


def frames_dir(tmp_path, n=4, size=(H, W)):
    d = tmp_path / "clip"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(d / f"{i:05d}.jpg")
    return d


def a_mask(path, labels=(1,), size=(H, W)):
    m = np.zeros(size, np.uint8)
    for k, label in enumerate(labels):
        m[4 + 10 * k:12 + 10 * k, 5:25] = label
    palette = np.zeros((256, 3), np.uint8)
    palette[1:4] = [(10, 200, 30), (200, 10, 30), (5, 5, 250)]
    save_mask(path, m, palette)
    return m, palette


def listing(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)


def test_davis_round_trip_with_overlays(davis, weights, tmp_path):
    root, names = davis
    out, viz = tmp_path / "out", tmp_path / "viz"
    rc = main(["segment", "--davis", root, "--imset", "2017/val.txt", "--out", str(out), "--weights", weights,
               "--overlay", str(viz), "--quiet"])
    assert rc == 0
    assert listing(out) == [f"{n}/{i:05d}.png" for n in names for i in range(4)]  # no temporary file left
    assert listing(viz) == [f"{n}/{i:05d}.jpg" for n in names for i in range(4)]
    for n in names:
        given, palette = load_mask(os.path.join(root, "Annotations", "480p", n, "00000.png"))
        first, out_palette = load_mask(out / n / "00000.png")
        assert np.array_equal(first, given) and np.array_equal(out_palette, palette)
        later, _ = load_mask(out / n / "00003.png")
        assert later.shape == (H, W) and set(np.unique(later)) <= set(np.unique(given))


def test_torchrun_ranks_split_the_sequences(davis, weights, tmp_path, monkeypatch):
    root, names = davis
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["segment", "--davis", root, "--out", str(tmp_path), "--weights", weights, "--quiet"]) == 0
    assert sorted(os.listdir(tmp_path)) == [names[1]]


def test_frames_and_a_late_object(tmp_path, weights):
    clip = frames_dir(tmp_path, n=5)
    first, palette = a_mask(tmp_path / "first.png", labels=(1,))
    late, _ = a_mask(tmp_path / "00003.png", labels=(0, 3))
    out = tmp_path / "out"
    rc = main(["segment", "--frames", str(clip), "--mask", str(tmp_path / "first.png"), "--out", str(out),
               "--weights", weights, "--quiet"])
    assert rc == 0 and listing(out) == [f"clip/{i:05d}.png" for i in range(5)]
    labels, pal = load_mask(out / "clip" / "00000.png")
    assert np.array_equal(labels, first) and np.array_equal(pal, palette)
    # several masks: each is the annotation of the frame of the same name
    save_mask(tmp_path / "00000.png", first, palette)
    rc = main(["segment", "--frames", str(clip), "--mask", str(tmp_path / "00000.png"), "--mask", str(tmp_path / "00003.png"),
               "--out", str(out), "--weights", weights, "--quiet", "--kernel", "kmn", "--memory-masks", "hard"])
    assert rc == 0
    assert np.array_equal(load_mask(out / "clip" / "00003.png")[0] == 3, late == 3)
    assert 3 not in load_mask(out / "clip" / "00002.png")[0]


def error_of(capsys, argv):
    assert main(argv) == 2
    return capsys.readouterr().err


def test_errors(tmp_path, weights, capsys, monkeypatch):
    clip = frames_dir(tmp_path, n=2)
    out = str(tmp_path / "out")
    base = ["segment", "--out", out, "--weights", weights, "--quiet"]
    a_mask(tmp_path / "m.png")

    mask = ["--mask", str(tmp_path / "m.png")]
    assert "frame folder not found" in error_of(capsys, base + ["--frames", str(tmp_path / "nope")] + mask)
    assert "needs at least one --mask" in error_of(capsys, base + ["--frames", str(clip)])
    assert "either --frames" in error_of(capsys, base)

    Image.new("RGB", (W, H), (200, 0, 0)).save(tmp_path / "rgb.png")
    assert "palette ('P') PNG" in error_of(capsys, base + ["--frames", str(clip), "--mask", str(tmp_path / "rgb.png")])

    save_mask(tmp_path / "empty.png", np.zeros((H, W), np.uint8))
    assert "no object" in error_of(capsys, base + ["--frames", str(clip), "--mask", str(tmp_path / "empty.png")])

    a_mask(tmp_path / "small.png", size=(H - 2, W))
    assert "mask size 60x38 differs" in error_of(capsys, base + ["--frames", str(clip), "--mask", str(tmp_path / "small.png")])

    Image.new("RGB", (W + 4, H), 0).save(clip / "00002.jpg")
    err = error_of(capsys, base + ["--frames", str(clip), "--mask", str(tmp_path / "m.png")])
    assert "00002.jpg: frame size 64x40 differs" in err
    os.remove(clip / "00002.jpg")

    err = error_of(capsys, base + ["--frames", str(clip)] + mask + ["--mask", str(tmp_path / "small.png")])
    assert "no frame named m.*" in err and "with several --mask" in err

    monkeypatch.setattr(segment, "DEFAULT_WEIGHTS", str(tmp_path / "missing.pt"))
    err = error_of(capsys, ["segment", "--out", out, "--frames", str(clip), "--mask", str(tmp_path / "m.png")])
    assert "no weights" in err and "--random-init" in err
    assert "file not found" in error_of(capsys, base[:3] + ["--weights", str(tmp_path / "w.pt"), "--frames", str(clip),
                                                            "--mask", str(tmp_path / "m.png")])
    assert not os.path.exists(out)  # every error came before any output
