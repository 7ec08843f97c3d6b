"""HMMN (Seong et al., ICCV 2021), thin and readable, with every memory read in hmmn_ops.

The released architecture when built with defaults (layer names and shapes of the released
checkpoint, ``HMMN.from_official`` loads it):

- two ResNet encoders up to res4 (1/16). The memory encoder adds
  ``conv1(frame) + conv1_m(mask) + conv1_o(others)`` before bn1; frames enter in [0, 1] and
  are normalised inside with the ImageNet mean / std;
- 3x3 key / value heads: res4 key 128 / value 512 (memory and query), res3 key 128 / memory
  value 256, res2 key 64 / memory value 128 (query: key only);
- res4: ``kernel_guided_read`` (Gaussian kernel from the ``Tracker``, KMN's ``global_track``
  or none) that also returns the top-32 memory positions over the first and previous memory
  frames; res3 / res2: ``topk_guided_read`` with those 32 (r = 2) and the first 8 (r = 4);
- decoder: convFM, ResBlock, two Refine stages (res3, res2 skips plus the res3 / res2
  readouts), a 2-class head at 1/4 upsampled x4;
- objects are the batch; their probabilities are merged by soft aggregation.

Inputs of ``encode_memory`` / ``encode_query`` / ``segment`` must be padded to a multiple
of 16 (``pad_to_multiple``); ``forward`` (training on clips) and ``InferenceCore`` pad and
crop for you.
"""
import collections
import dataclasses
import os

import torch
import torch.nn.functional as F
from torch import nn

import hmmn_ops

from .resnet import ResNet, backbone_config, init_weights

__all__ = ["HMMN", "HMMNConfig", "Memory", "Query", "expand_query", "KERNELS", "MEMORY_MASKS", "pad_to_multiple", "unpad",
           "soft_aggregate", "stack_memory", "scaled_size", "resize", "save_checkpoint", "load_model", "CHECKPOINT_FORMAT"]

KERNELS = ("none", "kmn", "hmmn")
MEMORY_MASKS = ("soft", "hard")
CHECKPOINT_FORMAT = "hmmn_ops.HMMN/1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Per-frame features. Memory: (B, C, h, w) per frame, or (B, C, T, h, w) once stacked into a bank.
Memory = collections.namedtuple("Memory", "k4 v4 k3 v3 k2 v2")
# Query: keys / values of one frame (N rows, one per frame) and its res3 / res2 skips.
Query = collections.namedtuple("Query", "k4 v4 k3 k2 r3 r2")


