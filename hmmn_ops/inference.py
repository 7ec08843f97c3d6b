"""``InferenceCore``: one video, frame by frame, with HMMN's memory schedule.

    core = InferenceCore(model)                 # model = HMMN(...) with weights
    for t, image in enumerate(video):           # image (3, H, W) float in [0, 1] (or uint8)
        probs = core.step(image, mask if t == 0 else None)   # (K+1, H, W), channel 0 = background
        labels = core.to_labels(probs)          # (H, W) int64 object ids

The memory schedule is the released code's:

- res4 memory: the first frame, every ``mem_every``-th frame (frame numbers 0, 5, 10, ...)
  and the previous frame (which is replaced by the next one unless it is kept);
- res3 / res2 memory: the first and the previous frame, plus every ``fine_mem_every``-th
  frame if given (the configuration the paper calls best; cheap with hmmn_ops's reads);
- memory masks are the soft probabilities of past frames (``model.config.memory_masks``
  "soft", the released code) or their argmax as one-hot masks ("hard"), the given mask on
  an annotated frame; a ``prev_mask`` model's decoder also sees the previous frame's mask,
  as memorised.

With ``model.config.input_scale`` != 1 the network sees every frame resized by that factor:
memory, tracking and memorised masks stay at that size, the returned probabilities are the
softmax of the logits resized back to the frame's size (as ``HMMN.forward`` trains them).

A frame is memorised when the next one arrives, so nothing is encoded for nothing at the end
of a video, and only the memory banks persist between steps: frames stream through and the
memory grows only as the schedule says.

Objects that first appear on a later frame (YouTube-VOS) are added when their mask is given:
the objects introduced together form a group with its own memory bank whose first frame is
that annotated frame (memory of earlier frames would describe them as absent). Groups share
the query encoding and are merged by soft aggregation; a given mask also overrides the
prediction of the objects it labels, and claims its pixels from the other objects.
"""
import contextlib
import dataclasses

import torch
import torch.nn.functional as F

from .models.hmmn import Memory, expand_query, pad_to_multiple, resize, scaled_size, soft_aggregate, unpad
from .tracking import Tracker

__all__ = ["InferenceCore"]


@dataclasses.dataclass
class _Group:
    """Objects introduced on the same frame, and their memory."""

    start: int                  # first object channel (1-based in the output: start + 1)
    count: int                  # number of objects
    first: int                  # frame number of the annotated frame that introduced them
    frames: list = dataclasses.field(default_factory=list)  # res4 bank: frame number per slot
    fine: list = dataclasses.field(default_factory=list)    # res3/res2 bank: frame numbers
    newest_kept: bool = False   # the newest res4 slot stays when the next frame is memorised
    fine_newest_kept: bool = False
    memory: Memory = None       # stacked banks (count, C, T, h, w)
    tracker: Tracker = None


