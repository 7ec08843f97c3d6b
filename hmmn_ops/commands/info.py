"""Versions, build configuration and which backend runs each op here."""
import platform


def add_arguments(parser):
    parser.add_argument("--device", default=None, help="device to report backends for (default: cuda if available, else cpu)")


def run(args):
    import torch

    import hmmn_ops
    from hmmn_ops.backends import FORWARD_OPS

    rows = [
        ("hmmn_ops", hmmn_ops.__version__),
        ("python", platform.python_version()),
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda}, cuda available: {torch.cuda.is_available()})"),
    ]
    try:
        import triton

        rows.append(("triton", triton.__version__))
    except ImportError:
        rows.append(("triton", "not installed"))
    if torch.cuda.is_available():
        rows.append(("gpu", f"{torch.cuda.get_device_name()} sm_{''.join(map(str, torch.cuda.get_device_capability()))}"))
    cfg = hmmn_ops.BUILD_CONFIG
    rows.append(("built against", f"torch {cfg['torch_version']}, CUDA kernels: {cfg['cuda_built']}"
                 + (f" ({cfg['cuda_archs']})" if cfg["cuda_built"] else "")
                 + f", CUDA emulator: {cfg.get('cuda_emulated', False)}"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")

    report = hmmn_ops.backends(args.device)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"\nbackends on {device}   (auto = what backend='auto' runs)")
    names = ("auto", "native", "triton", "reference", "cuda_emulated")
    op_width = max(len(op) for op in FORWARD_OPS)
    print(f"{'op':<{op_width}}  " + "  ".join(f"{n:<9}" for n in names))
    reasons = {}
    for op in FORWARD_OPS:
        cells = [report["auto"][op]]
        for name in names[1:]:
            why = report[name][op]
            cells.append("yes" if why is None else f"no [{reasons.setdefault(why, len(reasons) + 1)}]")
        print(f"{op:<{op_width}}  " + "  ".join(f"{c:<9}" for c in cells))
    for why, n in reasons.items():
        print(f"  [{n}] {why}")
    return 0
