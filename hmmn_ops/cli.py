"""`hmmn-vos`: the command-line front of hmmn_ops.

Each sub-command lives in `hmmn_ops/commands/<name>.py` and provides `add_arguments(parser)` and
`run(args) -> int`; its module docstring's first line is the help text. Modules are imported only
when their command runs, so `hmmn-vos info` stays fast.
"""
import argparse
import importlib
import sys

COMMANDS = ("segment", "eval", "train", "bench", "demo", "info")


def _load(name):
    try:
        return importlib.import_module(f"hmmn_ops.commands.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"hmmn_ops.commands.{name}":
            return None  # not written yet in this version
        raise


def main(argv=None):
    parser = argparse.ArgumentParser(prog="hmmn-vos", description="Memory-based video object segmentation with hmmn_ops.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name in COMMANDS:
        module = _load(name)
        if module is None:
            continue
        doc = (module.__doc__ or name).strip().splitlines()[0]
        p = sub.add_parser(name, help=doc, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        modules[name] = module
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
