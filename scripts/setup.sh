#!/usr/bin/env bash
# Makes a virtual environment (.venv in the repo root), installs the pinned requirements in it and
# builds hmmn_ops there, editable, against that environment's torch. Works with a distribution's
# stock Python (PEP 668: nothing is installed outside the venv). Then:
#   source .venv/bin/activate && hmmn-vos demo
#
# Environment:
#   PYTHON=python3     the interpreter the venv is made from (3.10 or newer)
#   VENV=.venv         where the venv goes (an existing one is reused)
#   TORCH_INDEX=URL    install torch from this index first, e.g. a CPU-only or a CUDA build
#                      (docs/install.md); default: pip's configured index
#   TRITON=auto|0|1    install Triton (optional; GPU kernels): auto tries and goes on without it
#   HMMN_OPS_CUDA, TORCH_CUDA_ARCH_LIST, MAX_JOBS, HMMN_OPS_DEBUG: build knobs (setup.py)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TRITON=${TRITON:-auto}
say() { echo "== setup.sh: $*"; }

command -v "$PYTHON" > /dev/null || { echo "setup.sh: $PYTHON not found; install Python 3.10+ (Debian/Ubuntu: sudo apt-get install python3 python3-venv python3-dev g++)" >&2; exit 1; }
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || { echo "setup.sh: $("$PYTHON" --version) is too old: hmmn_ops needs Python 3.10 or newer (torch 2.13 does)" >&2; exit 1; }

if [ -x "$VENV/bin/python" ]; then
    say "using the virtual environment $VENV ($("$VENV/bin/python" --version))"
else
    say "creating the virtual environment $VENV with $("$PYTHON" --version) ($(command -v "$PYTHON"))"
    "$PYTHON" -m venv "$VENV" || { rm -rf "$VENV"; echo "setup.sh: '$PYTHON -m venv' failed; on Debian/Ubuntu install the venv module: sudo apt-get install python3-venv" >&2; exit 1; }
fi
venv_dir=$(cd "$VENV" && pwd)
py="$venv_dir/bin/python"

if [ -n "${TORCH_INDEX:-}" ]; then
    say "installing $(grep -E '^torch==' requirements.txt) from $TORCH_INDEX"
    "$py" -m pip install -q --index-url "$TORCH_INDEX" "$(grep -E '^torch==' requirements.txt)"
fi
say "installing requirements-dev.txt (torch, numpy, the application's packages, build tools, pytest)"
"$py" -m pip install -q -r requirements-dev.txt
case "$TRITON" in
    0) say "Triton: skipped (TRITON=0)" ;;
    1) say "installing Triton"; "$py" -m pip install -q "triton>=3.0" ;;
    *) if "$py" -m pip install -q "triton>=3.0"; then say "Triton installed"
       else say "Triton not installed (optional: CUDA tensors then use the native kernels or the reference)"; fi ;;
esac
# What the build needs besides pip packages: a C++20 compiler and Python's headers.
command -v "${CXX:-c++}" > /dev/null || { echo "setup.sh: no C++ compiler (${CXX:-c++}); on Debian/Ubuntu: sudo apt-get install g++" >&2; exit 1; }
"$py" -c 'import os, sys, sysconfig; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
    || { echo "setup.sh: Python's headers (Python.h) are missing; on Debian/Ubuntu: sudo apt-get install python3-dev" >&2; exit 1; }
say "building hmmn_ops against $("$py" -c 'import torch; print("torch", torch.__version__)') (pip install --no-build-isolation --no-deps -e .; a few minutes)"
"$py" -m pip install -q --no-build-isolation --no-deps -e .

# Import from outside the tree, so that what loads is the installed package, not the source folder by accident.
(cd / && "$py" -c "
import os, sys, hmmn_ops
root = os.path.realpath(sys.argv[1])
assert os.path.realpath(hmmn_ops.__file__).startswith(root), f'hmmn_ops loads from {hmmn_ops.__file__}, not {root}'
print('== setup.sh: hmmn_ops', hmmn_ops.__version__, 'built against torch', hmmn_ops.BUILD_CONFIG['torch_version'], 'in', root)
" "$root")
say "done. Activate the environment, then run the demo:"
echo "    source $venv_dir/bin/activate && hmmn-vos demo"
