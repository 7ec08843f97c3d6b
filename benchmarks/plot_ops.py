"""Plots of benchmarks/bench_ops.py results: time and peak memory against memory frames T
(kernel_guided_read), and per row of the memory_read table (ours against the dense read).

    python benchmarks/plot_ops.py benchmarks/results/cpu/ops_480p_float32.json [--out DIR]
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import save_figure  # noqa: E402


def t_sweep_series(records):
    """{dtype: {implementation: [(T, ms, peak_mb)]}} from the T-sweep records.

    Each backend appears once per record pair; the baseline's numbers are taken once.
    """
    series = {}
    for r in records:
        if r.get("sweep") != "T":
            continue
        by_impl = series.setdefault(r["dtype"], {})
        T = r["shape"]["T"]
        by_impl.setdefault(r["backend"], {})[T] = (r["ms"], r["peak_mb"])
        if r.get("baseline") and r.get("baseline_ms") is not None:
            by_impl.setdefault(r["baseline"], {})[T] = (r["baseline_ms"], r["baseline_peak_mb"])
    return {
        dtype: {name: sorted((T, ms, mb) for T, (ms, mb) in pts.items()) for name, pts in impls.items()}
        for dtype, impls in series.items()
    }


def plot_t_sweep(records, out_dir):
    """One PNG per dtype (t_sweep_<dtype>.png); returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for dtype, impls in t_sweep_series(records).items():
        sample = next(r for r in records if r.get("sweep") == "T" and r["dtype"] == dtype)
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
        for name, pts in sorted(impls.items()):
            Ts = [p[0] for p in pts]
            style = "-" if _is_backend(name, records) else "--"  # ours solid, baselines dashed
            ax_t.plot(Ts, [p[1] for p in pts], style, marker="o", label=name)
            if all(p[2] is not None for p in pts):
                ax_m.plot(Ts, [p[2] for p in pts], style, marker="o", label=name)
        s = sample["shape"]
        title = (f"{sample['op']} {sample['variant']}, B={s['B']}, {s['H']}x{s['W']}, "
                 f"{s['Ck']}/{s['Cv']}, {dtype}\n{sample['device']}, torch {sample['torch']}")
        ax_t.set(xlabel="memory frames T", ylabel="median time (ms)", yscale="log")
        ax_m.set(xlabel="memory frames T", ylabel="peak extra memory (MB)", yscale="log")
        all_T = sorted({p[0] for pts in impls.values() for p in pts})
        for ax in (ax_t, ax_m):
            ax.set_xticks(all_T)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        fig.suptitle(title, fontsize=9)
        path = os.path.join(out_dir, f"t_sweep_{dtype}.png")
        save_figure(fig, path)
        plt.close(fig)
        paths.append(path)
    return paths


def memory_read_series(records):
    """{dtype: [(row label, {implementation: (ms, peak_mb)})]} from the memory_read records, in order."""
    series = {}
    for r in records:
        if r["op"] != "memory_read":
            continue
        rows = series.setdefault(r["dtype"], {})
        row = rows.setdefault(f"{r['variant']}\nNq {r['shape']['Nq']}, Nm {r['shape']['Nm']}", {})
        row[r["backend"]] = (r["ms"], r["peak_mb"])
        if r.get("baseline"):
            row[r["baseline"]] = (r["baseline_ms"], r["baseline_peak_mb"])
    return {dtype: list(rows.items()) for dtype, rows in series.items()}


def plot_memory_read(records, out_dir):
    """One PNG per dtype (memory_read_<dtype>.png): time and peak memory of every implementation
    per row (bars; a row a baseline skipped has no bar for it). Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for dtype, rows in memory_read_series(records).items():
        sample = next(r for r in records if r["op"] == "memory_read" and r["dtype"] == dtype)
        names = list(dict.fromkeys(name for _, impls in rows for name in impls))
        width = 0.8 / len(names)
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), layout="constrained")
        for ax, i, ylabel in ((axes[0], 0, "median time (ms)"), (axes[1], 1, "peak extra memory (MB)")):
            for j, name in enumerate(names):
                xs = [x + j * width for x, (_, impls) in enumerate(rows) if (impls.get(name) or (None,) * 2)[i]]
                ys = [impls[name][i] for _, impls in rows if (impls.get(name) or (None,) * 2)[i]]
                ax.bar(xs, ys, width, label=name, hatch="" if _is_backend(name, records) else "//")
            ax.set_xticks([x + 0.4 - width / 2 for x in range(len(rows))], [label for label, _ in rows], fontsize=8)
            ax.set(ylabel=ylabel, yscale="log")
            ax.grid(True, axis="y", which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"memory_read, B={sample['shape']['B']}, {dtype}\n{sample['device']}, torch {sample['torch']}",
                     fontsize=9)
        path = os.path.join(out_dir, f"memory_read_{dtype}.png")
        save_figure(fig, path)
        plt.close(fig)
        paths.append(path)
    return paths


def _is_backend(name, records):
    return any(r["backend"] == name for r in records)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", help="a JSON file written by bench_ops.py")
    parser.add_argument("--out", help="folder for the PNGs (default: next to the JSON)")
    args = parser.parse_args(argv)
    with open(args.json) as f:
        records = json.load(f)["records"]
    out = args.out or os.path.dirname(os.path.abspath(args.json))
    paths = plot_t_sweep(records, out) + plot_memory_read(records, out)
    print("\n".join(paths) if paths else "no T-sweep or memory_read records in this file")
    return 0


if __name__ == "__main__":
    sys.exit(main())
