"""Model benchmark: HMMN end to end, frame by frame, and the share of its memory matching.

The released architecture (``HMMN()``, ResNet-50 encoders) with random weights segments a
synthetic video through ``InferenceCore`` (res4 memory every 5th frame). For every (objects,
dtype) pair: median ms/frame over the frames after warm-up, the time spent inside the hmmn_ops
ops (the public ops are wrapped with timers) and its share of the step, the peak memory over
the video; with ``--baseline naive`` the same video, same weights, with the released-style
dense matching of baselines.py and the end-to-end speedup; on CUDA the longest video whose
memory fits at 1080p. Prints a table and writes JSON; see benchmarks/README.md.

    python benchmarks/bench_model.py                    # CPU: 480p, 1 object, float32
    python benchmarks/bench_model.py --quick            # tiny model and video, seconds
    python benchmarks/bench_model.py --device cuda --objects 1,3 --dtype float32,bfloat16 --baseline naive
    python benchmarks/bench_model.py --device cuda --fit only --dtype bfloat16 --objects 1
"""
import argparse
import collections
import contextlib
import copy
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import baselines as bl  # noqa: E402
import common  # noqa: E402
from bench_ops import _is_oom, backends_summary, refusal  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

SIZES = {"480p": (480, 854), "1080p": (1080, 1920)}  # DAVIS 480p frames; full HD
QUICK_SIZE = "64x112"
QUICK_MODEL = dict(backbone="tiny", key_dims=(16, 16, 8), value_dims=(32, 16, 8), decoder_dim=32)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "amp": torch.float32}
BACKENDS = ("auto", "native", "triton", "reference")
OPS = ("kernel_guided_read", "topk_guided_read", "local_track", "global_track", "gaussian_softmax")
LEVELS = {2: "res3", 4: "res2"}  # topk_guided_read's cell size r -> HMMN level


# ---------------------------------------------------------------- the op timer


