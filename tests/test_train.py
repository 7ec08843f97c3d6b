"""Training: a few steps end to end, exact resume, DDP over 2 gloo processes, the config and its ramps."""
import csv
import glob
import math
import os
import socket

import pytest
import torch

from hmmn_ops.cli import main
from hmmn_ops.models import load_model
from hmmn_ops.models import HMMN
from hmmn_ops.models.hmmn import Decoder
from hmmn_ops.train import (TrainConfig, Trainee, _batches, _datasets, _ramps, clip_loss, export_weights, learning_rate,
                            load_config, tie_initialisation, train)

pytestmark = pytest.mark.slow

# Tiny shapes: 32x32 crops of 40x48 videos, the tiny model, 2 clips a step, one thread.
TINY = dict(
    size=32, synthetic=dict(height=40, width=48, num_frames=8), batch_size=2, workers=0, threads=1,
    pretrain_steps=3, main_steps=3, steps_per_epoch=2, log_every=1, checkpoint_every=1, warmup_steps=2,
)


def tiny(**changes):
    return TrainConfig(**{**TINY, **changes})


def states_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def log_rows(run):
    with open(os.path.join(run, "log.csv"), newline="") as f:
        # timings differ between runs, everything else must not
        return [{k: v for k, v in row.items() if k not in ("s_per_step", "elapsed_s")} for row in csv.DictReader(f)]


def test_smoke_cli(tmp_path, capsys):
    out = tmp_path / "run"
    sets = [f"--set={k}={v}" for k, v in TINY.items() if k != "synthetic"]
    sets += ["--set=synthetic.height=40", "--set=synthetic.width=48", "--set=synthetic.num_frames=8", "--set=checkpoint_every=2",
             "--set=readout_loss=0"]  # the plain recipe here; the other tests train with the readout loss
    export = tmp_path / "exported" / "w.pt"
    assert main(["train", "--out", str(out), "--quiet", "--export", str(export), *sets]) == 0
    assert "trained 6 steps" in capsys.readouterr().out
    for name in ("config.yaml", "checkpoint.pt", "log.csv", "loss.png", "weights.pt"):
        assert (out / name).is_file(), name
    rows = log_rows(out)
    assert [int(r["step"]) for r in rows] == list(range(6))
    assert [r["stage"] for r in rows] == ["pretrain"] * 3 + ["main"] * 3
    assert all(0 < float(r["loss"]) < 10 and float(r["readout_loss"]) == 0 for r in rows)
    # the run's config is what was asked, and the weights load with it
    assert load_config(out / "config.yaml") == tiny(checkpoint_every=2, readout_loss=0)
    model = load_model(str(export))
    assert model.config == tiny().model_config()
    assert states_equal(model.state_dict(), load_model(str(out / "weights.pt")).state_dict())
    assert (tmp_path / "exported" / "w.json").is_file()
    # training moved the weights away from the seed's initialisation
    torch.manual_seed(0)
    init = HMMN(tiny().model_config()).state_dict()
    assert not torch.equal(init["Decoder.pred2.weight"], model.state_dict()["Decoder.pred2.weight"])
    # an existing run is not overwritten by accident
    assert main(["train", "--out", str(out), "--quiet", *sets]) == 2
    assert "--resume" in capsys.readouterr().err


