"""Hostile-call report (issue 20): many random and abusive calls on every RPC of a live
cluster (a coordinator and 2 stage workers as processes, a small random Llama) while good
requests run.

Run from the repository root::

    python -m bench.bench_hostile [CALLS]      # default 10,000

Writes ``bench/results/hostile.json`` and ``bench/results/hostile.md``: the calls made, the
status codes answered, forbidden answers (UNKNOWN, or INTERNAL to a well-formed message: must
be none), whether every process lived, the coordinator's RSS before and after, the log bytes
per call, and how many good requests got exactly their tokens.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from bench.harness import code_state, jsonable, machine
from pipeserve.v1 import pipeserve_pb2 as pb
from tests.cluster import Cluster
from tests.hostile import siege
from tests.models import lm_model, save_hf, save_word_tokenizer

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def main(calls: int = 10_000) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = lm_model("llama")
        save_hf(model, tmp / "m")
        save_word_tokenizer(tmp / "m")
        c = Cluster(tmp, workers=[[], []])
        c.small = model
        try:
            req = pb.LoadModelRequest(
                name="m", checkpoint=str(tmp / "m"), policy=pb.SplitPolicy(equal_size=2)
            )
            list(c.admin.LoadModel(req, timeout=300))
            r = siege(c, calls)
        finally:
            c.close()
    r = {"machine": machine(), "code": code_state(), **r}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "hostile.json").write_text(json.dumps(jsonable(r), indent=1))
    before, after = r["coordinator_rss_mb"]
    lines = [
        "# Hostile calls (issue 20)",
        "",
        "| metric | result | goal |",
        "|---|---|---|",
        f"| hostile calls, every RPC of coordinator and workers | {r['calls']} in "
        f"{r['seconds']:.0f} s | >= 10,000 |",
        f"| UNKNOWN, or INTERNAL to a well-formed message | {len(r['forbidden'])} | 0 |",
        f"| processes alive at the end | {'all' if r['alive'] else 'NOT all'} | all |",
        f"| coordinator RSS before -> after | {before:.0f} -> {after:.0f} MiB | bounded |",
        f"| coordinator log per call | {r['log_bytes_per_call']:.0f} bytes | one line |",
        f"| good requests meanwhile, token-identical | {r['good_identical']}/{r['good']} | all |",
        f"| model READY at the end | {r['model_ready']} | yes |",
        "",
        f"Status codes: {json.dumps(r['codes'], sort_keys=True)}",
        "",
    ]
    (RESULTS / "hostile.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return r


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000)
