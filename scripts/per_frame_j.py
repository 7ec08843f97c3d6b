"""Validation J frame by frame: where along a video a model loses its objects.

    python scripts/per_frame_j.py WEIGHTS [WEIGHTS ...] [--labels NAME ...] [--memory-masks soft|hard ...]
        [--set FIELD=VALUE ...] [--seed 20000000] [--videos 32] [--frames 20] [--threads 2]
        [--plot drift.png] [--errors]

Segments synthetic videos (seeds never used by training, nor by the demo: docs/training.md)
from their first-frame annotation with each checkpoint and prints, per checkpoint, J on every
frame t >= 1 (IoU per object, averaged over every object of every video) and its mean over the
video, next to the baseline that copies the frame-0 mask. This is the "validation J" of
docs/training.md; `--plot` draws the curves (J against frame number); `--errors` says where
the errors lie (objects lost, and false positives by what lies under them: most are on the
object's look-alike twin).
"""
import argparse
import os
import sys

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt
from tqdm import tqdm

from hmmn_ops.data import SyntheticConfig
from hmmn_ops.data.sampler import HIDDEN
from hmmn_ops.data.synthetic import SyntheticVideo
from hmmn_ops.inference import InferenceCore
from hmmn_ops.metrics import jaccard
from hmmn_ops.models import load_model
from hmmn_ops.train import apply_overrides


ERROR_KINDS = ("twin", "other target", "occluder", "other look-alike", "background")
# what an (object, frame) pair is up against, first match wins: less than HIDDEN (half) of the
# object's largest area in view, as the occlusion clips count it (occluded, or partly or wholly out
# of the frame); its look-alike twin within NEAR pixels; any other object (occluder, target,
# look-alike) within NEAR pixels; nothing
SITUATIONS = ("hidden", "twin near", "other near", "clear")
NEAR = 4


def situation_of(obj, largest, nearby_roles):
    """One of SITUATIONS for an object's true mask `obj` (H, W) bool on a frame, its largest
    area in the video, and the roles of the objects within NEAR pixels ("twin", "other")."""
    if obj.sum() < HIDDEN * largest:
        return "hidden"
    return "twin near" if "twin" in nearby_roles else "other near" if nearby_roles else "clear"


def _nearby_roles(obj, instances, layout, label):
    """Roles ("twin" / "other") of the objects drawn within NEAR pixels of the mask `obj`."""
    ring = (distance_transform_edt(~obj) <= NEAR) & ~obj
    return {"twin" if layout[k - 1]["twin"] == label else "other" for k in np.unique(instances[ring]) if k}


def losses_of(scores, lost=0.2, found=0.5):
    """(times J falls below ``lost``, how many of those are followed by J >= ``found`` on a later
    frame) for one object's J per frame."""
    falls = [t for t in range(1, len(scores)) if scores[t] < lost <= scores[t - 1]]
    return len(falls), sum(max(scores[t + 1:], default=0) >= found for t in falls)


