"""The libyaml-backed composer must locate everything exactly as the pure-Python one does."""

from __future__ import annotations

from pathlib import Path

import pytest

from veobatch.yamlpos import _compose_with, _FastLoader, _Loader

ROOT = Path(__file__).resolve().parent.parent

DOCS = [
    (ROOT / "jobs" / "example.yaml").read_text(),
    (ROOT / "jobs" / "demo.yaml").read_text(),
    "version: 1\njobs:\n  # c\n  - model: m\n    prompt: a\n  -\n    # alone\n    model: m\n",
    "jobs:\n- a\n- - b\n  - c\n-   d  # comment\n- [e, f]\n- {g: 1}\n",
    "x: &anchor {a: 1}\ny: *anchor\nz: 'quoted'\nw: yes\nv: 16:9\nu: 2026-01-01\n",
    "jobs:\n  - id: a\n    image_urls:\n      - https://x/1.png\n      -   https://x/2.png\n",
]


@pytest.mark.parametrize("text", DOCS)
def test_fast_and_pure_python_composers_agree(text: str) -> None:
    if _FastLoader is _Loader.__mro__[1]:
        pytest.skip("libyaml is not available")
    fast, pure = _compose_with(_FastLoader, text), _compose_with(_Loader, text)
    assert fast.data == pure.data
    assert fast.source.values == pure.source.values
    assert fast.source.keys == pure.source.keys
    assert fast.source.items == pure.source.items
    assert fast.source.plain == pure.source.plain
    assert fast.issues == pure.issues
