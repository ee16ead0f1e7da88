"""LLM-layer reduction machinery (plugins/adapters/decoder.py) on stock decoder-only models."""

from __future__ import annotations

from contextlib import contextmanager
from typing import ClassVar

import pytest
import torch
from models import VOCAB, _init, tiny_llama, one_thread  # noqa: F401 - fixture
from tokenreduce_plugins.adapters import compat
from tokenreduce_plugins.adapters.decoder import DecoderReduction
from transformers import Qwen2Config, Qwen2ForCausalLM

from tokenreduce import ConfigError, ScoringReducer, Stage, Step, create

PROMPT = 30

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_qwen2(seed: int = 0, attn_implementation: str = "sdpa") -> Qwen2ForCausalLM:
    cfg = Qwen2Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2, rope_theta=100.0,
    )
    return _init(Qwen2ForCausalLM._from_config(cfg, attn_implementation=attn_implementation), seed)


MODELS = {"llama": tiny_llama, "qwen2": tiny_qwen2}


def batch(rows: list[torch.Tensor], spans: list[tuple[int, int]]):
    """Left-padded ids, attention mask and image mask (image tokens at ``spans`` of each row)."""
    length = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    img = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, (row, (a, b)) in enumerate(zip(rows, spans)):
        off = length - len(row)
        ids[i, off:], mask[i, off:], img[i, off + a : off + b] = row, 1, True
    return ids, mask, img


def prompts(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randint(5, VOCAB, (PROMPT,), generator=gen), torch.randint(5, VOCAB, (PROMPT - 6,), generator=gen)]
    return rows, [(4, 20), (2, 14)]  # 16 and 12 image tokens


@contextmanager
def feed_images(model, red: DecoderReduction, img: torch.Tensor):
    """Give the reduction the image mask of each forward of ``generate``: the prompt at prefill, none after."""

    def pre(module, args, kwargs):
        ids = kwargs["input_ids"]
        red.set_image_mask(img if ids.shape[1] == img.shape[1] else None)

    handle = model.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def pyramid(budget0=0.5, budget1=4):
    return [
        Step("llm_layer", create("random", budget0, seed=1), layer=1),
        Step("llm_layer", create("random", budget1, seed=2), layer=3),
    ]


def generate(model, steps, ids, mask, img, positions, new=6):
    red = DecoderReduction(model.model, steps, positions=positions)
    red.attach()
    try:
        with feed_images(model, red, img):
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                output_logits=True, return_dict_in_generate=True,
            )
    finally:
        red.detach()
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits, dim=1)


def recompute(model, steps, ids, mask, img, positions, new=6):
    """Greedy decoding without a cache: the whole (reduced) forward again at every step."""
    red = DecoderReduction(model.model, steps, positions=positions)
    red.attach()
    seq, am, im, logits = ids, mask, img, []
    try:
        for _ in range(new):
            red.set_image_mask(im)
            pos = (am.cumsum(-1) - 1).clamp(min=0)  # generate()'s position ids for left padding
            last = model(input_ids=seq, attention_mask=am, position_ids=pos, use_cache=False).logits[:, -1]
            logits.append(last)
            nxt = last.argmax(-1, keepdim=True)
            seq, am = torch.cat([seq, nxt], 1), torch.cat([am, torch.ones_like(nxt)], 1)
            im = torch.cat([im, torch.zeros_like(nxt, dtype=torch.bool)], 1)
    finally:
        red.detach()
    return seq[:, ids.shape[1] :], torch.stack(logits, dim=1)


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("positions", ["compact", "original"])
def test_generate_with_cache_equals_recompute(family, attn, positions):
    model = MODELS[family](0, attn)
    rows, spans = prompts()
    ids, mask, img = batch(rows[:1], spans[:1])
    toks, logits = generate(model, pyramid(), ids, mask, img, positions)
    ref_toks, ref_logits = recompute(model, pyramid(), ids, mask, img, positions)
    assert torch.equal(toks, ref_toks)
    torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("positions", ["compact", "original"])
@pytest.mark.parametrize("budget", [0.5, 6])  # 0.5: rows keep 8 and 6 tokens (ragged); 6: both keep 6
def test_left_padded_batch_equals_rows_alone(positions, budget):
    model = tiny_llama(0)
    rows, spans = prompts()
    ids, mask, img = batch(rows, spans)
    toks, logits = generate(model, pyramid(budget), ids, mask, img, positions)
    for i in range(2):
        one = batch(rows[i : i + 1], spans[i : i + 1])
        t1, l1 = generate(model, pyramid(budget), *one, positions)
        assert torch.equal(t1[0], toks[i])
        torch.testing.assert_close(l1[0], logits[i], atol=2e-5, rtol=1e-4)
    # The batch recomputed without cache agrees too (left padding + ragged rows inside the forward).
    ref_toks, ref_logits = recompute(model, pyramid(budget), ids, mask, img, positions)
    assert torch.equal(toks, ref_toks)
    torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=1e-4)


