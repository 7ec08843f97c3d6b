"""Training HMMN the way STM / KMN / HMMN do: static-image pretraining, then main training on videos.

    from hmmn_ops.train import TrainConfig, train
    summary = train(TrainConfig(pretrain_steps=2000, main_steps=4000), "runs/mine")

or ``hmmn-vos train --config release --out runs/release`` (``torchrun
--nproc_per_node N -m hmmn_ops.cli train ...`` for N processes). See docs/training.md.

The recipe:

- stage 1 (``pretrain_steps``): 3-frame clips made of one still image by random affine warps
  (``ImageClips`` over ``SyntheticImages``) with Hide-and-Seek, p ramped ``hide`` (0 -> 0.5);
  readout dropout ramped ``pretrain_dropout`` (1 -> 0.5);
- stage 2 (``main_steps``): 3 frames of a video in order (``VideoClips`` over synthetic videos,
  or DAVIS / YouTube-VOS folders), the maximum interval ramped ``max_skip`` (0 -> 25); readout
  dropout ramped ``main_dropout`` (0.5 -> 0);
- loss: pixel-wise cross-entropy on the soft-aggregated logits of frames 1 and 2
  (``HMMN.forward``, where kernel guidance is off, as in the papers; main-training clips have
  ``clip_frames`` frames, 3 as in the papers), plus, for training from
  scratch, auxiliary losses on the memory readouts (``Trainee``: res4 ``readout_loss``, res3 /
  res2 ``fine_readout_loss``); Adam,
  a linear warm-up then a cosine decay over the whole run. ``tied_init`` starts the memory
  side as a copy of the query side (``tie_initialisation``).

Determinism and resuming: the clips of a step are fixed by (seed, stage, epoch, index), the
torch RNG (readout dropout) is re-seeded from (seed, rank, step) before every step, and the
checkpoint holds the model, the readout probes, the optimiser, the AMP scaler and the step. So a resumed run
computes exactly what an uninterrupted one would.

Ramps move once per data epoch (``steps_per_epoch`` steps; data loader workers hold a copy of
the dataset, so its attributes change only when the epoch's loader starts); the readout
dropout, a model attribute, moves every step.

Files in the run folder: ``config.yaml`` (the resolved config), ``checkpoint.pt`` (every
``checkpoint_every`` steps and at the end, written atomically), ``log.csv``, ``loss.png`` and,
at the end, ``weights.pt`` (the model alone, for ``load_model`` / ``hmmn-vos segment``).
"""
import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["TrainConfig", "load_config", "train", "export_weights", "ramp", "tie_initialisation", "Trainee", "clip_loss"]

