"""The README's usage snippet runs as written, on a tiny local checkpoint."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from helpers import batch_of, make_prompt, pixels, tiny_llava

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_first_lines_are_the_setup_commands():
    lines = README.read_text().splitlines()
    commands = [line.strip() for line in lines[:5] if line.startswith("    ")]
    assert len(commands) == 2
    assert commands[0].endswith('pip install -e ".[lab]" && dpn demo') and commands[1].endswith("pytest")


def test_readme_snippet_runs(tmp_path, monkeypatch):
    snippet = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    path = tmp_path / "tiny-llava"
    tiny_llava(seed=1).save_pretrained(path)
    batch = batch_of([make_prompt(3, 5, seed=1), make_prompt(6, 2, seed=2)])
    batch["pixel_values"] = pixels(2)
    labels = batch["input_ids"].clone()
    labels[:, :-3] = -100
    monkeypatch.chdir(tmp_path)
    namespace = {"path": str(path), "batch": batch, "labels": labels}
    exec(compile(snippet, str(README), "exec"), namespace)
    model = namespace["model"]
    assert namespace["ids"].shape == (2, batch["input_ids"].shape[1] + 32)
    assert (tmp_path / "ckpt" / "pyramid_model.safetensors").is_file()
    with torch.no_grad():
        out = model(**batch)
    assert out.routing is not None and out.routing.flops_ratio.shape == (2,)
