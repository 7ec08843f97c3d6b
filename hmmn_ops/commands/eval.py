"""Score segmentation results with the DAVIS benchmark's J&F (semi-supervised protocol).

Reads RESULTS/<sequence>/<frame>.png (label PNGs, as `hmmn-vos segment` writes them), compares
them with ROOT/Annotations/<resolution>/ for the sequences of ROOT/ImageSets/<imset>, leaving
out the first and last frame of each sequence. Prints the global numbers and J/F per object,
and writes global_results-<set>.csv and per-sequence_results-<set>.csv into RESULTS.

example:
  hmmn-vos eval --results out/val --davis data/DAVIS --imset 2017/val.txt
"""
REQUIRES = ("PIL", "tqdm", "scipy")


def add_arguments(parser):
    parser.add_argument("--results", required=True, metavar="DIR", help="folder of result masks: DIR/<sequence>/<frame>.png")
    parser.add_argument("--davis", required=True, metavar="ROOT", help="DAVIS root (JPEGImages/, Annotations/, ImageSets/)")
    parser.add_argument("--imset", default="2017/val.txt", help="image set, relative to ROOT/ImageSets (default: %(default)s)")
    parser.add_argument("--resolution", default="480p", help="DAVIS resolution folder (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=None, metavar="N", help="processes (default: all cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args):
    from hmmn_ops.metrics import evaluate_davis, format_results, write_results_csv

    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers: expected >= 1, got {args.workers}")
    evaluation = evaluate_davis(args.results, args.davis, args.imset, args.resolution, workers=args.workers,
                                progress=not args.no_progress)
    print(format_results(evaluation))
    for path in write_results_csv(args.results, evaluation):
        print(f"wrote {path}")
    return 0