def test_caches_full_before_and_reduced_from_layer_k():
    model = tiny_llama(0)
    rows, spans = prompts()
    ids, mask, img = batch(rows[:1], spans[:1])
    red = DecoderReduction(model.model, pyramid(0.5, 3))
    red.attach()
    red.set_image_mask(img)
    out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    red.detach()
    lengths = [compat.output_cache(out).get_seq_length(i) for i in range(4)]
    # 16 image tokens: 8 kept at layer 1, 3 of those at layer 3.
    assert lengths == [PROMPT, PROMPT - 8, PROMPT - 8, PROMPT - 13]
    assert out.logits.shape[1] == PROMPT - 13
    kept = red.last_kept[0]
    assert kept.shape[0] == PROMPT - 13 and bool((kept.diff() > 0).all())
    assert int(img[0, kept].sum()) == 3  # 3 image tokens survive, every text token too


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_identity_budget_is_bit_identical_to_stock(attn):
    model = tiny_llama(0, attn)
    rows, spans = prompts()
    ids, mask, img = batch(rows, spans)
    stock = model(input_ids=ids, attention_mask=mask).logits
    steps = [Step("llm_layer", create("random", 100), layer=1), Step("llm_layer", create("pool", 16), layer=2)]
    red = DecoderReduction(model.model, steps)
    red.attach()
    red.set_image_mask(img)
    got = model(input_ids=ids, attention_mask=mask).logits
    red.detach()
    assert torch.equal(got, stock)
    assert red.last_kept is None


def test_detach_restores_stock_behaviour():
    model = tiny_llama(0)
    rows, spans = prompts()
    ids, mask, img = batch(rows, spans)
    before = model(input_ids=ids, attention_mask=mask).logits
    red = DecoderReduction(model.model, pyramid())
    red.attach()
    red.set_image_mask(img)
    assert model(input_ids=ids, attention_mask=mask).logits.shape[1] < ids.shape[1]
    red.detach()
    red.set_image_mask(img)  # a stale mask must not matter once detached
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)
    assert not model.model._forward_pre_hooks and not model.model._forward_hooks
    assert not any(layer._forward_pre_hooks for layer in model.model.layers)


class AttentionProbe(ScoringReducer):
    """Keeps the tokens the query rows attend to most, and remembers the context it got."""

    name = "attention-probe"
    stages = frozenset({Stage.LLM_LAYER})
    required_context = frozenset({"attention"})
    seen: ClassVar[list] = []

    def score(self, tokens, valid, context):
        type(self).seen.append(context)
        return context.attention.float().mean(dim=1)


@pytest.mark.parametrize("query", ["last", "text"])
@pytest.mark.parametrize("layer_mode", ["previous", "current"])
def test_recomputed_attention_rows_equal_eager_weights(query, layer_mode):
    probe = type("Probe", (AttentionProbe,), {"attention_query": query, "attention_layer": layer_mode, "seen": []})
    fast, eager = tiny_llama(0, "sdpa"), tiny_llama(0, "eager")
    rows, spans = prompts()
    ids, mask, img = batch(rows, spans)
    weights = eager(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    k = 2
    red = DecoderReduction(fast.model, [Step("llm_layer", probe(0.5), layer=k)])
    red.attach()
    red.set_image_mask(img)
    fast(input_ids=ids, attention_mask=mask)
    red.detach()
    ctx = probe.seen[0]
    ref = weights[k - 1 if layer_mode == "previous" else k].mean(dim=1)  # (B, L, L) head-averaged
    length = ids.shape[1]
    for b in range(2):
        cols = img[b].nonzero()[:, 0]
        q_rows = torch.tensor([length - 1]) if query == "last" else torch.arange(int(cols.max()) + 1, length)
        expect = ref[b][q_rows][:, cols]
        got = ctx.attention[b, : len(q_rows), : len(cols)]
        torch.testing.assert_close(got, expect, atol=1e-6, rtol=1e-5)
        assert bool((ctx.attention[b, :, len(cols) :] == 0).all())  # padded image slots
        if query == "text":
            assert int(ctx.text_mask[b].sum()) == len(q_rows)
    # The instruction's hidden states are the text context.
    assert ctx.text_embeds.shape[:2] == ctx.text_mask.shape


def test_context_keys_equal_the_cached_keys_of_the_layer():
    model = tiny_llama(0)
    rows, spans = prompts()
    ids, mask, img = batch(rows, spans)
    stock = compat.output_cache(model(input_ids=ids, attention_mask=mask, use_cache=True))
    probe = type("Probe", (AttentionProbe,), {"seen": [], "required_context": frozenset({"attention", "keys", "text_keys"})})
    red = DecoderReduction(model.model, [Step("llm_layer", probe(0.5), layer=2)])
    red.attach()
    red.set_image_mask(img)
    model(input_ids=ids, attention_mask=mask)
    red.detach()
    ctx = probe.seen[0]
    cached = stock.layers[1].keys.transpose(1, 2).flatten(2)  # layer K-1 = 1: (B, L, H_kv * d), post-RoPE
    for b in range(2):
        cols = img[b].nonzero()[:, 0]
        torch.testing.assert_close(ctx.keys[b, : len(cols)], cached[b, cols], atol=1e-6, rtol=1e-5)
        text = torch.arange(int(cols.max()) + 1, ids.shape[1])
        torch.testing.assert_close(ctx.text_keys[b, : len(text)], cached[b, text], atol=1e-6, rtol=1e-5)


def test_context_positions_compact_and_original():
    model = tiny_llama(0)
    rows, spans = prompts()
    ids, mask, img = batch(rows[:1], spans[:1])
    seen = {}
    for positions in ("compact", "original"):
        probe = type("Probe", (AttentionProbe,), {"seen": []})
        steps = [Step("llm_layer", create("random", 6), layer=1), Step("llm_layer", probe(3), layer=2)]
        red = DecoderReduction(model.model, steps, positions=positions)
        red.attach()
        red.set_image_mask(img)
        model(input_ids=ids, attention_mask=mask)
        red.detach()
        seen[positions] = probe.seen[0].positions[0]
    kept = create("random", 6, seed=0)(torch.zeros(1, 16, 1)).indices[0]
    assert torch.equal(seen["original"], 4 + kept)  # the image starts at position 4
    assert torch.equal(seen["compact"], torch.arange(4, 10))  # renumbered after the removal


def test_step_errors_are_raised_when_built():
    model = tiny_llama(0)
    with pytest.raises(ConfigError, match="out of range"):
        DecoderReduction(model.model, [Step("llm_layer", create("random", 4), layer=9)])
    probe = type("Probe", (AttentionProbe,), {"attention_layer": "previous"})
    with pytest.raises(ConfigError, match="layer must be >= 1"):
        DecoderReduction(model.model, [Step("llm_layer", probe(4), layer=0)])
    with pytest.raises(ConfigError, match="positions"):
        DecoderReduction(model.model, pyramid(), positions="shifted")


def test_layer_zero_step_and_text_only_forwards():
    model = tiny_llama(0)
    rows, spans = prompts()
    ids, mask, img = batch(rows[:1], spans[:1])
    steps = [Step("llm_layer", create("random", 5), layer=0)]
    toks, logits = generate(model, steps, ids, mask, img, "compact")
    ref_toks, ref_logits = recompute(model, steps, ids, mask, img, "compact")
    assert torch.equal(toks, ref_toks)
    torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=1e-4)
    # A forward without image tokens is the stock forward.
    red = DecoderReduction(model.model, steps)
    red.attach()
    text_only = model(input_ids=ids, attention_mask=mask).logits
    red.detach()
    assert torch.equal(text_only, model(input_ids=ids, attention_mask=mask).logits)


