"""``Tracker``: HMMN's kernel-guided centres, chained over a memory bank (docs/ops.md section 6).

Every processed frame is tracked to the next one with ``local_track``. A memory frame's
centres in the current query are its pixels followed hop by hop through every intermediate
frame; the previous frame's centres are its own ``local_track`` argmaxes. The Tracker only
follows positions: the memory bank itself (keys, values) belongs to the caller, and the
Tracker's slots are in the same order as the bank's frames. See docs/tracking.md for how
this maps onto the released HMMN code.
"""
import torch

__all__ = ["Tracker"]

SCHEDULES = ("paper", "official")


def _follow(step, chain):
    """``step[chain]`` per batch row, keeping -1 (a lost chain) as -1.

    step: (B, HW) int64, chain: (B, S, HW) int64 in [-1, HW) -> (B, S, HW).
    """
    B, S, HW = chain.shape
    moved = step.gather(1, chain.clamp_min(0).reshape(B, S * HW)).view(B, S, HW)
    return torch.where(chain >= 0, moved, chain)


def _shape(x):
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


class Tracker:
    """Centres and sigmas of HMMN's kernel-guided read for a memory bank that grows frame by frame.

    Per frame: ``centers, sigma = tracker.centers(query_key, memory_key)`` gives, for the bank
    ``memory_key`` the query is about to read, ``centers (B, T, H, W) int64`` (flat query index
    ``y * W + x``, or -1 = no Gaussian) and ``sigma (T,)`` (float32; float64 for float64 keys),
    ready for ``hmmn_ops.kernel_guided_read(query_key, memory_key, memory_value, centers, sigma)``.
    Once the frame is processed, ``tracker.push(keep)`` makes it the newest memory slot. The
    slot that was newest (the previous frame) stays in memory if it was pushed with
    ``keep=True``; otherwise the new frame replaces it. ``push`` returns ``True`` when it
    replaced, so the caller's bank does the same: overwrite its last frame, else append.

    ``local_track(newest memory key, query_key)`` is called once per ``centers()``; its result
    (the previous frame's centres) is also the hop that carries every older slot's pixels into
    the query frame, so chains pass through every processed frame, kept or not. The chains
    reset (older slots get -1 until they are pushed again) when the batch size or grid changes.

    Args:
        window: local tracking window (positive odd int), HMMN uses 7.
        sigma_init, sigma_factor: the Gaussian widths, HMMN 4.1 uses 3 and 0.5.
        schedule: ``"paper"``: ``sigma = sigma_init + sigma_factor * dt``, ``dt`` = frames
            between the memory frame and the previous frame (0 for the previous frame);
            ``"official"``: ``sigma = sigma_init * (1 + sigma_factor * h)``, ``h`` = memory
            slots between it and the newest slot. Default: ``"official"`` when
            ``official_compat`` else ``"paper"``.
        official_compat: reproduce the released HMMN code exactly, including its quirk: a
            memory frame older than the previous frame is centred one more hop along the
            newest step (``step[chain[p]]`` where ``chain[p]`` is already in the query frame).
        local_track: ``f(memory_key (B,C,H,W), query_key (B,C,H,W), window) -> (B,H,W) int64``;
            default ``hmmn_ops.local_track``.

    Example, HMMN's memory schedule (first frame, every 5th frame and the previous frame; the
    previous frame is replaced unless it is kept). ``encode_query`` and ``encode_memory`` stand
    for the model's res4 key/value heads::

        tracker = Tracker(official_compat=True)       # the released HMMN read
        keys, values = [], []                         # the bank: one (B, C, H, W) per slot
        mask = annotation                             # frame 0's given mask
        for t, frame in enumerate(video):
            if t > 0:
                qk, qv = encode_query(frame)
                mk, mv = torch.stack(keys, 2), torch.stack(values, 2)   # (B, C, T, H, W)
                centers, sigma = tracker.centers(qk, mk)
                read = hmmn_ops.kernel_guided_read(qk, mk, mv, centers, sigma)
                mask = decode(read, qv)
            k, v = encode_memory(frame, mask)
            if tracker.push(keep=t % 5 == 0):         # frames 0, 5, 10, ... stay for good
                keys[-1], values[-1] = k, v           # replaced the previous frame
            else:
                keys.append(k); values.append(v)

    With 12 frames the bank read by frame t is ``[0, t-1]`` for t <= 6, then
    ``[0, 5, t-1]`` for 7 <= t <= 11 (``tracker.frames`` lists it).
    """

    def __init__(self, window=7, sigma_init=3.0, sigma_factor=0.5, schedule=None,
                 official_compat=False, local_track=None):
        if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
            raise ValueError(f"Tracker: window must be a positive odd int, got {window!r}")
        if not sigma_init > 0:
            raise ValueError(f"Tracker: sigma_init must be > 0, got {sigma_init!r}")
        if not sigma_factor >= 0:
            raise ValueError(f"Tracker: sigma_factor must be >= 0, got {sigma_factor!r}")
        if schedule is None:
            schedule = "official" if official_compat else "paper"
        if schedule not in SCHEDULES:
            raise ValueError(f"Tracker: schedule must be one of {SCHEDULES}, got {schedule!r}")
        if local_track is not None and not callable(local_track):
            raise ValueError(f"Tracker: local_track must be callable, got {type(local_track).__name__}")
        self.window = window
        self.sigma_init = float(sigma_init)
        self.sigma_factor = float(sigma_factor)
        self.schedule = schedule
        self.official_compat = bool(official_compat)
        self._local_track = local_track
        self.reset()

    def reset(self):
        """Forget everything (a new video)."""
        self._frames = []         # frame number of each memory slot, memory order
        self._newest_kept = False
        self._chain = None        # (B, S-1, H*W): older slots' pixels in the newest slot's frame, -1 = lost
        self._size = None         # (B, H, W) that _chain belongs to
        self._pending = None      # from the last centers(): the hop (B, H*W) and the chains carried by it
        self._count = 0           # frames pushed since reset

    def __len__(self):
        return len(self._frames)

    @property
    def frames(self):
        """Frame number (0 = first pushed) of every memory slot, in memory order."""
        return tuple(self._frames)

    def __repr__(self):
        return (f"Tracker(window={self.window}, sigma_init={self.sigma_init}, sigma_factor={self.sigma_factor}, "
                f"schedule={self.schedule!r}, official_compat={self.official_compat}, frames={list(self._frames)})")

    def sigma(self, dtype=torch.float32, device=None):
        """(T,) Gaussian width of every memory slot under the schedule."""
        T = len(self._frames)
        if self.schedule == "paper":
            newest = self._frames[-1] if T else 0
            values = [self.sigma_init + self.sigma_factor * (newest - f) for f in self._frames]
        else:
            values = [self.sigma_init * (1 + self.sigma_factor * (T - 1 - s)) for s in range(T)]
        return torch.tensor(values, dtype=dtype, device=device)

    def centers(self, query_key, memory_key):
        """Centres and sigmas of the current bank in the query frame.

        Args:
            query_key: (B, C, H, W), the query frame's key.
            memory_key: (B, C, T, H, W), the bank the query reads, ``T == len(self)``; its
                last frame (the previous frame) is tracked into the query.
        Returns:
            ``centers (B, T, H, W) int64`` in ``[-1, H*W)`` and ``sigma (T,)``.
        """
        if not isinstance(query_key, torch.Tensor) or query_key.dim() != 4:
            raise ValueError(f"Tracker.centers: query_key must be a tensor (B, C, H, W), got {_shape(query_key)}")
        B, C, H, W = query_key.shape
        T = len(self._frames)
        if T == 0:
            raise RuntimeError("Tracker.centers: the memory is empty; push() the first frame before reading")
        if not isinstance(memory_key, torch.Tensor) or memory_key.dim() != 5 \
                or tuple(memory_key.shape) != (B, C, memory_key.shape[2], H, W):
            raise ValueError(f"Tracker.centers: memory_key must be (B, C, T, H, W) = ({B}, {C}, {T}, {H}, {W}) "
                             f"to match query_key {tuple(query_key.shape)}, got {_shape(memory_key)}")
        if memory_key.shape[2] != T:
            raise ValueError(f"Tracker.centers: memory_key has T={memory_key.shape[2]} frames but the tracker holds "
                             f"{T} slots {list(self._frames)}; push() once for every frame the bank gains or replaces")

        with torch.no_grad():
            step = self._track(memory_key[:, :, -1], query_key).reshape(B, H * W)
        if self._size != (B, H, W):
            # First read, or the batch or grid changed: older slots' positions are lost.
            self._chain = step.new_full((B, T - 1, H * W), -1)
            self._size = (B, H, W)
        chain = _follow(step, self._chain.to(step.device))  # older slots, now in the query frame
        self._pending = step, chain
        # The released code gathers the Gaussian of step[c] at c = an index already in the query
        # frame: one hop too many for every slot but the newest (docs/tracking.md).
        older = _follow(step, chain) if self.official_compat else chain
        centers = torch.cat([older, step.unsqueeze(1)], 1).view(B, T, H, W)
        acc = torch.float64 if query_key.dtype == torch.float64 else torch.float32
        return centers, self.sigma(acc, query_key.device)

    def push(self, keep=False):
        """Make the frame just processed the newest memory slot.

        Call after ``centers()`` for this frame (for the very first frame, without it).
        ``keep=True``: this frame stays in memory when the next one is pushed (HMMN: the first
        frame and every 5th). Returns ``True`` when the new frame replaced the previous frame's
        slot (it was pushed with ``keep=False``), ``False`` when it was appended.
        """
        if not isinstance(keep, bool):
            raise ValueError(f"Tracker.push: keep must be a bool, got {type(keep).__name__}")
        replaced = False
        if self._frames:
            if self._pending is None:
                raise RuntimeError("Tracker.push: no centers() call since the last push(); every frame after the "
                                   "first must be tracked from the previous one (call reset() to start a new video)")
            step, chain = self._pending
            if self._newest_kept:
                chain = torch.cat([chain, step.unsqueeze(1)], 1)
            else:
                self._frames.pop()
                replaced = True
            self._chain = chain
        self._frames.append(self._count)
        self._newest_kept = keep
        self._count += 1
        self._pending = None
        return replaced

    def _track(self, memory_key, query_key):
        fn = self._local_track
        if fn is None:
            import hmmn_ops  # lazily: hmmn_ops imports this module
            fn = hmmn_ops.local_track
        idx = fn(memory_key, query_key, self.window)
        B, _, H, W = query_key.shape
        if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int64 or tuple(idx.shape) != (B, H, W):
            raise RuntimeError(f"Tracker: local_track must return an int64 tensor (B, H, W) = ({B}, {H}, {W}), "
                               f"got {_shape(idx)} {getattr(idx, 'dtype', '')}")
        return idx