def test_resume_is_exact(tmp_path):
    cfg = tiny(checkpoint_every=1, fine_readout_loss=0.5)
    whole = train(cfg, str(tmp_path / "whole"), progress=False)
    parts = tmp_path / "parts"
    train(cfg, str(parts), progress=False, stop_at=2)  # mid data epoch, in pretraining
    assert not (parts / "weights.pt").exists()
    # across the stage change, with a loader process this time (`workers` may change on resume)
    train(tiny(checkpoint_every=1, fine_readout_loss=0.5, workers=1), str(parts), resume=True, progress=False, stop_at=4)
    last = train(cfg, str(parts), resume=True, progress=False)
    assert states_equal(whole["model"].state_dict(), last["model"].state_dict())  # bit for bit
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    b = torch.load(parts / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    assert all(states_equal(a[part], b[part]) for part in ("probe", "fine_probes"))
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    assert all(states_equal(a["optimizer"]["state"][i], b["optimizer"]["state"][i]) for i in a["optimizer"]["state"])
    assert log_rows(tmp_path / "whole") == log_rows(parts)


def test_resume_refuses_a_changed_config(tmp_path):
    train(tiny(), str(tmp_path), progress=False, stop_at=1)
    with pytest.raises(ValueError, match=r"differs.*\['lr'\]"):
        train(tiny(lr=5e-4), str(tmp_path), resume=True, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny(), str(tmp_path), progress=False)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    result = train(tiny(pretrain_steps=2, main_steps=1, checkpoint_every=3, log_every=3), out, progress=False)
    torch.save(result["model"].state_dict(), os.path.join(out, f"rank{rank}.pt"))


def test_ddp_two_gloo_processes(tmp_path):
    out = str(tmp_path)
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    # averaged gradients and broadcast buffers: both processes hold the same model ...
    assert states_equal(r0, r1)
    # ... which is the one process 0 saved, and it trained
    assert states_equal(r0, load_model(str(tmp_path / "weights.pt")).state_dict())
    torch.manual_seed(0)
    assert not torch.equal(HMMN(tiny().model_config()).state_dict()["Decoder.pred2.weight"], r0["Decoder.pred2.weight"])
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["step"] == 3


class _FakeDist:
    def __init__(self, rank, world):
        self.rank, self.world, self.device = rank, world, torch.device("cpu")


class _Recorder(torch.utils.data.Dataset):
    """Returns its index and the ramp values it was set to."""

    def __init__(self):
        self.epoch, self.p_hide, self.max_skip, self.samples_per_epoch = 0, 0.0, 0, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.samples_per_epoch

    def __getitem__(self, i):
        return {"index": i, "epoch": self.epoch, "p_hide": self.p_hide, "max_skip": self.max_skip}


def test_batches_split_the_data_across_ranks_and_ramp():
    cfg = tiny(pretrain_steps=4, main_steps=4, steps_per_epoch=2, batch_size=3, hide=(0.0, 0.5), max_skip=(0, 20))

    def run(rank, world, start=0):
        data = {"pretrain": _Recorder(), "main": _Recorder()}
        return [(s, b["epoch"].tolist(), b["index"].tolist(), float(b["p_hide"][0]), int(b["max_skip"][0]))
                for s, b in _batches(cfg, _FakeDist(rank, world), data, start, cfg.total_steps)]

    one, r0, r1 = run(0, 1), run(0, 2), run(1, 2)
    assert [s for s, *_ in one] == list(range(8))
    for (s, e, i0, *ramps0), (_, _, i1, *ramps1) in zip(r0, r1):
        assert not set(i0) & set(i1) and len(i0) == 3  # ranks see different clips of the same epoch
        assert ramps0 == ramps1
    assert [x[1][0] for x in one] == [0, 0, 1, 1, 0, 0, 1, 1]  # epochs restart with the stage
    assert [x[3] for x in one[:4]] == [0.0, 0.0, 0.25, 0.25]  # p_hide moves per epoch
    assert [x[4] for x in one[4:]] == [0, 0, 10, 10]  # so does max_skip
    assert run(0, 1, start=3) == one[3:]  # a resumed run starts mid-epoch on the same clips


def test_ramps_and_learning_rate():
    cfg = tiny(pretrain_steps=10, main_steps=10, steps_per_epoch=5, warmup_steps=0, lr=1.0, lr_final=0.1, max_skip=(0, 20))
    assert _ramps(cfg, 0)[0] == 1.0 and _ramps(cfg, 9)[0] == pytest.approx(0.55)  # 1 -> 0.5 in pretraining
    assert _ramps(cfg, 10)[0] == 0.5 and _ramps(cfg, 15)[0] == pytest.approx(0.25)  # 0.5 -> 0 in main training
    assert _ramps(cfg, 7)[1] == pytest.approx(0.25) and _ramps(cfg, 17)[2] == 10
    assert learning_rate(cfg, 0) == pytest.approx(1.0) and learning_rate(cfg, 10) == pytest.approx(0.55)


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.002\nsize: [64, 80]\nmodel: {backbone: tiny, decoder_dim: 16}\n")
    cfg = load_config(path, ["main_steps=7", "model.decoder_dim=24"])
    assert (cfg.lr, cfg.size, cfg.main_steps, cfg.model["decoder_dim"]) == (0.002, (64, 80), 7, 24)
    with pytest.raises(ValueError, match=r"unknown TrainConfig fields \['lrr'\]"):
        load_config(None, ["lrr=1"])
    with pytest.raises(ValueError, match="checkpoint_every"):
        TrainConfig(log_every=10, checkpoint_every=15)
    with pytest.raises(ValueError, match="HMMNConfig"):
        TrainConfig(model=dict(kernel="gauss"))
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"TrainConfig.prior_dropout: expected in \[0, 1\)"):
            TrainConfig(prior_dropout=bad, model=dict(prev_mask=True))
    with pytest.raises(ValueError, match="TrainConfig.prior_dropout: expected 0 for a model without prev_mask"):
        TrainConfig(prior_dropout=0.2)
    assert TrainConfig(prior_dropout=0.2, model=dict(prev_mask=True)).prior_dropout == 0.2
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"TrainConfig.lose_objects: expected in \[0, 1\)"):
            TrainConfig(lose_objects=bad)
    with pytest.raises(ValueError, match=r"TrainConfig.occlusion_clips: expected in \[0, 1\]"):
        TrainConfig(occlusion_clips=1.5)
    assert _datasets(tiny(occlusion_clips=0.25))[1].occlusions == 0.25