# Fields that may change when a run is resumed: they do not change what is computed.
OPERATIONAL = ("workers", "checkpoint_every", "log_every", "threads", "device")
LOG_COLUMNS = ("step", "stage", "loss", "readout_loss", "lr", "readout_dropout", "p_hide", "max_skip", "s_per_step", "elapsed_s")


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run depends on. Ranges are (start, end) of a linear ramp over the
    stage, or [start, stop) of seeds."""

    # model: HMMNConfig fields (its kernel is not used in training)
    model: dict = dataclasses.field(default_factory=lambda: dict(
        backbone="tiny", key_dims=(16, 16, 8), value_dims=(32, 16, 8), decoder_dim=32))
    seed: int = 0
    # data
    size: tuple = (96, 96)  # training crop (H, W)
    max_objects: int = 3
    clip_frames: int = 3  # frames of a main-training clip (STM / KMN / HMMN: 3); pretraining clips have 3
    synthetic: dict = dataclasses.field(default_factory=lambda: dict(height=112, width=160, num_frames=30))
    video_seeds: tuple = (0, 100_000)  # synthetic videos of main training
    image_seeds: tuple = (100_000, 200_000)  # synthetic stills of pretraining (frame 0 of those videos)
    davis: str = None  # DAVIS root: main training on its videos instead of synthetic ones
    davis_imset: str = "2017/train.txt"
    youtube: str = None  # YouTube-VOS train root: likewise (with DAVIS, both)
    batch_size: int = 4  # per process
    workers: int = 1  # data loader processes per training process (0: load in the main process)
    steps_per_epoch: int = 100
    # optimisation
    pretrain_steps: int = 2000
    main_steps: int = 4000
    lr: float = 1e-3
    lr_final: float = 0.05  # the cosine ends at lr * lr_final
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # max gradient norm, 0: none
    pretrain_dropout: tuple = (1.0, 0.5)
    main_dropout: tuple = (0.5, 0.0)
    hide: tuple = (0.0, 0.5)
    max_skip: tuple = (0, 25)
    readout_loss: float = 1.0  # weight of the auxiliary res4 readout loss (Trainee), 0: none
    fine_readout_loss: float = 0.0  # weight of each of the res3 / res2 readout losses (Trainee), 0: none
    tied_init: bool = True  # start memory encoder / key heads as copies of the query ones (tie_initialisation)
    init: str = None  # start from these weights (a run's checkpoint.pt / weights.pt, or exported weights) instead
    prior_lr_scale: float = 1.0  # learning-rate multiplier of a prev_mask model's zero-started convPrev
    prior_dropout: float = 0.0  # a prev_mask model's prior is zeroed per sample and frame with this probability
    lose_objects: float = 0.0  # an object's predicted mask is zeroed (memory and prior) with this probability
    occlusion_clips: float = 0.0  # share of main-training clips built around an occlusion (VideoClips.occlusions)
    amp: bool = True  # float16 autocast + gradient scaling, on CUDA only
    # bookkeeping
    checkpoint_every: int = 200
    log_every: int = 10
    device: str = "auto"
    threads: int = 0  # torch threads per process, 0: torch's default

    def __post_init__(self):
        # YAML / JSON give lists: tuples, so that a config read back compares equal
        for f in dataclasses.fields(self):
            value = _tuples(getattr(self, f.name))
            if type(f.default) in (int, float) and isinstance(value, str):
                try:  # YAML reads 1e-4 (no dot) as a string
                    value = type(f.default)(value)
                except ValueError:
                    raise ValueError(f"TrainConfig.{f.name}: expected a number, got {value!r}") from None
            setattr(self, f.name, value)
        if isinstance(self.size, int):
            self.size = (self.size, self.size)
        checks = [
            ("size", len(self.size) == 2 and min(self.size) >= 16, "two ints >= 16"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("clip_frames", self.clip_frames >= 2, ">= 2 (a memory frame and a query)"),
            ("workers", self.workers >= 0, ">= 0"),
            ("steps_per_epoch", self.steps_per_epoch >= 1, ">= 1"),
            ("pretrain_steps", self.pretrain_steps >= 0, ">= 0"),
            ("main_steps", self.main_steps >= 0, ">= 0"),
            ("lr", self.lr > 0, "> 0"),
            ("prior_lr_scale", self.prior_lr_scale > 0, "> 0"),
            ("prior_dropout", 0 <= self.prior_dropout < 1, "in [0, 1)"),
            ("lose_objects", 0 <= self.lose_objects < 1, "in [0, 1)"),
            ("occlusion_clips", 0 <= self.occlusion_clips <= 1, "in [0, 1]"),
            ("checkpoint_every", self.checkpoint_every >= 1, ">= 1"),
            ("log_every", self.log_every >= 1, ">= 1"),
            # a resumed run then starts on a log interval: its log matches an uninterrupted run's
            ("checkpoint_every", self.checkpoint_every % self.log_every == 0, "a multiple of log_every"),
            ("video_seeds", len(self.video_seeds) == 2 and self.video_seeds[0] < self.video_seeds[1], "[start, stop)"),
            ("image_seeds", len(self.image_seeds) == 2 and self.image_seeds[0] < self.image_seeds[1], "[start, stop)"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"TrainConfig.{name}: expected {expected}, got {getattr(self, name)!r}")
        if self.pretrain_steps + self.main_steps < 1:
            raise ValueError("TrainConfig: pretrain_steps + main_steps must be >= 1")
        model = self.model_config()  # fails now, not after the data is built
        if self.prior_dropout > 0 and not model.prev_mask:
            raise ValueError(f"TrainConfig.prior_dropout: expected 0 for a model without prev_mask, got {self.prior_dropout}")

    @property
    def total_steps(self):
        return self.pretrain_steps + self.main_steps

    def model_config(self):
        from .models import HMMNConfig

        return HMMNConfig(**self.model)

    def to_dict(self):
        return _plain(dataclasses.asdict(self))


def _tuples(x):
    """Lists to tuples, recursively (inside dicts too)."""
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return tuple(_tuples(v) for v in x)
    return x


def _plain(x):
    """Tuples to lists, recursively: what YAML and JSON write."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def packaged_configs():
    """Names of the configs shipped in the package (hmmn_ops/configs/NAME.yaml): ``--config NAME``."""
    return sorted(name[:-5] for name in os.listdir(CONFIG_DIR) if name.endswith(".yaml"))


