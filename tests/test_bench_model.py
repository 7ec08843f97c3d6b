"""benchmarks/bench_model.py and `hmmn-vos bench`: the --quick smoke run through the CLI, the op
timer's attribution, the memory schedule of the fit search against InferenceCore, the search."""
import json
import os
import sys
import time

import pytest
import torch

import hmmn_ops
from hmmn_ops.cli import main
from hmmn_ops.commands import bench
from hmmn_ops.inference import InferenceCore
from hmmn_ops.models import HMMN

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_model  # noqa: E402

TINY = bench_model.QUICK_MODEL
MATCHING = ("kernel_guided_read", "topk_guided_read res3", "topk_guided_read res2", "local_track")


def tiny_video(n, H=32, W=48):
    images = [torch.rand(3, H, W) for _ in range(n)]
    mask = torch.zeros(H, W, dtype=torch.int64)
    mask[8:24, 10:30] = 1
    return images, mask


def test_quick_run_through_the_cli(tmp_path, capsys):
    out = tmp_path / "model.json"
    rc = main(["bench", "model", "--quick", "--quiet", "--baseline", "naive", "--fit", "on", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "hmmn_ops (auto)" in printed and "naive" in printed and "longest video" in printed
    data = json.loads(out.read_text())
    assert data["meta"]["device_type"] == "cpu" and data["meta"]["frames"] == 8
    runs = [r for r in data["records"] if r["kind"] == "run"]
    ours, naive = runs
    assert (ours["impl"], naive["impl"]) == ("hmmn_ops", "naive")
    for r in runs:
        assert r["timed_frames"] == 8 - 2 and len(r["per_frame"]) == 8
        assert r["ms_per_frame"] > 0 and 0 < r["matching_share"] < 1
        # one res4 read, one top-k read per fine level and one local track per predicted frame
        assert {k: v["calls_per_frame"] for k, v in r["ops"].items()} == dict.fromkeys(MATCHING, 1.0)
        assert r["res4_frames"] == [2, 3] and r["fine_frames"] == [2, 2]  # frame 5 kept from frame 7 on
        for key in ("device", "torch", "date", "command", "shape"):
            assert r[key], key
    # same weights, same function: the naive matching segments the video the same way
    assert naive["speedup"] > 0 and naive["label_agreement"] > 0.999
    assert naive["last_frame_max_prob_diff"] < 1e-4
    fits = [r for r in data["records"] if r["kind"] == "fit"]
    assert [r["fine_mem_every"] for r in fits] == [None, 5]
    for r in fits:  # the tiny model's memory never gets near the limit: the frame cap stops the search
        assert r["longest_frames"] == 64 and r["stopped_by"].startswith("--max-frames-1080p")
        assert r["res4_frames"] == len(bench_model.schedule(64, 5))
    assert fits[1]["fine_frames"] == fits[1]["res4_frames"] and fits[0]["fine_frames"] == 2


class _Slow:
    """kernel_guided_read that takes at least `seconds` longer, and calls another public op inside."""

    def __init__(self, seconds):
        self.seconds = seconds

    def __call__(self, *args, **kwargs):
        time.sleep(self.seconds)
        hmmn_ops.local_track(args[0], args[0])  # nested: counted in the outer op only
        return hmmn_ops.kernel_guided_read.__wrapped__(*args, **kwargs)


def test_op_timer_attributes_time_to_the_ops():
    original = hmmn_ops.kernel_guided_read
    model = HMMN(**TINY)
    images, mask = tiny_video(5)
    core = InferenceCore(model, mem_every=5)
    delay = 0.02
    frames = []
    with bench_model.OpTimer("cpu", impls={"kernel_guided_read": _Slow(delay)}) as timer:
        assert hmmn_ops.kernel_guided_read is not original
        for t, image in enumerate(images):
            timer.reset()
            start = time.perf_counter()
            core.step(image, mask if t == 0 else None)
            ms = (time.perf_counter() - start) * 1e3
            frames.append(dict(ms=ms, cpu_ms=1.0, ops=dict(timer.ms), op_cpu_ms=dict(timer.cpu_ms),
                               calls=dict(timer.calls), res4=0, fine=0))
    assert hmmn_ops.kernel_guided_read is original  # restored
    assert frames[0]["calls"] == {}  # frame 0 is the annotation: nothing is read
    for f in frames[1:]:
        assert f["calls"] == dict.fromkeys(MATCHING, 1)
        assert f["ops"]["kernel_guided_read"] >= delay * 1e3
        assert sum(f["ops"].values()) <= f["ms"]
    s = bench_model.summarise(frames, warmup=1)
    assert s["timed_frames"] == 4
    assert delay * 1e3 / s["ms_mean"] <= s["matching_share"] < 1
    assert s["ops"]["kernel_guided_read"]["ms_per_frame"] >= delay * 1e3


def test_op_timer_passes_the_backend():
    seen = []

    def spy(*args, backend="auto", **kwargs):
        seen.append(backend)
        return torch.zeros(1, 1, 1, dtype=torch.int64)

    timer = bench_model.OpTimer("cpu", backend="reference")
    original = hmmn_ops.local_track
    try:
        hmmn_ops.local_track = spy
        with timer:
            hmmn_ops.local_track(torch.zeros(1), torch.zeros(1))
    finally:
        hmmn_ops.local_track = original
    assert seen == ["reference"] and timer.calls == {"local_track": 1}


def test_schedule_is_inference_cores():
    model = HMMN(**TINY)
    images, mask = tiny_video(13)
    core = InferenceCore(model, mem_every=2, fine_mem_every=4)
    for t, image in enumerate(images):
        if t:
            res4, fine = core.memory_frames()[0]
            assert (res4, fine) == (bench_model.schedule(t + 1, 2), bench_model.schedule(t + 1, 4)), t
        core.step(image, mask if t == 0 else None)
    assert bench_model.schedule(13, None) == [0, 11]


def test_longest_video_search():
    calls = []

    def fits(n):
        calls.append(n)
        return n <= 1234

    n, why = bench_model.longest_video(fits, start=8, limit=100_000, resolution=5)
    assert why == "memory" and 1229 <= n <= 1234 and len(calls) < 20
    assert bench_model.longest_video(lambda n: True, 8, 100, 5) == (100, "limit")
    assert bench_model.longest_video(lambda n: False, 8, 100, 5) == (None, "memory")


def test_bench_help(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["bench", "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert "bench_ops.py" in text and "bench_model.py" in text
    assert main(["bench", "model", "--help"]) == 0  # the script's own help
    assert "--max-frames-1080p" in capsys.readouterr().out


def test_bench_bad_flag_and_missing_checkout(tmp_path, monkeypatch, capsys):
    assert main(["bench", "model", "--size", "10x10"]) == 2
    assert "--size" in capsys.readouterr().err
    fake = tmp_path / "site-packages" / "hmmn_ops" / "__init__.py"
    monkeypatch.setattr(hmmn_ops, "__file__", str(fake))
    assert bench.benchmarks_dir() is None
    assert main(["bench", "ops", "--quick"]) == 2
    assert "source checkout" in capsys.readouterr().err
