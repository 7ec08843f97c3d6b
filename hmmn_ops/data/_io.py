"""Atomic file writes: write under a temporary name in the same folder, then `os.replace`.

A reader (or a crashed run) never sees a half-written frame, mask or CSV: the final name
appears only once its content is complete. Same folder, so the rename never crosses a
file system.
"""
import contextlib
import os
import uuid


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
