"""The README's Python snippets run as written (on this machine's device): the quick example, then the flash-attn
and SDPA/nn snippets that continue it. The transformers snippet downloads a model and is covered by
tests/test_transformers.py instead."""

from __future__ import annotations

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _blocks(section: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"## {section}")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start : end if end > 0 else None], flags=re.S)


def test_readme_snippets_run():
    quick = _blocks("Quick example")
    uses = _blocks("Use it from transformers / flash-attn / SDPA")
    assert len(quick) == 1 and len(uses) == 3 and "from_pretrained" in uses[0]
    scope: dict = {}
    exec(compile(quick[0], "README quick example", "exec"), scope)
    assert scope["out"].shape == scope["q"].shape and scope["q"].grad is not None
    for i, block in enumerate(uses[1:], start=1):
        exec(compile(block, f"README use snippet {i}", "exec"), scope)
    assert scope["step"].shape == (2, 1, 512) and scope["cache"].seqlen == 11
