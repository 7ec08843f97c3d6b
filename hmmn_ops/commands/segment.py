"""Segment videos: propagate annotated masks through every frame with HMMN.

One video:      hmmn-vos segment --frames DIR --mask DIR/00000.png --out OUT
A DAVIS set:    hmmn-vos segment --davis ROOT --imset 2017/val.txt --out OUT

Writes palette PNGs with the input mask's palette in the DAVIS layout, OUT/<sequence>/<frame
name>.png (for --frames, <sequence> is the frames folder's name), each under a temporary name
then renamed, so a file in OUT is always complete. --mask may be repeated: a mask is the
annotation of the frame with the same file name (00012.png -> 00012.jpg), which is how objects
that appear later are added; a single mask whose name matches no frame is the first frame's.
With --davis only the first frame's annotation is used (the semi-supervised protocol). Under
torchrun the sequences are split across the ranks (RANK / WORLD_SIZE), each rank on its own
GPU (LOCAL_RANK).

Weights: --weights takes the released HMMN_weights.pth or a checkpoint written by
hmmn_ops.models.save_checkpoint (hmmn-vos train). Without --weights the packaged
hmmn_ops/weights/hmmn.pt is used; if it is not installed the command stops with an error
unless --random-init is given (random weights: for smoke tests only, the masks are noise).

Resuming: run the same command again after an interruption and it continues. Frames already
written are not written again and a sequence whose frames are all there is skipped (in a
sequence begun, the frames before the first missing one are segmented again but not written:
the model's memory needs them). Each file records what it was computed from (weights, frames,
masks, options); a file computed otherwise is replaced.
"""
import hashlib
import os
import sys

from ._common import check_output_folder, device, device_arg

DEFAULT_WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights", "hmmn.pt")
VOID = 255  # DAVIS-style "ignore" label: background here, not an object
REQUIRES = ("PIL", "tqdm")


def add_arguments(p):
    src = p.add_argument_group("input: --frames and --mask, or --davis")
    src.add_argument("--frames", metavar="DIR", help="folder of frames (.jpg/.jpeg/.png, sorted by name)")
    src.add_argument("--mask", metavar="PNG", action="append", default=[],
                     help="palette PNG annotation of the frame with the same name (repeatable); one mask whose name "
                          "matches no frame is the first frame's")
    src.add_argument("--davis", metavar="ROOT", help="DAVIS root (JPEGImages/, Annotations/, ImageSets/)")
    src.add_argument("--imset", default="2017/val.txt", help="image set under ROOT/ImageSets (default: %(default)s)")
    src.add_argument("--resolution", default="480p", help="DAVIS resolution folder (default: %(default)s)")
    src.add_argument("--sequences", nargs="+", metavar="NAME", help="only these sequences of the set")
    p.add_argument("--out", required=True, metavar="DIR", help="output root: OUT/<sequence>/<frame>.png")
    p.add_argument("--overlay", metavar="DIR", help="also write overlay pictures: DIR/<sequence>/<frame>.jpg")
    p.add_argument("--weights", metavar="PATH", help=f"checkpoint (default: the packaged {DEFAULT_WEIGHTS})")
    p.add_argument("--random-init", action="store_true", help="run with random weights when none are found (smoke tests)")
    p.add_argument("--device", default="auto", type=device_arg, help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--amp", action="store_true", help="mixed precision (float16 on CUDA, bfloat16 on CPU)")
    p.add_argument("--kernel", choices=("none", "kmn", "hmmn"), help="override the model's res4 kernel")
    p.add_argument("--memory-masks", choices=("soft", "hard"),
                   help="override what the model memorises of a segmented frame: probabilities or argmax masks")
    p.add_argument("--mem-every", type=int, default=5, help="keep every N-th frame in the res4 memory (default: %(default)s)")
    p.add_argument("--fine-mem-every", type=int, help="keep every N-th frame in the res3/res2 memory too")
    p.add_argument("--official-compat", action="store_true", help="reproduce the released code's read exactly")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args):
    sequences = _shard(_sequences(args))
    check_output_folder(args.out, "--out")
    if args.overlay:
        check_output_folder(args.overlay, "--overlay")
    model, weights = _model(args)
    for seq, masks, palette in sequences:
        _segment(seq, masks, palette, model, _fingerprint(seq, masks, palette, weights, args), args)
    return 0


