#!/usr/bin/env bash
# The distribution as a user gets it: build the sdist from the checkout's files, build a wheel FROM
# THE SDIST in a clean virtual environment, install the wheel in another fresh one, and run it from
# outside the source tree: every op once (scripts/smoke_ops.py), `hmmn-vos info`, a packaged config
# name, a tiny `hmmn-vos demo`, then the same wheel with a mismatched torch record (warning, the
# reference backend, `hmmn-vos info` still works). CI runs it (scripts/test.sh).
#
#   bash scripts/smoke_package.sh            # in a temporary folder, removed afterwards
#   KEEP=1 bash scripts/smoke_package.sh     # keep it (the sdist and wheel are in WORK/dist)
# Environment: PYTHON (the interpreter the venvs are made from, default python3), TORCH (the torch
# requirement, default the pin of requirements.txt), MAX_JOBS (compile jobs, default 2).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-$(grep -E '^torch==' "$root/requirements.txt")}
export MAX_JOBS=${MAX_JOBS:-2}
unset HMMN_OPS_CUDA_EMULATION PYTHONPATH  # a release build, and nothing of the checkout on the path
work=$(mktemp -d "${TMPDIR:-/tmp}/hmmn_smoke.XXXXXX")
[ -n "${KEEP:-}" ] || trap 'rm -rf "$work"' EXIT
echo "== package smoke test in $work ($TORCH, $("$PYTHON" --version))"
start=$SECONDS
timed() { local t=$SECONDS; "$@"; echo "   ($(( SECONDS - t )) s)"; }
pipq() { "$@" -q --disable-pip-version-check 2>&1 | { grep -v "is ignored: it is neither" || true; }; }

# 1. The sdist, from the files git knows (tracked and new, not ignored: no build outputs), so that
#    a file the sdist forgets cannot be found in the checkout.
mkdir -p "$work/src" "$work/dist"
(cd "$root" && git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} sh -c 'test -e "{}" && echo "{}"' \
    | tar -cf - -T - ) | tar -xf - -C "$work/src"
echo "-- build venv: $TORCH, setuptools, build, ninja, numpy"
"$PYTHON" -m venv "$work/build-venv"
timed pipq "$work/build-venv/bin/pip" install "$TORCH" "setuptools>=77" build ninja numpy
echo "-- sdist"
"$work/build-venv/bin/python" -m build --sdist --no-isolation -o "$work/dist" "$work/src" > "$work/sdist.log" 2>&1 \
    || { tail -30 "$work/sdist.log"; exit 1; }
sdist=$(ls "$work"/dist/*.tar.gz)
listing=$(tar -tzf "$sdist")
for need in csrc/cpu/common.h csrc/cuda/kernels/common.cuh csrc/ops.cpp CMakeLists.txt LICENSE CHANGELOG.md \
            hmmn_ops/configs/release.yaml hmmn_ops/weights/hmmn.pt hmmn_ops/py.typed docs/ops.md; do
    grep -q "^[^/]*/$need\$" <<<"$listing" || { echo "sdist lacks $need"; exit 1; }
done
if grep -E '_build_config\.py$|\.so$' <<<"$listing"; then echo "sdist carries build outputs (above)"; exit 1; fi
echo "   $(basename "$sdist"): $(wc -l <<<"$listing") entries, $(du -k "$sdist" | cut -f1) KB; headers, CUDA sources, configs present; no build outputs"

# 2. The wheel, built from the unpacked sdist (nothing else of the checkout).
mkdir "$work/unpacked" && tar -xzf "$sdist" -C "$work/unpacked"
echo "-- wheel from the sdist (MAX_JOBS=$MAX_JOBS)"
t=$SECONDS
(cd "$work/unpacked"/* && "$work/build-venv/bin/python" -m build --wheel --no-isolation -o "$work/dist" . \
    > "$work/wheel.log" 2>&1) || { tail -30 "$work/wheel.log"; exit 1; }
echo "   ($(( SECONDS - t )) s)"
wheel=$(ls "$work"/dist/*.whl)
"$work/build-venv/bin/python" - "$wheel" <<'PY'
import sys, zipfile
wheel = zipfile.ZipFile(sys.argv[1])
names = wheel.namelist()
meta = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
so = next(i for i in wheel.infolist() if i.filename.startswith("hmmn_ops/_C") and i.filename.endswith(".so"))
for need in ("hmmn_ops/_build_config.py", "hmmn_ops/py.typed", "hmmn_ops/configs/release.yaml", "hmmn_ops/weights/hmmn.pt"):
    assert need in names, f"the wheel lacks {need}"
pins = [l for l in meta.splitlines() if l.startswith("Requires-Dist: torch")]
assert len(pins) == 1 and "==" in pins[0], f"the wheel must pin its torch, has {pins}"
print(f"   {sys.argv[1].rsplit('/', 1)[1]}: {sum(i.compress_size for i in wheel.infolist()) // 1024} KB; "
      f"_C {so.file_size // 1024} KB; {pins[0]}")
PY
if command -v file > /dev/null; then unzip -p "$wheel" 'hmmn_ops/_C*.so' > "$work/_C.so"; file "$work/_C.so" | grep -q "stripped" \
    && ! file "$work/_C.so" | grep -q "not stripped" || { echo "_C.so is not stripped: $(file "$work/_C.so")"; exit 1; }; fi

# 3. A fresh venv: torch, then the wheel alone (the ops need nothing else), run from outside the source tree.
echo "-- run venv: $TORCH, then the wheel"
"$PYTHON" -m venv "$work/run-venv"
timed pipq "$work/run-venv/bin/pip" install "$TORCH"
timed pipq "$work/run-venv/bin/pip" install "$wheel"
cd "$work"
py="$work/run-venv/bin/python"
echo "-- every op, backward, Tracker (without the vos extra)"
"$py" "$root/scripts/smoke_ops.py" --expect-native

# 4. The application: the vos extra.
echo "-- the wheel's vos extra"
timed pipq "$work/run-venv/bin/pip" install "$wheel[vos]"
echo "-- hmmn-vos info"
"$work/run-venv/bin/hmmn-vos" info
"$py" -c "from hmmn_ops.train import load_config; load_config('release'); print('-- packaged config: release loads')"
echo "-- hmmn-vos demo (2 sequences, 6 frames)"
t=$SECONDS
"$work/run-venv/bin/hmmn-vos" demo --out "$work/demo" --sequences 2 --frames 6 --threads 2 --quiet > "$work/demo.log" 2>&1 \
    || { tail -20 "$work/demo.log"; exit 1; }
echo "   $(tail -1 "$work/demo.log") ($(( SECONDS - t )) s)"
test -f "$work/demo/overlay.png"

# 5. The installed torch is not the one the wheel was built with (simulated by editing its record).
config=$("$py" -c "import hmmn_ops._build_config as c; print(c.__file__)")
sed -i "s/'torch_version': '[^']*'/'torch_version': '2.0.0'/" "$config"
echo "-- torch mismatch: warning, reference backend, info"
"$py" "$root/scripts/smoke_ops.py" --expect-fallback
"$work/run-venv/bin/hmmn-vos" info 2>&1 | grep -E "compiled kernels|built against"
echo "== package smoke test passed in $(( SECONDS - start )) s"
