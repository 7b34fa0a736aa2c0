"""GrowingLayer appends in place yet holds exactly what transformers' DynamicLayer holds."""

from __future__ import annotations

import torch
from transformers import DynamicCache, LlamaConfig
from transformers.cache_utils import DynamicLayer

from pipeline_core.kv_cache import MIN_SPARE, advance_phantoms, grow_in_place


def _kv(rows: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 2, n, 8, generator=g), torch.randn(rows, 2, n, 8, generator=g)


def test_growing_layer_matches_dynamic_layer_through_edits():
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2)
    ours, ref = grow_in_place(DynamicCache(config=cfg)), DynamicCache(config=cfg)
    assert type(ours.layers[0]) is not DynamicLayer and type(ref.layers[0]) is DynamicLayer
    step = 0

    def append(n: int) -> None:
        nonlocal step
        step += 1
        k, v = _kv(ours.layers[0].keys.shape[0] if step > 1 else 4, n, step)
        for cache in (ours, ref):
            got = cache.update(k, v, 0)
            assert torch.equal(got[0], cache.layers[0].keys)
        assert torch.equal(ours.layers[0].keys, ref.layers[0].keys)
        assert torch.equal(ours.layers[0].values, ref.layers[0].values)

    append(7)  # prefill
    buf = ours.layers[0]._kbuf
    for _ in range(MIN_SPARE):  # decode steps write into the spare room of the same buffer
        append(1)
    assert ours.layers[0]._kbuf is buf
    append(1)  # past the spare room: a bigger buffer
    assert ours.layers[0]._kbuf is not buf and ours.layers[0]._kbuf.shape[-2] > buf.shape[-2]
    buf = ours.layers[0]._kbuf
    for cache in (ours, ref):  # rows leave: a new tensor, then appends go on from it
        cache.batch_select_indices(torch.tensor([0, 2, 3]))
    append(1)
    assert ours.layers[0]._kbuf is not buf
    for cache in (ours, ref):  # cropping keeps the buffer and overwrites the cut tail
        cache.crop(-3)
    for _ in range(3):
        append(1)
    for cache in (ours, ref):  # merging groups replaces the tensors outright
        layer = cache.layers[0]
        layer.keys = torch.cat([layer.keys, layer.keys[:1]])
        layer.values = torch.cat([layer.values, layer.values[:1]])
    for _ in range(40):
        append(1)
    assert ours.get_seq_length() == ref.get_seq_length() == 7 + MIN_SPARE + 1 + 1 - 3 + 3 + 40
    spare = ours.layers[0]._kbuf.shape[-2] - ours.get_seq_length()
    assert 0 <= spare <= max(MIN_SPARE, ours.get_seq_length() // 8)


def test_phantom_layer_tracks_lengths_like_a_dynamic_layer():
    """A phantom (a layer another stage owns) holds zeros of the same shapes as a plain layer
    fed zeros, through appends, row selection, merging and regrowth, without copying."""
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2)
    ours = grow_in_place(DynamicCache(config=cfg), phantoms=[1])
    ref = DynamicCache(config=cfg)
    assert type(ours.layers[1]).__name__ == "PhantomLayer"
    assert type(ours.layers[0]).__name__ == "GrowingLayer"

    def append(rows: int, n: int) -> None:
        z = torch.zeros(rows, 1, n, 1)
        for cache in (ours, ref):
            cache.update(z, z, 1)
        for attr in ("keys", "values"):
            a, b = getattr(ours.layers[1], attr), getattr(ref.layers[1], attr)
            assert a.shape == b.shape and torch.equal(a, b)
        assert ours.get_seq_length(1) == ref.get_seq_length(1)

    append(3, 5)
    buf = ours.layers[1]._z
    for _ in range(MIN_SPARE):
        append(3, 1)
    assert ours.layers[1]._z is buf  # appends are views of one buffer
    append(3, 1)
    for cache in (ours, ref):
        cache.batch_select_indices(torch.tensor([0, 2]))
    append(2, 1)
    for cache in (ours, ref):  # merge: the engine replaces the tensors (left-padded, 4 rows)
        layer = cache.layers[1]
        layer.keys = layer.values = torch.zeros(4, 1, layer.keys.shape[-2] + 2, 1)
    append(4, 1)


def test_advance_phantoms_moves_every_phantom_as_one_view():
    """All of a stage's phantoms advance together (one zeros view shared, no per-layer update)
    and hold what plain layers fed zeros hold, through row selection and merging."""
    cfg = LlamaConfig(num_hidden_layers=4, hidden_size=16, num_attention_heads=2)
    phantoms = [0, 2, 3]
    ours = grow_in_place(DynamicCache(config=cfg), phantoms=phantoms)
    ref = DynamicCache(config=cfg)

    def advance(rows: int, n: int) -> None:
        advance_phantoms(ours, phantoms, rows, n, torch.device("cpu"))
        z = torch.zeros(rows, 1, n, 1)
        for i in phantoms:
            ref.update(z, z, i)
        for i in phantoms:
            for attr in ("keys", "values"):
                a, b = getattr(ours.layers[i], attr), getattr(ref.layers[i], attr)
                assert a.shape == b.shape and torch.equal(a, b)
        assert ours.get_seq_length(0) == ref.get_seq_length(0)

    advance(3, 5)  # prefill: each layer's own update
    advance(3, 1)
    view = ours.layers[0].keys
    assert all(ours.layers[i].keys is view for i in phantoms)  # one view for all
    buf = ours._pipeserve_phantoms
    for _ in range(MIN_SPARE):
        advance(3, 1)
    assert ours._pipeserve_phantoms is buf  # appends are views of one buffer
    advance(3, 1)  # past the spare room: a bigger buffer
    assert ours._pipeserve_phantoms.shape[-2] > buf.shape[-2]
    for cache in (ours, ref):
        cache.batch_select_indices(torch.tensor([0, 2]))
    advance(2, 1)
    for cache in (ours, ref):  # merge: the engine replaces the tensors (left-padded, 4 rows)
        for i in phantoms:
            layer = cache.layers[i]
            layer.keys = layer.values = torch.zeros(4, 1, layer.keys.shape[-2] + 2, 1)
    advance(4, 1)
    advance(4, 1)
    assert ours.layers[0].keys.data_ptr() == ours._pipeserve_phantoms.data_ptr()
