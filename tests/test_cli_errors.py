"""`hmmn-vos` refuses bad input with `hmmn-vos <command>: error: ...` and exit status 2, before
any work where it can, while a genuine bug still shows its traceback; `segment` continues an
interrupted run; the VOS extra's packages are needed only by the commands that use them."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

import hmmn_ops.data.palette
import hmmn_ops.models
from hmmn_ops.cli import main
from hmmn_ops.commands import segment
from hmmn_ops.commands.demo import DEMO_SEED0
from hmmn_ops.data import load_mask
from hmmn_ops.data.synthetic import SyntheticConfig, write_davis
from hmmn_ops.models import HMMN, save_checkpoint
from hmmn_ops.train import load_config
from test_segment_cli import H, TINY, W, a_mask, frames_dir, listing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    save_checkpoint(path, HMMN(**TINY))
    return str(path)


@pytest.fixture
def clip(tmp_path):
    """(frames folder of 4 frames, the first frame's mask)."""
    folder = frames_dir(tmp_path)
    a_mask(tmp_path / "m.png")
    return folder, str(tmp_path / "m.png")


def segment_args(clip, out, weights, *more):
    return ["segment", "--frames", str(clip[0]), "--mask", clip[1], "--out", str(out), "--weights", weights, "--quiet", *more]


def error_of(capsys, argv):
    """stderr of a command that must refuse its input in the argparse style."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"hmmn-vos {argv[0]}: error: " in err and "Traceback" not in err
    return err


def corrupt(path, how):
    """Break a file: 'garbage' (not an image or checkpoint at all) or 'truncated' (its first half)."""
    data = b"this is not what it should be\n" if how == "garbage" else open(path, "rb").read()[: os.path.getsize(path) // 2]
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


# ---------------------------------------------------------------- corrupt inputs


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_corrupt_mask(tmp_path, clip, weights, capsys, how):
    mask = corrupt(clip[1], how)
    err = error_of(capsys, segment_args(clip, tmp_path / "out", weights))
    assert mask in err
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("frame, how", [("00000.jpg", "garbage"), ("00002.jpg", "truncated")])
def test_corrupt_frame(tmp_path, clip, weights, capsys, frame, how):
    path = corrupt(clip[0] / frame, how)  # a truncated frame has a valid header: found when it is decoded
    assert path in error_of(capsys, segment_args(clip, tmp_path / "out", weights))


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_corrupt_weights(tmp_path, clip, weights, capsys, how):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(open(weights, "rb").read())
    err = error_of(capsys, segment_args(clip, tmp_path / "out", corrupt(bad, how)))
    assert str(bad) in err and "checkpoint" in err


def test_demo_corrupt_weights_before_any_work(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    err = error_of(capsys, ["demo", "--out", str(tmp_path / "demo"), "--weights", corrupt(bad, "garbage"),
                            "--seed", str(DEMO_SEED0), "--quiet"])
    assert str(bad) in err
    assert not os.path.exists(tmp_path / "demo")  # refused before the data was generated


def a_run_folder(out, checkpoint):
    """A train --out folder with the default config and `checkpoint` bytes as its checkpoint.pt."""
    os.makedirs(out)
    with open(out / "config.yaml", "w") as f:
        yaml.safe_dump(load_config().to_dict(), f)
    (out / "checkpoint.pt").write_bytes(checkpoint)
    return str(out / "checkpoint.pt")


@pytest.mark.parametrize("content", ["garbage", "truncated", "another file"])
def test_train_resume_corrupt_checkpoint(tmp_path, capsys, content):
    model = tmp_path / "model.pt"
    torch.save({"state_dict": {}} if content == "another file" else {"step": 3, "x": torch.zeros(100)}, model)
    if content != "another file":
        corrupt(model, content)
    checkpoint = a_run_folder(tmp_path / "run", model.read_bytes())
    err = error_of(capsys, ["train", "--out", str(tmp_path / "run"), "--resume", "--quiet"])
    assert checkpoint in err


def test_train_init_corrupt(tmp_path, capsys):
    bad = corrupt(tmp_path / "init.pt", "garbage")
    assert bad in error_of(capsys, ["train", "--out", str(tmp_path / "run"), "--set", f"init={bad}", "--quiet"])


@pytest.mark.parametrize("where", ["config", "set"])
def test_invalid_yaml(tmp_path, capsys, where):
    config = tmp_path / "bad.yaml"
    config.write_text("lr: 1e-3\nsize: [96, 96\n")
    argv = ["--config", str(config)] if where == "config" else ["--set", "size=[96, 96"]
    err = error_of(capsys, ["train", "--out", str(tmp_path / "run"), "--quiet", *argv])
    assert "YAML" in err and (str(config) in err if where == "config" else "size=[96, 96" in err)


def test_config_is_a_folder(tmp_path, capsys):
    assert str(tmp_path) in error_of(capsys, ["train", "--out", str(tmp_path / "run"), "--config", str(tmp_path)])


@pytest.mark.parametrize("command", ["segment", "demo", "info"])
def test_unknown_device(tmp_path, clip, weights, capsys, command):
    argv = {"segment": segment_args(clip, tmp_path / "out", weights), "demo": ["demo", "--out", str(tmp_path / "d")],
            "info": ["info"]}[command]
    with pytest.raises(SystemExit) as stop:  # argparse's own refusal of a bad value
        main(argv + ["--device", "tpu"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"hmmn-vos {command}: error: argument --device" in err and "'tpu'" in err


def test_cuda_missing(tmp_path, clip, weights, capsys, monkeypatch):
    argv = segment_args(clip, tmp_path / "out", weights, "--device", "cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "CUDA is not available" in error_of(capsys, argv)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert "--device cuda:1: this machine has 1 CUDA device(s)" in error_of(capsys, argv)


@pytest.mark.parametrize("workers", [1, 2])
def test_eval_corrupt_result(tmp_path, capsys, workers):
    root = tmp_path / "davis"
    (name,) = write_davis(root, seeds=[3], config=SyntheticConfig(height=H, width=W, num_frames=4, objects=(1, 1)))
    results = tmp_path / "results"
    os.makedirs(results / name)
    for i in range(4):
        (results / name / f"{i:05d}.png").write_bytes((root / "Annotations" / "480p" / name / f"{i:05d}.png").read_bytes())
    bad = corrupt(results / name / "00002.png", "truncated")
    err = error_of(capsys, ["eval", "--results", str(results), "--davis", str(root), "--workers", str(workers),
                            "--no-progress"])
    assert bad in err


# ---------------------------------------------------------------- outputs, checked before any work


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: the command had to refuse before."""
    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")
    monkeypatch.setattr(hmmn_ops.models, "load_model", load_model)


@pytest.mark.parametrize("flag, sub", [("--out", ""), ("--out", "sub"), ("--overlay", "")])
def test_output_is_a_file(tmp_path, clip, weights, capsys, no_model, flag, sub):
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    target = str(a_file / sub) if sub else str(a_file)
    argv = segment_args(clip, target if flag == "--out" else tmp_path / "out", weights)
    if flag == "--overlay":
        argv += ["--overlay", target]
    err = error_of(capsys, argv)
    assert f"{flag} {target}" in err and "not a folder" in err
    assert a_file.read_text() == "mine"


def test_output_not_writable(tmp_path, clip, weights, capsys, no_model):
    target = "/sys/hmmn-vos-test"  # read-only even for root
    try:
        os.mkdir(target)
    except OSError:
        pass
    else:
        os.rmdir(target)
        pytest.skip("/sys is writable here")
    err = error_of(capsys, segment_args(clip, target, weights))
    assert f"--out {target}" in err and "cannot write" in err


@pytest.mark.parametrize("command", ["train", "demo"])
def test_other_outputs_are_files(tmp_path, capsys, command):
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    argv = ["--out", str(a_file)] + (["--seed", str(DEMO_SEED0)] if command == "demo" else [])
    assert "not a folder" in error_of(capsys, [command, *argv, "--quiet"])


def test_genuine_bug_keeps_its_traceback(tmp_path, clip, weights, monkeypatch):
    def broken(args):
        raise TypeError("a bug")
    monkeypatch.setattr(segment, "_sequences", broken)
    with pytest.raises(TypeError, match="a bug"):
        main(segment_args(clip, tmp_path / "out", weights))


# ---------------------------------------------------------------- segment resumes


class Interrupted(Exception):
    pass


def test_segment_resumes(tmp_path, weights, monkeypatch):
    folder = frames_dir(tmp_path, n=6)
    a_mask(tmp_path / "m.png", labels=(1, 2))
    clip = (folder, str(tmp_path / "m.png"))

    def run(name, *more):
        return main(segment_args(clip, tmp_path / name, weights, "--overlay", str(tmp_path / f"{name}-viz"), *more))

    assert run("whole") == 0
    save_mask = hmmn_ops.data.palette.save_mask
    written = []

    def save_until(stop):
        def save(path, *args, **kwargs):
            if len(written) == stop:
                raise Interrupted
            written.append(os.path.basename(path))
            save_mask(path, *args, **kwargs)
        return save

    monkeypatch.setattr(hmmn_ops.data.palette, "save_mask", save_until(3))
    with pytest.raises(Interrupted):
        run("parts")
    frames = [f"clip/{i:05d}.png" for i in range(6)]
    assert listing(tmp_path / "parts") == frames[:3]  # no temporary file left
    first = [os.stat(tmp_path / "parts" / f).st_mtime_ns for f in frames[:3]]

    written.clear()
    monkeypatch.setattr(hmmn_ops.data.palette, "save_mask", save_until(99))
    assert run("parts") == 0
    assert written == [f"{i:05d}.png" for i in range(3, 6)]  # only the missing frames
    assert [os.stat(tmp_path / "parts" / f).st_mtime_ns for f in frames[:3]] == first
    assert listing(tmp_path / "parts") == frames
    assert listing(tmp_path / "parts-viz") == listing(tmp_path / "whole-viz")
    for f in frames:  # as if never interrupted
        a, b = load_mask(tmp_path / "whole" / f), load_mask(tmp_path / "parts" / f)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])

    written.clear()
    assert run("parts") == 0 and written == []  # done: nothing to do
    assert run("parts", "--kernel", "kmn") == 0 and len(written) == 6  # other settings: every frame again


