"""Plain ``nn.Module``s: the README's example runs as written, and split points are consistent.

Issue 18 item 5: the README had no complete example for a plain module, and which modules were
split points depended on what an ``nn.Sequential`` held (``Sequential(Linear, ReLU, Linear)``
was split, ``Sequential(LayerNorm, Linear)`` was not).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline_core.units import find_units
from pipeserve.cli import main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "plain_module.py"


def test_the_readme_shows_the_example_file():
    """The README's plain-module block is ``examples/plain_module.py``, which the next test
    runs: what a reader copies is what ran."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Plain modules", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block is not None, "no python block in the README's Plain modules section"
    assert block.group(1) == EXAMPLE.read_text()


@pytest.mark.slow
def test_the_example_runs_as_written(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # pipeline_core, as an installed package
    r = subprocess.run(
        [sys.executable, str(EXAMPLE), str(tmp_path / "ckpt")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,  # not the repository: the factory is found through the script's folder
    )
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "max |pipelined - single process|" in r.stdout
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))  # one class rules
        self.body = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Dropout(0.0), nn.GELU())  # none
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8)) for _ in range(3)
        )
        self.head = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(self.stem(x))
        for b in self.blocks:
            x = x + b(x)
        return self.head(x)


def test_every_sequential_outside_a_unit_is_split_at_its_children():
    """A ``Sequential`` is a chain: each child is a split point, whatever the children are;
    a ``Sequential`` inside a unit (an element of a block list) stays inside it."""
    names = [u.name for u in find_units(_Mixed())]
    assert names == [
        *[f"stem.{i}" for i in range(3)],
        *[f"body.{i}" for i in range(4)],
        *[f"blocks.{i}" for i in range(3)],
        "head.0",
        "head.1",
    ]


def test_units_flag_lists_the_split_points(tmp_path, capsys, monkeypatch):
    """``pipeserve plan --units`` on the example's model (a factory, inputs.json)."""
    monkeypatch.syspath_prepend(str(EXAMPLE.parent))
    import plain_module
    from safetensors.torch import save_file

    save_file(plain_module.build().state_dict(), str(tmp_path / "model.safetensors"))
    spec = {"name": "x", "shape": [4, 16], "dtype": "float32", "dynamic": {"0": "batch"}}
    (tmp_path / "inputs.json").write_text(json.dumps([spec]))
    args = ["plan", str(tmp_path), "--factory", plain_module.FACTORY, "--units"]
    assert main([*args, "--equal-size", "2"]) == 0
    units = [ln.split()[-1] for ln in capsys.readouterr().out.splitlines()]
    assert units == ["embed", *[f"blocks.{i}" for i in range(6)], "head.0", "head.1"]