def resolve_config(path):
    """``path`` if it is a file, else the packaged config of that name (``release`` or
    ``release.yaml``), so that ``--config release`` works from an installed wheel as from the repo."""
    if os.path.isfile(path) or os.path.dirname(path):
        return path
    name = path[:-5] if path.endswith(".yaml") else path
    if name in packaged_configs():
        return os.path.join(CONFIG_DIR, name + ".yaml")
    raise FileNotFoundError(f"config {path!r}: no such file, and not a packaged config name "
                            f"(one of {', '.join(packaged_configs())})")


def load_config(path=None, overrides=()):
    """A TrainConfig from a YAML / JSON file (any subset of the fields) or a packaged config name
    (:func:`packaged_configs`), and ``key=value`` overrides (the value is read as YAML: ``lr=3e-4``,
    ``size=[128,128]``, ``model.decoder_dim=48``)."""
    import yaml

    d = {}
    if path is not None:
        path = resolve_config(path)
        with open(path, encoding="utf-8") as f:
            d = yaml.safe_load(f) or {}
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a mapping of TrainConfig fields, got {type(d).__name__}")
    apply_overrides(d, overrides, lambda name: dict(getattr(TrainConfig(), name, None) or {}))
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise ValueError(f"{path or 'overrides'}: unknown TrainConfig fields {unknown}")
    return TrainConfig(**d)


def apply_overrides(d, items, nested=lambda name: {}):
    """Set ``key=value`` items in the dict ``d`` (the value read as YAML; ``a.b=1`` sets
    ``d["a"]["b"]``, starting ``d["a"]`` from ``nested("a")`` if missing). Returns ``d``."""
    import yaml

    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r}: expected key=value")
        *parents, leaf = key.strip().split(".")
        target = d
        for name in parents:
            target = target.setdefault(name, nested(name))
        target[leaf] = yaml.safe_load(value)
    return d


def ramp(values, progress):
    """Linear interpolation from values[0] to values[1] at progress in [0, 1]."""
    start, end = values
    return start + (end - start) * min(max(progress, 0.0), 1.0)


# ---------------------------------------------------------------- processes and devices


