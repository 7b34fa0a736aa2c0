"""Tiny random-init models for tests (no downloads), saved as sharded checkpoints."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from pipeline_core import pipe_split
from pipeserve.reference import hf_greedy  # noqa: F401 -- the tests' reference

VOCAB = 96

HF_CONFIGS = {
    "gpt2": dict(
        model_type="gpt2", vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=128
    ),
    "opt": dict(
        model_type="opt",
        vocab_size=VOCAB,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=128,
        word_embed_proj_dim=32,
    ),
    "bloom": dict(model_type="bloom", vocab_size=VOCAB, hidden_size=32, n_layer=4, n_head=4),
    "gpt_neo": dict(
        model_type="gpt_neo",
        vocab_size=VOCAB,
        hidden_size=32,
        num_layers=4,
        num_heads=4,
        attention_types=[[["global", "local"], 2]],
        max_position_embeddings=128,
        window_size=8,
    ),
    "codegen": dict(
        model_type="codegen",
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=4,
        n_head=4,
        n_positions=128,
        rotary_dim=4,
    ),
    "llama": dict(
        model_type="llama",
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "t5": dict(
        model_type="t5",
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=3,
        num_decoder_layers=3,
        num_heads=4,
        decoder_start_token_id=0,
    ),
    # more families, traced and split by the same generic code
    "mistral": dict(
        model_type="mistral",
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=4,
    ),
    "qwen2": dict(
        model_type="qwen2",
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "falcon": dict(
        model_type="falcon",
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
    ),
    "gptj": dict(
        model_type="gptj",
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=4,
        n_head=4,
        rotary_dim=4,
        n_positions=128,
    ),
    # families with their own twists (Gemma 2, Phi-3 and Cohere below, from Llama's): parallel
    # residual with partial rotary (GPT-NeoX), latent attention with a dense first layer
    # before MoE layers (DeepSeek-V3)
    "gpt_neox": dict(
        model_type="gpt_neox",
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=128,
    ),
    "deepseek_v3": dict(
        model_type="deepseek_v3",
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        kv_lora_rank=16,
        q_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
    ),
    "bart": dict(
        model_type="bart",
        vocab_size=VOCAB,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=128,
    ),
    # mixture of experts: the checkpoint stores each expert apart, the model merges them
    "mixtral": dict(
        model_type="mixtral",
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    ),
    "bert": dict(
        model_type="bert",
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        architectures=["BertForMaskedLM"],
    ),
    # checkpoint keys differ from module names (legacy names, renamed on load)
    "vit": dict(
        model_type="vit",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        num_labels=3,
        architectures=["ViTForImageClassification"],
    ),
    "resnet": dict(
        model_type="resnet",
        architectures=["ResNetForImageClassification"],
        embedding_size=8,
        hidden_sizes=[8, 16, 16, 32],
        depths=[1, 1, 2, 1],
        num_labels=5,
        image_size=32,
    ),
}


# a layer shared by every depth: export unflattens one copy per call (``layer@1``, ...)
HF_CONFIGS["albert"] = dict(
    HF_CONFIGS["bert"],
    model_type="albert",
    embedding_size=16,
    num_hidden_groups=1,
    architectures=["AlbertForMaskedLM"],
)
# ``share_att_key``: one projection called twice per layer
HF_CONFIGS["deberta-v2"] = dict(
    HF_CONFIGS["bert"],
    model_type="deberta-v2",
    relative_attention=True,
    position_buckets=16,
    max_relative_positions=-1,
    pos_att_type=["p2c", "c2p"],
    norm_rel_ebd="layer_norm",
    share_att_key=True,
    position_biased_input=False,
    pad_token_id=0,
    architectures=["DebertaV2ForSequenceClassification"],
)
# BART's shape with sinusoidal position tables that checkpoints leave out (computed on load)
HF_CONFIGS["marian"] = dict(
    HF_CONFIGS["bart"], model_type="marian", decoder_start_token_id=0, pad_token_id=0
)
# no decoder_start_token_id: the decoder starts from BOS, as generate does
HF_CONFIGS["mbart"] = dict(HF_CONFIGS["bart"], model_type="mbart")
HF_CONFIGS["pegasus"] = dict(HF_CONFIGS["bart"], model_type="pegasus")
# alternating sliding-window layers, soft-capped logits; untied: tied, greedy decoding of the
# tiny model repeats its input
HF_CONFIGS["gemma2"] = dict(
    HF_CONFIGS["llama"],
    model_type="gemma2",
    head_dim=8,
    sliding_window=4,
    tie_word_embeddings=False,
)
_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=1)  # inside the tiny vocabulary
HF_CONFIGS["phi3"] = dict(HF_CONFIGS["llama"], model_type="phi3", tie_word_embeddings=False, **_IDS)
HF_CONFIGS["cohere"] = dict(HF_CONFIGS["llama"], model_type="cohere", **_IDS)  # a logit scale


def clip_model() -> nn.Module:
    """A tiny random CLIP (text + image; its image x text logits mix rows of the batch)."""
    from transformers import CLIPConfig, CLIPModel

    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(
        text_config=dict(
            layers,
            vocab_size=VOCAB,
            max_position_embeddings=32,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        vision_config=dict(layers, image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    return CLIPModel(config).eval()


def hf_model(family: str, seed: int = 0) -> nn.Module:
    import transformers
    from transformers import AutoConfig

    cfg = dict(HF_CONFIGS[family])
    arch = cfg.pop("architectures", None)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(seed)
    if arch:
        config.architectures = arch
        return getattr(transformers, arch[0])(config).eval()
    if config.is_encoder_decoder:
        return transformers.AutoModelForSeq2SeqLM.from_config(config).eval()
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def save_hf(model: nn.Module, path: Path, shard: str = "40KB", bin_index: bool = False) -> Path:
    """save_pretrained with sharded safetensors, or a pytorch_model.bin.index.json layout."""
    model.save_pretrained(path, max_shard_size=shard)
    if bin_index:
        for f in path.glob("model*.safetensors*"):
            f.unlink()
        write_bin_index(dict(model.state_dict()), path, tied=model)
    return path


def write_bin_index(
    state: dict[str, torch.Tensor], path: Path, tied: nn.Module | None = None, per_file: int = 6
) -> None:
    """Write torch.save shards + pytorch_model.bin.index.json (like older save_pretrained)."""
    unique: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in state.items():  # tied tensors are stored once, under their first name
        if v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            unique[k] = v.contiguous().clone()
    write_sharded(unique, path, "bin", per_file)


def save_safetensors_sharded(state: dict[str, torch.Tensor], path: Path, per_file: int = 4) -> Path:
    return write_sharded(state, path, "safetensors", per_file)


def write_sharded(state: dict[str, torch.Tensor], path: Path, fmt: str, per_file: int) -> Path:
    """Shard ``state`` into files of ``per_file`` tensors plus the matching index JSON."""
    path.mkdir(parents=True, exist_ok=True)
    names = list(state)
    chunks = [names[i : i + per_file] for i in range(0, len(names), per_file)]
    stem, index = (
        ("model", "model.safetensors.index.json")
        if fmt == "safetensors"
        else ("pytorch_model", "pytorch_model.bin.index.json")
    )
    weight_map = {}
    for i, chunk in enumerate(chunks):
        fname = f"{stem}-{i + 1:05d}-of-{len(chunks):05d}.{fmt}"
        part = {k: state[k].contiguous() for k in chunk}
        if fmt == "safetensors":
            save_file(part, str(path / fname))
        else:
            torch.save(part, path / fname)
        weight_map.update(dict.fromkeys(chunk, fname))
    (path / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.norm(x))))


class UserMLP(nn.Module):
    """A plain user model (not HF) with uneven blocks and a big head."""

    def __init__(self, markers: bool = False) -> None:
        super().__init__()
        self.markers = markers
        self.embed = nn.Linear(12, 32)
        self.blocks = nn.ModuleList(Block(32, h) for h in (32, 128, 64, 256, 32, 96))
        self.head = nn.Linear(32, 200)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for i, b in enumerate(self.blocks):
            if self.markers and i in (2, 4):
                pipe_split()
            x = b(x)
        return self.head(x)


def make_user_mlp() -> nn.Module:
    torch.manual_seed(0)
    return UserMLP()


def make_user_mlp_markers() -> nn.Module:
    torch.manual_seed(0)
    return UserMLP(markers=True)


class TwoInTwoOut(nn.Module):
    """Two inputs (one read by every block), a tuple of two outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.inp(x)
        for b in self.blocks:
            h = torch.relu(b(h)) + y
        return self.head(h), h.sum(-1)


