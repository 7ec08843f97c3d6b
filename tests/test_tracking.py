"""Tracker (docs/ops.md section 6): chaining, sigma schedules, official_compat, resets, errors."""
import pytest
import torch

from hmmn_ops.tracking import Tracker


def brute_local_track(memory_key, query_key, window):
    """docs/ops.md section 3 written as loops: windowed argmax, clipped to the frame, ties to the smaller index."""
    B, C, H, W = memory_key.shape
    r = window // 2
    out = torch.empty(B, H, W, dtype=torch.int64)
    for b in range(B):
        for y in range(H):
            for x in range(W):
                best, arg = None, None
                for qy in range(max(0, y - r), min(H, y + r + 1)):
                    for qx in range(max(0, x - r), min(W, x + r + 1)):
                        s = float((memory_key[b, :, y, x] * query_key[b, :, qy, qx]).sum())
                        if best is None or s > best:
                            best, arg = s, qy * W + qx
                out[b, y, x] = arg
    return out


def hmmn_keep(t):
    return t % 5 == 0  # HMMN: the first frame and every 5th stay in memory


# --- chaining against an oracle, with a fake local_track whose hops are known -------------------

class KnownHops:
    """A local_track whose hop into frame u is a fixed random map ``hops[u]`` (u-1 -> u).

    Keys carry their frame number in element [:, 0, 0, 0]; the fake checks that the tracker
    always tracks the previous frame (the bank's newest slot) into the query frame.
    """

    def __init__(self, B, H, W, frames, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.hops = {u: torch.randint(0, H * W, (B, H * W), generator=g) for u in range(1, frames)}
        self.B, self.H, self.W = B, H, W

    def __call__(self, memory_key, query_key, window):
        assert window == 7
        src, dst = int(memory_key[0, 0, 0, 0]), int(query_key[0, 0, 0, 0])
        assert dst == src + 1, f"tracked frame {src} into {dst}: not adjacent"
        return self.hops[dst].view(self.B, self.H, self.W).clone()

    def key(self, frame, C=2):
        k = torch.zeros(self.B, C, self.H, self.W)
        k[:, 0, 0, 0] = frame
        return k

    def followed(self, f, t, extra_hop=False):
        """Pixels of frame f followed hop by hop into frame t (+ one more hop along t's)."""
        c = torch.arange(self.H * self.W).expand(self.B, -1)
        for u in range(f + 1, t + 1):
            c = self.hops[u].gather(1, c)
        if extra_hop:
            c = self.hops[t].gather(1, c)
        return c.view(self.B, self.H, self.W)


def run_schedule(tracker, hops, n_frames, keep=hmmn_keep):
    """Drive the tracker as an inference loop would; yield (t, bank frames, centers, sigma)."""
    bank = []  # the caller's memory bank: frame numbers in slot order
    for t in range(n_frames):
        if t > 0:
            mk = torch.stack([hops.key(f) for f in bank], 2)
            centers, sigma = tracker.centers(hops.key(t), mk)
            yield t, list(bank), centers, sigma
        if tracker.push(keep(t)):
            bank[-1] = t
        else:
            bank.append(t)
        assert list(tracker.frames) == bank


EXPECTED_BANKS = {1: [0], 2: [0, 1], 3: [0, 2], 4: [0, 3], 5: [0, 4], 6: [0, 5],
                  7: [0, 5, 6], 8: [0, 5, 7], 9: [0, 5, 8], 10: [0, 5, 9], 11: [0, 5, 10]}


@pytest.mark.parametrize("official_compat", [False, True])
def test_chaining_over_12_frames(official_compat):
    B, H, W = 2, 3, 4
    hops = KnownHops(B, H, W, 12, seed=1)
    tracker = Tracker(official_compat=official_compat, local_track=hops)
    seen = 0
    for t, bank, centers, sigma in run_schedule(tracker, hops, 12):
        assert bank == EXPECTED_BANKS[t]
        assert centers.dtype == torch.int64 and centers.shape == (B, len(bank), H, W)
        for s, f in enumerate(bank):
            newest = s == len(bank) - 1
            # The previous frame: its own local_track argmaxes. Older: followed through every frame.
            expected = hops.followed(f, t, extra_hop=official_compat and not newest)
            assert torch.equal(centers[:, s], expected), (t, f)
        seen += 1
    assert seen == 11
    assert tracker.frames == (0, 5, 10, 11)


def test_the_quirk_moves_every_older_slot():
    """official_compat differs from the correct chain exactly on the slots older than the previous frame."""
    hops = KnownHops(1, 4, 4, 12, seed=2)
    plain = list(run_schedule(Tracker(local_track=hops), hops, 12))
    compat = list(run_schedule(Tracker(official_compat=True, local_track=hops), hops, 12))
    for (t, bank, c0, _), (_, _, c1, _) in zip(plain, compat):
        assert torch.equal(c0[:, -1], c1[:, -1])
        assert torch.equal(c1[:, :-1].flatten(2), hops.hops[t].gather(1, c0[:, :-1].flatten(1)).view(1, -1, 16))


class ReleasedIndexing:
    """The released Memory.forward index bookkeeping (model.py 214-228), restated independently.

    State: ``stacked`` (B, T*HW), every slot's pixels in the last query frame, and ``T_prev``.
    A bank that did not grow means the previous frame was replaced: drop its part. Then
    ``stacked = step[stacked]``, and older slot i is centred at ``step[stacked_i]``.
    """

    def __init__(self):
        self.stacked, self.T_prev = None, None

    def __call__(self, step, T):
        """step (B, HW): the previous frame's windowed argmax into the query -> (B, T, HW)."""
        HW = step.shape[1]
        if T == 1 or self.stacked is None or self.T_prev > T:
            self.stacked, out = step, [step]
        else:
            if self.T_prev == T:
                self.stacked = self.stacked[:, :-HW]
            self.stacked = step.gather(1, self.stacked)
            out = [step.gather(1, self.stacked[:, i * HW:(i + 1) * HW]) for i in range(T - 1)] + [step]
            self.stacked = torch.cat([self.stacked, step], 1)
        self.T_prev = T
        return torch.stack(out, 1)


def next_bank(bank, t):
    """HMMN's memory after frame t: the previous frame is replaced unless it is kept."""
    return bank[:-1] + [t] if bank and not hmmn_keep(bank[-1]) else bank + [t]


def test_official_compat_matches_released_bookkeeping():
    B, H, W = 2, 3, 5
    hops = KnownHops(B, H, W, 12, seed=3)
    released, bank = ReleasedIndexing(), [0]
    tracker = Tracker(official_compat=True, local_track=hops)
    for t, tracker_bank, centers, sigma in run_schedule(tracker, hops, 12):
        assert tracker_bank == bank
        assert torch.equal(centers.flatten(2), released(hops.hops[t], len(bank))), t
        # Released: slot T-1-h gets sigma 3 * (h * 0.5 + 1) (model.py 225).
        assert sigma.tolist() == [3 * (h * 0.5 + 1) for h in reversed(range(len(bank)))]
        bank = next_bank(bank, t)


def released_dense_read(mk, mv, qk, centres, window=7):
    """The released read, densely: windowed argmax for tracking, softmax x Gaussian, renormalised."""
    B, C, T, H, W = mk.shape
    HW = H * W
    p = torch.einsum("bctp,bcq->btpq", mk.flatten(3), qk.flatten(2)).reshape(B, T * HW, HW) / C ** 0.5
    ys, xs = torch.arange(HW) // W, torch.arange(HW) % W
    far = ((ys[:, None] - ys[None]).abs() > window // 2) | ((xs[:, None] - xs[None]).abs() > window // 2)
    step = p[:, -HW:].masked_fill(far, float("-inf")).argmax(2)
    c = centres(step, T)                                             # (B, T, HW)
    sigma = torch.tensor([3 * (1 + 0.5 * h) for h in reversed(range(T))], dtype=p.dtype)
    d2 = (ys - c[..., None] // W) ** 2 + (xs - c[..., None] % W) ** 2   # (B, T, HW_mem, HW_query)
    gauss = torch.exp(-d2 / (2 * sigma[None, :, None, None] ** 2)).reshape(B, T * HW, HW)
    att = torch.softmax(p, 1) * gauss
    att = att / att.sum(1, keepdim=True)
    return torch.einsum("bvp,bpq->bvq", mv.flatten(2), att).view(B, -1, H, W), c


def test_official_compat_reproduces_the_released_read():
    hmmn_ops = pytest.importorskip("hmmn_ops")
    if not hasattr(hmmn_ops, "kernel_guided_read"):
        pytest.skip("hmmn_ops.kernel_guided_read not available yet")
    torch.manual_seed(2)
    B, C, H, W = 2, 6, 9, 10
    frames = [torch.randn(B, C, H, W, dtype=torch.float64) for _ in range(9)]
    values = [torch.randn(B, 3, H, W, dtype=torch.float64) for _ in range(9)]
    tracker, released, bank = Tracker(official_compat=True), ReleasedIndexing(), []
    for t in range(9):
        if t > 0:
            mk = torch.stack([frames[f] for f in bank], 2)
            mv = torch.stack([values[f] for f in bank], 2)
            expected, expected_centres = released_dense_read(mk, mv, frames[t], released)
            centers, sigma = tracker.centers(frames[t], mk)
            assert torch.equal(centers.flatten(2), expected_centres), t
            out = hmmn_ops.kernel_guided_read(frames[t], mk, mv, centers, sigma)
            torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
        assert tracker.push(hmmn_keep(t)) == (len(next_bank(bank, t)) == len(bank))
        bank = next_bank(bank, t)
    assert tracker.frames == (0, 5, 8)


# --- sigma schedules, exact values ---------------------------------------------------------------

PAPER = {1: [3.0], 2: [3.5, 3.0], 6: [5.5, 3.0], 7: [6.0, 3.5, 3.0], 9: [7.0, 4.5, 3.0], 11: [8.0, 5.5, 3.0]}
OFFICIAL = {1: [3.0], 2: [4.5, 3.0], 6: [4.5, 3.0], 7: [6.0, 4.5, 3.0], 9: [6.0, 4.5, 3.0], 11: [6.0, 4.5, 3.0]}


@pytest.mark.parametrize("schedule,table", [("paper", PAPER), ("official", OFFICIAL)])
def test_sigma_schedules(schedule, table):
    hops = KnownHops(1, 2, 2, 12)
    tracker = Tracker(schedule=schedule, local_track=hops)
    got = {t: sigma for t, _, _, sigma in run_schedule(tracker, hops, 12)}
    for t, expected in table.items():
        assert got[t].dtype == torch.float32 and got[t].tolist() == expected, (t, got[t])


def test_sigma_parameters_and_defaults():
    hops = KnownHops(1, 2, 2, 12)
    custom = Tracker(sigma_init=2.0, sigma_factor=0.25, schedule="official", local_track=hops)
    assert dict((t, s.tolist()) for t, _, _, s in run_schedule(custom, hops, 8))[7] == [3.0, 2.5, 2.0]
    assert Tracker().schedule == "paper" and Tracker(official_compat=True).schedule == "official"
    assert Tracker(official_compat=True, schedule="paper").schedule == "paper"


# --- official_compat worked out by hand, with the real windowed argmax ----------------------------

def sliding_keys(frame, W=6):
    """1 x W grid whose content moves one pixel right per frame: pixel x of frame f shows
    pattern x - f (a one-hot key), so the pattern at x is found at x + 1 in the next frame."""
    k = torch.zeros(1, 9, 1, W, dtype=torch.float64)
    for x in range(W):
        k[0, x - frame + 3, 0, x] = 1.0
    return k


def test_official_compat_by_hand():
    # With window 3, every hop is x -> x + 1, except x = 5, whose pattern leaves the frame:
    # all its candidates score 0 and the tie goes to the smallest index of its window, 4.
    hop = [1, 2, 3, 4, 5, 4]
    assert brute_local_track(sliding_keys(0), sliding_keys(1), 3).flatten().tolist() == hop
    both = {}
    for compat in (False, True):
        tracker = Tracker(window=3, official_compat=compat, local_track=brute_local_track)
        tracker.push(keep=True)                              # frame 0, kept
        bank = [sliding_keys(0)]
        got = []
        for t in (1, 2, 3):
            centers, sigma = tracker.centers(sliding_keys(t), torch.stack(bank, 2))
            got.append((centers.flatten(2)[0].tolist(), sigma.tolist()))
            if tracker.push(keep=False):
                bank[-1] = sliding_keys(t)
            else:
                bank.append(sliding_keys(t))
        both[compat] = got
    # Query 1 reads [0]; query 2 reads [0, 1]; query 3 reads [0, 2] (frame 1 replaced).
    # Frame 0's pixels followed correctly: two hops into frame 2, three into frame 3:
    #   x=0..5 -> [1,2,3,4,5,4] -> [2,3,4,5,4,5] -> [3,4,5,4,5,4].
    # The released code adds one more hop: [3,4,5,4,5,4] at query 2 and [4,5,4,5,4,5] at query 3.
    # sigma: the paper schedule by default (dt = 1, then 2), the official one with official_compat.
    assert both[False] == [([hop], [3.0]),
                           ([[2, 3, 4, 5, 4, 5], hop], [3.5, 3.0]),
                           ([[3, 4, 5, 4, 5, 4], hop], [4.0, 3.0])]
    assert both[True] == [([hop], [3.0]),
                          ([[3, 4, 5, 4, 5, 4], hop], [4.5, 3.0]),
                          ([[4, 5, 4, 5, 4, 5], hop], [4.5, 3.0])]


# --- resets ------------------------------------------------------------------------------------

@pytest.mark.parametrize("change", ["batch", "grid"])
def test_reset_on_size_change(change):
    torch.manual_seed(0)
    tracker = Tracker(window=3, local_track=brute_local_track)

    def keys(B, H, W):
        return torch.randn(B, 4, H, W, dtype=torch.float64)

    B, H, W = 2, 3, 4
    bank = [keys(B, H, W)]
    tracker.push(keep=True)
    for t in (1, 2):
        q = keys(B, H, W)
        centers, _ = tracker.centers(q, torch.stack(bank, 2))
        assert (centers >= 0).all()
        if tracker.push(keep=t == 2):
            bank[-1] = q
        else:
            bank.append(q)
    assert tracker.frames == (0, 2)
    # New objects (batch) or a new resolution (grid): the caller's bank is rebuilt to match.
    B, H, W = (3, 3, 4) if change == "batch" else (2, 4, 5)
    bank = [keys(B, H, W) for _ in bank]
    q = keys(B, H, W)
    centers, _ = tracker.centers(q, torch.stack(bank, 2))
    assert centers.shape == (B, 2, H, W)
    assert (centers[:, 0] == -1).all()                       # the chain of frame 0 is lost
    assert torch.equal(centers[:, 1], brute_local_track(bank[-1], q, 3))
    tracker.push(keep=False)                                 # frame 3 enters after the kept frame 2
    bank.append(q)
    q2 = keys(B, H, W)
    centers, _ = tracker.centers(q2, torch.stack(bank, 2))
    step = brute_local_track(q, q2, 3).flatten(1)
    assert (centers[:, 0] == -1).all()
    assert torch.equal(centers[:, 1].flatten(1), step.gather(1, brute_local_track(bank[1], q, 3).flatten(1)))
    assert torch.equal(centers[:, 2].flatten(1), step)


def test_reset_forgets_the_video():
    hops = KnownHops(1, 2, 2, 12)
    tracker = Tracker(local_track=hops)
    list(run_schedule(tracker, hops, 7))
    assert len(tracker) == 3
    tracker.reset()
    assert len(tracker) == 0 and tracker.frames == ()
    assert [t for t, *_ in run_schedule(tracker, hops, 3)] == [1, 2]


def test_empty_batch_and_float64():
    tracker = Tracker(local_track=lambda m, qk, w: torch.zeros(0, 2, 3, dtype=torch.int64))
    mk = torch.zeros(0, 2, 1, 2, 3, dtype=torch.float64)
    q = torch.zeros(0, 2, 2, 3, dtype=torch.float64)
    tracker.push(keep=False)
    for _ in range(2):  # the bank stays one slot: each frame replaces the previous one
        centers, sigma = tracker.centers(q, mk)
        assert centers.shape == (0, 1, 2, 3) and centers.dtype == torch.int64
        assert sigma.dtype == torch.float64 and sigma.tolist() == [3.0]
        tracker.push(keep=False)


# --- with the library's ops ----------------------------------------------------------------------

def test_default_local_track_and_read():
    hmmn_ops = pytest.importorskip("hmmn_ops")
    if not hasattr(hmmn_ops, "local_track"):
        pytest.skip("hmmn_ops.local_track not available yet")
    torch.manual_seed(1)
    B, C, H, W = 2, 8, 5, 6
    frames = [torch.randn(B, C, H, W) for _ in range(8)]
    ours, brute = Tracker(), Tracker(local_track=brute_local_track)
    bank = []
    for t, k in enumerate(frames):
        if t > 0:
            mk = torch.stack(bank, 2)
            got, sigma = ours.centers(k, mk)
            expected, _ = brute.centers(k, mk)
            assert torch.equal(got, expected), t
            value = torch.randn(B, 3, len(bank), H, W)
            out = hmmn_ops.kernel_guided_read(k, mk, value, got, sigma)
            assert out.shape == (B, 3, H, W) and torch.isfinite(out).all()
        replaced = ours.push(hmmn_keep(t))
        assert brute.push(hmmn_keep(t)) == replaced
        if replaced:
            bank[-1] = k
        else:
            bank.append(k)


# --- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(window=4), "window must be a positive odd int, got 4"),
    (dict(window=0), "window"),
    (dict(window=True), "window"),
    (dict(sigma_init=0), "sigma_init must be > 0"),
    (dict(sigma_factor=-1), "sigma_factor must be >= 0"),
    (dict(schedule="linear"), r"schedule must be one of \('paper', 'official'\), got 'linear'"),
    (dict(local_track=3), "local_track must be callable"),
])
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Tracker(**kwargs)


def test_bad_calls():
    hops = KnownHops(2, 3, 4, 5)
    tracker = Tracker(local_track=hops)
    q = hops.key(1)
    with pytest.raises(RuntimeError, match="memory is empty; push"):
        tracker.centers(q, torch.zeros(2, 2, 1, 3, 4))
    with pytest.raises(ValueError, match="keep must be a bool, got int"):
        tracker.push(keep=1)
    tracker.push(keep=True)
    with pytest.raises(RuntimeError, match="no centers\\(\\) call since the last push"):
        tracker.push()
    mk = hops.key(0).unsqueeze(2)
    with pytest.raises(ValueError, match=r"query_key must be a tensor \(B, C, H, W\), got \(2, 2, 1, 3, 4\)"):
        tracker.centers(mk, mk)
    with pytest.raises(ValueError, match=r"query_key must be a tensor \(B, C, H, W\), got list"):
        tracker.centers([1], mk)
    with pytest.raises(ValueError, match=r"memory_key must be \(B, C, T, H, W\) = \(2, 2, 1, 3, 4\) to match "
                                         r"query_key \(2, 2, 3, 4\), got \(2, 2, 1, 3, 5\)"):
        tracker.centers(q, torch.zeros(2, 2, 1, 3, 5))
    with pytest.raises(ValueError, match=r"memory_key must be .* got \(2, 2, 3, 4\)"):
        tracker.centers(q, q)
    with pytest.raises(ValueError, match=r"memory_key has T=2 frames but the tracker holds 1 slots \[0\]"):
        tracker.centers(q, torch.cat([mk, mk], 2))
    bad = Tracker(local_track=lambda m, qk, w: torch.zeros(2, 3, 4))
    bad.push(keep=True)
    with pytest.raises(RuntimeError, match=r"local_track must return an int64 tensor \(B, H, W\) = \(2, 3, 4\), "
                                           r"got \(2, 3, 4\) torch.float32"):
        bad.centers(q, mk)
    # A failed call leaves the tracker usable.
    centers, _ = tracker.centers(q, mk)
    assert torch.equal(centers[:, 0].flatten(1), hops.hops[1])