class InferenceCore:
    """Segment one video frame by frame with an HMMN model (puts it in eval mode).

    Args:
        model: an ``HMMN``; its ``config.kernel`` picks the res4 Gaussian ("hmmn": ``Tracker``,
            "kmn": ``global_track``, "none").
        mem_every: keep every ``mem_every``-th frame in the res4 memory (None: first and previous only).
        fine_mem_every: keep those frames in the res3/res2 memory too (a multiple of
            ``mem_every``, so the res4 top-k can point at them); None: first and previous only.
        official_compat: reproduce the released code's read exactly (the Tracker's quirk and,
            unless ``sigma_schedule`` says otherwise, its "official" sigma schedule).
        sigma_schedule: "paper" | "official" | None (official if ``official_compat`` else paper).
        amp: autocast the convolutions (float16 on CUDA, bfloat16 on CPU); outputs stay float32.
    """

    def __init__(self, model, mem_every=5, fine_mem_every=None, official_compat=False, sigma_schedule=None, amp=False):
        for name, value in (("mem_every", mem_every), ("fine_mem_every", fine_mem_every)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}: expected a positive int or None, got {value!r}")
        if fine_mem_every is not None and (mem_every is None or fine_mem_every % mem_every):
            raise ValueError(f"fine_mem_every: expected a multiple of mem_every={mem_every} (res3/res2 memory frames must "
                             f"also be res4 memory frames, where the top-k is taken), got {fine_mem_every}")
        self.model = model.eval()
        self.mem_every, self.fine_mem_every = mem_every, fine_mem_every
        self.official_compat = bool(official_compat)
        self.sigma_schedule = sigma_schedule
        self.amp = bool(amp)
        self._make_tracker()  # validates the schedule now rather than at the first object
        self.reset()

    def reset(self):
        """Forget the video: the next step is a new video's first frame."""
        self._t = 0
        self._groups = []
        self._labels = []
        self._size = None
        self._pending = None  # (padded image (1, 3, Hp, Wp), padded object probs (1, K, Hp, Wp)) of the last frame

    # ---- public state

    @property
    def labels(self):
        """Object id of every output channel 1..K, in channel order (order of appearance)."""
        return tuple(self._labels)

    @property
    def frame_index(self):
        """Number of frames processed so far."""
        return self._t

    def memory_frames(self):
        """Per object group: (res4 memory frame numbers, res3/res2 memory frame numbers), as
        read by the next frame (the last frame is memorised then, so it is listed already)."""
        if self._pending is None:
            return [(list(g.frames), list(g.fine)) for g in self._groups]
        t = self._t - 1
        return [(_advance(g.frames, g.newest_kept, t), _advance(g.fine, g.fine_newest_kept, t)) for g in self._groups]

    def to_labels(self, probs):
        """(K+1, H, W) probabilities of ``step`` -> (H, W) int64 object ids (argmax)."""
        lut = torch.tensor([0, *self._labels], dtype=torch.int64, device=probs.device)
        return lut[probs.argmax(0)]

    # ---- the step

    @torch.no_grad()
    def step(self, image, mask=None):
        """Process the next frame.

        image: (3, H, W) float in [0, 1] (uint8 is divided by 255). mask: None or (H, W) int64
        object ids (0 = background); its objects are added (new ids) or overridden (known ids).
        Returns (K+1, H, W) probabilities on the model's device, float32 (float64 for a float64
        model); channel i >= 1 is the object ``labels[i-1]``.
        """
        device = next(self.model.parameters()).device
        image = self._check_image(image).to(device)
        if mask is not None:
            mask = self._check_mask(mask).to(device)
        size = scaled_size(self._size, self.model.config.input_scale)  # the network's frame size
        padded, pad = pad_to_multiple(resize(image[None], size))
        padded = padded.to(next(self.model.parameters()).dtype)

        with self._autocast(device):
            prev = None
            if self._pending is not None:
                self._memorise(*self._pending)
                prev = self._pending[1][0]  # what the last frame left in memory: the prev_mask prior
            logits = self._predict(padded, pad, prev)
        rescaled = size != self._size
        if logits is None:  # nothing in memory yet: all background
            scaled = torch.zeros(len(self._labels) + 1, *size, device=device, dtype=torch.promote_types(padded.dtype, torch.float32))
            scaled[0] = 1
            probs = resize(scaled, self._size)
        else:
            scaled = F.softmax(logits, 0)
            probs = F.softmax(resize(logits, self._size), 0) if rescaled else scaled
        if mask is not None:
            self._add_objects(mask)
            probs = self._apply_mask(probs, mask)
            scaled = self._apply_mask(scaled, resize(mask, size, "nearest")) if rescaled else probs
        if len(self._labels):
            if self.model.config.memory_masks == "hard":  # a frame's argmax: no half-believed look-alikes in memory
                scaled = F.one_hot(scaled.argmax(0), scaled.shape[0]).permute(2, 0, 1).to(scaled.dtype)
            self._pending = (padded, pad_to_multiple(scaled[1:][None].to(padded.dtype))[0])
        self._t += 1
        return probs

    # ---- internals

    def _check_image(self, image):
        if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image: expected a tensor (3, H, W), got {getattr(image, 'shape', type(image).__name__)}")
        if image.dtype == torch.uint8:
            image = image.float() / 255
        elif not image.is_floating_point():
            raise ValueError(f"image: expected float in [0, 1] or uint8, got {image.dtype}")
        if self._size is None:
            self._size = tuple(image.shape[1:])
        elif tuple(image.shape[1:]) != self._size:
            raise ValueError(f"image: expected size (3, {self._size[0]}, {self._size[1]}) like the video's first frame, "
                             f"got {tuple(image.shape)} at frame {self._t}")
        return image

    def _check_mask(self, mask):
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise ValueError(f"mask: expected a tensor (H, W) of object ids, got {getattr(mask, 'shape', type(mask).__name__)}")
        if tuple(mask.shape) != self._size:
            raise ValueError(f"mask: expected size {self._size} (the frame's H, W), got {tuple(mask.shape)}")
        if mask.dtype.is_floating_point or mask.dtype == torch.bool or (mask.numel() and int(mask.min()) < 0):
            raise ValueError(f"mask: expected non-negative integer object ids, got dtype {mask.dtype}")
        return mask.long()

    def _autocast(self, device):
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)

    def _make_tracker(self):
        cfg = self.model.config
        return Tracker(window=cfg.window, sigma_init=cfg.sigma_init, sigma_factor=cfg.sigma_factor,
                       schedule=self.sigma_schedule, official_compat=self.official_compat)

    def _keep(self, t, group, every):
        return t == group.first or (every is not None and t % every == 0)

    def _memorise(self, image, probs):
        """Add frame t-1 (image and its object probabilities) to every group's memory."""
        t = self._t - 1
        feats = self.model.encode_memory(image, probs)  # rows = objects, in channel order
        for g in self._groups:
            rows = Memory(*(f[g.start:g.start + g.count].unsqueeze(2) for f in feats))
            if g.memory is None:
                g.memory = rows
            else:
                g.memory = Memory(*(_push(bank, new, replace=not kept) for bank, new, kept in zip(
                    g.memory, rows, (g.newest_kept,) * 2 + (g.fine_newest_kept,) * 4)))
            g.frames, g.fine = _advance(g.frames, g.newest_kept, t), _advance(g.fine, g.fine_newest_kept, t)
            if g.tracker is not None:
                g.tracker.push(keep=self._keep(t, g, self.mem_every))
            g.newest_kept = self._keep(t, g, self.mem_every)
            g.fine_newest_kept = self._keep(t, g, self.fine_mem_every)

    def _predict(self, padded, pad, prev):
        """(K+1, h, w) logits of the current frame at the network's (unpadded) size, or None
        when there is no memory yet. prev: (K, Hp, Wp) the last frame's object masks, padded."""
        K = len(self._labels)
        dtype = torch.promote_types(padded.dtype, torch.float32)  # aggregation in float32 even under amp
        ready = [g for g in self._groups if g.memory is not None]
        if not ready:
            return None
        query = self.model.encode_query(padded)
        obj = torch.zeros(K, *padded.shape[2:], device=padded.device, dtype=dtype)
        kernel = self.model.config.kernel
        for g in ready:
            q = expand_query(query, g.count)
            centers = sigma = None
            if kernel == "hmmn":
                centers, sigma = g.tracker.centers(q.k4, g.memory.k4)
            elif kernel == "kmn":
                centers, sigma = self.model.kmn_centers(q.k4, g.memory.k4)
            fine_frames = [g.frames.index(f) for f in g.fine]
            rows = prev[g.start:g.start + g.count] if self.model.config.prev_mask else None
            obj[g.start:g.start + g.count] = self.model.segment(q, g.memory, centers, sigma, fine_frames, rows).to(dtype)
        return unpad(soft_aggregate(obj[None]), pad)[0]

    def _add_objects(self, mask):
        """Start a group for the mask's objects not seen before."""
        new = [i for i in (int(i) for i in torch.unique(mask)) if i > 0 and i not in self._labels]
        if new:
            g = _Group(start=len(self._labels), count=len(new), first=self._t)
            if self.model.config.kernel == "hmmn":
                g.tracker = self._make_tracker()
            self._groups.append(g)
            self._labels.extend(new)

    def _apply_mask(self, probs, mask):
        """Let the mask decide its pixels and objects (channels of objects added by this mask
        are appended to ``probs``, empty)."""
        missing = len(self._labels) + 1 - probs.shape[0]
        if missing:
            probs = torch.cat([probs, probs.new_zeros(missing, *probs.shape[1:])])
        ids = [int(i) for i in torch.unique(mask) if i > 0]
        lut = torch.zeros(max(max(ids, default=0), max(self._labels, default=0)) + 1, dtype=torch.int64,
                          device=mask.device)
        lut[torch.tensor(self._labels, device=mask.device)] = torch.arange(1, len(self._labels) + 1, device=mask.device)
        onehot = F.one_hot(lut[mask], len(self._labels) + 1).permute(2, 0, 1).to(probs.dtype)
        onehot[0] = 0  # background pixels keep the prediction
        return probs * (mask == 0) + onehot


def _advance(frames, newest_kept, t):
    """The frame numbers of a bank once frame t is memorised: the newest frame makes way for it
    unless it is kept."""
    return (frames if newest_kept or not frames else frames[:-1]) + [t]


def _push(bank, new, replace):
    """Append a frame (B, C, 1, h, w) to a bank (B, C, T, h, w), or overwrite its newest frame."""
    if replace:
        bank[:, :, -1:] = new
        return bank
    return torch.cat([bank, new], 2)