def make_two_in_two_out() -> nn.Module:
    torch.manual_seed(0)
    return TwoInTwoOut()


class DictOut(TwoInTwoOut):
    """The same, answering a dict with a nested list."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:  # type: ignore[override]
        logits, total = super().forward(x, y)
        return {"logits": logits, "extra": [total, total * 2]}


def make_dict_out() -> nn.Module:
    torch.manual_seed(0)
    return DictOut()


def lm_model(family: str, seed: int = 0, std: float = 1.0) -> nn.Module:
    """``hf_model`` with matrices redrawn at a larger scale, so greedy decoding of the tiny
    random model does not collapse into repeating one token (a weak test)."""
    model = hf_model(family, seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def save_word_tokenizer(path: Path, vocab_size: int = VOCAB) -> Any:
    """A word-level tokenizer ("w0".."wN" -> ids) saved beside a checkpoint: text in/out
    without downloads."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size - 1)}
    vocab["[UNK]"] = vocab_size - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.save_pretrained(path)
    return fast


def hf_greedy_batch(
    model: nn.Module, prompts: list[list[int]], new: int, device: str = "cpu"
) -> list[list[int]]:
    """``generate`` on the padded batch (on ``device``); the new tokens of each row.  Prompts
    are left-padded, an encoder-decoder's right-padded (as their tokenizers do)."""
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        cols = slice(0, len(p)) if model.config.is_encoder_decoder else slice(width - len(p), None)
        ids[r, cols] = torch.tensor(p)
        mask[r, cols] = 1
    with torch.no_grad():
        out = model.to(device).generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            do_sample=False,
            max_new_tokens=new,
            min_new_tokens=new,
            eos_token_id=None,
            pad_token_id=0,
        )
    start = 1 if model.config.is_encoder_decoder else width
    return out[:, start:].tolist()


