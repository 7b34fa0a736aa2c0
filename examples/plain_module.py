"""Pipeline a plain nn.Module: python examples/plain_module.py [CHECKPOINT_DIR]"""

import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from pipeline_core import InputSpec, LocalPipeline, ModelSource, Policy, make_plan


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class Net(nn.Module):
    def __init__(self, dim: int = 64, depth: int = 6, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(16, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))  # split points
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, classes))  # head.0, head.1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def build() -> nn.Module:
    """The factory every stage calls (on the meta device) to get the model's structure."""
    return Net()


# "module:function": importable on every worker. Here the script's directory is on sys.path
# (stage processes inherit it); on a cluster, install the module on every worker.
FACTORY = "plain_module:build"

if __name__ == "__main__":  # stages are spawned processes that import this file again
    ckpt = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
    ckpt.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = build().eval()
    # the checkpoint: the model's state_dict in model.safetensors (or sharded + index.json)
    save_file(model.state_dict(), str(ckpt / "model.safetensors"))
    # example inputs, named as forward's arguments; dim 0 (the batch) may change per call
    inputs = [InputSpec(name="x", shape=[4, 16], dynamic={0: "batch"})]
    source = ModelSource(checkpoint=str(ckpt), factory=FACTORY)
    plan = make_plan(source, Policy.equal_size(3), inputs=inputs)
    print("stages:", [stage.units for stage in plan.stages])
    x = torch.randn(8, 16)
    with LocalPipeline(plan) as pipe:  # 2 stage processes; the last stage runs here
        out = pipe(x=x, chunks=4)  # 4 microbatches of 2 rows
    with torch.no_grad():
        diff = (out - model(x)).abs().max().item()
    print(f"max |pipelined - single process| = {diff:.3g}")
    assert diff < 1e-5
