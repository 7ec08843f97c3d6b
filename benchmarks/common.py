"""Shared benchmark plumbing: timing, peak memory, the environment record, atomic output.

Timing: median of repeated calls after warm-up; CUDA events on a GPU, time.perf_counter on
the CPU. The number of repeats adapts to a per-implementation time budget (at least 3 when a
call fits in a third of the budget, else 1) so a whole run stays bounded.

Peak memory (MB, extra memory of one call, outputs included):
  CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus the memory
        allocated before the call;
  CPU:  peak resident set size of the process during the call minus the RSS before it. Free
        heap pages are first returned to the OS (glibc malloc_trim), then the kernel's
        high-water mark is reset by writing "5" to /proc/self/clear_refs; the peak is VmHWM
        from /proc/self/status afterwards. None where /proc/self/clear_refs is not writable.
"""
import contextlib
import ctypes
import datetime
import gc
import json
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time

import torch

MB = 1024 * 1024


# ---------------------------------------------------------------- environment


def device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            match = re.search(r"model name\s*:\s*(.+)", f.read())
            if match:
                name = match.group(1).strip()
    return name


def device_slug(device):
    """Folder name under benchmarks/results/: "cpu", or the GPU name ("nvidia-h100-80gb-hbm3")."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def triton_version():
    try:
        import triton
    except Exception:  # not installed, or broken install: either way not usable here
        return None
    return getattr(triton, "__version__", "unknown")


def hmmn_ops_build():
    try:
        from hmmn_ops._build_config import BUILD_CONFIG
    except Exception:
        return None
    return {k: BUILD_CONFIG.get(k) for k in ("torch_version", "cuda_built", "cuda_archs", "debug")}


def environment(device, argv=None):
    """What every benchmark record carries: device, versions, date, command."""
    argv = sys.argv if argv is None else argv
    return {
        "device": device_name(device),
        "device_type": torch.device(device).type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version(),
        "hmmn_ops_build": hmmn_ops_build(),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,  # others sharing the CPU?
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in ["python"] + list(argv)),
    }


# ---------------------------------------------------------------- timing


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device, *, repeats, budget_s, estimate_s=None):
    """Median milliseconds of fn() and the number of timed calls.

    estimate_s: the duration of an earlier (warm-up) call; without it one warm-up call is made.
    """
    cuda = torch.device(device).type == "cuda"
    if estimate_s is None:
        start = time.perf_counter()
        fn()
        synchronize(device)
        estimate_s = time.perf_counter() - start
    n = int(budget_s / max(estimate_s, 1e-9))
    n = max(3 if estimate_s * 3 <= budget_s else 1, min(repeats, n))
    times = []
    for _ in range(n):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), n


# ---------------------------------------------------------------- peak memory


def _status_kb(field):
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def _malloc_trim():
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _can_reset_hwm():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kb("VmHWM")
        return True
    except (OSError, AttributeError):
        return False


def peak_memory(fn, device):
    """(extra MB at the peak of one fn() call or None, seconds it took, its output); see module doc."""
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        out = fn()
        synchronize(device)
        seconds = time.perf_counter() - start
        return (torch.cuda.max_memory_allocated(device) - base) / MB, seconds, out
    if not _can_reset_hwm():
        start = time.perf_counter()
        out = fn()
        return None, time.perf_counter() - start, out
    _malloc_trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the high-water mark restarts from the current RSS
    base = _status_kb("VmRSS")
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    return (_status_kb("VmHWM") - base) / 1024, seconds, out


def available_memory_mb(device):
    """Memory a new allocation can still get: free GPU memory, or MemAvailable on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / MB
    with contextlib.suppress(OSError, AttributeError):
        with open("/proc/meminfo") as f:
            return int(re.search(r"MemAvailable:\s+(\d+) kB", f.read()).group(1)) / 1024
    return float("inf")


# ---------------------------------------------------------------- output


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; results are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")


def save_figure(fig, path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=os.path.splitext(path)[1].lstrip(".") or "png", dpi=120, bbox_inches="tight")


def format_table(rows, columns):
    """Plain aligned text. rows: dicts of strings; columns: (key, title); numbers right-aligned."""
    titles = [title for _, title in columns]
    cells = [[str(row.get(key, "")) for key, _ in columns] for row in rows]
    widths = [max([len(t)] + [len(r[i]) for r in cells]) for i, t in enumerate(titles)]
    number = re.compile(r"[-+0-9.e%x ]*|idx.*|.* (TFLOP|GB)/s")
    numeric = [all(number.fullmatch(r[i]) for r in cells) for i in range(len(titles))]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(titles), rule] + [line(r) for r in cells])
