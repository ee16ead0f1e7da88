"""Model-independent correctness checks for the LLaVA-family adapters (imported by the tests).

A :class:`Case` describes one tiny model family and a fixed batch of prompts; each check
builds what it needs from it and compares the patched model against the stock model.
The model-agnostic properties every adapter must have (identity, counts, cache, batch,
restoration, every reducer) are the exported kit, :func:`tokenreduce.testing.check_adapter`,
run on every built-in adapter by ``test_adapter_kit.py``; these checks go further for the
LLaVA family (e.g. selection equals the stock model fed only the kept features, in bf16 on GPU).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from models import PAD_TOKEN
from transformers.modeling_outputs import BaseModelOutputWithPooling

import tokenreduce
from tokenreduce import Pipeline, Step, create
from tokenreduce_plugins.adapters import compat

NEW_TOKENS = 5


@dataclass
class Case:
    """A tiny model family with a fixed batch of ``rows`` prompts.

    Attributes:
        build: ``build(seed, attn_implementation) -> model``.
        inputs: ``inputs(rows) -> forward kwargs`` for a subset of the fixed batch (a row's
            content does not depend on which other rows are present).
        tokens: placeholder token id per modality.
        stock_features: ``(model, kwargs) -> {modality: [(N_i, D) features per item]}``
            in placeholder order, as the stock model splices them in.
        rows: size of the fixed batch.
        flat_features: the stock forward takes every modality's features as one
            ``(1, T, D)`` tensor (InternVL), not a list per image.
    """

    build: Callable
    inputs: Callable[[list[int]], dict]
    tokens: dict[str, int]
    stock_features: Callable[[torch.nn.Module, dict], dict[str, list[torch.Tensor]]]
    rows: int = 2
    flat_features: bool = False

    def all_rows(self) -> list[int]:
        return list(range(self.rows))


@dataclass
class Env:
    """Where the checks run: device, dtype, and the tolerances that go with the precision.

    ``exact_tokens``: greedy tokens must agree exactly (fp32). In bf16 a near-tie may flip
    between two kernels, so generation is compared teacher-forced (logits along the same
    token sequence) instead.
    """

    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    atol: float = 5e-5
    rtol: float = 1e-4
    exact_tokens: bool = True

    def model(self, case: Case, attn: str = "sdpa"):
        return case.build(0, attn).to(device=self.device, dtype=self.dtype)

    def inputs(self, case: Case, rows: list[int] | None = None) -> dict:
        kw = case.inputs(case.all_rows() if rows is None else rows)
        return {k: self.move(v) for k, v in kw.items()}

    def move(self, v):
        if not isinstance(v, torch.Tensor):
            return v
        return v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)


CPU = Env()


def pipeline(*steps: Step, positions: str | None = None, video_budget: str = "per_frame") -> Pipeline:
    return Pipeline(list(steps), positions=positions, video_budget=video_budget)


def identity_pipeline(layer: int = 1) -> Pipeline:
    big = 100_000
    return pipeline(
        Step("vision_encoder", create("random", big)),
        Step("projector", create("pool", big)),
        Step("llm_layer", create("random", big), layer=layer),
    )


def logits(model, kw: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**kw).logits


def with_features(model, call: dict, poolers: dict, pixels: dict):
    """The stock forward on ``call`` with the features of each modality replaced by ``poolers``.

    ``poolers[m]`` is what the LLM sequence gets (videos: with their newline). Releases
    whose forward takes ``mm_encoder_outputs`` get them there; older ones get the pixel
    inputs ``pixels`` and the model's feature getters serve the features.
    """
    mm = {m: BaseModelOutputWithPooling(pooler_output=p) for m, p in poolers.items()}
    inner = model.model
    with torch.no_grad():
        if compat.takes_encoder_outputs(model.forward):
            return model(**call, mm_encoder_outputs=mm)
        if "video" in mm and compat.forward_adds_video_newline(inner):
            mm["video"] = BaseModelOutputWithPooling(pooler_output=mm["video"].pooler_output[:, :-1])
        with compat.serving_features(inner, mm):
            return model(**call, **pixels)


def media_inputs(kw: dict) -> dict:
    """The pixel arguments of a call (everything but ids, masks, positions and labels)."""
    return {k: v for k, v in kw.items() if k not in ("input_ids", "attention_mask", "position_ids", "labels")}


def check_identity(case: Case, attn: str, env: Env = CPU, rows: list[int] | None = None) -> None:
    """Budget >= tokens everywhere: logits and generated tokens bit-identical to the stock model."""
    model = env.model(case, attn)
    kw = env.inputs(case, rows)
    stock = logits(model, kw)
    stock_gen = model.generate(**kw, max_new_tokens=NEW_TOKENS, do_sample=False)
    with tokenreduce.apply(model, identity_pipeline()) as handle:
        got = logits(model, kw)
        got_gen = model.generate(**kw, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert handle.records and all(r.tokens_before == r.tokens_after for r in handle.records)
    assert torch.equal(got, stock)
    assert torch.equal(got_gen, stock_gen)


def hand_built_ids(ids: torch.Tensor, mask: torch.Tensor, tokens: dict[str, int], keep: dict[str, list[torch.Tensor]]):
    """Shorten prompts the slow, obvious way: walk every token, drop the placeholders not kept."""
    counters = {m: [0, 0] for m in tokens}  # item index, index within the item
    rows = []
    for r in range(ids.shape[0]):
        row = []
        for t, valid in zip(ids[r].tolist(), mask[r].tolist()):
            if not valid:
                continue
            mod = next((m for m, tid in tokens.items() if tid == t), None)
            if mod is None:
                row.append(t)
                continue
            item, pos = counters[mod]
            if bool(keep[mod][item][pos]):
                row.append(t)
            pos += 1
            if pos == keep[mod][item].numel():
                item, pos = item + 1, 0
            counters[mod] = [item, pos]
        rows.append(row)
    length = max(len(r) for r in rows)
    out = torch.full((len(rows), length), PAD_TOKEN, dtype=torch.long)
    out_mask = torch.zeros_like(out)
    for r, row in enumerate(rows):
        out[r, length - len(row) :] = torch.tensor(row, dtype=torch.long)
        out_mask[r, length - len(row) :] = 1
    return out, out_mask


def check_hand_built(case: Case, pipe: Pipeline, *, atol: float = 1e-5, env: Env = CPU, rows=None) -> dict:
    """Encoder-side selection equals the stock model fed only the kept features (same positions rule)."""
    model = env.model(case)
    kw = env.inputs(case, rows)
    with tokenreduce.apply(model, pipe) as handle:
        got = logits(model, kw)
        keep = {m: [k.clone() for k in ks] for m, ks in handle.adapter.last_keep.items()}
        positions = handle.adapter.positions
    stock = case.stock_features(model, kw)
    ids, mask = hand_built_ids(kw["input_ids"].cpu(), kw["attention_mask"].cpu(), case.tokens, keep)
    ids, mask = ids.to(env.device), mask.to(env.device)
    feats = {m: [f[k.to(f.device)] for f, k in zip(stock[m], keep[m])] for m in keep}
    poolers = {m: fs if m == "image" and not case.flat_features else torch.cat(fs).unsqueeze(0) for m, fs in feats.items()}
    hand = {"input_ids": ids, "attention_mask": mask}
    if positions == "original":
        full_ids, full_mask = kw["input_ids"].cpu(), kw["attention_mask"].cpu()
        full = torch.arange(full_ids.shape[1]).expand_as(full_ids)
        flat_keep = hand_keep_mask(full_ids, case.tokens, keep)
        pos = torch.zeros(ids.shape, dtype=torch.long)
        for r in range(ids.shape[0]):
            kept = full[r][flat_keep[r] & full_mask[r].bool()]
            pos[r, ids.shape[1] - len(kept) :] = kept
        hand["position_ids"] = pos.to(env.device)
    expect = with_features(model, hand, poolers, media_inputs(kw)).logits
    # Compare real tokens only (padding rows attend to nothing; their logits are meaningless).
    assert got.shape == expect.shape
    torch.testing.assert_close(got[mask.bool()], expect[mask.bool()], atol=max(atol, env.atol), rtol=env.rtol)
    return keep


def hand_keep_mask(ids, tokens, keep) -> torch.Tensor:
    out = torch.ones_like(ids, dtype=torch.bool)
    for m, tid in tokens.items():
        if m not in keep:
            continue
        ph = ids == tid
        flat = torch.cat([k.cpu() for k in keep[m]]) if keep[m] else torch.zeros(0, dtype=torch.bool)
        out[ph] = flat
    return out


def recompute(model, kw: dict, new: int = NEW_TOKENS, forced: torch.Tensor | None = None):
    """Greedy decoding by a full forward (no cache) of the growing sequence at every step.

    With ``forced (B, new)`` the sequence grows by those tokens instead (teacher forcing).
    """
    seq, am = kw["input_ids"], kw["attention_mask"]
    rest = {k: v for k, v in kw.items() if k not in ("input_ids", "attention_mask")}
    out = []
    for t in range(new):
        pos = (am.cumsum(-1) - 1).clamp(min=0)  # the position ids generate() uses
        with torch.no_grad():
            last = model(input_ids=seq, attention_mask=am, position_ids=pos, use_cache=False, **rest).logits[:, -1]
        out.append(last)
        nxt = last.argmax(-1, keepdim=True) if forced is None else forced[:, t : t + 1]
        seq, am = torch.cat([seq, nxt], 1), torch.cat([am, torch.ones_like(nxt)], 1)
    return seq[:, kw["input_ids"].shape[1] :], torch.stack(out, 1)


def greedy_generate(model, kw: dict, new: int = NEW_TOKENS):
    out = model.generate(**kw, max_new_tokens=new, do_sample=False, output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, kw["input_ids"].shape[1] :], torch.stack(out.logits, 1)


def _agree(env: Env, toks, lg, ref_toks, ref_lg) -> None:
    if env.exact_tokens:
        assert torch.equal(toks, ref_toks)
    torch.testing.assert_close(lg.float(), ref_lg.float(), atol=env.atol, rtol=env.rtol)


def check_generate_matches_recompute(case: Case, pipe: Pipeline, attn: str = "sdpa", env: Env = CPU, rows=None) -> None:
    """generate() with the KV cache equals recomputing the whole reduced forward at every step."""
    model = env.model(case, attn)
    kw = env.inputs(case, rows)
    with tokenreduce.apply(model, pipe):
        toks, lg = greedy_generate(model, kw)
        ref_toks, ref_lg = recompute(model, kw, forced=None if env.exact_tokens else toks)
    _agree(env, toks, lg, ref_toks, ref_lg)


def check_batch_matches_rows(case: Case, pipe: Pipeline, env: Env = CPU) -> None:
    """A left-padded batch (rows with different image counts) equals each row run alone."""
    model = env.model(case)
    with tokenreduce.apply(model, pipe):
        toks, lg = greedy_generate(model, env.inputs(case))
        for r in case.all_rows():
            one = env.inputs(case, [r])
            if env.exact_tokens:
                t1, l1 = greedy_generate(model, one)
            else:  # the row alone, teacher-forced along the batch's tokens
                t1, l1 = recompute(model, one, forced=toks[r : r + 1])
            _agree(env, t1[0], l1[0], toks[r], lg[r])


def our_hooks(model: torch.nn.Module) -> list:
    """Forward (pre-)hooks installed by tokenreduce (transformers installs its own output-capturing ones)."""
    found = []
    for mod in model.modules():
        for fn in [*mod._forward_pre_hooks.values(), *mod._forward_hooks.values()]:
            if getattr(fn, "__module__", "").startswith("tokenreduce"):
                found.append(fn)
    return found


def check_remove_restores(case: Case, pipe: Pipeline, env: Env = CPU, rows=None) -> None:
    """patch() then remove() leaves the model behaving bit-identically to never patched."""
    model = env.model(case)
    kw = env.inputs(case, rows)
    before = logits(model, kw)
    gen_before = model.generate(**kw, max_new_tokens=NEW_TOKENS, do_sample=False)
    handle = tokenreduce.patch(model, pipe)
    assert logits(model, kw).shape[1] < before.shape[1]
    handle.remove()
    handle.remove()  # idempotent
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__
    assert not our_hooks(model)
    assert torch.equal(logits(model, kw), before)
    assert torch.equal(model.generate(**kw, max_new_tokens=NEW_TOKENS, do_sample=False), gen_before)
    # Also restored when the body of `with apply(...)` raises.
    try:
        with tokenreduce.apply(model, pipe):
            raise KeyError("boom")
    except KeyError:
        pass
    assert torch.equal(logits(model, kw), before)
