"""InferenceCore: the released code's schedule and read (official_compat), late objects, streaming."""
import math

import pytest
import torch
import torch.nn.functional as F

from hmmn_ops.inference import InferenceCore
from hmmn_ops.models import HMMN

TINY = dict(backbone="tiny", key_dims=(16, 16, 8), value_dims=(32, 16, 8), decoder_dim=32)


def tiny_model(**fields):
    return HMMN(**{**TINY, **fields}).eval()


def blobs(H, W, boxes):
    mask = torch.zeros(H, W, dtype=torch.int64)
    for label, (y0, y1, x0, x1) in boxes.items():
        mask[y0:y1, x0:x1] = label
    return mask


def moving_video(T, H, W, seed=0):
    """Smooth random frames with a drifting texture, so tracking has something to follow."""
    g = torch.Generator().manual_seed(seed)
    base = F.interpolate(torch.rand(1, 3, H // 4 + 4, W // 4 + 4, generator=g), scale_factor=4, mode="bilinear")[0]
    return [base[:, t % 4:t % 4 + H, t // 2:t // 2 + W].clamp(0, 1) + 0.05 * torch.rand(3, H, W, generator=g)
            for t in range(T)]


# ---------------------------------------------------------------- the released algorithm, written out densely

class ReleasedHMMN:
    """The released eval loop (Run_video, mem_every=5) and reads (Memory with its tracking
    state, Memory_topk), with dense affinities, around our model's encoders and decoder.
    Written from the released code's behaviour for this test; it shares no matching code with
    hmmn_ops."""

    def __init__(self, model, window=7, sigma=3.0, topk=32):
        self.m, self.window, self.sigma, self.topk = model, window, sigma, topk
        self.T_prev, self.chain, self.shape = None, None, None

    @staticmethod
    def pad16(x):
        h, w = x.shape[-2:]
        nh, nw = math.ceil(h / 16) * 16, math.ceil(w / 16) * 16
        top, left = (nh - h) // 2, (nw - w) // 2
        return F.pad(x, (left, nw - w - left, top, nh - h - top)), (top, top + h, left, left + w)

    def gauss(self, centres, sigma, H, W):
        """(B, M) flat centres -> (B, M, H*W) Gaussian over the query grid."""
        qy = torch.arange(H, dtype=torch.float64).view(1, 1, H, 1)
        qx = torch.arange(W, dtype=torch.float64).view(1, 1, 1, W)
        cy, cx = (centres // W).double()[..., None, None], (centres % W).double()[..., None, None]
        g = torch.exp(-((qx - cx) ** 2 + (qy - cy) ** 2) / (2 * sigma ** 2))
        return g.flatten(2).to(torch.get_default_dtype())

    def read4(self, mk, mv, qk):
        B, C, T, H, W = mk.shape
        HW = H * W
        p = torch.bmm(mk.reshape(B, C, T * HW).transpose(1, 2), qk.reshape(B, C, HW)) / math.sqrt(C)
        # local tracking of the previous frame into the query, window-limited
        yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
        far = ((yy.flatten()[:, None] - yy.flatten()[None]).abs() > self.window // 2) | \
              ((xx.flatten()[:, None] - xx.flatten()[None]).abs() > self.window // 2)
        step = p[:, -HW:].masked_fill(far, float("-inf")).argmax(2)  # (B, HW)
        if self.shape != (B, H, W) or self.T_prev is None or self.T_prev > T or T == 1:
            assert T == 1
            self.chain = step
            kernel = self.gauss(step, self.sigma, H, W)
        else:
            if self.T_prev == T:  # the previous frame was replaced: drop its chain
                self.chain = self.chain[:, :-HW]
            self.chain = step.gather(1, self.chain)
            parts = [self.gauss(step, self.sigma, H, W)]
            for h in range(1, T):  # older slots: one hop too many, wider sigma
                rows = self.chain[:, (T - 1 - h) * HW:(T - h) * HW]
                parts.insert(0, self.gauss(step.gather(1, rows), self.sigma * (1 + 0.5 * h), H, W))
            kernel = torch.cat(parts, 1)
            self.chain = torch.cat([self.chain, step], 1)
        self.T_prev, self.shape = T, (B, H, W)
        a = F.softmax(p, 1) * kernel
        a = a / a.sum(1, keepdim=True)
        out = torch.bmm(mv.reshape(B, -1, T * HW), a).view(B, -1, H, W)
        ref = torch.cat([a[:, :HW], a[:, -HW:]], 1) if T > 1 else a
        return out, ref.transpose(1, 2).topk(self.topk, dim=2).indices

    @staticmethod
    def read_fine(mk, mv, qk, idx):
        B, C, T, H, W = mk.shape
        cells, k = idx.shape[1:]
        r = int(round(math.sqrt(H * W / cells)))
        Hc, Wc = H // r, W // r
        t, rem = idx // (Hc * Wc), idx % (Hc * Wc)
        a, b = torch.meshgrid(torch.arange(r), torch.arange(r), indexing="ij")
        fine = t[..., None] * H * W + ((rem // Wc)[..., None] * r + a.flatten()) * W + (rem % Wc)[..., None] * r + b.flatten()
        fine = fine.flatten(2)  # (B, cells, k*r*r)
        keys = mk.flatten(2).gather(2, fine.flatten(1)[:, None].expand(B, C, -1)).view(B, C, cells, -1)
        vals = mv.flatten(2).gather(2, fine.flatten(1)[:, None].expand(B, mv.shape[1], -1)).view(B, mv.shape[1], cells, -1)
        q = qk.view(B, C, Hc, r, Wc, r).permute(0, 1, 2, 4, 3, 5).reshape(B, C, cells, r * r)
        att = F.softmax(torch.einsum("bcnm,bcnj->bnjm", keys, q) / math.sqrt(C), -1)
        out = torch.einsum("bvnm,bnjm->bvnj", vals, att).view(B, -1, Hc, Wc, r, r)
        return out.permute(0, 1, 2, 4, 3, 5).reshape(B, -1, H, W)

    def run(self, frames, first_mask, K, mem_every=5):
        onehot = F.one_hot(first_mask, K + 1).permute(2, 0, 1).to(frames[0].dtype)
        probs, saved4, saved_fine = [onehot], None, None
        for t in range(1, len(frames)):
            image, crop = self.pad16(frames[t - 1][None])
            masks, _ = self.pad16(probs[t - 1][None, 1:])
            prev = self.m.encode_memory(image, masks)
            prev = [x.unsqueeze(2) for x in prev]
            if saved4 is None:
                cur4, cur_fine = prev[:2], prev[2:]
            else:
                cur4 = [torch.cat([a, b], 2) for a, b in zip(saved4, prev[:2])]
                cur_fine = [torch.cat([a, b], 2) for a, b in zip(saved_fine, prev[2:])]
            image, crop = self.pad16(frames[t][None])
            q = self.m.encode_query(image)
            qk4, qv4, qk3, qk2 = (x.expand(K, *x.shape[1:]) for x in q[:4])
            m4, idx = self.read4(cur4[0], cur4[1], qk4)
            m3 = self.read_fine(cur_fine[0], cur_fine[1], qk3, idx)
            m2 = self.read_fine(cur_fine[2], cur_fine[3], qk2, idx[..., :self.topk // 4])
            logits = self.m.Decoder(torch.cat([m4, qv4], 1), q.r3.expand(K, -1, -1, -1), q.r2.expand(K, -1, -1, -1), m3, m2)
            ps = F.softmax(logits, 1)[:, 1]
            em = torch.cat([torch.prod(1 - ps, 0, keepdim=True), ps]).clamp(1e-7, 1 - 1e-7)
            logit = torch.log(em / (1 - em))[:, crop[0]:crop[1], crop[2]:crop[3]]
            probs.append(F.softmax(logit, 0))
            if (t - 1) % mem_every == 0:
                saved4 = cur4
            if t - 1 == 0:
                saved_fine = cur_fine
        return probs


@pytest.mark.parametrize("dtype", [torch.float64])
def test_official_compat_matches_released_algorithm_over_12_frames(dtype):
    # 12 frames with mem_every=5: memory frames kept (0, 5, 10) and the previous frame replaced.
    torch.set_default_dtype(dtype)
    try:
        model = tiny_model().to(dtype)
        H, W = 90, 100  # padded to 96 x 112: res4 6 x 7 = 42 >= top-32 positions per frame
        frames = [f.to(dtype) for f in moving_video(12, H, W)]
        mask = blobs(H, W, {1: (10, 45, 10, 50), 2: (50, 85, 40, 95)})
        with torch.no_grad():
            expected = ReleasedHMMN(model).run(frames, mask, K=2)
        core = InferenceCore(model, mem_every=5, official_compat=True)
        for t, frame in enumerate(frames):
            got = core.step(frame, mask if t == 0 else None)
            assert got.dtype == dtype
            torch.testing.assert_close(got, expected[t], rtol=1e-7, atol=1e-9, msg=f"frame {t}")
        assert core.memory_frames() == [([0, 5, 10, 11], [0, 11])]
    finally:
        torch.set_default_dtype(torch.float32)


def test_paper_schedule_differs_from_official():
    model = tiny_model()
    H, W = 64, 64
    frames, mask = moving_video(8, H, W), blobs(H, W, {1: (8, 40, 8, 40)})
    outs = {}
    for compat in (False, True):
        core = InferenceCore(model, mem_every=3, official_compat=compat)
        outs[compat] = [core.step(f, mask if t == 0 else None) for t, f in enumerate(frames)]
    assert torch.equal(outs[False][1], outs[True][1])  # one memory frame: the same read
    # Different sigmas (and the official hop) change the read; with random weights the effect on the
    # output can be as small as 1e-6, so test for any difference rather than a tolerance.
    assert not torch.equal(outs[False][-1], outs[True][-1])


@pytest.mark.parametrize("kernel,topk_read", [("none", True), ("kmn", False), ("hmmn", False)])
def test_switches_run_and_give_probabilities(kernel, topk_read):
    core = InferenceCore(tiny_model(kernel=kernel, topk_read=topk_read), mem_every=2, fine_mem_every=2)
    H, W = 50, 70
    mask = blobs(H, W, {2: (5, 25, 5, 30), 7: (30, 45, 40, 65)})
    for t, frame in enumerate(moving_video(5, H, W)):
        probs = core.step(frame, mask if t == 0 else None)
        assert probs.shape == (3, H, W)
        torch.testing.assert_close(probs.sum(0), torch.ones(H, W))
    assert core.labels == (2, 7)
    labels = core.to_labels(probs)
    assert set(labels.unique().tolist()) <= {0, 2, 7}
    # fine_mem_every=2: frames 0, 2 kept at every level, plus the previous one
    assert core.memory_frames() == [([0, 2, 4], [0, 2, 4])]


def test_first_frame_returns_the_mask_and_memory_streams():
    core = InferenceCore(tiny_model(), mem_every=4)
    H, W = 40, 56
    mask = blobs(H, W, {1: (4, 20, 4, 20), 3: (22, 38, 30, 50)})
    probs = core.step(moving_video(1, H, W)[0], mask)
    assert torch.equal(core.to_labels(probs), mask)
    for frame in moving_video(14, H, W)[1:]:
        core.step(frame)
    # 14 frames: kept 0, 4, 8, 12 and the previous (13): the bank does not hold every frame
    (res4, fine), = core.memory_frames()
    assert res4 == [0, 4, 8, 12, 13] and fine == [0, 13]
    group = core._groups[0]
    assert group.memory.k4.shape[2] == 4 and group.memory.k3.shape[2] == 2  # frame 13 is memorised on the next step


def test_objects_appearing_late():
    H, W = 48, 64
    frames = moving_video(6, H, W)
    early = blobs(H, W, {1: (4, 20, 4, 24)})
    late = blobs(H, W, {4: (26, 44, 36, 60)})
    core = InferenceCore(tiny_model(), mem_every=5)
    for t, frame in enumerate(frames):
        probs = core.step(frame, early if t == 0 else late if t == 3 else None)
        assert probs.shape == (2 if t < 3 else 3, H, W)
        if t == 3:
            labels = core.to_labels(probs)
            assert torch.equal(labels == 4, late == 4)  # the given mask decides its pixels
            assert not (labels[late == 4] == 1).any()
    assert core.labels == (1, 4)
    assert core.memory_frames() == [([0, 5], [0, 5]), ([3, 5], [3, 5])]


def test_late_objects_before_any_mask_and_empty_start():
    H, W = 32, 48
    core = InferenceCore(tiny_model())
    frames = moving_video(4, H, W)
    assert torch.equal(core.step(frames[0]), torch.ones(1, H, W))  # no object yet: all background
    core.step(frames[1], blobs(H, W, {2: (4, 20, 4, 20)}))
    assert core.step(frames[2]).shape == (2, H, W)


def test_step_errors():
    core = InferenceCore(tiny_model())
    with pytest.raises(ValueError, match="image"):
        core.step(torch.rand(32, 32, 3))
    core.step(torch.rand(3, 32, 48), blobs(32, 48, {1: (0, 10, 0, 10)}))
    with pytest.raises(ValueError, match=r"image: expected size \(3, 32, 48\)"):
        core.step(torch.rand(3, 32, 40))
    with pytest.raises(ValueError, match="mask: expected size"):
        core.step(torch.rand(3, 32, 48), torch.zeros(30, 48, dtype=torch.int64))
    with pytest.raises(ValueError, match="fine_mem_every"):
        InferenceCore(tiny_model(), mem_every=5, fine_mem_every=7)


@pytest.mark.parametrize("memory_masks", ["soft", "hard"])
def test_memory_masks_soft_or_hard(memory_masks):
    # What a segmented frame leaves in memory: its probabilities, or their argmax one-hot.
    H, W = 32, 48  # multiples of 16: no padding
    model = tiny_model(memory_masks=memory_masks)
    memorised = []
    encode = model.encode_memory
    model.encode_memory = lambda image, probs: memorised.append(probs.clone()) or encode(image, probs)
    core = InferenceCore(model)
    frames = moving_video(3, H, W, seed=1)
    core.step(frames[0], blobs(H, W, {1: (4, 20, 4, 20), 2: (16, 30, 24, 44)}))
    probs = core.step(frames[1])
    core.step(frames[2])
    assert len(memorised) == 2 and memorised[1].shape == (1, 2, H, W)
    hard = F.one_hot(probs.argmax(0), 3).permute(2, 0, 1)[1:].to(probs.dtype)
    assert torch.equal(memorised[1][0], hard if memory_masks == "hard" else probs[1:])
    assert not torch.equal(hard, probs[1:])  # the two differ, so the test tells them apart


def test_prev_mask_model_sees_what_the_last_frame_left_in_memory():
    # The prior of a prev_mask model is, row for row, the mask the previous frame was memorised
    # with (hard: its argmax), also for an object group added late and on a padded frame.
    H, W = 30, 40
    model = tiny_model(prev_mask=True, memory_masks="hard")
    with torch.no_grad():
        for level in (model.Decoder.RF3, model.Decoder.RF2):
            level.convPrev.weight.normal_()
    memorised, priors = [], []
    encode, segment = model.encode_memory, model.segment
    model.encode_memory = lambda image, probs: memorised.append(probs[0].clone()) or encode(image, probs)
    model.segment = lambda *args: priors.append(args[-1].clone()) or segment(*args)
    core = InferenceCore(model)
    frames = moving_video(4, H, W, seed=3)
    core.step(frames[0], blobs(H, W, {1: (4, 20, 4, 20)}))
    core.step(frames[1])
    core.step(frames[2], blobs(H, W, {2: (16, 28, 24, 38)}))  # a second group
    core.step(frames[3])
    # segment calls: frame 1 (group 1), frame 2 (group 1), frame 3 (groups 1 and 2)
    assert [p.shape[0] for p in priors] == [1, 1, 1, 1]
    assert all(p.shape == (1, 32, 48) for p in priors)
    torch.testing.assert_close(priors[0], memorised[0][:1], rtol=0, atol=0)
    torch.testing.assert_close(priors[1], memorised[1][:1], rtol=0, atol=0)
    torch.testing.assert_close(torch.cat(priors[2:]), memorised[2], rtol=0, atol=0)
    assert set(memorised[1].unique().tolist()) <= {0.0, 1.0}  # hard, as memorised


def test_input_scale_runs_the_network_on_resized_frames():
    # A core whose model has input_scale = 2 returns what a scale-1 core fed the frames resized
    # x2 (masks nearest) returns, with its logits resized back to the frame's size.
    H, W = 21, 30  # odd: resized to 42x60, padded to 48x64
    scaled = tiny_model(input_scale=2.0, memory_masks="hard").double()
    plain = tiny_model(memory_masks="hard").double()
    plain.load_state_dict(scaled.state_dict())
    a, b = InferenceCore(scaled), InferenceCore(plain)
    mask = blobs(H, W, {1: (2, 12, 3, 14), 3: (10, 19, 16, 28)})
    for t, frame in enumerate(moving_video(4, H, W, seed=2)):
        frame = frame.double()
        given = mask if t == 0 else None
        got = a.step(frame, given)
        big = b.step(F.interpolate(frame[None], size=(2 * H, 2 * W), mode="bilinear", align_corners=False)[0],
                     None if given is None else given.repeat_interleave(2, 0).repeat_interleave(2, 1))
        assert got.shape == (3, H, W) and a.labels == (1, 3)
        if t == 0:
            assert torch.equal(a.to_labels(got), mask)
            continue
        # softmax is shift-invariant per pixel: resizing log-probabilities = resizing logits
        want = F.softmax(F.interpolate(big.log()[None], size=(H, W), mode="bilinear", align_corners=False)[0], 0)
        torch.testing.assert_close(got, want)
