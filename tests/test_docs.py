"""The repo is self-contained: every relative link of README.md and docs/**/*.md resolves, and no
tracked file points to the op contract outside the repo (docs/ops.md is the op reference).

    HMMN_DOCS_FILES="README.md docs/ops.md" pytest tests/test_docs.py   # check only these files
"""
import glob
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONLY = os.environ.get("HMMN_DOCS_FILES", "").split()
# A path outside the repo: the contract's file name and the folder it lived in.
OUTSIDE = re.compile(r"SPEC\.md|\bshared/")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _selected(paths):
    return [p for p in paths if not ONLY or p in ONLY]


def markdown_files():
    paths = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "**", "*.md"),
                                                                              recursive=True))
    return _selected(paths)


def tracked_files():
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout (e.g. an unpacked sdist): no list of tracked files")
    return _selected([p for p in out.decode().split("\0") if p])


def relative_links(path):
    """(line number, target) of the links in a markdown file that point into the repo."""
    links = []
    in_code = False
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.lstrip().startswith("```"):
                in_code = not in_code
                continue
            if in_code:
                continue
            for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
                if not re.match(r"[a-z][a-z0-9+.-]*:", target) and not target.startswith("#"):
                    links.append((number, target))
    return links


@pytest.mark.parametrize("path", markdown_files())
def test_relative_links_resolve(path):
    base = os.path.dirname(os.path.join(ROOT, path))
    broken = [f"{path}:{number}: {target}" for number, target in relative_links(path)
              if not os.path.exists(os.path.normpath(os.path.join(base, target.split("#")[0])))]
    assert not broken, "links to files that do not exist:\n" + "\n".join(broken)


def test_link_checker_sees_links_and_breakage(tmp_path, monkeypatch):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("[ok](b.md) ![img](../x.png) [web](https://example.org) [anchor](#h)\n"
                                            "`[not a link](nowhere.md)`\n```\n[code](nowhere.md)\n```\n[gone](c.md#s)\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", str(tmp_path))
    assert relative_links("docs/a.md") == [(1, "b.md"), (1, "../x.png"), (6, "c.md#s")]


def test_no_tracked_file_points_outside_the_repo():
    this = os.path.relpath(__file__, ROOT)
    hits = []
    for path in tracked_files():
        full = os.path.join(ROOT, path)
        if path == this or not os.path.isfile(full):
            continue
        with open(full, "rb") as f:
            data = f.read()
        if b"\0" in data[:4096]:
            continue  # binary
        for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{path}:{number}: {line.strip()[:120]}")
    assert not hits, "references to files outside the repo (use docs/ops.md):\n" + "\n".join(hits)
