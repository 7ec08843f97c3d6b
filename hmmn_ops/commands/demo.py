"""Demo: segment a held-out synthetic DAVIS-format set with the packaged weights and score it.

  hmmn-vos demo                       # into ./hmmn-demo
  hmmn-vos demo --out /tmp/demo --sequences 4 --frames 20

Generates synthetic videos (textured backgrounds, moving objects, occluders and look-alike
distractors of the targets) from seeds that training never uses, writes them as a DAVIS
folder (OUT/data), segments every sequence from its first-frame annotation with the
packaged weights (hmmn_ops/weights/hmmn.pt, or --weights) on the fastest backend available
(InferenceCore, backend "auto"), writes the masks (OUT/results/<sequence>/<frame>.png) and an
overlay strip (OUT/overlay.png: per sequence, the annotated frame then predictions across
the video), and scores the results with the DAVIS benchmark's J&F (OUT/results/*.csv).

The last line printed is: J&F <mean> J <mean> F <mean> ms/frame <mean>
(ms/frame: the model's time per frame, reading and writing files excluded).
"""
import os
import sys
import time

from ._common import check_output_folder, device, device_arg

REQUIRES = ("PIL", "tqdm", "scipy")
DEMO_SEED0 = 10_000_000  # training configs draw their seeds far below this (see docs/training.md)
STRIP_COLUMNS = 6
STRIP_ROWS = 6