def _op_label(name, args):
    """The op, and for topk_guided_read the level it reads (from its cell size r)."""
    if name != "topk_guided_read" or len(args) < 4:
        return name
    H, W = args[0].shape[-2:]
    r = math.isqrt(H * W // max(args[3].shape[1], 1))
    return f"{name} {LEVELS.get(r, f'r={r}')}"


class OpTimer:
    """Replaces the public ops of hmmn_ops (what the model and the Tracker call: they look the ops
    up on the module at every call) with timed calls to ``backend``, or to the replacement in
    ``impls`` (name -> function with the public signature, without ``backend``).

    ``ms`` / ``cpu_ms`` / ``calls`` add up wall time, process CPU time and calls per op label
    since ``reset()``. On CUDA the device is synchronised before and after each op, so the time
    is the op's own. A public op called inside another one counts in the outer op only.
    """

    def __init__(self, device, backend="auto", impls=None):
        self.device = torch.device(device)
        self.backend = backend
        self.impls = dict(impls or {})
        self._depth = 0
        self._saved = None
        self.reset()

    def reset(self):
        self.ms, self.cpu_ms, self.calls = collections.Counter(), collections.Counter(), collections.Counter()

    def _wrap(self, name, original):
        impl = self.impls.get(name)

        def fn(*args, **kwargs):
            return impl(*args, **kwargs) if impl is not None else original(*args, backend=self.backend, **kwargs)

        def timed(*args, **kwargs):
            if self._depth:
                return fn(*args, **kwargs)
            self._depth += 1
            try:
                common.synchronize(self.device)
                wall, cpu = time.perf_counter(), time.process_time()
                out = fn(*args, **kwargs)
                common.synchronize(self.device)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            finally:
                self._depth -= 1
            label = _op_label(name, args)
            self.ms[label] += wall * 1e3
            self.cpu_ms[label] += cpu * 1e3
            self.calls[label] += 1
            return out

        timed.__wrapped__ = original
        return timed

    def __enter__(self):
        import hmmn_ops

        if self._saved is not None:
            raise RuntimeError("OpTimer is already active")
        self._saved = {name: getattr(hmmn_ops, name) for name in OPS}
        for name, original in self._saved.items():
            setattr(hmmn_ops, name, self._wrap(name, original))
        return self

    def __exit__(self, *exc):
        import hmmn_ops

        for name, original in self._saved.items():
            setattr(hmmn_ops, name, original)
        self._saved = None


def naive_ops():
    """The released-style dense implementations of baselines.py behind the public signatures."""
    def kernel_guided_read(qk, mk, mv, centers=None, sigma=None, *, scale=None, topk=0, topk_frames=None):
        if centers is not None and not isinstance(sigma, torch.Tensor):  # KMN: one sigma for every frame
            sigma = torch.full((mk.shape[2],), float(sigma), device=qk.device)
        return bl.naive_kernel_read(qk, mk, mv, centers, sigma, scale=scale, topk=topk, topk_frames=topk_frames)

    def topk_guided_read(qk, mk, mv, topk_indices, *, scale=None):
        return bl.naive_topk_read(qk, mk, mv, topk_indices, scale=scale)

    def local_track(mk, qk, window=7):
        return bl.naive_local_track(mk, qk, window)

    def gaussian_softmax(affinity, centers, sigma, *, size):
        return bl.naive_gaussian_softmax(affinity, centers, sigma, size=size)

    return dict(kernel_guided_read=kernel_guided_read, topk_guided_read=topk_guided_read, local_track=local_track,
                global_track=bl.naive_global_track, gaussian_softmax=gaussian_softmax)


# ---------------------------------------------------------------- shapes and the memory schedule


def parse_size(text):
    """'480p' | '1080p' | 'HxW' -> (label, H, W)."""
    if text in SIZES:
        return (text, *SIZES[text])
    try:
        H, W = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 480p, 1080p or HxW (e.g. 720x1280), got {text!r}") from None
    if H < 16 or W < 16:
        raise argparse.ArgumentTypeError(f"expected H, W >= 16, got {text!r}")
    return (f"{H}x{W}", H, W)


def padded(H, W):
    """The frame size InferenceCore runs at: a multiple of 16."""
    return -(-H // 16) * 16, -(-W // 16) * 16


def schedule(frames, every):
    """Frame numbers in a memory bank when the last frame of a ``frames``-frame video is read
    (InferenceCore's schedule): frame 0, every ``every``-th frame (None: none) and the previous frame."""
    if frames < 2:
        return []
    previous = frames - 2
    kept = set(range(0, previous + 1, every)) if every else {0}
    return sorted(kept | {0, previous})


def naive_need_mb(cfg, K, Hp, Wp, T, F, dtype):
    """Rough peak of the naive matching of one frame (the largest of its three reads), in MB.

    res4: the dense (K, T*hw, hw) affinity, softmax, Gaussian map and its float32 distances (5
    copies, as bench_ops counts); res3 / res2: the one-hot (K, hw, F*hw) and 2 gathered copies
    of the r x r candidates' keys and values.
    """
    item = max(4, DTYPES[dtype].itemsize)
    hw = (Hp // 16) * (Wp // 16)
    res4 = 5 * K * T * hw * hw * item
    fine = [K * hw * F * hw * item + 2 * K * hw * k * r * r * (ck + cv) * item
            for k, r, ck, cv in ((cfg.topk, 2, cfg.key_dims[1], cfg.value_dims[1]),
                                 (cfg.fine_topk, 4, cfg.key_dims[2], cfg.value_dims[2]))]
    return max([res4] + fine) / common.MB


# ---------------------------------------------------------------- running a video


def render_video(H, W, frames, objects, seed):
    """A synthetic video (frames as (3, H, W) uint8 tensors, frame 0's mask (H, W) int64) with
    ``objects`` targets; rendered before timing."""
    from hmmn_ops.data.synthetic import SyntheticConfig, SyntheticVideo

    video = SyntheticVideo(seed, SyntheticConfig(height=H, width=W, num_frames=frames, objects=(objects, objects)))
    images = [torch.from_numpy(video.frame(t)).permute(2, 0, 1).contiguous() for t in range(frames)]
    return images, torch.from_numpy(video.mask(0))


def run_video(model, images, mask, device, timer, args, dtype_name, desc, keep_labels):
    """Segment the video with a fresh InferenceCore: per-frame timings (and labels)."""
    from tqdm import tqdm

    from hmmn_ops.inference import InferenceCore

    core = InferenceCore(model, mem_every=args.mem_every, fine_mem_every=args.fine_mem_every,
                         amp=dtype_name == "amp")
    mask = mask.to(device)
    per_frame, labels, probs = [], [], None
    with timer:
        for t in tqdm(range(len(images)), desc=desc, unit="frame", file=sys.stderr, dynamic_ncols=True,
                      disable=args.quiet):
            image = images[t].to(device)
            banks = core.memory_frames()  # what frame t reads
            timer.reset()
            common.synchronize(device)
            wall, cpu = time.perf_counter(), time.process_time()
            probs = core.step(image, mask if t == 0 else None)
            common.synchronize(device)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            per_frame.append(dict(t=t, ms=wall * 1e3, cpu_ms=cpu * 1e3, ops=dict(timer.ms),
                                  op_cpu_ms=dict(timer.cpu_ms), calls=dict(timer.calls),
                                  res4=len(banks[0][0]) if banks else 0, fine=len(banks[0][1]) if banks else 0))
            if keep_labels:
                labels.append(core.to_labels(probs).to(torch.uint8).cpu())
    return per_frame, labels, None if probs is None else probs.float().cpu()


def summarise(per_frame, warmup):
    """Medians and totals over the timed frames (after the warm-up)."""
    timed = per_frame[warmup:]
    n = len(timed)
    step_ms = sum(f["ms"] for f in timed)
    step_cpu = sum(f["cpu_ms"] for f in timed)
    labels = list(dict.fromkeys(k for f in timed for k in f["ops"]))
    ops = {k: dict(ms_per_frame=sum(f["ops"].get(k, 0.0) for f in timed) / n,
                   cpu_ms_per_frame=sum(f["op_cpu_ms"].get(k, 0.0) for f in timed) / n,
                   calls_per_frame=sum(f["calls"].get(k, 0) for f in timed) / n) for k in labels}
    matching = sum(sum(f["ops"].values()) for f in timed)
    return dict(
        timed_frames=n,
        ms_per_frame=statistics.median(f["ms"] for f in timed),
        ms_mean=step_ms / n,
        ms_min=min(f["ms"] for f in timed),
        cpu_ms_per_frame=statistics.median(f["cpu_ms"] for f in timed),
        matching_ms_per_frame=matching / n,
        matching_share=matching / step_ms if step_ms else None,
        matching_cpu_share=(sum(sum(f["op_cpu_ms"].values()) for f in timed) / step_cpu) if step_cpu > 0 else None,
        ops=ops,
        res4_frames=[min(f["res4"] for f in timed), max(f["res4"] for f in timed)],
        fine_frames=[min(f["fine"] for f in timed), max(f["fine"] for f in timed)],
    )


def model_for(base, dtype_name):
    """The model in the run's dtype (amp: float32 weights, InferenceCore autocasts)."""
    if DTYPES[dtype_name] == torch.float32:
        return base
    return copy.deepcopy(base).to(DTYPES[dtype_name])


def measure_run(model, video, device, args, dtype_name, K, impl, keep_labels):
    """One video through the model: the record's numbers, and the labels for comparison."""
    images, mask = video
    timer = OpTimer(device, args.backend, naive_ops() if impl == "naive" else None)
    desc = f"{K} obj {dtype_name} {impl}"
    base_total = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    peak_mb, seconds, (per_frame, labels, probs) = common.peak_memory(
        lambda: run_video(model, images, mask, device, timer, args, dtype_name, desc, keep_labels), device)
    result = dict(summarise(per_frame, args.warmup), peak_mb=peak_mb, seconds=round(seconds, 2), per_frame=per_frame)
    if base_total is not None:
        result["peak_total_mb"] = base_total / common.MB + peak_mb
    return result, labels, probs


def unless_out_of_memory(fn, device):
    """fn()'s value, or None when it runs out of memory (other errors propagate)."""
    try:
        return fn()
    except Exception as err:
        if not _is_oom(err):
            raise
        return None
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def timed_runs(model, device, args, env, dtype_name, K, log):
    """The records of one (dtype, objects) pair: our ops, then the naive matching if asked."""
    size = args.size
    video = render_video(size[1], size[2], args.frames, K, args.seed)
    naive = args.baseline == "naive"
    ours = unless_out_of_memory(
        lambda: measure_run(model, video, device, args, dtype_name, K, "hmmn_ops", keep_labels=naive), device)
    records = [make_record(args, env, size, K, dtype_name, "hmmn_ops", ours and ours[0],
                           None if ours else "out of memory")]
    if not naive:
        return records
    Hp, Wp = padded(size[1], size[2])
    T, F = len(schedule(args.frames, args.mem_every)), len(schedule(args.frames, args.fine_mem_every))
    need = naive_need_mb(model.config, K, Hp, Wp, T, F, dtype_name)
    limit = args.mem_limit * 1024 if args.mem_limit else 0.4 * common.available_memory_mb(device)
    result, note = None, None
    if need > limit:
        note = f"skipped: needs ~{need / 1024:.1f} GB (estimated), limit {limit / 1024:.1f} GB (--mem-limit)"
    else:
        run = unless_out_of_memory(
            lambda: measure_run(model, video, device, args, dtype_name, K, "naive", keep_labels=True), device)
        if run is None:
            note = "out of memory"
        else:
            result = run[0]
            if ours:
                result.update(compare(ours[0], ours[1], ours[2], *run))
    if note:
        log(f"  naive, {K} objects, {dtype_name}: {note}")
    records.append(make_record(args, env, size, K, dtype_name, "naive", result, note))
    records[-1]["naive_need_mb"] = need
    return records


# ---------------------------------------------------------------- the 1080p fit search


def _autocast(device, dtype_name):
    if dtype_name != "amp":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)


def probe(model, device, frames, K, dtype_name, H, W, every, fine_every):
    """Peak memory and time of the last step of a ``frames``-frame video.

    Runs what InferenceCore does on that frame with the bank its schedule holds: encode the
    previous frame and append it to the bank (``torch.cat``: old and new bank coexist for a
    moment; the fine bank grows only with ``fine_every``), encode the query, track the newest
    frame into it, read and decode. The bank is one encoded frame repeated, which costs the
    same memory as distinct frames. ``peak_mb``: extra memory of the step, bank included (as
    common.peak_memory); ``peak_total_mb`` (CUDA): all memory allocated at its peak, weights
    included. Returns None when it runs out of memory.
    """
    from hmmn_ops.models.hmmn import Memory, expand_query, soft_aggregate

    import hmmn_ops

    res4, fine = schedule(frames, every), schedule(frames, fine_every)
    T, F = len(res4), len(fine)
    positions = [res4.index(f) for f in fine]
    cfg = model.config
    dtype = next(model.parameters()).dtype
    Hp, Wp = padded(H, W)
    gen = torch.Generator().manual_seed(0)
    frame = torch.rand(1, 3, Hp, Wp, generator=gen).to(device, dtype)
    masks = torch.rand(1, K, Hp, Wp, generator=gen).to(device, dtype) / K

    def step():
        with torch.no_grad(), _autocast(device, dtype_name):
            one = model.encode_memory(frame, masks)
            sizes, grows = (T,) * 2 + (F,) * 4, (True,) * 2 + (fine_every is not None,) * 4
            old = [x.unsqueeze(2).expand(-1, -1, n - g, -1, -1).contiguous() for x, n, g in zip(one, sizes, grows)]
            bank = Memory(*(torch.cat([o, x.unsqueeze(2)], 2) if g else o for o, x, g in zip(old, one, grows)))
            del old, one
            q = expand_query(model.encode_query(frame), K)
            track = hmmn_ops.local_track(bank.k4[:, :, -1], q.k4, cfg.window)
            centers = track.unsqueeze(1).expand(-1, T, -1, -1).contiguous()  # the Tracker's (K, T, h, w)
            sigma = torch.tensor([cfg.sigma_init * (1 + cfg.sigma_factor * h) for h in range(T - 1, -1, -1)],
                                 device=device)
            obj = model.segment(q, bank, centers, sigma, positions)
            return torch.softmax(soft_aggregate(obj[None].float()), 1)

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device) / common.MB if cuda else None
    measured = unless_out_of_memory(lambda: common.peak_memory(step, device)[:2], device)
    if measured is None:
        return None
    extra, seconds = measured
    return dict(frames=frames, res4_frames=T, fine_frames=F, peak_mb=extra,
                peak_total_mb=None if base is None else base + extra, step_ms=seconds * 1e3)


def longest_video(fits, start, limit, resolution):
    """The largest frame count n in [start, limit] with fits(n), for fits monotone (true up to
    some n): doubling from ``start``, then bisection down to ``resolution`` frames.

    Returns (n or None when even ``start`` does not fit, "limit" when ``limit`` fits, else "memory").
    """
    good, bad, n = None, None, start
    while bad is None:
        n = min(n, limit)
        if fits(n):
            good = n
            if n == limit:
                return good, "limit"
            n *= 2
        else:
            bad = n
    if good is None:
        return None, "memory"
    while bad - good > resolution:
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good, "memory"


def fit_search(model, device, args, dtype_name, K, fine_every, env):
    """The longest video at the fit size whose memory fits (out of memory, or --fit-mem-limit)."""
    from tqdm import tqdm

    label, H, W = args.fit_size
    probes = []
    bar = tqdm(desc=f"fit {label} {K} obj {dtype_name} fine_mem_every={fine_every}", unit="probe", file=sys.stderr,
               dynamic_ncols=True, disable=args.quiet)

    def fits(n):
        with OpTimer(device, args.backend):
            p = probe(model, device, n, K, dtype_name, H, W, args.mem_every, fine_every)
        # the ceiling applies to all allocated memory on CUDA, to the step's extra memory on the CPU
        peak = p and (p["peak_total_mb"] if p["peak_total_mb"] is not None else p["peak_mb"])
        ok = p is not None and (args.fit_mem_limit is None or (peak is not None and peak <= args.fit_mem_limit * 1024))
        probes.append(dict(p or dict(frames=n, res4_frames=len(schedule(n, args.mem_every)),
                                     fine_frames=len(schedule(n, fine_every)), peak_mb=None, peak_total_mb=None,
                                     step_ms=None), fits=ok))
        bar.update()
        bar.set_postfix_str(f"{n} frames: {'fits' if ok else 'does not fit'}")
        return ok

    resolution = max(args.mem_every or 1, 1)
    frames, stop = longest_video(fits, start=8, limit=args.max_frames_1080p, resolution=resolution)
    bar.close()
    best = next((p for p in probes if p["frames"] == frames and p["fits"]), None)
    limit = "out of memory" if args.fit_mem_limit is None else f"--fit-mem-limit {args.fit_mem_limit} GB"
    return dict(
        kind="fit", size=label, shape=dict(H=H, W=W, padded=list(padded(H, W)), objects=K), objects=K,
        dtype=dtype_name, backend=args.backend, mem_every=args.mem_every, fine_mem_every=fine_every,
        longest_frames=frames, stopped_by=f"--max-frames-1080p {args.max_frames_1080p}" if stop == "limit" else limit,
        res4_frames=best and best["res4_frames"], fine_frames=best and best["fine_frames"],
        peak_mb=best and best["peak_mb"], peak_total_mb=best and best["peak_total_mb"],
        step_ms=best and best["step_ms"],
        probes=probes, **_env_fields(env))


# ---------------------------------------------------------------- records and table


def _env_fields(env):
    return {k: env[k] for k in ("device", "torch", "triton", "cuda", "date", "command")}


def make_record(args, env, size, K, dtype_name, impl, result, note=None):
    label, H, W = size
    Hp, Wp = padded(H, W)
    rec = dict(kind="run", size=label, shape=dict(H=H, W=W, padded=[Hp, Wp], res4=[Hp // 16, Wp // 16], objects=K),
               objects=K, dtype=dtype_name, backend=args.backend, impl=impl,
               baseline=None if impl == "hmmn_ops" else impl, frames=args.frames, warmup=args.warmup,
               mem_every=args.mem_every, fine_mem_every=args.fine_mem_every, note=note)
    rec.update(result or {})
    rec.update(_env_fields(env))
    return rec


def compare(ours, ours_labels, ours_probs, naive, naive_labels, naive_probs):
    """Speedups of ours over the naive run, and how far their segmentations are apart."""
    out = dict(speedup=naive["ms_per_frame"] / ours["ms_per_frame"])
    if ours["matching_ms_per_frame"]:
        out["matching_speedup"] = naive["matching_ms_per_frame"] / ours["matching_ms_per_frame"]
    if ours_labels and naive_labels:
        same = sum(int((a == b).sum()) for a, b in zip(ours_labels, naive_labels))
        out["label_agreement"] = same / sum(a.numel() for a in ours_labels)
        out["last_frame_max_prob_diff"] = float((ours_probs - naive_probs).abs().max())
    return out


def _num(x, fmt):
    return "-" if x is None else format(x, fmt)


def table(records, cpu):
    rows = []
    op_labels = list(dict.fromkeys(k for r in records for k in (r.get("ops") or {})))
    for r in records:
        ours = r["impl"] == "hmmn_ops"
        row = dict(size=r["size"], objects=str(r["objects"]), dtype=r["dtype"],
                   impl=f"hmmn_ops ({r['backend']})" if ours else r["impl"], note=r.get("note") or "")
        if r.get("ms_per_frame") is not None:
            row.update(ms=_num(r["ms_per_frame"], ".1f"), cpu=_num(r["cpu_ms_per_frame"], ".1f"),
                       matching=_num(r["matching_ms_per_frame"], ".1f"),
                       share=_num(r["matching_share"] and 100 * r["matching_share"], ".1f"),
                       mb=_num(r["peak_mb"], ".0f"), mem=f"{'-'.join(map(str, sorted(set(r['res4_frames']))))}"
                       f" / {'-'.join(map(str, sorted(set(r['fine_frames']))))}",
                       speedup=f"{r['speedup']:.2f}x" if r.get("speedup") else "")
            for k in op_labels:
                row[k] = _num((r["ops"].get(k) or {}).get("ms_per_frame"), ".1f")
            if r.get("label_agreement") is not None:
                row["note"] = (f"labels {100 * r['label_agreement']:.2f}% equal, max prob diff "
                               f"{r['last_frame_max_prob_diff']:.1e} (last frame)")
        rows.append(row)
    columns = [("size", "size"), ("objects", "obj"), ("dtype", "dtype"), ("impl", "ops"), ("ms", "ms/frame")]
    if cpu:
        columns.append(("cpu", "CPU ms/frame"))
    columns += [("matching", "matching ms"), ("share", "share %")]
    columns += [(k, k.replace("kernel_guided_read", "kgr").replace("topk_guided_read", "topk")) for k in op_labels]
    columns += [("mb", "peak MB"), ("mem", "res4 / fine T"), ("speedup", "speedup"), ("note", "note")]
    return common.format_table(rows, columns)


def fit_table(records):
    rows = [dict(size=r["size"], objects=str(r["objects"]), dtype=r["dtype"], every=str(r["mem_every"]),
                 fine=str(r["fine_mem_every"] or "-"),
                 frames=_num(r["longest_frames"], "d") if r["longest_frames"] is not None else "none",
                 mem=f"{r['res4_frames']} / {r['fine_frames']}" if r["res4_frames"] else "-",
                 gb=_num(r["peak_mb"] and r["peak_mb"] / 1024, ".2f"),
                 total=_num(r["peak_total_mb"] and r["peak_total_mb"] / 1024, ".2f"), ms=_num(r["step_ms"], ".0f"),
                 stop=r["stopped_by"], probes=str(len(r["probes"])))
            for r in records]
    columns = [("size", "size"), ("objects", "obj"), ("dtype", "dtype"), ("every", "mem_every"),
               ("fine", "fine_mem_every"), ("frames", "longest video"), ("mem", "res4 / fine T"),
               ("gb", "step peak GB"), ("total", "total GB"), ("ms", "last step ms"), ("stop", "stopped by"), ("probes", "probes")]
    return common.format_table(rows, columns)


# ---------------------------------------------------------------- main


def _csv(kind, choices=None):
    def parse(text):
        items = [kind(x.strip()) for x in text.split(",") if x.strip()]
        bad = [x for x in items if choices is not None and x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(map(str, choices or ()))}"
                                             f" got {text!r}")
        return items
    return parse


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=parse_size, default=None, help="480p (default), 1080p or HxW")
    p.add_argument("--objects", "-K", type=_csv(int), default=None,
                   help="objects of the video, comma-separated (default 1 on the CPU, 1,3 on CUDA)")
    p.add_argument("--frames", type=int, default=None,
                   help="frames of the video (default 12 on the CPU, 60 on CUDA; 8 with --quick)")
    p.add_argument("--warmup", type=int, default=None,
                   help="first frames not timed, frame 0 (the annotation) included (default 2 on the CPU, 5 on CUDA)")
    p.add_argument("--dtype", type=_csv(str, DTYPES), default=None,
                   help="float32, bfloat16, float16 (the model cast), amp (float32 weights, autocast: float16 on "
                        "CUDA, bfloat16 on the CPU); default float32 on the CPU, float32,bfloat16 on CUDA")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available)")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="hmmn_ops backend of the ops (default auto)")
    p.add_argument("--baseline", choices=("none", "naive"), default="none",
                   help="naive: also run the video with the released-style dense matching (same weights)")
    p.add_argument("--mem-limit", type=float, default=None,
                   help="GB: skip the naive run when its estimated peak exceeds it (default 40%% of the memory "
                        "available now; on CUDA, of the free GPU memory)")
    p.add_argument("--mem-every", type=int, default=5, help="res4 memory every N frames (default 5)")
    p.add_argument("--fine-mem-every", type=int, default=None,
                   help="res3/res2 memory every N frames too (a multiple of --mem-every; default: first and previous)")
    p.add_argument("--fit", choices=("auto", "on", "off", "only"), default="auto",
                   help="the longest video that fits at 1080p, without and with --fine-mem-every = --mem-every "
                        "(auto: on CUDA only; only: skip the timed runs)")
    p.add_argument("--max-frames-1080p", type=int, default=100_000,
                   help="stop the fit search at this many frames (default 100000; 64 with --quick)")
    p.add_argument("--fit-mem-limit", type=float, default=None,
                   help="GB: the fit search's memory ceiling (default: until out of memory on CUDA; 40%% of "
                        "the available memory on the CPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default torch's; 1 with --quick)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and of the synthetic video")
    p.add_argument("--json", help="output JSON (default benchmarks/results/<device>/model_<size>.json)")
    p.add_argument("--no-save", action="store_true", help="print the tables only")
    p.add_argument("--quick", action="store_true",
                   help=f"tiny model ({QUICK_MODEL['backbone']} backbone), {QUICK_SIZE} frames, 8 frames: "
                        "a smoke test in seconds (saves nothing unless --json)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def resolve(args):
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available here")
    cuda = device.type == "cuda"
    if args.size is None:
        args.size = parse_size(QUICK_SIZE if args.quick else "480p")
    args.objects = args.objects or ([1, 3] if cuda and not args.quick else [1])
    args.dtype = args.dtype or (["float32", "bfloat16"] if cuda and not args.quick else ["float32"])
    if args.frames is None:
        args.frames = 8 if args.quick else (60 if cuda else 12)
    if args.warmup is None:
        args.warmup = 2 if args.quick or not cuda else 5
    if args.quick and args.max_frames_1080p == 100_000:
        args.max_frames_1080p = 64
    args.fit_size = parse_size(QUICK_SIZE if args.quick else "1080p")
    args.fit_on = args.fit in ("on", "only") or (args.fit == "auto" and cuda)
    if args.fit_on and not cuda and args.fit_mem_limit is None:
        args.fit_mem_limit = 0.4 * common.available_memory_mb(device) / 1024  # never let the kernel kill us
    problems = []
    if min(args.objects) < 1:
        problems.append(f"--objects must be >= 1, got {args.objects}")
    if not 1 <= args.warmup < args.frames:
        problems.append(f"--warmup must be in [1, --frames) (frame 0 is the annotation, nothing to time), "
                        f"got --warmup {args.warmup} with --frames {args.frames}")
    if args.mem_every < 1:
        problems.append(f"--mem-every must be >= 1, got {args.mem_every}")
    if args.fine_mem_every is not None and (args.fine_mem_every < 1 or args.fine_mem_every % args.mem_every):
        problems.append(f"--fine-mem-every must be a multiple of --mem-every {args.mem_every}, got {args.fine_mem_every}")
    if args.max_frames_1080p < 8:
        problems.append(f"--max-frames-1080p must be >= 8, got {args.max_frames_1080p}")
    for op in ("kernel_guided_read", "topk_guided_read", "local_track"):
        why = refusal(args.backend, op, device)
        if why is not None:
            problems.append(f"--backend {args.backend} cannot run {op} on {device}: {why}")
            break
    if problems:
        sys.exit("bench_model.py: error: " + "; ".join(problems))
    if args.threads is None and args.quick:
        args.threads = 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return device


def build_model(args, device):
    from hmmn_ops.models import HMMN

    torch.manual_seed(args.seed)
    model = HMMN(**QUICK_MODEL) if args.quick else HMMN()
    return model.to(device).eval()


def main(argv=None):
    args = parse_args(argv)
    device = resolve(args)
    import hmmn_ops  # noqa: F401  (fails early and clearly if the package is missing)

    env = common.environment(device, None if argv is None else ["benchmarks/bench_model.py", *argv])
    start = time.time()
    base = build_model(args, device)
    label, H, W = args.size
    meta = dict(env, size=label, frames=args.frames, warmup=args.warmup, mem_every=args.mem_every,
                fine_mem_every=args.fine_mem_every, backend=args.backend,
                model="HMMN() (released architecture)" if not args.quick else f"HMMN(**{QUICK_MODEL})",
                weights=f"random (seed {args.seed})", video=f"hmmn_ops.data.synthetic (seed {args.seed})",
                parameters=sum(p.numel() for p in base.parameters()),
                backends_info=backends_summary(device), cudnn_benchmark=torch.backends.cudnn.benchmark)
    records, fits = [], []

    def log(message):
        print(message, file=sys.stderr)

    for dtype_name in args.dtype:
        model = model_for(base, dtype_name)
        if args.fit != "only":
            # One-time costs of the first frames in a process (allocator pools, library caches,
            # autotuning) would otherwise count in the first run's time and peak memory.
            images, mask = render_video(H, W, 2, args.objects[0], args.seed)
            run_video(model, images, mask, device, OpTimer(device, args.backend), args, dtype_name, "warm-up", False)
        for K in ([] if args.fit == "only" else args.objects):
            records += timed_runs(model, device, args, env, dtype_name, K, log)
        if args.fit_on:
            for K in args.objects:
                for fine_every in (None, args.mem_every):
                    fits.append(fit_search(model, device, args, dtype_name, K, fine_every, env))
        del model
    meta["seconds"] = round(time.time() - start, 1)
    meta["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None

    print(f"device: {env['device']}   threads: {env['threads']}   load average: {env['loadavg']} -> "
          f"{tuple(round(x, 2) for x in meta['loadavg_end'] or ())}")
    print(f"torch {env['torch']}   cuda {env['cuda']}   triton {env['triton']}   hmmn_ops build {env['hmmn_ops_build']}")
    print(f"{meta['model']}, {meta['parameters'] / 1e6:.1f} M parameters, {meta['weights']}; InferenceCore(mem_every="
          f"{args.mem_every}, fine_mem_every={args.fine_mem_every}); {args.frames} frames, {args.warmup} warm-up")
    print(f"{env['date']}   {env['command']}   ({meta['seconds']} s)")
    for line in meta["backends_info"]:
        print(f"  {line}")
    if records:
        print(table(records, device.type == "cpu"))
        print("ms/frame: median over the timed frames; matching ms: mean time per frame inside the ops, split in "
              "the op columns; share: matching / the whole step (totals); peak MB: extra memory over the video; "
              "speedup: naive ms/frame / ours")
    if fits:
        print(f"\nlongest video whose memory fits ({args.fit_size[0]}):")
        print(fit_table(fits))

    json_path = args.json
    if json_path is None and not (args.quick or args.no_save):
        json_path = os.path.join(HERE, "results", common.device_slug(device), f"model_{label}.json")
    if json_path:
        common.write_json(json_path, dict(meta=meta, records=records + fits))
        print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