def per_frame_j(model, seeds, config, mem_every):
    """(J per frame, copy-first-mask J per frame, errors), frame 0 included (J 1 by construction).

    errors: over frames t >= 1 and every object, {"lost": share of (object, frame) pairs with
    J < 0.2, "missed": false-negative pixels / object pixels, "losses": times an object's J
    fell below 0.2, "found again": share of those after which it came back (J >= 0.5 on a later
    frame), "lost at the end": share of objects with J < 0.2 on the last frame, and per kind of
    ERROR_KINDS: false-positive pixels lying on it / object pixels, "situations": {situation:
    (share of the (object, frame) pairs, their mean J)} for SITUATIONS}. "twin" is the object's
    own look-alike (same shape and texture), "other target" another annotated object.
    """
    j, copy, count = (np.zeros(config.num_frames) for _ in range(3))
    lost = area = missed = losses = found = lost_at_end = objects_seen = 0
    wrong = dict.fromkeys(ERROR_KINDS, 0)
    by_situation = {k: [] for k in SITUATIONS}
    with torch.no_grad():
        for seed in tqdm(seeds, leave=False, desc="videos"):
            video = SyntheticVideo(seed, config)
            first = video.mask(0)
            objects = [i for i in np.unique(first) if i > 0]
            layout = video.layout  # what lies under a pixel of the instance map
            core = InferenceCore(model, mem_every=mem_every)
            history = {i: [] for i in objects}
            largest = {i: max((video.mask(t) == i).sum() for t in range(config.num_frames)) for i in objects}
            for t in range(config.num_frames):
                image, truth, instances = video.render(t, instances=True)
                image = torch.tensor(image).permute(2, 0, 1)
                labels = core.to_labels(core.step(image, torch.tensor(first) if t == 0 else None)).numpy()
                for i in objects:
                    score = jaccard(truth == i, labels == i)
                    history[i].append(score)
                    j[t] += score
                    copy[t] += jaccard(truth == i, first == i)
                    count[t] += 1
                    if t == 0:
                        continue
                    lost += score < 0.2
                    obj = truth == i
                    kind = situation_of(obj, largest[i], _nearby_roles(obj, instances, layout, i))
                    by_situation[kind].append(score)
                    area += (truth == i).sum()
                    missed += ((truth == i) & (labels != i)).sum()
                    under = instances[(labels == i) & (truth != i)]
                    for index, pixels in zip(*np.unique(under, return_counts=True)):
                        o = layout[index - 1] if index else None
                        kind = ("background" if o is None else "other target" if o["role"] == "target" else
                                "occluder" if o["role"] == "occluder" else "twin" if o["twin"] == i else "other look-alike")
                        wrong[kind] += pixels
            for scores in history.values():
                falls, back = losses_of(scores)
                losses, found = losses + falls, found + back
                lost_at_end += scores[-1] < 0.2
                objects_seen += 1
    pairs = count[1:].sum()
    errors = {"lost": lost / pairs, "missed": missed / max(area, 1), "losses": losses,
              "found again": found / max(losses, 1), "lost at the end": lost_at_end / max(objects_seen, 1),
              **{k: v / max(area, 1) for k, v in wrong.items()},
              "situations": {k: (len(v) / max(pairs, 1), float(np.mean(v)) if v else float("nan"))
                             for k, v in by_situation.items()}}
    return j / count, copy / count, errors


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("weights", nargs="+", help="checkpoints (a run's checkpoint.pt or exported weights)")
    p.add_argument("--labels", nargs="+", help="names for the checkpoints (default: their paths)")
    p.add_argument("--memory-masks", nargs="+", choices=("soft", "hard"),
                   help="per checkpoint, override what it memorises (default: each model's own setting)")
    p.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                   help="override HMMNConfig fields of every checkpoint (value read as YAML), e.g. kernel=none "
                        "sigma_init=0.5 input_scale=1")
    p.add_argument("--seed", type=int, default=20_000_000, help="first video seed (default: %(default)s)")
    p.add_argument("--videos", type=int, default=32, help="videos (default: %(default)s)")
    p.add_argument("--frames", type=int, default=20, help="frames per video (default: %(default)s)")
    p.add_argument("--height", type=int, default=112)
    p.add_argument("--width", type=int, default=192)
    p.add_argument("--mem-every", type=int, default=5, help="InferenceCore's mem_every (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--plot", metavar="PNG", help="draw J against frame number")
    p.add_argument("--errors", action="store_true",
                   help="also say where the errors are: objects lost, pixels missed, false positives by what lies "
                        "under them (the object's look-alike twin, another target, an occluder, ...)")
    args = p.parse_args(argv)
    labels = args.labels or args.weights
    memory_masks = args.memory_masks or [None] * len(args.weights)
    for name, given in (("labels", labels), ("memory-masks", memory_masks)):
        if len(given) != len(args.weights):
            p.error(f"--{name}: expected {len(args.weights)} values (one per checkpoint), got {len(given)}")
    if args.frames < 2 or args.videos < 1:
        p.error("--frames: expected >= 2 and --videos >= 1")
    try:
        fields = apply_overrides({}, args.set)
    except ValueError:
        p.error(f"--set: expected FIELD=VALUE, got {args.set}")
    torch.set_num_threads(args.threads)
    config = SyntheticConfig(height=args.height, width=args.width, num_frames=args.frames)
    seeds = range(args.seed, args.seed + args.videos)
    curves = {}
    for label, path, masks in zip(labels, args.weights, memory_masks):
        model = load_model(path, **fields, **({"memory_masks": masks} if masks else {})).eval()
        j, copy, errors = per_frame_j(model, seeds, config, args.mem_every)
        curves[label] = j
        print(f"{label}: mean J (frames 1-{args.frames - 1}) {j[1:].mean():.3f}   "
              f"per frame: {' '.join(f'{x:.2f}' for x in j[1:])}")
        if args.errors:
            print(f"  errors of {label}: lost (J < 0.2) {errors['lost']:.3f} of objects x frames; per object pixel: "
                  f"missed {errors['missed']:.3f}, false positives on " +
                  ", ".join(f"{kind} {errors[kind]:.3f}" for kind in ERROR_KINDS))
            print(f"  losses of {label}: {errors['losses']} times an object fell below J 0.2, found again (J >= 0.5 "
                  f"later) {errors['found again']:.3f} of them; lost on the last frame {errors['lost at the end']:.3f} "
                  f"of objects")
            print(f"  J by situation of {label} (share of object x frame pairs, J, J lost = share x (1 - J)): " +
                  ", ".join(f"{k} {share:.3f} J {j:.3f} lost {share * (1 - j):.3f}"
                            for k, (share, j) in errors["situations"].items() if share))
    print(f"copy frame 0's mask: mean J {copy[1:].mean():.3f}   per frame: {' '.join(f'{x:.2f}' for x in copy[1:])}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        t = np.arange(1, args.frames)
        for label, j in curves.items():
            ax.plot(t, j[1:], marker=".", label=f"{label} (mean {j[1:].mean():.3f})")
        ax.plot(t, copy[1:], ls="--", color="grey", label=f"copy frame 0's mask (mean {copy[1:].mean():.3f})")
        ax.set(xlabel="frame", ylabel="J (mean over objects)", ylim=(0, 1),
               title=f"{args.videos} videos from seed {args.seed}, {args.height}x{args.width}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        tmp = args.plot + ".tmp.png"
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
