"""The fill-drain schedule as data.

Each stage gets an ordered list of actions; an action is ``(stage, op, microbatch)`` written
like ``1F3`` (stage 1 runs forward on microbatch 3).  ``R`` receives a microbatch's inputs,
``F`` computes, ``S`` sends the results.  The executor in :mod:`.runtime` only interprets these
lists, so the order can be checked (and printed) without any process group.

Fill-drain (GPipe for inference): stage ``k`` runs microbatch ``i`` at step ``k + i``, so while
stage ``k`` works on ``i``, stage ``k+1`` works on ``i-1``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Action", "fill_drain", "render", "validate"]


@dataclass(frozen=True)
class Action:
    stage: int
    op: str  # "R" | "F" | "S"
    microbatch: int

    def __str__(self) -> str:
        return f"{self.stage}{self.op}{self.microbatch}"


def fill_drain(num_stages: int, num_microbatches: int) -> list[list[Action]]:
    """Per stage, the actions in execution order."""
    if num_stages < 1 or num_microbatches < 1:
        raise ValueError("need at least one stage and one microbatch")
    return [
        [Action(s, op, i) for i in range(num_microbatches) for op in "RFS"]
        for s in range(num_stages)
    ]


def validate(schedule: list[list[Action]]) -> None:
    """Check every stage receives, computes and sends each microbatch once, in order.

    Raises:
        ValueError: naming the first action out of place.
    """
    for s, actions in enumerate(schedule):
        expected_mb = 0
        expected_op = "R"
        for a in actions:
            if a.stage != s:
                raise ValueError(f"action {a} is listed under stage {s}")
            if a.op != expected_op or a.microbatch != expected_mb:
                raise ValueError(f"stage {s}: expected {s}{expected_op}{expected_mb}, found {a}")
            expected_op = {"R": "F", "F": "S", "S": "R"}[a.op]
            if a.op == "S":
                expected_mb += 1
        if expected_op != "R":
            raise ValueError(f"stage {s} ends in the middle of microbatch {expected_mb}")


def render(schedule: list[list[Action]]) -> str:
    """A step-by-stage grid of the F actions (``.`` marks a bubble)."""
    steps = max(len(a) // 3 for a in schedule) + len(schedule) - 1
    lines = []
    for s, actions in enumerate(schedule):
        row = ["."] * steps
        for a in actions:
            if a.op == "F":
                row[s + a.microbatch] = str(a.microbatch)
        lines.append(f"stage {s}: " + " ".join(f"{c:>2}" for c in row))
    return "\n".join(lines)