class _Dist:
    """This process's place: rank, world size, device; torch.distributed when WORLD_SIZE > 1."""

    def __init__(self, device):
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        local = int(os.environ.get("LOCAL_RANK", 0))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", local)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.owns_group = False
        if self.world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend, rank=self.rank, world_size=self.world)
            self.owns_group = True

    @property
    def main(self):
        return self.rank == 0

    def mean(self, value):
        """The mean of a float over the processes."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.item() / self.world

    def sync_buffers(self, model):
        """Process 0's BatchNorm statistics everywhere: DDP sends them before every forward, so
        after the last one each process holds its own."""
        if self.world > 1:
            for b in model.buffers():
                torch.distributed.broadcast(b, 0)

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def close(self):
        if self.owns_group:
            torch.distributed.destroy_process_group()


# ---------------------------------------------------------------- data


def _datasets(cfg):
    """(pretraining ImageClips, main VideoClips)."""
    from .data import ImageClips, SyntheticConfig, SyntheticImages, SyntheticVideos, VideoClips

    synth = SyntheticConfig(**cfg.synthetic)
    images = SyntheticImages(range(*cfg.image_seeds), synth)
    videos = []
    if cfg.davis:
        from .data import DAVIS

        videos += list(DAVIS(cfg.davis, cfg.davis_imset))
    if cfg.youtube:
        from .data import YouTubeVOS

        videos += list(YouTubeVOS(cfg.youtube))
    if not videos:
        videos = SyntheticVideos(range(*cfg.video_seeds), synth)
    # samples_per_epoch is set per epoch by _batches (it depends on the world size)
    pre = ImageClips(images, cfg.size, max_objects=cfg.max_objects, seed=cfg.seed)
    main = VideoClips(videos, cfg.size, num_frames=cfg.clip_frames, max_objects=cfg.max_objects, seed=cfg.seed + 1,
                      occlusions=cfg.occlusion_clips)
    return pre, main


def _stage(cfg, step):
    """(stage name, first step of the stage, steps in the stage) of a global step."""
    if step < cfg.pretrain_steps:
        return "pretrain", 0, cfg.pretrain_steps
    return "main", cfg.pretrain_steps, cfg.main_steps


def _batches(cfg, dist, datasets, start, stop):
    """Yield (step, batch) for the steps [start, stop). One DataLoader per data epoch, set up with
    that epoch's ramps; the indices of a step depend only on (step, rank)."""
    step = start
    while step < stop:
        name, first, length = _stage(cfg, step)
        dataset = datasets[name]
        epoch = (step - first) // cfg.steps_per_epoch
        epoch_start = first + epoch * cfg.steps_per_epoch
        end = min(epoch_start + cfg.steps_per_epoch, first + length, stop)
        progress = (epoch_start - first) / length
        dataset.samples_per_epoch = cfg.steps_per_epoch * dist.world * cfg.batch_size
        dataset.set_epoch(epoch)
        if name == "pretrain":
            dataset.p_hide = ramp(cfg.hide, progress)
        else:
            dataset.max_skip = int(round(ramp(cfg.max_skip, progress)))
        batches = [[((s - epoch_start) * dist.world + dist.rank) * cfg.batch_size + i for i in range(cfg.batch_size)]
                   for s in range(step, end)]
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=batches, num_workers=cfg.workers, pin_memory=dist.device.type == "cuda",
            # its own generator: creating the loader must not draw from the global RNG
            generator=torch.Generator().manual_seed(cfg.seed))
        for batch in loader:
            yield step, batch
            step += 1


def _ramps(cfg, step):
    """The values in force at a step (for the log): readout dropout, p_hide, max_skip."""
    name, first, length = _stage(cfg, step)
    epoch_start = first + (step - first) // cfg.steps_per_epoch * cfg.steps_per_epoch
    data_progress = (epoch_start - first) / length
    if name == "pretrain":
        return ramp(cfg.pretrain_dropout, (step - first) / length), ramp(cfg.hide, data_progress), ""
    return ramp(cfg.main_dropout, (step - first) / length), "", int(round(ramp(cfg.max_skip, data_progress)))


def learning_rate(cfg, step):
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    cosine = 0.5 * (1 + math.cos(math.pi * step / max(cfg.total_steps, 1)))
    return cfg.lr * warm * (cfg.lr_final + (1 - cfg.lr_final) * cosine)


def _step_seed(cfg, rank, step):
    return int(np.random.SeedSequence([cfg.seed, rank, step]).generate_state(1, np.uint64)[0] >> 1)


def tie_initialisation(model):
    """Make the memory side start as a copy of the query side: Encoder_M's stem and res2..res4
    and the memory key heads take the query ones' weights, and the mask convs (conv1_m,
    conv1_o) start at zero. Then at step 0 a frame's memory keys equal its query keys, so
    matching by appearance works from the start. STM / KMN / HMMN get the same from starting
    both encoders from one ImageNet ResNet; from scratch, two unrelated random encoders must
    first learn to agree, which is slow."""
    with torch.no_grad():
        result = model.Encoder_M.load_state_dict(model.Encoder_Q.state_dict(), strict=False)
        assert not result.unexpected_keys, result.unexpected_keys
        for level in ("r4", "r3", "r2"):
            getattr(model, f"KV_M_{level}").Key.load_state_dict(getattr(model, f"KV_Q_{level}").Key.state_dict())
        model.Encoder_M.conv1_m.weight.zero_()
        model.Encoder_M.conv1_o.weight.zero_()
    return model