@dataclasses.dataclass(frozen=True)
class HMMNConfig:
    """Everything that defines an HMMN; ``to_dict`` / ``from_dict`` for checkpoints.

    Defaults are the released model. A small CPU variant, for instance::

        HMMNConfig(backbone="tiny", key_dims=(16, 16, 8), value_dims=(32, 16, 8), decoder_dim=32)

    backbone: a name of ``resnet.BACKBONES``, a dict or a ``BackboneConfig`` with 3 stages.
    key_dims / value_dims: (res4, res3, res2) key and memory value channels.
    kernel: "hmmn" (Tracker), "kmn" (global_track, one sigma ``kmn_sigma``) or "none" (STM).
    topk_read: res3 / res2 read the ``topk`` (r = 2) and ``fine_topk`` (r = 4) best res4
        positions of the first and previous frames (HMMN); False: dense reads at res3 / res2.
    window, sigma_init, sigma_factor: the Tracker's (HMMN 4.1: 7, 3, 0.5).
    memory_masks: what ``InferenceCore`` memorises of a segmented frame: "soft" its object
        probabilities (the released code), "hard" their argmax as one-hot masks (the shipped
        weights': validation J +0.01 to +0.04, docs/training.md). Like ``kernel``, inference only.
    input_scale: frames are resized by this factor (bilinear) before the encoders, given masks
        likewise (nearest), and logits back to the frame's size after the decoder; everything in
        between (memory, reads, tracking) runs at the scaled size. 1 is the released model; 2
        gives small objects 4x the res4 cells (tried for the shipped weights: docs/training.md).
    prev_mask: the decoder also sees each object's mask on the previous frame (RGMP's prior,
        not in the released model), pooled to 1/8 and 1/4 and added at the res3 / res2
        refinements through zero-initialised 3x3 convolutions (``convPrev``), so weights
        trained without it load and behave as before. Memory matches by appearance; the prior
        says where the object just was, which look-alikes touching it do not share.
    prev_mask_res4: with ``prev_mask``, the prior also enters at 1/16, added to convFM's output
        (``Decoder.convPrev``, zero-initialised too), where the decoder first decides which
        res4 cells are the object.
    """

    backbone: object = "resnet50"
    key_dims: tuple = (128, 128, 64)
    value_dims: tuple = (512, 256, 128)
    decoder_dim: int = 256
    kernel: str = "hmmn"
    topk_read: bool = True
    topk: int = 32
    fine_topk: int = 8
    window: int = 7
    sigma_init: float = 3.0
    sigma_factor: float = 0.5
    kmn_sigma: float = 7.0
    memory_masks: str = "soft"
    input_scale: float = 1.0
    prev_mask: bool = False
    prev_mask_res4: bool = False

    def __post_init__(self):
        bb = backbone_config(self.backbone)
        if len(bb.layers) != 3:
            raise ValueError(f"HMMNConfig.backbone: the encoders use 3 stages (res2, res3, res4), got layers={bb.layers}")
        object.__setattr__(self, "backbone", bb)
        for name in ("key_dims", "value_dims"):
            dims = tuple(int(d) for d in getattr(self, name))
            if len(dims) != 3 or min(dims) < 1:
                raise ValueError(f"HMMNConfig.{name}: expected 3 positive ints (res4, res3, res2), got {getattr(self, name)!r}")
            object.__setattr__(self, name, dims)
        if self.kernel not in KERNELS:
            raise ValueError(f"HMMNConfig.kernel: expected one of {KERNELS}, got {self.kernel!r}")
        if self.memory_masks not in MEMORY_MASKS:
            raise ValueError(f"HMMNConfig.memory_masks: expected one of {MEMORY_MASKS}, got {self.memory_masks!r}")
        if isinstance(self.input_scale, bool) or not isinstance(self.input_scale, (int, float)) or not 0 < self.input_scale <= 8:
            raise ValueError(f"HMMNConfig.input_scale: expected a number in (0, 8], got {self.input_scale!r}")
        object.__setattr__(self, "input_scale", float(self.input_scale))
        for name in ("prev_mask", "prev_mask_res4"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"HMMNConfig.{name}: expected a bool, got {getattr(self, name)!r}")
        if self.prev_mask_res4 and not self.prev_mask:
            raise ValueError("HMMNConfig.prev_mask_res4: expected False without prev_mask (it adds the prior at one more level)")
        if not 1 <= self.fine_topk <= self.topk:
            raise ValueError(f"HMMNConfig: expected 1 <= fine_topk <= topk, got fine_topk={self.fine_topk}, topk={self.topk}")
        if self.decoder_dim < 1 or self.window < 1 or self.window % 2 == 0 or not self.kmn_sigma > 0:
            raise ValueError(f"HMMNConfig: decoder_dim >= 1, odd window >= 1 and kmn_sigma > 0 expected, got "
                             f"{self.decoder_dim}, {self.window}, {self.kmn_sigma}")

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["backbone"] = dataclasses.asdict(self.backbone)
        return d

    @classmethod
    def from_dict(cls, d):
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"HMMNConfig.from_dict: unknown fields {unknown}")
        return cls(**d)


# ---------------------------------------------------------------- padding and aggregation


def pad_to_multiple(x, multiple=16):
    """Zero-pad the last two dims of `x` up to a multiple, centred (the extra pixel, if odd,
    goes right / bottom, as the released code). Returns (padded, pad = (left, right, top, bottom))."""
    h, w = x.shape[-2:]
    dh, dw = -h % multiple, -w % multiple
    pad = (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2)
    return (F.pad(x, pad) if dh or dw else x), pad


