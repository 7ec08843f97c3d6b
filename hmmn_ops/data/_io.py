"""File I/O that names the file: atomic writes, and reads that refuse a broken file clearly.

Writes go under a temporary name in the same folder, then `os.replace`: a reader (or a
crashed run) never sees a half-written frame, mask or CSV, since the final name appears only
once its content is complete. Same folder, so the rename never crosses a file system.

A file that exists but cannot be read as what it should be (corrupt, truncated, another
format) raises `FileFormatError`, whose message starts with the file's path.
"""
import contextlib
import os
import uuid


class FileFormatError(ValueError):
    """A file that cannot be read as what it should be; the message starts with its path."""


@contextlib.contextmanager
def reading(path, what):
    """Run the block that parses `path` (a `what`: "PNG mask", "PyTorch checkpoint", ...): a
    failure to parse it raises FileFormatError naming the file. A file that is missing or
    unreadable keeps the operating system's own error (FileNotFoundError, PermissionError)."""
    try:
        yield
    except MemoryError:
        raise
    except OSError as e:
        if e.errno is not None:
            raise
        raise FileFormatError(_unreadable(path, what, e)) from None
    except Exception as e:  # decoders and unpicklers raise anything on bad bytes (IndexError, SyntaxError, ...)
        raise FileFormatError(_unreadable(path, what, e)) from None


def _unreadable(path, what, error):
    reason = (str(error).strip().splitlines() or [""])[0]
    reason = f"{type(error).__name__}: {reason[:150]}{'...' if len(reason) > 150 else ''}"
    return f"{os.fspath(path)}: not a readable {what} (corrupt, truncated or another kind of file; {reason})"


def read_checkpoint(path, map_location="cpu"):
    """`torch.load(path, weights_only=True)`; a file torch cannot read raises FileFormatError."""
    import torch

    with reading(path, "PyTorch checkpoint"):
        return torch.load(path, map_location=map_location, weights_only=True)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; on success rename it to `path`, else delete it."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # A unique name rather than mkstemp: mkstemp makes 0600 files, and the renamed file
    # should get the usual permissions (umask), like any other file the user writes.
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_text(path, text):
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
