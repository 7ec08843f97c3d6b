"""Run the benchmarks of a source checkout: the ops (bench_ops.py) or the whole model (bench_model.py).

    hmmn-vos bench ops [bench_ops.py flags]       # e.g. --quick, --device cuda --dtype bfloat16
    hmmn-vos bench model [bench_model.py flags]   # e.g. --quick, --objects 1,3 --baseline naive
    hmmn-vos bench model --help                   # the benchmark's own flags

The scripts live in benchmarks/ next to the package in a source checkout (an editable
install); a wheel does not ship them.
"""
import argparse
import os
import runpy
import sys

SCRIPTS = {"ops": "bench_ops.py", "model": "bench_model.py"}


def benchmarks_dir():
    """benchmarks/ of the source checkout the package is imported from, or None (a wheel install)."""
    import hmmn_ops

    root = os.path.dirname(os.path.dirname(os.path.abspath(hmmn_ops.__file__)))
    folder = os.path.join(root, "benchmarks")
    # common.py too: a stray "benchmarks" folder next to site-packages is not ours
    ours = all(os.path.isfile(os.path.join(folder, name)) for name in ("common.py", *SCRIPTS.values()))
    return folder if ours else None


def add_arguments(parser):
    parser.add_argument("benchmark", choices=sorted(SCRIPTS),
                        help="ops: benchmarks/bench_ops.py; model: benchmarks/bench_model.py")
    parser.add_argument("args", nargs=argparse.REMAINDER,
                        help="the benchmark's flags (see `hmmn-vos bench ops --help`, `hmmn-vos bench model --help`)")


def run(args):
    folder = benchmarks_dir()
    if folder is None:
        import hmmn_ops

        print("hmmn-vos bench: error: the benchmarks are not installed with the package (hmmn_ops imported from "
              f"{os.path.dirname(os.path.abspath(hmmn_ops.__file__))}); run from a source checkout: "
              "git clone the repository, `pip install --no-build-isolation -e .` there, then `hmmn-vos bench ...` "
              "or `python benchmarks/bench_ops.py`", file=sys.stderr)
        return 2
    path = os.path.join(folder, SCRIPTS[args.benchmark])
    saved = sys.argv
    sys.argv = [path, *args.args]  # the script parses sys.argv and records it as its command
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as stop:  # the script's sys.exit(main()), argparse's exits, sys.exit("message")
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(stop.code, file=sys.stderr)
        return 1
    finally:
        sys.argv = saved
    return 0
