"""Train an HMMN: static-image pretraining, then main training on videos (synthetic by default).

  hmmn-vos train --config release --out runs/release
  hmmn-vos train --config release --out runs/release --resume   # continue after a stop
  hmmn-vos train --out runs/quick --set pretrain_steps=200 --set main_steps=400 --set lr=5e-4
  torchrun --nproc_per_node 2 -m hmmn_ops.cli train --config ... --out ...  # DDP (gloo on CPU, nccl on GPU)

The run folder gets config.yaml (the resolved config), checkpoint.pt (every checkpoint_every
steps, atomically), log.csv, loss.png and, at the end, weights.pt (for hmmn-vos segment
--weights). --export PATH also writes the finished model to PATH (+ PATH's .json). With
--resume a run continues exactly where its checkpoint stopped (or starts if there is none);
without it an existing checkpoint is an error. See docs/training.md for every field.
"""
import os

from ._common import check_output_folder

REQUIRES = ("PIL", "tqdm", "yaml", "matplotlib")


def add_arguments(p):
    p.add_argument("--config", metavar="FILE|NAME", help="YAML or JSON file of TrainConfig fields (the rest: defaults), "
                   "or a packaged config: release, finetune, long_clips, prev_mask, prior_res4, gpu")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="override a field, value read as YAML (repeatable): --set lr=3e-4 --set model.decoder_dim=48")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint, if any")
    p.add_argument("--export", metavar="PATH", help="at the end, write the model to PATH (weights only) and PATH's .json")
    p.add_argument("--threads", type=int, help="torch threads per process (default: the config's, else torch's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args):
    import yaml

    from hmmn_ops.train import export_weights, load_config, train

    check_output_folder(args.out, "--out")
    for item in args.set:
        try:
            yaml.safe_load(item.partition("=")[2])
        except yaml.YAMLError as e:
            raise ValueError(f"--set {item}: the value is not valid YAML: {e}") from None
    try:
        overrides = list(args.set) + ([f"threads={args.threads}"] if args.threads is not None else [])
        cfg = load_config(args.config, overrides)
        summary = train(cfg, args.out, resume=args.resume, progress=not args.quiet)
    except yaml.YAMLError as e:  # --config, or the config.yaml of the run resumed
        raise ValueError(f"invalid YAML: {e}") from None
    if int(os.environ.get("RANK", 0)) != 0:
        return 0  # process 0 reports and exports
    if args.export:
        export_weights(args.out, args.export)
        print(f"exported {args.export}")
    if summary["steps_run"] == 0:
        print(f"{args.out}: already trained to step {summary['step']}, nothing to do")
    else:
        print(f"trained {summary['step']} steps, last loss {summary['loss']:.4f}: {args.out}")
    return 0