def unpad(x, pad):
    """Crop what `pad_to_multiple` added."""
    left, right, top, bottom = pad
    h, w = x.shape[-2:]
    return x[..., top:h - bottom, left:w - right]


def scaled_size(size, scale):
    """(H, W) resized by ``scale`` (rounded, at least 1 pixel)."""
    return tuple(max(1, round(n * scale)) for n in size)


def resize(x, size, mode="bilinear"):
    """Resize the last two dims of ``x`` (any leading dims) to ``size``; a no-op at that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    flat = x.reshape(-1, 1, *x.shape[-2:]) if x.dim() != 4 else x
    if not flat.is_floating_point():  # label maps (nearest): exact as float for ids < 2**24
        flat = flat.float()
    out = F.interpolate(flat, size=size, mode=mode, **({"align_corners": False} if mode == "bilinear" else {}))
    return out.reshape(*x.shape[:-2], *size).to(x.dtype)


def soft_aggregate(probs, valid=None):
    """Merge independent object probabilities (N, K, H, W) into logits (N, K+1, H, W).

    Background = prod(1 - p); every channel clamped to [1e-7, 1 - 1e-7]; logit = log(e / (1 - e)).
    `valid` (N, K) bool zeroes padded objects' probabilities first. softmax(logits, 1) gives
    the merged probabilities.
    """
    if valid is not None:
        probs = probs * valid[:, :, None, None].to(probs.dtype)
    bg = torch.prod(1 - probs, dim=1, keepdim=True)
    e = torch.cat([bg, probs], 1).clamp(1e-7, 1 - 1e-7)
    return torch.log(e / (1 - e))


# ---------------------------------------------------------------- layers


class Encoder(nn.Module):
    """ResNet stem + res2 .. res4 (torchvision layer1 .. layer3) of its own ResNet.

    ``with_mask``: the memory encoder, which adds conv1_m(mask) + conv1_o(others) to conv1(frame).
    """

    def __init__(self, backbone, with_mask):
        super().__init__()
        resnet = ResNet(backbone)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.with_mask = with_mask
        if with_mask:
            w = resnet.config.width
            self.conv1_m = nn.Conv2d(1, w, 7, stride=2, padding=3, bias=False)
            self.conv1_o = nn.Conv2d(1, w, 7, stride=2, padding=3, bias=False)
            init_weights(self)
        # The released names: res2..res4 are torchvision's layer1..layer3.
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.res2, self.res3, self.res4 = resnet.layer1, resnet.layer2, resnet.layer3

    def forward(self, frame, mask=None, others=None):
        """frame (N, 3, H, W) in [0, 1]; mask, others (N, K, H, W) -> r4, r3, r2 with N*K rows
        (memory encoder: conv1(frame) is computed once per frame and shared by its K objects)."""
        x = self.conv1((frame - self.mean) / self.std)
        if self.with_mask:
            K = mask.shape[1]
            x = x.repeat_interleave(K, 0) + self.conv1_m(mask.reshape(-1, 1, *mask.shape[2:])) \
                + self.conv1_o(others.reshape(-1, 1, *others.shape[2:]))
        x = self.maxpool(self.relu(self.bn1(x)))
        r2 = self.res2(x)
        r3 = self.res3(r2)
        r4 = self.res4(r3)
        return r4, r3, r2


class KeyValue(nn.Module):
    def __init__(self, cin, key_dim, value_dim=None):
        super().__init__()
        self.Key = nn.Conv2d(cin, key_dim, 3, padding=1)
        if value_dim is not None:
            self.Value = nn.Conv2d(cin, value_dim, 3, padding=1)

    def forward(self, x):
        return self.Key(x), (self.Value(x) if hasattr(self, "Value") else None)


class ResBlock(nn.Module):
    """x + conv2(relu(conv1(relu(x)))), 3x3 convs."""

    def __init__(self, dim):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class PriorConv(nn.Conv2d):
    """The previous-mask prior of one decoder stage: the mask average-pooled to the stage's size,
    through a 3x3 convolution that starts at zero, so a stage given it computes what it did
    without it until training moves the weights."""

    def __init__(self, dim):
        super().__init__(1, dim, 3, padding=1, bias=False)
        nn.init.zeros_(self.weight)

    def forward(self, prev, size):
        return super().forward(F.adaptive_avg_pool2d(prev, size))


class Refine(nn.Module):
    """One decoder stage: the skip and the memory readout of this level, plus the upsampled
    coarser stage (and, with ``prev_mask``, the object's previous mask at this level)."""

    def __init__(self, skip_dim, readout_dim, dim, prev_mask=False):
        super().__init__()
        self.convFS = nn.Conv2d(skip_dim, dim, 3, padding=1)
        self.convMemory = nn.Conv2d(readout_dim, dim, 3, padding=1, bias=False)
        self.convPrev = PriorConv(dim) if prev_mask else None
        self.ResFS = ResBlock(dim)
        self.ResMM = ResBlock(dim)

    def forward(self, skip, coarse, readout, prev=None):
        x = self.convFS(skip) + self.convMemory(readout)
        if prev is not None:
            x = x + self.convPrev(prev, skip.shape[-2:])
        s = self.ResFS(x)
        m = s + F.interpolate(coarse, scale_factor=2, mode="bilinear", align_corners=False)
        return self.ResMM(m)


class Decoder(nn.Module):
    """convFM + ResBlock at 1/16, then the res3 and res2 refinements, then a 2-class head.

    ``readout_dropout``: in training, every sample's whole res3 and res2 readout is zeroed with
    this probability on the way in (so whatever reads the decoder's inputs, as the training's
    readout probes do, sees them undropped). ``prior_dropout``: likewise every sample's whole
    previous mask (at every level at once)."""

    def __init__(self, in_dim, skip_dims, readout_dims, dim, prev_mask=False, prev_mask_res4=False):
        super().__init__()
        self.readout_dropout = 0.0
        self.prior_dropout = 0.0
        self.convFM = nn.Conv2d(in_dim, dim, 3, padding=1)
        self.convPrev = PriorConv(dim) if prev_mask_res4 else None
        self.ResMM = ResBlock(dim)
        self.RF3 = Refine(skip_dims[0], readout_dims[0], dim, prev_mask)
        self.RF2 = Refine(skip_dims[1], readout_dims[1], dim, prev_mask)
        self.pred2 = nn.Conv2d(dim, 2, 3, padding=1)

    def forward(self, m4, r3, r2, read3, read2, prev=None):
        """prev: None, or (B, 1, H, W) the objects' previous masks at the frame's (padded) size."""
        if self.training and self.readout_dropout > 0:
            read3, read2 = (_drop_whole(r, self.readout_dropout) for r in (read3, read2))
        if self.training and self.prior_dropout > 0 and prev is not None:
            prev = _drop_whole(prev, self.prior_dropout)
        m = self.convFM(m4)
        if prev is not None and self.convPrev is not None:
            m = m + self.convPrev(prev, m4.shape[-2:])
        m = self.ResMM(m)
        m = self.RF3(r3, m, read3, prev)
        m = self.RF2(r2, m, read2, prev)
        p = self.pred2(F.relu(m))  # 1/4
        return F.interpolate(p, scale_factor=4, mode="bilinear", align_corners=False)


# ---------------------------------------------------------------- the model


class HMMN(nn.Module):
    """Hierarchical Memory Matching Network. ``HMMN()`` is the released architecture;
    ``HMMN(config)`` or ``HMMN(**fields)`` any ``HMMNConfig``.

    ``readout_dropout`` (attribute, default 0): during training, every sample's whole res3
    and res2 readout is zeroed with this probability as it enters the decoder (independently
    per readout, no rescaling, so the decoder sees the same scale as at test time). Change it
    between steps to schedule it.

    ``prior_dropout`` (attribute, default 0; ``prev_mask`` models): during training, every
    sample's whole previous mask is zeroed with this probability as it enters the decoder, so
    the model also learns to find an object from memory alone. At test time an object the
    previous frame lost (an occlusion, a twin) has an empty prior; a model that never saw one
    in training marks nothing where the prior is empty, and never finds the object again.

    ``lose_objects`` (attribute, default 0): during training, every object's predicted mask
    of a segmented frame is zeroed with this probability before it is memorised and passed
    on as the next frame's prior, as if the model had lost the object there: the next frames
    must find it again from the earlier ones, as at test time after a loss.
    """

    def __init__(self, config=None, **fields):
        super().__init__()
        if config is None:
            config = HMMNConfig(**fields)
        elif fields:
            config = config.replace(**fields)
        self.config = config
        bb, (k4, k3, k2), (v4, v3, v2) = config.backbone, config.key_dims, config.value_dims
        c2, c3, c4 = (bb.channels(s) for s in (1, 2, 3))
        self.Encoder_M = Encoder(bb, with_mask=True)
        self.Encoder_Q = Encoder(bb, with_mask=False)
        self.KV_M_r4 = KeyValue(c4, k4, v4)
        self.KV_Q_r4 = KeyValue(c4, k4, v4)
        self.KV_M_r3 = KeyValue(c3, k3, v3)
        self.KV_Q_r3 = KeyValue(c3, k3)
        self.KV_M_r2 = KeyValue(c2, k2, v2)
        self.KV_Q_r2 = KeyValue(c2, k2)
        self.Decoder = Decoder(2 * v4, (c3, c2), (v3, v2), config.decoder_dim, config.prev_mask,
                               config.prev_mask_res4)
        self.lose_objects = 0.0

    @property
    def readout_dropout(self):
        return self.Decoder.readout_dropout

    @readout_dropout.setter
    def readout_dropout(self, p):
        self.Decoder.readout_dropout = float(p)

    @property
    def prior_dropout(self):
        return self.Decoder.prior_dropout

    @prior_dropout.setter
    def prior_dropout(self, p):
        self.Decoder.prior_dropout = float(p)

    def extra_repr(self):
        return f"config={self.config}"

    # ---- encoders

    def encode_memory(self, frame, masks):
        """Memory features of a frame for each of its objects.

        frame (N, 3, H, W) in [0, 1], H and W multiples of 16; masks (N, K, H, W) object
        probabilities. "Others" of an object = clamp(sum of the other objects, 0, 1).
        Returns ``Memory`` of (N*K, C, h, w) tensors, objects of a frame contiguous.
        """
        _check_frame("frame", frame)
        if masks.dim() != 4 or masks.shape[0] != frame.shape[0] or masks.shape[2:] != frame.shape[2:]:
            raise ValueError(f"masks: expected (N, K, H, W) = ({frame.shape[0]}, K, {frame.shape[2]}, {frame.shape[3]}) "
                             f"to match frame {tuple(frame.shape)}, got {tuple(masks.shape)}")
        masks = masks.to(frame.dtype)
        others = (masks.sum(1, keepdim=True) - masks).clamp(0, 1)
        r4, r3, r2 = self.Encoder_M(frame, masks, others)
        k4, v4 = self.KV_M_r4(r4)
        k3, v3 = self.KV_M_r3(r3)
        k2, v2 = self.KV_M_r2(r2)
        return Memory(k4, v4, k3, v3, k2, v2)

    def encode_query(self, frame):
        """Query features of frames (N, 3, H, W) in [0, 1], H and W multiples of 16."""
        _check_frame("frame", frame)
        r4, r3, r2 = self.Encoder_Q(frame)
        k4, v4 = self.KV_Q_r4(r4)
        k3, _ = self.KV_Q_r3(r3)
        k2, _ = self.KV_Q_r2(r2)
        return Query(k4, v4, k3, k2, r3, r2)

    # ---- matching

    def kmn_centers(self, query_key, memory_key):
        """KMN's Gaussian: centres = memory-to-query argmax (global_track), one sigma."""
        centers = hmmn_ops.global_track(memory_key, query_key)
        return centers, self.config.kmn_sigma

    def read(self, query, memory, centers=None, sigma=None, fine_frames=None):
        """The three memory reads of HMMN.

        query: ``Query`` whose rows match the memory's (expand a frame's query over its objects).
        memory: ``Memory`` of stacked banks (B, C, T, h, w); res4 holds T frames, res3 / res2 hold
            the frames listed by ``fine_frames`` (positions in the res4 bank, in bank order;
            default: first and previous, or the first alone while T == 1).
        centers, sigma: the res4 Gaussian (``kernel_guided_read``), or None for a plain read.
        Returns (res4 input of the decoder (B, 2*V4, h4, w4), res3 readout, res2 readout).
        """
        T = memory.k4.shape[2]
        if fine_frames is None:
            fine_frames = (0, T - 1) if T > 1 else (0,)
        fine_frames = tuple(int(f) for f in fine_frames)
        if memory.k3.shape[2] != len(fine_frames) or memory.k2.shape[2] != len(fine_frames):
            raise ValueError(f"memory: the res3/res2 banks must hold the {len(fine_frames)} frames of fine_frames="
                             f"{fine_frames}, got T={memory.k3.shape[2]} (res3) and T={memory.k2.shape[2]} (res2)")
        cfg = self.config
        if cfg.topk_read:
            h, w = memory.k4.shape[-2:]
            k = min(cfg.topk, len(fine_frames) * h * w)  # tiny frames have fewer positions than 32
            r4, idx = hmmn_ops.kernel_guided_read(query.k4, memory.k4, memory.v4, centers, sigma,
                                                  topk=k, topk_frames=fine_frames)
            # The indices point into the concatenation of the fine_frames, which is exactly the
            # res3/res2 bank; res2 takes the best fine_topk of the same sorted list.
            r3 = hmmn_ops.topk_guided_read(query.k3, memory.k3, memory.v3, idx)
            r2 = hmmn_ops.topk_guided_read(query.k2, memory.k2, memory.v2, idx[..., :min(cfg.fine_topk, k)])
        else:
            r4 = hmmn_ops.kernel_guided_read(query.k4, memory.k4, memory.v4, centers, sigma)
            r3 = hmmn_ops.kernel_guided_read(query.k3, memory.k3, memory.v3)
            r2 = hmmn_ops.kernel_guided_read(query.k2, memory.k2, memory.v2)
        return torch.cat([r4, query.v4], 1), r3, r2

    def segment(self, query, memory, centers=None, sigma=None, fine_frames=None, prev=None):
        """Object probabilities (B, H, W) of the query frame (padded size), one row per memory row.

        prev: each row's object probabilities on the previous frame (B, H, W), padded like the
        query frame; required by ``config.prev_mask`` models, refused by the others.
        """
        if self.config.prev_mask:
            shape = (query.k4.shape[0], query.r2.shape[-2] * 4, query.r2.shape[-1] * 4)
            if prev is None or tuple(prev.shape) != shape:
                raise ValueError(f"prev: expected the objects' previous masks (B, H, W) = {shape} (the model has "
                                 f"prev_mask=True), got {None if prev is None else tuple(prev.shape)}")
            prev = prev[:, None].to(query.r2.dtype)
        elif prev is not None:
            raise ValueError(f"prev: expected None (the model has prev_mask=False), got a tensor {tuple(prev.shape)}")
        m4, read3, read2 = self.read(query, memory, centers, sigma, fine_frames)
        logits = self.Decoder(m4, query.r3, query.r2, read3, read2, prev)
        return F.softmax(logits, dim=1)[:, 1]

    # ---- training

    def forward(self, frames, masks):
        """Train on clips the way STM / HMMN do (kernel guidance off).

        frames (N, T, 3, H, W) in [0, 1], T >= 2; masks (N, K, H, W): frame 0's object
        probabilities (an all-zero channel is an absent object, for clips with fewer objects).
        Frame 0 is memorised with its mask, frame 1 segmented, memorised with its predicted soft
        mask, frame 2 segmented from frames 0 and 1, and so on (res4 reads every earlier frame,
        res3 / res2 the first and previous; with ``prev_mask`` the decoder also sees frame t-1's
        mask, given or predicted). Returns logits (N, T-1, K+1, H, W) of frames 1..T-1
        (soft aggregation; channel 0 = background) for a cross-entropy against the labels.
        """
        if frames.dim() != 5 or frames.shape[1] < 2 or frames.shape[2] != 3:
            raise ValueError(f"frames: expected (N, T >= 2, 3, H, W), got {tuple(frames.shape)}")
        N, T, _, H, W = frames.shape
        if masks.dim() != 4 or masks.shape[0] != N or masks.shape[2:] != (H, W) or masks.shape[1] < 1:
            raise ValueError(f"masks: expected (N, K, H, W) = ({N}, K >= 1, {H}, {W}), got {tuple(masks.shape)}")
        K = masks.shape[1]
        valid = masks.flatten(2).amax(2) > 0  # (N, K)
        size = scaled_size((H, W), self.config.input_scale)
        frames = resize(frames, size)
        frames, pad = pad_to_multiple(frames)
        probs, _ = pad_to_multiple(resize(masks.to(frames.dtype), size, "nearest"))
        bank, out = [], []
        for t in range(1, T):
            bank.append(self.encode_memory(frames[:, t - 1], probs))
            fine = (0, t - 1) if t > 1 else (0,)
            prev = probs.reshape(N * K, *probs.shape[2:]) if self.config.prev_mask else None
            p = self.segment(expand_query(self.encode_query(frames[:, t]), K), stack_memory(bank, fine), fine_frames=fine,
                             prev=prev)
            logits = soft_aggregate(p.view(N, K, *p.shape[1:]), valid)
            out.append(resize(unpad(logits, pad), (H, W)))
            probs = F.softmax(logits, dim=1)[:, 1:]
            if self.training and self.lose_objects > 0:  # as if the model had lost them: find them again
                probs = _drop_whole(probs.flatten(0, 1)[:, None], self.lose_objects).view_as(probs)
        return torch.stack(out, 1)

    # ---- weights

    @classmethod
    def from_official(cls, checkpoint, map_location="cpu", **fields):
        """Load the released checkpoint (``HMMN_weights.pth``: names with or without the
        ``module.`` prefix) strictly. ``fields`` may change the matching (kernel, topk_read,
        ...), not the shapes. Raises ValueError listing missing, unexpected and mis-shaped names."""
        owned = isinstance(checkpoint, (str, os.PathLike))
        state = _strip_prefix(_state_dict(checkpoint, map_location), "module.")
        return _build_loaded(HMMNConfig(**fields), state, "HMMN.from_official", copy=not owned)

    def load_backbone(self, checkpoint, map_location="cpu"):
        """Initialise both encoders from a torchvision ResNet state dict (conv1, bn1, layer1..3;
        layer4 and fc are ignored; conv1_m / conv1_o keep their initialisation)."""
        state = _strip_prefix(_state_dict(checkpoint, map_location), "module.")
        rename = {"layer1.": "res2.", "layer2.": "res3.", "layer3.": "res4."}
        mapped = {}
        for name, tensor in state.items():
            if name.startswith(("layer4.", "fc.")):
                continue
            for old, new in rename.items():
                if name.startswith(old):
                    name = new + name[len(old):]
            mapped[name] = tensor
        for encoder in (self.Encoder_M, self.Encoder_Q):
            skip = ("mean", "std", "conv1_m.", "conv1_o.")
            load_strict(encoder, mapped, what="HMMN.load_backbone", ignore_missing=skip)
        return self


def _check_frame(name, frame):
    if not isinstance(frame, torch.Tensor) or frame.dim() != 4 or frame.shape[1] != 3:
        raise ValueError(f"{name}: expected a tensor (N, 3, H, W), got {getattr(frame, 'shape', type(frame).__name__)}")
    if frame.shape[2] % 16 or frame.shape[3] % 16:
        raise ValueError(f"{name}: H and W must be multiples of 16 (use pad_to_multiple), got {tuple(frame.shape)}")


def expand_query(query, K):
    """Query features of N frames repeated for their K objects (rows frame-major, like the memory)."""
    return Query(*(x.expand(K, *x.shape[1:]) if x.shape[0] == 1 else x.repeat_interleave(K, 0) for x in query))


def stack_memory(frames, fine_frames):
    """A bank from per-frame ``Memory`` (B, C, h, w): res4 holds every frame, res3 / res2 the
    frames at the positions ``fine_frames``. Returns ``Memory`` of (B, C, T, h, w)."""
    def stack(field, positions):
        return torch.stack([getattr(frames[i], field) for i in positions], 2)
    every = range(len(frames))
    return Memory(stack("k4", every), stack("v4", every), stack("k3", fine_frames), stack("v3", fine_frames),
                  stack("k2", fine_frames), stack("v2", fine_frames))


def _drop_whole(x, p):
    keep = (torch.rand(x.shape[0], 1, 1, 1, device=x.device) >= p).to(x.dtype)
    return x * keep


# ---------------------------------------------------------------- checkpoints


def _state_dict(checkpoint, map_location):
    if isinstance(checkpoint, (str, os.PathLike)):
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"checkpoint not found: {os.fspath(checkpoint)}")
        checkpoint = torch.load(checkpoint, map_location=map_location, weights_only=True)
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError("checkpoint: expected a state dict (name -> tensor) or the path of one")
    return checkpoint