LAYER_KEYS = (
    "n_layer",
    "num_layers",
    "num_hidden_layers",
    "num_decoder_layers",
    "encoder_layers",
    "decoder_layers",
)


def deep_lm(family: str, layers: int, seed: int = 0) -> nn.Module:
    """A family's tiny test model at ``layers`` layers (each stack of an encoder-decoder),
    initialised at a larger scale (``initializer_range`` 0.25 and the families' other names for
    it; 0.08 for BART's post-norm family, which collapses to one token above that) with untied
    input and output embeddings, so greedy tokens vary (a tied embedding at this depth tends to
    repeat the input token); a model's own computed tables (Marian's sinusoids) stay."""
    base = dict(HF_CONFIGS[family])
    cfg = {k: (layers if k in LAYER_KEYS else v) for k, v in base.items()}
    if family == "gpt_neo":
        cfg["attention_types"] = [[["global", "local"], layers // 2]]
    post_norm = family in ("bart", "marian", "mbart", "pegasus")
    if post_norm:
        cfg.update(init_std=0.08, tie_word_embeddings=False)
    else:
        cfg.update(
            initializer_range=0.25, init_std=0.25, initializer_factor=4.0, tie_word_embeddings=False
        )
    saved = HF_CONFIGS[family]
    HF_CONFIGS[family] = cfg
    try:
        return hf_model(family, seed)
    finally:
        HF_CONFIGS[family] = saved


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` for the ``with`` block (a reference computed with
    the threads the stages use: a reduction may be split differently across more threads)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
