"""What several commands check the same way: --device values and output folders."""
import argparse
import os
import re
import tempfile

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def device_arg(text):
    """argparse type of --device: auto | cpu | cuda | cuda:N; "auto" gives None (the default device)."""
    if not _DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return None if text == "auto" else text


def device(name):
    """The torch.device to run on: `name` from device_arg (None: cuda if available, else cpu);
    cuda without an index is this process's GPU under torchrun (LOCAL_RANK)."""
    import torch

    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available in this torch build or machine")
        index = int(name[5:] or os.environ.get("LOCAL_RANK", 0))
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    return torch.device(name)


def check_output_folder(path, flag):
    """Refuse, before any work, an output folder (`flag` PATH) that is a file or cannot be written
    (a folder that does not exist yet is checked where it would be created)."""
    folder = os.path.abspath(path)
    while not os.path.isdir(folder):
        if os.path.lexists(folder):
            raise ValueError(f"{flag} {path}: {folder} is a file, not a folder")
        folder = os.path.dirname(folder)
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write in {folder} ({e.strerror or e})") from None
