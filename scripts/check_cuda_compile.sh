#!/usr/bin/env bash
# Compiles every CUDA source of hmmn_ops (csrc/cuda/*.cu: the torch glue together with the
# torch-free kernels it instantiates) with nvcc for sm_80 and sm_90, without a GPU, and prints
# ptxas' resource usage per kernel. Fails on any compile error and on any register spill.
#
# The flags are setup.py's plus those torch's CUDAExtension adds (-std=c++20, the
# __CUDA_NO_HALF*__ defines). A CPU-only torch wheel lacks c10/cuda/impl/cuda_cmake_macros.h;
# scripts/cuda_shim provides it for this check only.
#
# Knobs: NVCC (compiler, default: nvcc on PATH or /usr/local/cuda/bin/nvcc; without one the
#        check is skipped, or fails if HMMN_REQUIRE_NVCC=1), HMMN_CHECK_ARCHS (default "80 90"),
#        MAX_JOBS (parallel nvcc runs, default: cores), PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

shopt -s nullglob
sources=(csrc/cuda/*.cu)
if [ ${#sources[@]} -eq 0 ]; then
  echo "check_cuda_compile: no CUDA sources in csrc/cuda, nothing to check"
  exit 0
fi

NVCC=${NVCC:-$(command -v nvcc || true)}
[ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ] && NVCC=/usr/local/cuda/bin/nvcc
if [ -z "$NVCC" ]; then
  # A machine without the CUDA toolkit cannot run this check; say so loudly, and fail only
  # where the check is required (HMMN_REQUIRE_NVCC=1).
  echo "check_cuda_compile: SKIPPED: nvcc not found (set NVCC or put the CUDA toolkit on PATH)" >&2
  exit "${HMMN_REQUIRE_NVCC:-0}"
fi
PYTHON=${PYTHON:-python3}
if ! inc=$("$PYTHON" -c 'import torch.utils.cpp_extension as c; print("\n".join(c.include_paths()))'); then
  echo "check_cuda_compile: FAILED: $PYTHON cannot import torch (set PYTHON)" >&2
  exit 1
fi
mapfile -t torch_inc <<<"$inc"
archs=(${HMMN_CHECK_ARCHS:-80 90})
jobs=${MAX_JOBS:-$(nproc)}
echo "check_cuda_compile: $("$NVCC" --version | tail -1); archs: ${archs[*]}; ${#sources[@]} sources; $jobs jobs"

flags=(-std=c++20 -O3 --use_fast_math -lineinfo --expt-relaxed-constexpr -DHMMN_OPS_WITH_CUDA
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
       -D__CUDA_NO_HALF2_OPERATORS__ -DTORCH_EXTENSION_NAME=_C --compiler-options -fPIC
       -Xptxas -v -Iscripts/cuda_shim -Icsrc)
for inc in "${torch_inc[@]}"; do flags+=(-isystem "$inc"); done
for a in "${archs[@]}"; do flags+=(-gencode "arch=compute_$a,code=sm_$a"); done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# One nvcc per source (all archs in one run: the host side is parsed once), MAX_JOBS at a time.
pids=()
for src in "${sources[@]}"; do
  name=$(basename "$src" .cu)
  ( "$NVCC" "${flags[@]}" -c "$src" -o "$work/$name.o" >"$work/$name.log" 2>&1; echo $? >"$work/$name.rc" ) &
  pids+=($!)
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do sleep 0.5; done
done
wait "${pids[@]}" || true

# ptxas -v prints, per kernel and arch: "Compiling entry function 'X' for 'sm_NN'", then
# "N bytes stack frame, N bytes spill stores, N bytes spill loads", then "Used N registers".
status=0
"$PYTHON" - "$work" "${sources[@]}" <<'PY' || status=$?
import os, re, shutil, subprocess, sys

work, sources = sys.argv[1], sys.argv[2:]
demangler = shutil.which("cu++filt") or shutil.which("c++filt")
failed, rows = False, []
for src in sources:
    name = os.path.basename(src)[:-3]
    log = open(os.path.join(work, name + ".log")).read()
    if open(os.path.join(work, name + ".rc")).read().strip() != "0":
        failed = True
        print(f"---- {src}: nvcc FAILED")
        print("\n".join(l for l in log.splitlines() if not l.startswith("ptxas info"))[-6000:])
        continue
    entry = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if m:
            entry = {"src": name, "fn": m.group(1), "arch": m.group(2)}
            continue
        if entry is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            entry["stack"], entry["spill"] = int(m.group(1)), int(m.group(2)) + int(m.group(3))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m:
            entry["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            entry["smem"] = int(s.group(1)) if s else 0
            rows.append(entry)
            entry = None

names = [r["fn"] for r in rows]
if demangler and names:
    out = subprocess.run([demangler], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    if len(out) == len(names):
        names = out
print(f"\n{'arch':6} {'regs':>4} {'smem':>6} {'stack':>5} {'spill':>5}  kernel")
spills = 0
for r, n in zip(rows, names):
    n = re.sub(r"^void ", "", re.sub(r"\(.*", "", n)).replace("hmmn::", "").replace(" ", "")
    spills += r.get("spill", 0) > 0
    print(f"{r['arch']:6} {r['regs']:>4} {r['smem']:>6} {r.get('stack', 0):>5} {r.get('spill', 0):>5}  {r['src']}: {n}")
print(f"\n{len(rows)} kernel builds, {spills} with register spills")
if spills:
    print("FAILED: register spills (spill column)", file=sys.stderr)
sys.exit(1 if failed or spills or not rows else 0)
PY
echo "check_cuda_compile: $(($(date +%s) - start)) s wall"
if [ $status -eq 0 ]; then echo "check_cuda_compile: OK"; else echo "check_cuda_compile: FAILED" >&2; exit 1; fi
