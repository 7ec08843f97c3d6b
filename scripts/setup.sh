#!/usr/bin/env bash
# Installs the pinned dependencies and builds hmmn_ops in place against the installed torch.
# On a GPU machine with its own CUDA torch, skip this and run:
#   pip install --no-build-isolation --no-deps -e .
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -r requirements-dev.txt 2>&1 | grep -v -e "^WARNING: Running pip as" -e "is ignored: it is neither" || true
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | grep -v -e "^WARNING: Running pip as" || true
python3 -c "import hmmn_ops; print('hmmn_ops', hmmn_ops.__version__, 'built against torch', hmmn_ops.BUILD_CONFIG['torch_version'])"