def initialise_from(trainee, path):
    """Load the model (and the readout probes the file has) of `path`: a run's
    checkpoint.pt or weights.pt, or exported weights. The architecture must be the config's:
    the fields that change the weights' shapes must agree; matching switches may differ, and a
    ``prev_mask`` model may start from one without the prior, or with it at fewer levels (the
    missing convolutions start at zero)."""
    from .data._io import read_checkpoint
    from .models import load_model

    if not os.path.isfile(path):
        raise FileNotFoundError(f"TrainConfig.init: weights not found: {path}")
    checkpoint = read_checkpoint(path)
    source = load_model(checkpoint)
    state = source.state_dict()
    # Prior convolutions the source lacks start at zero: the model starts as the one it comes from.
    state.update({k: v for k, v in trainee.model.state_dict().items() if _is_prior(k) and k not in state})
    try:
        trainee.model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"TrainConfig.init: {path} holds another architecture than TrainConfig.model "
                         f"({source.config.to_dict()}): {str(e).splitlines()[0]}") from None
    trainee.load_probe_state(checkpoint, required=False)


def _is_prior(name):
    """A parameter of a prev_mask model's prior convolutions (``models.hmmn.PriorConv``)."""
    return ".convPrev." in name


def _param_groups(trainee, cfg):
    """Adam's parameter groups, each with its "lr_scale". A prev_mask model's prior
    convolutions start at zero, one input channel each: at the others' learning rate Adam moves
    them by at most lr a step, so they would weigh little for thousands of steps."""
    prior = [p for name, p in trainee.named_parameters() if _is_prior(name)]
    rest = [p for name, p in trainee.named_parameters() if not _is_prior(name)]
    return [{"params": rest, "lr_scale": 1.0}] + ([{"params": prior, "lr_scale": cfg.prior_lr_scale}] if prior else [])


class Trainee(torch.nn.Module):
    """What the optimiser trains: the HMMN and readout probes, 1x1 convolutions that read each
    object's mask from the model's memory readouts (the decoder's inputs, taken by a hook,
    before the readout dropout): at 1/16 from the res4 readout when `readout_loss` > 0, and at
    1/8 and 1/4 from the res3 and res2 top-k readouts when `fine_readout_loss` > 0.

    Why: from scratch, the decoder first learns to find object-like pixels from the query's own
    features, the readout is ignored, the keys get no gradient and drift until every query reads
    the same memory position (seen here within a few hundred steps: no memory, only objectness).
    A loss that asks the readout itself for the object's mask rewards matching from step 0
    (the readout of the mask is the matched, propagated mask). The fine readouts are ignored by
    the decoder the same way (zeroing them at test time changed J by < 0.01) unless asked for
    the mask too. The probes are not part of the model and are not shipped; inference is unchanged.
    """

    def __init__(self, model, readout_loss=0.0, fine_readout_loss=0.0):
        super().__init__()
        self.model = model
        self.readout_loss = float(readout_loss)
        self.fine_readout_loss = float(fine_readout_loss)
        if self.readout_loss > 0:
            self.probe = torch.nn.Conv2d(model.config.value_dims[0], 1, 1)
        if self.fine_readout_loss > 0:
            self.fine_probes = torch.nn.ModuleList(torch.nn.Conv2d(v, 1, 1) for v in model.config.value_dims[1:])

    def forward(self, frames, masks):
        """(logits (N, T-1, K+1, H, W), probe logits {stride: (N*K, T-1, 1, H/stride, W/stride)}
        for the strides whose loss is on)."""
        if self.readout_loss <= 0 and self.fine_readout_loss <= 0:
            return self.model(frames, masks), {}
        readouts = []
        v4 = self.model.config.value_dims[0]
        hook = self.model.Decoder.register_forward_pre_hook(
            lambda module, args: readouts.append((args[0][:, :v4], args[3], args[4])))
        try:
            logits = self.model(frames, masks)
        finally:
            hook.remove()
        probes = {}
        if self.readout_loss > 0:
            probes[16] = torch.stack([self.probe(r4) for r4, _, _ in readouts], 1)
        if self.fine_readout_loss > 0:
            probe3, probe2 = self.fine_probes
            probes[8] = torch.stack([probe3(r3) for _, r3, _ in readouts], 1)
            probes[4] = torch.stack([probe2(r2) for _, _, r2 in readouts], 1)
        return logits, probes

    def _probes(self):
        """{checkpoint key: module} of the probes in use."""
        return {name: getattr(self, name) for name, weight in (("probe", self.readout_loss),
                                                               ("fine_probes", self.fine_readout_loss)) if weight > 0}

    def probe_state(self):
        """The probes' weights, as checkpoints hold them."""
        return {name: probe.state_dict() for name, probe in self._probes().items()}

    def load_probe_state(self, state, required=True):
        """Load what `probe_state` saved; `required=False` skips probes the state lacks."""
        for name, probe in self._probes().items():
            if name in state or required:
                probe.load_state_dict(state[name])


