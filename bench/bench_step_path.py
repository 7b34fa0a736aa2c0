"""A generation stage's own Python on the token's path (issue 23), in one process.

    python -m bench.bench_step_path                    # 4 stages, 60 decode steps, 5 rounds
    python -m bench.bench_step_path --profile 2        # + cProfile of stage 2's on-path part
    python -m bench.bench_step_path --profile 0 --top 40

No ring, no processes, no threads: the ``GenStage``s of an ``equal_size(S)`` plan of
``bench_generate``'s 134M random Llama (its ``build()`` makes the checkpoint, once, under
``--dir``) run one after the other, each stage's output message being the next one's input and
the last stage's tokens going back to stage 0, as the ring would carry them.  One torch
thread.  Each decode step of each stage is split into:

* ``before``: a later stage's part before the previous stage's payload arrives -- what decode
  ahead (:mod:`pipeline_core.decode_ahead`) runs while the earlier stages compute (simulated by
  :func:`~pipeline_core.decode_ahead.decode_ahead` with a ``fetch`` that returns the ready
  message); stage 0's is what its scheduler prepares while the step is in flight
  (:func:`~pipeline_core.decode_ahead.prepare_decode`, called after its step as the engine
  does);
* ``compute``: inside the units the stage owns (its step timing's ``compute``);
* ``path``: the rest after the payload arrived, up to the message it sends on (sampling on the
  last stage included) -- the stage's own Python on the token's path.

The tokens are checked against ``transformers`` ``generate`` (greedy).  Figures are medians
over rounds of the per-step means, in milliseconds, with the 1-minute load average.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench.bench_generate import _prompt, build
from pipeline_core import ModelSource, Policy, make_plan
from pipeline_core.decode_ahead import Ahead, decode_ahead, prepare_decode
from pipeline_core.gen_stage import GenStage
from pipeline_core.ring_messages import Decode, Prefill, Tokens
from pipeline_core.sampling import SamplingParams, encode_rows
from pipeline_core.stage_loop import run_step

PARTS = ("before", "compute", "path")


def _checkpoint(root: Path) -> tuple[Any, Path]:
    path = root / "llama"
    if (path / "config.json").exists():
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM.from_pretrained(path).eval(), path
    return build(path)


def _step(
    stage: GenStage, msg: Decode, prof: cProfile.Profile | None
) -> tuple[Decode | Tokens, dict[str, float]]:
    """One decode step of ``stage`` on ``msg``, split into :data:`PARTS` (seconds)."""
    c0 = stage.timing.compute_s
    t0 = time.perf_counter()
    if stage.is_first or stage.groups[msg.group].ahead_call is None:
        if prof is not None:
            prof.enable()
        out = run_step(stage, msg)
        t1 = time.perf_counter()
        if prof is not None:
            prof.disable()
        before = 0.0
        if stage.is_first:  # what its scheduler does while the step is in flight
            prepare_decode(stage, msg.group)
            before = time.perf_counter() - t1  # the next step's (each step's alike)
        compute = stage.timing.compute_s - c0
        return out, {"before": before, "compute": compute, "path": t1 - t0 - compute}
    arrived = t0
    ahead = Ahead(t0, time.time())

    def fetch() -> tuple[torch.Tensor, Any]:
        nonlocal arrived
        arrived = time.perf_counter()
        if prof is not None:
            prof.enable()
        return msg.tokens, msg.payloads

    ahead.result = decode_ahead(stage, msg.group, fetch)
    assert ahead.result is not None, "the step run ahead missed its message"
    out = run_step(stage, msg, ahead)
    t1 = time.perf_counter()
    if prof is not None:
        prof.disable()
    compute = stage.timing.compute_s - c0
    return out, {"before": arrived - t0, "compute": compute, "path": t1 - arrived - compute}


def run_round(
    stages: list[GenStage], prompt: list[int], new: int, prof_stage: int | None
) -> tuple[list[int], list[dict[str, float]], cProfile.Profile | None]:
    """Prefill then ``new - 1`` decode steps; the tokens and each stage's mean split (ms)."""
    gid = 1
    ids = torch.tensor([prompt])
    floats, ints = encode_rows([SamplingParams(max_new_tokens=new, ignore_eos=True)], [0])
    msg: Any = Prefill(gid, ids, torch.ones_like(ids), floats, ints, None, (None,))
    for s in stages:
        msg = run_step(s, msg)
    assert isinstance(msg, Tokens), msg
    tokens = msg.tokens.tolist()
    sums = [dict.fromkeys(PARTS, 0.0) for _ in stages]
    prof = cProfile.Profile() if prof_stage is not None else None
    steps = 0
    for k in range(new - 1):
        msg = Decode(gid, None, msg.tokens, (None,))
        for i, s in enumerate(stages):
            # the first decode step is a plain one (it tells a later stage where steps come in)
            p = prof if (i == prof_stage and k > 0) else None
            msg, part = _step(s, msg, p)
            if k > 0:
                for c in PARTS:
                    sums[i][c] += part[c]
        steps += k > 0
        assert isinstance(msg, Tokens), msg
        tokens += msg.tokens.tolist()
    for s in stages:
        s.release(gid)
    return tokens, [{c: v / steps * 1e3 for c, v in d.items()} for d in sums], prof


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--new", type=int, default=61, help="new tokens (decode steps + 1)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", type=int, default=None, help="cProfile this stage's path part")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--dir", default="/tmp/pipeserve-step-path")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, ckpt = _checkpoint(Path(args.dir))
    prompt = _prompt(16, 2)
    with torch.no_grad():
        ref = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=args.new,
            min_new_tokens=args.new,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
    del model
    plan = make_plan(ModelSource(checkpoint=str(ckpt)), Policy.equal_size(args.stages), trace=False)
    stages = [GenStage(plan, i, "cpu", step_timing=True) for i in range(args.stages)]
    run_round(stages, prompt, 4, None)  # warm-up: meta shapes, caches of the hooks
    rounds, loads, prof = [], [], None
    for r in range(args.rounds):
        loads.append(os.getloadavg()[0])
        want = args.profile if r == args.rounds - 1 else None
        tokens, split, p = run_round(stages, prompt, args.new, want)
        assert tokens == ref, f"tokens differ from generate: {tokens} vs {ref}"
        rounds.append(split)
        prof = p or prof
    print(
        f"{args.stages} stages, {args.new - 2} timed decode steps, median of {args.rounds} "
        f"rounds, load {', '.join(f'{x:.2f}' for x in loads)}; tokens equal generate's"
    )
    print("stage | before (ahead) | compute | path (own Python after the payload) | ms/step")
    for i in range(args.stages):
        med = {c: statistics.median(r[i][c] for r in rounds) for c in PARTS}
        print(f"{i} | {med['before']:.3f} | {med['compute']:.3f} | {med['path']:.3f}")
    if prof is not None:
        buf = io.StringIO()
        st = pstats.Stats(prof, stream=buf)
        st.sort_stats("tottime").print_stats(args.top)
        st.sort_stats("cumulative").print_stats(args.top)
        print(buf.getvalue())


if __name__ == "__main__":
    main()