ROOT = os.path.join(os.path.dirname(__file__), "..")
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "hmmn_ops", "configs", "*.yaml"))
                 + glob.glob(os.path.join(ROOT, "configs", "experiments", "*.yaml")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_in_configs_loads_and_holds_out_the_demo(path):
    # a typo in a config only the GPU runs (hmmn_ops/configs/gpu.yaml) would otherwise cost a device call
    from hmmn_ops.commands.demo import DEMO_SEED0

    cfg = load_config(path)
    HMMN(cfg.model_config())
    assert max(cfg.video_seeds[1], cfg.image_seeds[1]) <= DEMO_SEED0  # validation seeds (20000000+) lie above too


def test_packaged_config_names(tmp_path):
    from hmmn_ops.train import packaged_configs

    assert {"release", "finetune", "long_clips", "prev_mask", "prior_res4", "gpu"} <= set(packaged_configs())
    assert load_config("release") == load_config(os.path.join(ROOT, "hmmn_ops", "configs", "release.yaml"))
    assert load_config("release.yaml") == load_config("release")
    (tmp_path / "release").write_text("main_steps: 7\n")  # a file of that name wins over the packaged config
    assert load_config(str(tmp_path / "release")).main_steps == 7
    with pytest.raises(FileNotFoundError, match="not a packaged config name.*release"):
        load_config("no_such_config")


def test_longer_main_training_clips(tmp_path):
    cfg = tiny(clip_frames=5, pretrain_steps=0, main_steps=2)
    pre, main = _datasets(cfg)
    main.samples_per_epoch = pre.samples_per_epoch = 1
    assert main[0]["frames"].shape[0] == 5 and pre[0]["frames"].shape[0] == 3
    result = train(cfg, str(tmp_path), progress=False)  # frames 1..4 segmented, each from all earlier ones
    assert math.isfinite(result["loss"])
    with pytest.raises(ValueError, match="TrainConfig.clip_frames"):
        tiny(clip_frames=1)


def test_tied_initialisation_matches_memory_and_query_keys():
    model = tie_initialisation(HMMN(tiny().model_config())).eval()
    frame = torch.rand(1, 3, 32, 48)
    masks = (torch.rand(1, 2, 32, 48) > 0.5).float()
    with torch.no_grad():
        memory, query = model.encode_memory(frame, masks), model.encode_query(frame)
    for level in ("k4", "k3", "k2"):  # both objects' memory keys are the frame's query keys
        torch.testing.assert_close(getattr(memory, level), getattr(query, level).expand(2, -1, -1, -1))


def _two_clips():
    N, T, K, S = 2, 3, 2, 32
    labels = torch.zeros(N, T, S, S, dtype=torch.int64)
    labels[:, :, 4:20, 4:20] = 1
    labels[0, :, 20:30, 20:30] = 2  # clip 1 has one object: its second channel is absent
    return {"frames": torch.rand(N, T, 3, S, S), "labels": labels,
            "masks": torch.nn.functional.one_hot(labels, K + 1).permute(0, 1, 4, 2, 3).float()}


def test_readout_loss_reads_the_res4_readout():
    torch.manual_seed(0)
    trainee = Trainee(HMMN(tiny().model_config()), readout_loss=0.5)
    batch = _two_clips()
    N, T, K, S = 2, 3, 2, 32
    total, ce, aux = clip_loss(trainee, batch, torch.device("cpu"), torch.autocast("cpu", enabled=False))
    assert total.item() == pytest.approx(ce.item() + aux.item(), rel=1e-6) and aux.item() > 0
    _, probes = trainee(batch["frames"], batch["masks"][:, 0, 1:])
    assert list(probes) == [16] and probes[16].shape == (N * K, T - 1, 1, S // 16, S // 16)
    total.backward()  # the loss reaches the memory keys through the readout
    assert trainee.probe.weight.grad.abs().sum() > 0 and trainee.model.KV_M_r4.Key.weight.grad.abs().sum() > 0
    assert trainee.model.KV_M_r2.Key.weight.grad.abs().sum() > 0  # through the decoder
    assert not hasattr(trainee, "fine_probes")


def test_readout_loss_at_an_input_scale():
    # The probes read a res4 map of the resized frame: the targets must be pooled at that size.
    torch.manual_seed(0)
    trainee = Trainee(HMMN(tiny().model_config().replace(input_scale=2.0)), readout_loss=1.0, fine_readout_loss=1.0)
    total, ce, aux = clip_loss(trainee, _two_clips(), torch.device("cpu"), torch.autocast("cpu", enabled=False))
    assert math.isfinite(total.item()) and aux.item() > 0
    _, probes = trainee(_two_clips()["frames"], _two_clips()["masks"][:, 0, 1:])
    assert probes[16].shape[-2:] == (4, 4) and probes[4].shape[-2:] == (16, 16)  # 32x32 clips seen at 64x64


def test_fine_readout_loss_reads_the_res3_res2_readouts_undropped():
    torch.manual_seed(0)
    trainee = Trainee(HMMN(tiny().model_config()), readout_loss=0.0, fine_readout_loss=2.0)
    trainee.model.readout_dropout = 1.0  # the decoder never sees the fine readouts, the probes do
    batch = _two_clips()
    N, T, K, S = 2, 3, 2, 32
    _, probes = trainee(batch["frames"], batch["masks"][:, 0, 1:])
    assert {stride: p.shape for stride, p in probes.items()} == {
        8: (N * K, T - 1, 1, S // 8, S // 8), 4: (N * K, T - 1, 1, S // 4, S // 4)}
    total, ce, aux = clip_loss(trainee, batch, torch.device("cpu"), torch.autocast("cpu", enabled=False))
    assert aux.item() > 0 and total.item() == pytest.approx(ce.item() + aux.item(), rel=1e-6)
    total.backward()
    model = trainee.model
    for level in ("r3", "r2"):  # only the probes' losses reach the fine memory keys here
        assert getattr(model, f"KV_M_{level}").Key.weight.grad.abs().sum() > 0
    assert all(p.weight.grad.abs().sum() > 0 for p in trainee.fine_probes)
    assert model.Decoder.RF3.convMemory.weight.grad.abs().sum() == 0  # dropped on the way into the decoder


def test_init_starts_from_given_weights(tmp_path):
    first = tmp_path / "first"
    train(tiny(pretrain_steps=2, main_steps=0), str(first), progress=False)
    start = torch.load(first / "checkpoint.pt", weights_only=True)
    # one step at a negligible learning rate: the run's weights are still the ones it started from
    # (with fine readout probes, which the first run had not: they start fresh)
    train(tiny(init=str(first / "checkpoint.pt"), pretrain_steps=0, main_steps=1, lr=1e-12, video_seeds=(500, 600),
               fine_readout_loss=1.0), str(tmp_path / "second"), progress=False)
    second = torch.load(tmp_path / "second" / "checkpoint.pt", weights_only=True)
    assert "fine_probes" not in start and "fine_probes" in second
    for part in ("state_dict", "probe"):
        assert second[part].keys() == start[part].keys()
        for name, value in start[part].items():
            if name.endswith(("running_mean", "running_var", "num_batches_tracked")):
                continue  # batch-norm statistics move in a training step whatever the learning rate
            torch.testing.assert_close(second[part][name], value, rtol=0, atol=1e-6, msg=name)
    other = dict(backbone="tiny", key_dims=(8, 8, 8), value_dims=(32, 16, 8), decoder_dim=32)
    with pytest.raises(ValueError, match="TrainConfig.init"):
        train(tiny(init=str(first / "weights.pt"), model=other), str(tmp_path / "third"), progress=False)
    with pytest.raises(FileNotFoundError, match="TrainConfig.init"):
        train(tiny(init=str(tmp_path / "missing.pt")), str(tmp_path / "fourth"), progress=False)


@pytest.mark.parametrize("res4", [False, True])
def test_prev_mask_run_starts_from_weights_without_the_prior(tmp_path, monkeypatch, res4):
    first = tmp_path / "first"
    train(tiny(pretrain_steps=1, main_steps=0), str(first), progress=False)
    model = {**TrainConfig().model, "prev_mask": True, "prev_mask_res4": res4}
    convs = {"Decoder.RF3.convPrev.weight", "Decoder.RF2.convPrev.weight"} | ({"Decoder.convPrev.weight"} if res4 else set())
    seen = []  # the prior dropout and object losses the model trains with
    decode, forward = Decoder.forward, HMMN.forward
    monkeypatch.setattr(Decoder, "forward", lambda self, *a: seen.append(("prior", self.prior_dropout)) or decode(self, *a))
    monkeypatch.setattr(HMMN, "forward", lambda self, *a: seen.append(("lose", self.lose_objects)) or forward(self, *a))
    train(tiny(init=str(first / "weights.pt"), model=model, pretrain_steps=0, main_steps=1, lr=1e-12, warmup_steps=0,
               prior_lr_scale=10, prior_dropout=0.25 * res4, lose_objects=0.5 * res4, video_seeds=(500, 600)),
          str(tmp_path / "second"), progress=False)
    assert set(seen) == {("prior", 0.25 * res4), ("lose", 0.5 * res4)}
    start = torch.load(first / "weights.pt", weights_only=True)["state_dict"]
    second = torch.load(tmp_path / "second" / "weights.pt", weights_only=True)["state_dict"]
    groups = torch.load(tmp_path / "second" / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [len(g["params"]) for g in groups][1:] == [len(convs)] and groups[1]["lr"] == pytest.approx(10 * groups[0]["lr"])
    assert set(second) - set(start) == convs
    assert all(second[k].abs().max() < 1e-6 for k in set(second) - set(start))  # zero, then one tiny step
    for name, value in start.items():
        if not name.endswith(("running_mean", "running_var", "num_batches_tracked")):
            torch.testing.assert_close(second[name], value, rtol=0, atol=1e-6, msg=name)


def test_export_names_the_earlier_stages_and_demo_checks_their_seeds(tmp_path, capsys):
    import json

    first, second = tmp_path / "first", tmp_path / "second"
    train(tiny(pretrain_steps=1, main_steps=0), str(first), progress=False)
    train(tiny(init=str(first / "checkpoint.pt"), pretrain_steps=0, main_steps=1, video_seeds=(500, 600)), str(second),
          progress=False)
    export_weights(str(second), str(tmp_path / "w.pt"))
    info = json.loads((tmp_path / "w.json").read_text())
    assert info["train"]["video_seeds"] == [500, 600]
    assert [stage["train"]["video_seeds"] for stage in info["init"]] == [list(TrainConfig().video_seeds)]
    assert info["init"][0]["log"]["pretrain"]["steps"] == 1
    # seed 5 is a video of the first stage only: still refused
    assert main(["demo", "--out", str(tmp_path / "demo"), "--weights", str(tmp_path / "w.pt"), "--seed", "5",
                 "--sequences", "1", "--quiet"]) == 2
    assert "overlap the training video_seeds [0, 100000)" in capsys.readouterr().err

