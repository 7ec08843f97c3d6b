"""`hmmn-vos`: the command-line front of hmmn_ops.

Each sub-command lives in `hmmn_ops/commands/<name>.py` and provides `add_arguments(parser)` and
`run(args) -> int`, and lists in `REQUIRES` the packages of the VOS extra it imports; its module
docstring's first line is the help text. Modules are imported only when their command runs, so
`hmmn-vos info` stays fast and needs none of the extra's packages.

Bad input (a ValueError, which includes a corrupt file's FileFormatError, or a file that is
missing, a folder, or not allowed) ends with `hmmn-vos <command>: error: ...` and exit status 2,
as argparse does for bad arguments; any other exception is a bug and shows its traceback.
"""
import argparse
import importlib
import importlib.util
import sys

COMMANDS = ("segment", "eval", "train", "bench", "demo", "info")
# import name -> package of the `hmmn_ops[vos]` extra (the video object segmentation application)
VOS_EXTRA = {"PIL": "pillow", "tqdm": "tqdm", "yaml": "pyyaml", "matplotlib": "matplotlib", "scipy": "scipy"}
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


def _load(name):
    try:
        return importlib.import_module(f"hmmn_ops.commands.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"hmmn_ops.commands.{name}":
            return None  # not written yet in this version
        raise


def _message(error):
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.filename}: {error.strerror}"  # not "[Errno 2] No such file or directory: '...'"
    return str(error)


def _missing_extra(packages):
    return (f"needs {', '.join(packages)}, not installed: install the video object segmentation dependencies with "
            "pip install 'hmmn_ops[vos]'")


def _run(command, module, args):
    try:
        missing = [VOS_EXTRA[name] for name in getattr(module, "REQUIRES", ()) if importlib.util.find_spec(name) is None]
        if missing:
            raise ValueError(_missing_extra(missing))
        return int(module.run(args) or 0)
    except ModuleNotFoundError as e:  # one that REQUIRES does not list
        top = (e.name or "").partition(".")[0]
        if top not in VOS_EXTRA:
            raise
        message = _missing_extra([VOS_EXTRA[top]])
    except USER_ERRORS as e:
        message = _message(e)
    print(f"hmmn-vos {command}: error: {message}", file=sys.stderr)
    return 2


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
    return _run(args.command, modules[args.command], args)


if __name__ == "__main__":
    sys.exit(main())
