"""Planning that scales: vocabulary-sized units are timed on stand-ins, units too large or slow
to time fall back to FLOPs with a note, and a plan says how many workers of a size it needs."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from pipeline_core import ModelSource, Policy, Workload, cost, make_plan
from pipeline_core.plan import workers_needed


@pytest.fixture(scope="module")
def wide_vocab(tmp_path_factory):
    """A config only (no weights): vocab 8000 rows against a 64-wide model."""
    path = tmp_path_factory.mktemp("wide")
    LlamaConfig(
        vocab_size=8000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        tie_word_embeddings=False,
        dtype="bfloat16",
    ).save_pretrained(path)
    return ModelSource(checkpoint=str(path))


def _units(source, monkeypatch, tmp_path, **limits):
    for k, v in limits.items():
        monkeypatch.setattr(cost, k, v)
    built: list[tuple[str, int]] = []
    real = cost._materialize

    def spy(module, device, dtype):
        built.append((type(module).__name__, cost._nbytes(module)))
        return real(module, device, dtype)

    monkeypatch.setattr(cost, "_materialize", spy)
    w = Workload(batch=2, seq=16, chunks=1)
    cache = tmp_path / "profiles.json"
    plan = make_plan(source, Policy.balanced(2), trace=False, workload=w, profile_cache=cache)
    assert plan.dtype == "bfloat16"
    return {u["name"]: u for u in plan.units}, built


def test_vocabulary_sized_units_are_timed_on_stand_ins(wide_vocab, monkeypatch, tmp_path):
    units, built = _units(wide_vocab, monkeypatch, tmp_path, TABLE_ROWS=1000)
    assert units["model.embed_tokens"]["cost"] == "profile"
    assert units["lm_head"]["cost"] == "profile"
    # no module built near the table's size: 8000 x 64 x 2 bytes
    assert max(b for _, b in built) < 8000 * 64 * 2 / 4
    assert ("Embedding", 1000 * 64 * 2) in built and ("Linear", 1000 * 64 * 2) in built


def test_too_large_or_slow_units_fall_back_to_flops(wide_vocab, monkeypatch, tmp_path):
    layer = 64 * 64 * 4 * 2 + 3 * 64 * 128 * 2  # one decoder layer's matrices in bf16
    units, built = _units(wide_vocab, monkeypatch, tmp_path, PROFILE_MAX_BYTES=layer // 2)
    note = units["model.layers.0"]["cost"]
    assert note.startswith("flops (LlamaDecoderLayer not timed: larger than")
    assert all(b <= layer // 2 for _, b in built)
    monkeypatch.undo()
    units, _ = _units(wide_vocab, monkeypatch, tmp_path / "b", PROFILE_MAX_SECONDS=0.0)
    assert units["model.layers.0"]["cost"].startswith("flops (LlamaDecoderLayer not timed: a run")
    assert units["model.layers.0"]["seconds"] > 0


def test_workers_needed(wide_vocab):
    plan = make_plan(
        wide_vocab, Policy.equal_size(2), trace=False, workload=Workload(profile=False)
    )
    sizes = [u["nbytes"] for u in plan.units]
    assert workers_needed(plan, sum(sizes)) == 1
    assert workers_needed(plan, max(sizes) - 1) == 0  # the largest unit alone does not fit
    n = workers_needed(plan, max(sizes))
    assert -(-sum(sizes) // max(sizes)) <= n <= len(sizes)
    kv = sum(u["kv_bytes_per_token"] for u in plan.units)
    assert kv > 0
    assert workers_needed(plan, sum(sizes), kv_tokens=1) == 2
    assert workers_needed(plan, "1 GiB") == 1