# ---------------------------------------------------------------- inputs, checked before any work


def _sequences(args):
    """[(Sequence, {frame index: labels (H, W)}, palette or None)], every input checked."""
    from ..data.video import FRAME_EXTENSIONS, Sequence, list_files, stem

    if bool(args.frames) == bool(args.davis):
        raise ValueError("give either --frames DIR with --mask PNG, or --davis ROOT (with --imset)")
    if args.davis:
        if args.mask:
            raise ValueError("--mask goes with --frames; with --davis the first frame's annotation is used")
        from ..data.davis import DAVIS

        davis = DAVIS(args.davis, args.imset, args.resolution, args.sequences)
        seqs = [Sequence(s.name, s.frame_paths, {0: s.mask_paths[0]}) for s in davis]
    else:
        if not args.mask:
            raise ValueError("--frames needs at least one --mask PNG (the annotation of the first frame)")
        frame_dir = os.path.normpath(args.frames)
        names = list_files(frame_dir, FRAME_EXTENSIONS, "frame")
        index = {stem(n): i for i, n in enumerate(names)}
        masks = {}
        for path in args.mask:
            i = index.get(stem(os.path.basename(path)))
            if i is None:
                if len(args.mask) > 1:
                    raise ValueError(f"{path}: no frame named {stem(os.path.basename(path))}.* in {frame_dir}; with several "
                                     "--mask, each must have the name of its frame")
                i = 0
            if i in masks:
                raise ValueError(f"{path}: frame {names[i]} already has a mask ({masks[i]})")
            masks[i] = path
        seqs = [Sequence(os.path.basename(frame_dir) or "video", [os.path.join(frame_dir, n) for n in names], masks)]
    return [_check(seq) for seq in seqs]


def _check(seq):
    from ..data.palette import image_size, load_mask

    H, W = seq.size
    for path in seq.frame_paths:
        h, w = image_size(path)
        if (h, w) != (H, W):
            raise ValueError(f"{path}: frame size {w}x{h} differs from the first frame's {W}x{H} ({seq.frame_paths[0]})")
    masks, palette = {}, None
    for i, path in seq.mask_paths.items():
        labels, pal = load_mask(path)  # refuses RGB masks with an explanation
        if labels.shape != (H, W):
            raise ValueError(f"{path}: mask size {labels.shape[1]}x{labels.shape[0]} differs from its frame's {W}x{H} "
                             f"({seq.frame_paths[i]})")
        labels[labels == VOID] = 0
        if not labels.any():
            raise ValueError(f"{path}: the mask has no object (every pixel is background 0); "
                             "annotate the objects to segment with values 1..K")
        masks[i] = labels
        palette = pal if palette is None else palette
    return seq, masks, palette


