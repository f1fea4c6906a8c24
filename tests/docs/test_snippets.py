"""Every Python code block of README.md and docs/ runs, offline, in the order the page shows them.

A page's blocks share one namespace (as a reader would paste them one after the other) and run in a fresh tmp
working directory with the offline torch hub / Hugging Face caches of ``tests/conftest.py``. Blocks that need
downloaded weights are preceded by a hidden ``<!-- test-setup ... -->`` comment that puts locally made weights
in those caches first (the rendered page does not show it). ``bash`` / ``yaml`` blocks are not run here (the
recipes and the CLI have their own tests).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# a python fence, or a hidden setup comment; in page order
BLOCK = re.compile(r"^```python\n(?P<code>.*?)^```\s*$|^<!-- test-setup\n(?P<setup>.*?)^-->\s*$", re.S | re.M)


def blocks(page: Path) -> list[tuple[int, str, str]]:
    """(line number, "code" | "setup", source) of the page's python blocks and hidden setup comments, in order."""
    text = page.read_text()
    found = []
    for m in BLOCK.finditer(text):
        kind = "code" if m.group("code") is not None else "setup"
        found.append((text.count("\n", 0, m.start()) + 2, kind, m.group(kind)))
    return found


RUNNABLE = [p for p in PAGES if blocks(p)]


@pytest.mark.parametrize("page", RUNNABLE, ids=[str(p.relative_to(ROOT)) for p in RUNNABLE])
def test_page_code_blocks_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for line, _, code in blocks(page):
        try:
            exec(compile(code, f"{page.relative_to(ROOT)}:{line}", "exec"), namespace)
        except Exception as error:  # name the block, keep the traceback
            raise AssertionError(f"{page.relative_to(ROOT)}, the block at line {line} failed: {error!r}") from error


def test_every_python_fence_is_run() -> None:
    """Each ```python fence of every page is one block the test above runs (a fence the pattern missed, e.g. with
    trailing text after the language, would silently not run)."""
    for page in PAGES:
        text = page.read_text()
        fences = len(re.findall(r"^```python", text, re.M))
        setups = len(re.findall(r"^<!-- test-setup", text, re.M))
        kinds = [kind for _, kind, _ in blocks(page)]
        assert (kinds.count("code"), kinds.count("setup")) == (fences, setups), page