def test_forward_phases_are_explicit_per_layer():
    """The per-forward state is one phase object: not started before the first hooked layer, the stock
    computation until a step removes tokens (or the cache is reduced), reduced from there on, gone after."""
    from tokenreduce_plugins.adapters.decoder_state import NotStarted, Passthrough, Reduced, Reducing

    model = tiny_llama(0)
    rows, spans = prompts()
    ids, mask, img = batch(rows[:1], spans[:1])

    def phases(red, **kw):
        seen = []

        def spy(i):
            def hook(module, args, kwargs):  # runs after the reduction's own hook on that layer
                phase = red._phase
                seen.append((type(phase), getattr(phase, "step", None)))

            return hook

        handles = [layer.register_forward_pre_hook(spy(i), with_kwargs=True) for i, layer in enumerate(model.model.layers)]
        try:
            out = model(**kw)
        finally:
            for h in handles:
                h.remove()
        assert red._phase is None  # the decoder post-hook ends the forward's state
        return seen, out

    red = DecoderReduction(model.model, pyramid())  # steps at layers 1 and 3
    red.attach()
    try:
        red.set_image_mask(img)
        seen, out = phases(red, input_ids=ids, attention_mask=mask, use_cache=True)
        assert seen == [(NotStarted, None), (Reduced, 0), (Reduced, 0), (Reduced, 1)]
        # A decoding step on the reduced cache: stock layers before the first step, then its reduced layers.
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        am = torch.cat([mask, torch.ones_like(nxt)], 1)
        cache = compat.native_kwargs(model.forward, {"cache": compat.output_cache(out)})
        seen, _ = phases(red, input_ids=nxt, attention_mask=am, use_cache=True, **cache)
        assert seen == [(NotStarted, None), (Reduced, 0), (Reduced, 0), (Reduced, 1)]
        # A text-only forward on a fresh cache is the stock forward.
        seen, _ = phases(red, input_ids=ids, attention_mask=mask)
        assert seen == [(NotStarted, None)] + [(Passthrough, None)] * 3
    finally:
        red.detach()
    # Nothing removed (identity budgets): layers keep the stock computation after every step.
    steps = [Step("llm_layer", create("random", 100), layer=1), Step("llm_layer", create("pool", 16), layer=2)]
    red = DecoderReduction(model.model, steps)
    red.attach()
    try:
        red.set_image_mask(img)
        seen, _ = phases(red, input_ids=ids, attention_mask=mask)
        assert seen == [(NotStarted, None)] + [(Reducing, None)] * 3
    finally:
        red.detach()
