#!/usr/bin/env bash
# Installs the pinned dependencies and builds hmmn_ops in place against the installed torch.
# On a GPU machine with its own CUDA torch, skip this and run:
#   pip install --no-build-isolation --no-deps -e .
set -euo pipefail
cd "$(dirname "$0")/.."
# Runs pip hiding only its root-user and local-index chatter; with pipefail a pip failure still fails.
quiet() { "$@" 2>&1 | { grep -v -e "^WARNING: Running pip as" -e "is ignored: it is neither" || true; }; }
quiet python3 -m pip install -q -r requirements-dev.txt
quiet python3 -m pip install -q --no-build-isolation --no-deps -e .
# Import from outside the tree so the installed package (not the source folder) is what loads.
root=$PWD
(cd / && python3 -c "
import os, sys, hmmn_ops
root = os.path.realpath(sys.argv[1])
assert os.path.realpath(hmmn_ops.__file__).startswith(root), f'hmmn_ops loads from {hmmn_ops.__file__}, not {root}'
print('hmmn_ops', hmmn_ops.__version__, 'built against torch', hmmn_ops.BUILD_CONFIG['torch_version'], 'from', root)
" "$root")
