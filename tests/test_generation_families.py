"""Generation beyond the seven families of ``test_generation``, and awkward split points.

* A split right after the token embedding (GPT-2's ``wte`` | ``wpe``, OPT's ``embed_tokens`` |
  ``embed_positions``): the token embeddings are no argument of the call where the first stage
  stops -- the model adds them later -- so the stage must send them along.  ``equal_size``
  picks such splits for large vocabularies and for BART-like models.
* Encoder-decoders with learned (BART, mBART) or computed (Marian, Pegasus: sinusoidal tables
  that checkpoints leave out) absolute positions: prompts of different lengths in one batch
  each get the tokens ``generate`` gives them alone (encoder inputs are right-padded).
* A mixture-of-experts model (Mixtral), whose checkpoint stores every expert apart.
* Decoder-only families nobody wrote code for (Mistral, Qwen2, Falcon, GPT-J, Gemma 2,
  GPT-NeoX, Phi-3, Cohere, DeepSeek-V3).
* bfloat16 stages.
* The model's own decoding rules (``generation_config``: forced EOS, n-gram bans, ...) and the
  repetition penalty, applied to each request's own tokens as ``generate`` applies them.

Stages run in this process (``LocalGenerator(in_process=True)``: the same stage code and ring
messages without a process per stage): what is checked here is each model's arithmetic and
rules; the ring between stage processes has its own tests (``test_generation``,
``test_generation_splits``, the cluster tests).
"""

from __future__ import annotations

import pytest
import torch

from pipeline_core import ModelSource, Policy, make_plan
from pipeline_core.local_generate import LocalGenerator
from pipeline_core.sampling import SamplingParams

from .models import hf_greedy, hf_greedy_batch, hf_model, lm_model, save_hf, torch_threads

pytestmark = pytest.mark.slow

PROMPTS = [[5, 6, 7, 8, 9], [3, 4, 5, 6, 7, 8, 9, 10, 11], [20, 21, 22]]
NEW = 16
GREEDY = SamplingParams(max_new_tokens=NEW, ignore_eos=True)


def _generate(model, tmp_path, policy: Policy, prompts):
    ckpt = save_hf(model, tmp_path / "ckpt")
    plan = make_plan(ModelSource(checkpoint=str(ckpt)), policy, trace=False)
    with LocalGenerator(plan, in_process=True) as gen:
        return plan, gen.generate(prompts, GREEDY)


@pytest.mark.parametrize(
    "family,split",
    [("gpt2", "transformer.wpe"), ("opt", "model.decoder.embed_positions")],
)
def test_split_right_after_the_token_embedding(family, split, tmp_path):
    model = lm_model(family)
    plan, got = _generate(model, tmp_path, Policy.manual([split]), PROMPTS)
    assert plan.split_points == [split]
    assert got == hf_greedy_batch(model, PROMPTS, NEW)


@pytest.mark.parametrize("family", ["bart", "marian", "mbart", "pegasus"])
def test_encoder_decoder_with_absolute_positions(family, tmp_path):
    """Also the configs' forced EOS (every family here) and, for mBART, a decoder that starts
    from BOS (its config has no decoder start token)."""
    # marian, pegasus: hf_model keeps the computed sinusoidal tables (lm_model would redraw them)
    model = hf_model(family) if family in ("marian", "pegasus") else lm_model(family)
    _, got = _generate(model, tmp_path, Policy.equal_size(2), PROMPTS)
    assert got == [hf_greedy(model, p, NEW) for p in PROMPTS]  # batched, yet as if alone


@pytest.mark.parametrize("family", ["gpt2", "bart"])
def test_the_models_own_decoding_rules(family, tmp_path):
    """Rules a checkpoint's ``generation_config`` sets apply as in ``generate`` (which runs them
    unasked), and so does a request's repetition penalty: per request on its own tokens, so
    prompts of different lengths in one batch each get ``generate``'s tokens for that prompt.
    BART adds the rules on the encoder's input (n-gram ban, repetition penalty)."""
    model = lm_model(family)
    gc = model.generation_config
    gc.eos_token_id = gc.forced_eos_token_id = 3  # in the tiny vocabulary
    gc.no_repeat_ngram_size = 2
    gc.bad_words_ids = [[7], [8, 9]]
    gc.suppress_tokens = [10, 11]
    gc.begin_suppress_tokens = [12]
    gc.min_new_tokens = 4
    enc_dec = model.config.is_encoder_decoder
    if enc_dec:
        gc.encoder_no_repeat_ngram_size = 2
        gc.encoder_repetition_penalty = 20.0  # pulls the prompt's tokens in
    ckpt = save_hf(model, tmp_path / "ckpt")
    plan = make_plan(ModelSource(checkpoint=str(ckpt)), Policy.equal_size(2), trace=False)
    params = SamplingParams(max_new_tokens=NEW, repetition_penalty=1.3)
    with LocalGenerator(plan, in_process=True) as gen:
        got = gen.generate(PROMPTS, params)
    want = []
    for p in PROMPTS:
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.tensor([p]),
                do_sample=False,
                max_new_tokens=NEW,
                repetition_penalty=1.3,
            )
        want.append(out[0, 1 if enc_dec else len(p) :].tolist())
    assert got == want
    if enc_dec:  # the encoder's rules show: the prompts' tokens come back
        assert any(t in p for w, p in zip(want, PROMPTS, strict=True) for t in w)
    else:
        assert any(len(w) == NEW and w[-1] == gc.eos_token_id for w in want)  # forced EOS


@pytest.mark.parametrize(
    "family",
    ["mistral", "qwen2", "falcon", "gptj", "gemma2", "gpt_neox", "phi3", "cohere", "deepseek_v3"],
)
def test_more_decoder_families(family, tmp_path):
    model = lm_model(family)
    _, got = _generate(model, tmp_path, Policy.equal_size(2), PROMPTS)
    assert got == hf_greedy_batch(model, PROMPTS, NEW)


def test_mixture_of_experts(tmp_path):
    model = lm_model("mixtral", std=0.5)
    plan, got = _generate(model, tmp_path, Policy.equal_size(3), PROMPTS)
    assert plan.num_stages == 3
    assert got == hf_greedy_batch(model, PROMPTS, NEW)


def test_bfloat16_matches_generate_of_the_bfloat16_checkpoint(tmp_path):
    """The reference is the checkpoint loaded as ``from_pretrained(dtype=bfloat16)`` (buffers such
    as rotary frequencies stay float32), not ``model.to(bfloat16)``, which also rounds those.

    Each prompt runs alone on both sides (a one-row group; ``generate`` on that prompt): bf16
    CPU attention depends on how many masked padding keys a row has (up to 1 ulp, and AVX-512
    builds reduce in another order than AVX2), so a padded batch on one side and a different
    grouping on the other can flip a near-tie -- it did at step 7 of prompt 3 on an AMD EPYC.
    Both sides use one torch thread, as the stages do."""
    from transformers import AutoModelForCausalLM

    ckpt = save_hf(lm_model("llama"), tmp_path / "ckpt")
    plan = make_plan(
        ModelSource(checkpoint=str(ckpt)), Policy.equal_size(2), trace=False, dtype="bfloat16"
    )
    with LocalGenerator(plan, in_process=True) as gen:
        got = [gen.generate([p], GREEDY)[0] for p in PROMPTS]
    ref = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).eval()
    with torch_threads(1):  # as the stages run
        assert got == [hf_greedy(ref, p, NEW) for p in PROMPTS]