def clip_loss(trainee, batch, device, autocast):
    """(loss to minimise, its cross-entropy and readout-loss parts, detached) of a batch of clips: frame 0's masks given,
    frames 1.. predicted. The cross-entropy is on the soft-aggregated logits; a readout loss
    (see Trainee) is a binary cross-entropy against each object's mask averaged over the
    readout's cells; the readout-loss part is their weighted sum."""
    from .models.hmmn import pad_to_multiple, resize, scaled_size

    # contiguous: the clips' frames are permuted views, which a batch keeps in the main process but
    # not from a loader process; convolutions on either layout round differently, and `workers`
    # must not change the result
    frames = batch["frames"].to(device, non_blocking=True).contiguous()
    masks = batch["masks"].to(device, non_blocking=True)[:, :, 1:].contiguous()  # objects only
    labels = batch["labels"][:, 1:].to(device, non_blocking=True)
    with autocast:
        logits, probes = trainee(frames, masks[:, 0])
    ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(0, 1))
    if not probes:
        return ce, ce.detach(), torch.zeros(())
    inner = getattr(trainee, "module", trainee)
    N, T1, K = masks.shape[0], masks.shape[1] - 1, masks.shape[2]
    size = scaled_size(masks.shape[-2:], inner.model.config.input_scale)  # the readouts' frame size
    padded = pad_to_multiple(resize(masks[:, 1:], size, "nearest"))[0].flatten(0, 1)  # (N*(T-1), K, H, W)
    valid = masks[:, 0].flatten(2).amax(2).flatten() > 0  # objects present in the clip
    aux = 0
    for stride, probe in probes.items():
        target = F.avg_pool2d(padded, stride)
        target = target.view(N, T1, K, *target.shape[-2:]).transpose(1, 2).reshape(N * K, T1, 1, *target.shape[-2:])
        weight = inner.readout_loss if stride == 16 else inner.fine_readout_loss
        part = F.binary_cross_entropy_with_logits(probe.float()[valid], target[valid]) if valid.any() else probe.sum() * 0
        aux = aux + weight * part
    return ce + aux, ce.detach(), aux.detach()


# ---------------------------------------------------------------- files


def _paths(out):
    return {name: os.path.join(out, file) for name, file in (
        ("config", "config.yaml"), ("checkpoint", "checkpoint.pt"), ("log", "log.csv"),
        ("plot", "loss.png"), ("weights", "weights.pt"))}


def _write_config(path, cfg):
    import yaml

    from .data._io import write_text

    write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _read_run_checkpoint(path, device):
    from .data._io import FileFormatError, read_checkpoint

    state = read_checkpoint(path, map_location=device)
    missing = [k for k in ("state_dict", "optimizer", "scaler", "step") if not isinstance(state, dict) or k not in state]
    if missing:
        raise FileFormatError(f"{path}: not a checkpoint of hmmn-vos train (it lacks {missing}); move it away or use "
                              "another --out")
    return state


def _resumed_config(paths, cfg):
    """The run's saved config; `cfg` may differ from it only in OPERATIONAL fields."""
    saved = load_config(paths["config"])
    changed = [f.name for f in dataclasses.fields(TrainConfig)
               if f.name not in OPERATIONAL and getattr(saved, f.name) != getattr(cfg, f.name)]
    if changed:
        raise ValueError(f"--resume: the config differs from the run's {paths['config']} in {changed}; a resumed run "
                         f"must compute what the original would (only {list(OPERATIONAL)} may change). Use another --out")
    return dataclasses.replace(saved, **{k: getattr(cfg, k) for k in OPERATIONAL})


def _read_log(path, upto):
    """Rows of the CSV log with step < upto (a resumed run rewrites what follows)."""
    if not os.path.isfile(path):
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return [row for row in csv.DictReader(f) if int(row["step"]) < upto]