def _shard(sequences):
    """This rank's share of the sequences under torchrun (RANK / WORLD_SIZE)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world}: expected 0 <= RANK < WORLD_SIZE")
    return sequences[rank::world]


# ---------------------------------------------------------------- model and the loop


def _model(args):
    """(the model on its device, what identifies its weights: their file's digest)."""
    import uuid

    from ..data._io import read_checkpoint
    from ..models import HMMN, load_model

    run_on = device(args.device)
    fields = {name: getattr(args, name) for name in ("kernel", "memory_masks") if getattr(args, name)}
    path = args.weights or DEFAULT_WEIGHTS
    if os.path.isfile(path):
        model, weights = load_model(read_checkpoint(path), **fields), _digest(path)
    elif args.weights:
        raise FileNotFoundError(f"--weights {args.weights}: file not found")
    elif args.random_init:
        message = (f"no weights ({DEFAULT_WEIGHTS} is not installed): running with RANDOM weights as "
                   "--random-init asks; the masks will be meaningless")
        print(f"hmmn-vos segment: WARNING: {message}", file=sys.stderr)
        model, weights = HMMN(**fields), f"random {uuid.uuid4()}"  # never the same twice: nothing is resumed
    else:
        raise FileNotFoundError(f"no weights: {DEFAULT_WEIGHTS} is not installed. Pass --weights PATH (the released "
                                "HMMN_weights.pth or a checkpoint of hmmn-vos train), or --random-init for a smoke test")
    return model.to(run_on).eval(), weights


# ---------------------------------------------------------------- what a result was computed from


def _digest(path):
    """SHA-256 of a file's content, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fingerprint(seq, masks, palette, weights, args):
    """What the results of `seq` depend on, hashed: the weights, the frames, the annotations and
    the options that change the output. Every file written records it; a rerun does not write
    again a file that records the same."""
    options = [args.kernel, args.memory_masks, args.mem_every, args.fine_mem_every, args.official_compat, args.amp]
    h = hashlib.sha256(repr([weights, options]).encode())
    for path in seq.frame_paths:
        h.update(f"{os.path.basename(path)} {_digest(path)}".encode())
    for i, labels in masks.items():
        h.update(f"{i} {labels.shape}".encode())
        h.update(labels.tobytes())
    if palette is not None:
        h.update(palette.tobytes())
    return f"hmmn-vos segment {h.hexdigest()[:32]}"


def _records(path, fingerprint):
    """Whether the file at `path` exists and records `fingerprint` (its PNG or JPEG comment)."""
    from PIL import Image

    if not os.path.isfile(path):
        return False
    try:
        with Image.open(path) as img:  # the header only
            comment = img.info.get("comment")
    except (OSError, SyntaxError, ValueError):  # not readable: written again
        return False
    return (comment.decode("latin-1") if isinstance(comment, bytes) else comment) == fingerprint


# ---------------------------------------------------------------- the loop


def _segment(seq, masks, palette, model, fingerprint, args):
    import torch
    from PIL import Image
    from tqdm import tqdm

    from ..data import palette as pictures
    from ..data._io import atomic_path
    from ..data.video import stem
    from ..inference import InferenceCore

    names = [stem(os.path.basename(path)) for path in seq.frame_paths]
    outputs = [(os.path.join(args.out, seq.name, name + ".png"),
                os.path.join(args.overlay, seq.name, name + ".jpg") if args.overlay else None) for name in names]
    todo = {path for paths in outputs for path in paths if path is not None and not _records(path, fingerprint)}
    last = max((i for i, paths in enumerate(outputs) if todo.intersection(paths)), default=None)
    if last is None:
        if not args.quiet:
            print(f"{seq.name}: every frame already written, skipped", file=sys.stderr)
        return
    core = InferenceCore(model, mem_every=args.mem_every, fine_mem_every=args.fine_mem_every,
                         official_compat=args.official_compat, amp=args.amp)
    rank = os.environ.get("RANK")
    desc = seq.name if rank is None else f"[{rank}] {seq.name}"
    # the frames up to the last missing one: the model's memory of the earlier ones is needed
    for i in tqdm(range(last + 1), desc=desc, unit="frame", disable=args.quiet, file=sys.stderr):
        frame = seq.frame(i)
        mask = masks.get(i)
        probs = core.step(torch.tensor(frame).permute(2, 0, 1), None if mask is None else torch.from_numpy(mask))
        labels = core.to_labels(probs).cpu().numpy()
        mask_path, overlay_path = outputs[i]
        if mask_path in todo:
            pictures.save_mask(mask_path, labels, palette, comment=fingerprint)
        if overlay_path in todo:
            with atomic_path(overlay_path) as tmp:
                Image.fromarray(pictures.overlay(frame, labels, palette)).save(tmp, format="JPEG", quality=90,
                                                                               comment=fingerprint)