# ---------------------------------------------------------------- the VOS extra

VOS = ("PIL", "tqdm", "yaml", "matplotlib", "scipy")
_WITHOUT_VOS = f"""
import sys
for name in {VOS!r}:
    sys.modules[name] = None  # an import of it fails, as if not installed
import hmmn_ops
from hmmn_ops.cli import main
from hmmn_ops.models import HMMN, save_checkpoint
save_checkpoint(sys.argv[1], HMMN(backbone="tiny", key_dims=(16, 16, 8), value_dims=(32, 16, 8), decoder_dim=32))
print("rc info", main(["info"]))
for argv in (["segment", "--frames", "f", "--mask", "m.png", "--out", "o"], ["eval", "--results", "r", "--davis", "d"],
             ["train", "--out", "o"], ["demo", "--out", "o"]):
    rc = main(argv)
    print("rc", argv[0], rc)
"""


def test_without_the_vos_extra(tmp_path):
    path = [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", _WITHOUT_VOS, str(tmp_path / "w.pt")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    codes = [line.split()[1:] for line in run.stdout.splitlines() if line.startswith("rc ")]
    assert codes == [["info", "0"], ["segment", "2"], ["eval", "2"], ["train", "2"], ["demo", "2"]], run.stdout
    errors = [line for line in run.stderr.splitlines() if line.startswith("hmmn-vos ")]
    assert [line.split(":")[0] for line in errors] == ["hmmn-vos segment", "hmmn-vos eval", "hmmn-vos train", "hmmn-vos demo"]
    for line in errors:
        assert "pip install 'hmmn_ops[vos]'" in line
    assert "pillow" in errors[0] and "scipy" in errors[1] and "pyyaml" in errors[2]