def _strip_prefix(state, prefix):
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def _build_loaded(config, state, what, copy):
    """An HMMN whose every tensor comes from `state`: built on the meta device (no random
    initialisation to throw away) and then given the checkpoint's tensors (`copy`: copies,
    when the caller still holds them)."""
    with torch.device("meta"):
        model = HMMN(config)
    if copy:
        state = {k: v.clone() for k, v in state.items()}
    load_strict(model, state, what, assign=True)
    return model


def load_strict(module, state, what, ignore_missing=(), assign=False):
    """load_state_dict(strict) with one clear error that lists every mismatch."""
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.startswith(ignore_missing)]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        def show(items):
            return ", ".join(items[:12]) + (f", ... ({len(items)} in all)" if len(items) > 12 else "")
        parts = [f"{len(x)} {label}: {show(x)}" for label, x in
                 (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)) if x]
        raise ValueError(f"{what}: the checkpoint does not match the model ({type(module).__name__}); " + "; ".join(parts))
    module.load_state_dict(state, strict=not ignore_missing, assign=assign)


def save_checkpoint(path, model, **extra):
    """Write {format, config, state_dict, **extra} atomically; ``load_model`` reads it back."""
    from ..data._io import atomic_path

    payload = {"format": CHECKPOINT_FORMAT, "config": model.config.to_dict(), "state_dict": model.state_dict(), **extra}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_model(checkpoint, map_location="cpu", **fields):
    """An HMMN from ``save_checkpoint``'s file or from the released checkpoint (detected by its
    names). ``fields`` override matching switches (kernel, topk_read, ...)."""
    owned = isinstance(checkpoint, (str, os.PathLike))
    if owned:
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"weights not found: {os.fspath(checkpoint)}")
        checkpoint = torch.load(checkpoint, map_location=map_location, weights_only=True)
    if isinstance(checkpoint, dict) and checkpoint.get("format") == CHECKPOINT_FORMAT:
        config = HMMNConfig.from_dict(checkpoint["config"]).replace(**fields)
        return _build_loaded(config, checkpoint["state_dict"], "load_model", copy=not owned)
    if isinstance(checkpoint, dict) and any("Encoder_M." in k for k in checkpoint):
        state = _strip_prefix(_state_dict(checkpoint, map_location), "module.")
        return _build_loaded(HMMNConfig(**fields), state, "load_model", copy=not owned)
    raise ValueError(f"weights: not an hmmn_ops checkpoint (format {CHECKPOINT_FORMAT!r}) nor the released HMMN "
                     "state dict (names Encoder_M..., Decoder...)")