def _write_log(path, rows):
    from .data._io import write_text

    buf = io.StringIO()
    writer = csv.DictWriter(buf, LOG_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def plot_loss(rows, path, pretrain_steps=None, title="training loss"):
    """PNG of the loss against the step (raw and smoothed), the stage change marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .data._io import atomic_path

    steps = np.array([int(r["step"]) for r in rows])
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    curves = [("loss", "cross-entropy", "C0")]
    if any(float(r.get("readout_loss") or 0) > 0 for r in rows):
        curves.append(("readout_loss", "readout loss", "C1"))
    for column, label, colour in curves:
        loss = np.array([float(r[column]) for r in rows])
        ax.plot(steps, loss, lw=0.6, alpha=0.35, color=colour)
        k = max(len(loss) // 30, 3) if len(loss) >= 10 else 1
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, lw=1.5, color=colour, label=f"{label} (mean of {k})" if k > 1 else label)
    if pretrain_steps and len(steps) and steps[-1] >= pretrain_steps:
        ax.axvline(pretrain_steps, color="k", ls="--", lw=0.8, label="pretrain | main")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _save(paths, trainee, optimizer, scaler, step, world, cfg, rows):
    from .models import save_checkpoint

    save_checkpoint(paths["checkpoint"], trainee.model, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                    step=step, world_size=world, train_config=cfg.to_dict(), **trainee.probe_state())
    _write_log(paths["log"], rows)
    if rows:
        plot_loss(rows, paths["plot"], cfg.pretrain_steps)


def export_weights(run, dest):
    """Write the model of a finished run (RUN/weights.pt) to `dest` (weights only) and a JSON
    next to it (same name, .json): model config, training config, log summary."""
    from .data._io import write_text
    from .models import load_model, save_checkpoint

    paths = _paths(run)
    if not os.path.isfile(paths["weights"]):
        raise FileNotFoundError(f"{paths['weights']}: no finished run in {run} (train it first)")
    model = load_model(paths["weights"])
    cfg = load_config(paths["config"])
    summary = log_summary(_read_log(paths["log"], cfg.total_steps + 1), cfg)
    save_checkpoint(dest, model)
    info = {"model": model.config.to_dict(), "train": cfg.to_dict(), "log": summary,
            "parameters": sum(p.numel() for p in model.parameters())}
    before = _earlier_stages(cfg)
    if before:
        info["init"] = before
    write_text(os.path.splitext(dest)[0] + ".json", json.dumps(_plain(info), indent=2) + "\n")
    return info


def _earlier_stages(cfg):
    """The runs a run was initialised from (TrainConfig.init inside a run folder), newest first:
    [{"run", "train", "log"}, ...], as far as their folders are there."""
    stages, seen = [], set()
    while cfg.init and os.path.dirname(os.path.abspath(cfg.init)) not in seen:
        run = os.path.dirname(os.path.abspath(cfg.init))
        seen.add(run)
        paths = _paths(run)
        if not (os.path.isfile(paths["config"]) and os.path.isfile(paths["log"])):
            break
        cfg = load_config(paths["config"])
        stages.append({"run": os.path.relpath(run), "train": cfg.to_dict(),
                       "log": log_summary(_read_log(paths["log"], cfg.total_steps + 1), cfg)})
    return stages


def log_summary(rows, cfg):
    """Loss at the start and end of each stage, and the time taken."""
    out = {}
    for stage in ("pretrain", "main"):
        losses = [float(r["loss"]) for r in rows if r["stage"] == stage]
        if losses:
            n = max(1, min(10, len(losses) // 5))
            out[stage] = {"steps": getattr(cfg, f"{stage}_steps"), "loss_first": float(np.mean(losses[:n])),
                          "loss_last": float(np.mean(losses[-n:]))}
    if rows:
        out["elapsed_s"] = float(rows[-1]["elapsed_s"])
    return out


# ---------------------------------------------------------------- the loop


def train(cfg, out, resume=False, progress=True, stop_at=None):
    """Train per `cfg` into the folder `out`. `resume`: continue from out/checkpoint.pt if it
    exists (else start). `stop_at`: stop after that step with a checkpoint, as an interruption
    would (a later call with resume=True goes on). Returns {"step", "loss" (mean of the last
    log interval), "steps_run" (by this call), "out", "model"}.

    Under torchrun (WORLD_SIZE > 1) every process calls this; process 0 writes the files.
    """
    from tqdm import tqdm

    from .models import HMMN

    paths = _paths(out)
    dist = _Dist(cfg.device)
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        exists = os.path.isfile(paths["checkpoint"])
        if exists and not resume:
            raise FileExistsError(f"{paths['checkpoint']} exists: pass --resume to continue that run, or another --out")
        if exists:
            cfg = _resumed_config(paths, cfg)
        torch.manual_seed(cfg.seed)  # same initial weights on every process
        model = HMMN(cfg.model_config())
        if cfg.tied_init and not cfg.init:
            tie_initialisation(model)
        trainee = Trainee(model, cfg.readout_loss, cfg.fine_readout_loss)
        if cfg.init and not exists:
            initialise_from(trainee, cfg.init)
        trainee.to(dist.device)
        optimizer = torch.optim.Adam(_param_groups(trainee, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
        use_amp = cfg.amp and dist.device.type == "cuda"
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
        autocast = torch.autocast("cuda", dtype=torch.float16) if use_amp else contextlib.nullcontext()
        step, rows, elapsed0 = 0, [], 0.0
        if exists:
            state = _read_run_checkpoint(paths["checkpoint"], dist.device)
            model.load_state_dict(state["state_dict"])
            trainee.load_probe_state(state)
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            step = int(state["step"])
            if int(state.get("world_size", 1)) != dist.world:
                raise ValueError(f"--resume: {paths['checkpoint']} was written by {state.get('world_size', 1)} "
                                 f"process(es), this run has {dist.world}; the clips of a step depend on it")
            rows = _read_log(paths["log"], step)
            elapsed0 = float(rows[-1]["elapsed_s"]) if rows else 0.0
        elif dist.main:
            os.makedirs(out, exist_ok=True)
            _write_config(paths["config"], cfg)
        ddp = trainee
        if dist.world > 1:
            ddp = torch.nn.parallel.DistributedDataParallel(
                trainee, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
        datasets = dict(zip(("pretrain", "main"), _datasets(cfg)))
        model.train()
        model.prior_dropout, model.lose_objects = cfg.prior_dropout, cfg.lose_objects  # constant: set once
        bar = tqdm(total=cfg.total_steps, initial=step, disable=not (progress and dist.main), unit="step",
                   file=sys.stderr, dynamic_ncols=True)
        t0, window, window_t = time.time(), [], time.time()
        last_loss = math.nan
        end = cfg.total_steps if stop_at is None else min(int(stop_at), cfg.total_steps)
        first_step = step
        for step, batch in _batches(cfg, dist, datasets, step, end):
            torch.manual_seed(_step_seed(cfg, dist.rank, step))  # readout dropout, whatever came before
            dropout, p_hide, max_skip = _ramps(cfg, step)
            model.readout_dropout = dropout
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, step) * group.get("lr_scale", 1.0)  # none in older checkpoints
            loss, ce, aux = clip_loss(ddp, batch, dist.device, autocast)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(trainee.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            window.append((ce.item(), aux.item()))
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.total_steps:
                last_loss, last_aux = (dist.mean(float(v)) for v in np.mean(window, 0))
                now = time.time()
                rows.append({"step": step, "stage": _stage(cfg, step)[0], "loss": f"{last_loss:.5f}",
                             "readout_loss": f"{last_aux:.5f}",
                             "lr": f"{learning_rate(cfg, step):.3g}", "readout_dropout": f"{dropout:.3f}",
                             "p_hide": p_hide if p_hide == "" else f"{p_hide:.3f}", "max_skip": max_skip,
                             "s_per_step": f"{(now - window_t) / len(window):.3f}",
                             "elapsed_s": f"{elapsed0 + now - t0:.1f}"})
                window, window_t = [], now
                bar.set_postfix(loss=f"{last_loss:.4f}", stage=rows[-1]["stage"])
            bar.update()
            if done % cfg.checkpoint_every == 0 or done == end:
                if dist.main:
                    _save(paths, trainee, optimizer, scaler, done, dist.world, cfg, rows)
                dist.barrier()
        bar.close()
        dist.sync_buffers(model)
        if dist.main and end == cfg.total_steps:
            from .models import save_checkpoint

            save_checkpoint(paths["weights"], model)
        dist.barrier()
        return {"step": end, "steps_run": max(0, end - first_step), "loss": last_loss, "out": out, "model": model}
    finally:
        dist.close()