def add_arguments(p):
    p.add_argument("--out", default="hmmn-demo", metavar="DIR", help="output folder (default: %(default)s)")
    p.add_argument("--weights", metavar="PATH", help="checkpoint (default: the packaged hmmn_ops/weights/hmmn.pt)")
    p.add_argument("--sequences", type=int, default=32, metavar="N", help="videos in the set (default: %(default)s)")
    p.add_argument("--frames", type=int, default=40, metavar="T", help="frames per video (default: %(default)s)")
    p.add_argument("--height", type=int, default=112, help="frame height (default: %(default)s, the training scale)")
    p.add_argument("--width", type=int, default=192, help="frame width (default: %(default)s)")
    p.add_argument("--distractors", type=int, nargs=2, default=(1, 2), metavar=("MIN", "MAX"),
                   help="look-alike distractors per video (default: 1 2)")
    p.add_argument("--seed", type=int, default=DEMO_SEED0, help="first video seed (default: %(default)s, held out)")
    p.add_argument("--device", default="auto", type=device_arg, help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--kernel", choices=("none", "kmn", "hmmn"), help="override the model's res4 kernel (ablation)")
    p.add_argument("--no-topk", action="store_true", help="dense res3/res2 reads instead of top-k guided ones (ablation)")
    p.add_argument("--memory-masks", choices=("soft", "hard"),
                   help="override what the model memorises of a segmented frame: probabilities or argmax masks")
    p.add_argument("--mem-every", type=int, default=5, help="keep every N-th frame in the res4 memory (default: %(default)s)")
    p.add_argument("--amp", action="store_true", help="mixed precision (float16 on CUDA, bfloat16 on CPU)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's; 1 is faster on a busy machine)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args):
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads: expected >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    for name in ("sequences", "frames", "height", "width", "mem_every"):
        if getattr(args, name) < (3 if name == "frames" else 1):
            raise ValueError(f"--{name.replace('_', '-')}: expected >= {3 if name == 'frames' else 1}, got {getattr(args, name)}")
    return _demo(args)


def _demo(args):
    import numpy as np

    from ..backends import auto_choice
    from ..data import DAVIS, SyntheticConfig, write_davis
    from ..metrics import evaluate_davis, format_results, write_results_csv
    from .segment import DEFAULT_WEIGHTS

    start = time.time()
    weights = args.weights or DEFAULT_WEIGHTS
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"weights not found: {weights}" + ("" if args.weights else
                                " (the packaged weights are not installed; pass --weights PATH)"))
    seeds = list(range(args.seed, args.seed + args.sequences))
    _check_held_out(weights, seeds)
    check_output_folder(args.out, "--out")
    model, run_on = _model(weights, args)
    data = os.path.join(args.out, "data")
    results = os.path.join(args.out, "results")
    resolution = f"{args.height}p"
    config = SyntheticConfig(height=args.height, width=args.width, num_frames=args.frames,
                             distractors=tuple(args.distractors))
    write_davis(data, seeds, config, set_name="demo", resolution=resolution, prefix="demo", workers=2)
    print(f"data: {args.sequences} synthetic videos of {args.frames} frames, {args.width}x{args.height}, "
          f"seeds {seeds[0]}..{seeds[-1]} (held out): {data}")

    backend = auto_choice("kernel_guided_read", run_on)
    cfg = model.config
    print(f"model: {weights} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, kernel "
          f"{cfg.kernel}, {'top-k' if cfg.topk_read else 'dense'} res3/res2 reads, {cfg.memory_masks} memory masks"
          f"{f', frames resized x{cfg.input_scale:g} inside' if cfg.input_scale != 1 else ''}) "
          f"on {run_on}, backend auto -> {backend}")

    davis = DAVIS(data, "2017/demo.txt", resolution)
    ms, strips = _segment_all(davis, model, run_on, results, args)
    evaluation = evaluate_davis(results, data, "2017/demo.txt", resolution, workers=min(2, os.cpu_count() or 1))
    write_results_csv(results, evaluation)
    _save_strip(os.path.join(args.out, "overlay.png"), strips)
    print(format_results(evaluation))
    print(f"wrote {results}/<sequence>/*.png, {os.path.join(args.out, 'overlay.png')}, "
          f"{results}/global_results-demo.csv; total {time.time() - start:.1f} s")
    g = evaluation["global"]
    print(f"J&F {g['J&F-Mean']:.3f} J {g['J-Mean']:.3f} F {g['F-Mean']:.3f} ms/frame {float(np.mean(ms)):.1f}")
    return 0


def _check_held_out(weights, seeds):
    """Refuse a demo set that shares seeds with the weights' training data (read from the JSON
    written next to packaged weights, when there is one)."""
    import json

    info = os.path.splitext(weights)[0] + ".json"
    if not os.path.isfile(info):
        return
    with open(info, encoding="utf-8") as f:
        info = json.load(f)
    # every stage counts: the run that made the weights and the runs it started from
    for train in [info.get("train", {})] + [stage.get("train", {}) for stage in info.get("init", [])]:
        for field in ("video_seeds", "image_seeds"):
            lo, hi = train.get(field, (0, 0))
            if any(lo <= s < hi for s in seeds):
                raise ValueError(f"--seed: the demo seeds {seeds[0]}..{seeds[-1]} overlap the training {field} "
                                 f"[{lo}, {hi}) of {weights}; choose seeds outside it")


def _model(weights, args):
    from ..data._io import read_checkpoint
    from ..models import load_model

    fields = {}
    if args.kernel:
        fields["kernel"] = args.kernel
    if args.no_topk:
        fields["topk_read"] = False
    if args.memory_masks:
        fields["memory_masks"] = args.memory_masks
    run_on = device(args.device)
    return load_model(read_checkpoint(weights), **fields).to(run_on).eval(), run_on


def _segment_all(davis, model, device, results, args):
    """Segment every sequence; returns (ms per frame of each frame, overlay rows)."""
    import numpy as np
    import torch
    from tqdm import tqdm

    from ..data.palette import overlay, save_mask
    from ..inference import InferenceCore

    ms, strips = [], []
    bar = tqdm(total=sum(len(s) for s in davis), unit="frame", desc="segment", disable=args.quiet, file=sys.stderr)
    for n, seq in enumerate(davis):
        core = InferenceCore(model, mem_every=args.mem_every, amp=args.amp)
        first = seq.mask(0)
        columns = set(np.linspace(0, len(seq) - 1, STRIP_COLUMNS).round().astype(int).tolist())
        row = []
        for i in range(len(seq)):
            frame = seq.frame(i)
            image = torch.tensor(frame).permute(2, 0, 1)
            t = time.perf_counter()
            probs = core.step(image, torch.from_numpy(first) if i == 0 else None)
            labels = core.to_labels(probs).cpu().numpy()  # .cpu() waits for the GPU
            ms.append(1000 * (time.perf_counter() - t))
            name = os.path.splitext(os.path.basename(seq.frame_paths[i]))[0]
            save_mask(os.path.join(results, seq.name, name + ".png"), labels)
            if n < STRIP_ROWS and i in columns:
                row.append(overlay(frame, first if i == 0 else labels))
            bar.update()
        if row:
            strips.append(row)
    bar.close()
    return ms, strips


def _save_strip(path, strips):
    """One picture: a row per sequence, its annotated frame then predictions, 2-pixel gaps."""
    import numpy as np
    from PIL import Image

    from ..data._io import atomic_path

    gap = 2
    h, w = strips[0][0].shape[:2]
    cols = max(len(r) for r in strips)
    canvas = np.full((len(strips) * (h + gap) - gap, cols * (w + gap) - gap, 3), 255, np.uint8)
    for r, row in enumerate(strips):
        for c, picture in enumerate(row):
            canvas[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = picture
    with atomic_path(path) as tmp:
        Image.fromarray(canvas).save(tmp, format="PNG")
