"""Host reads of a reduced prefill: the prompt's facts once, before the tower; nothing after it.

Every read of a device value stops the host until the GPU has caught up. After the vision
tower is queued, one read exposes every launch that follows it (the reducer's, the
shortening's, the decoder's): on an H200, LLaVA-1.5's fast prefill waited about 2 ms for the
tower at its first read and then ran 3 ms of launches with the GPU idle. These tests pin down
the reads that remain (:class:`~tokenreduce_plugins.adapters.sequence.PromptFacts`, before the
tower) and check the host-known row lengths against the device's.
"""

from __future__ import annotations

import warnings

import pytest
import test_adapter_llava as llava
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import one_thread, tiny_llava  # noqa: F401 - fixture

import tokenreduce
import tokenreduce.reducer as reducer_module
from tokenreduce import Pipeline, Step, create, validation
from tokenreduce.errors import InvalidInputError
from tokenreduce.sync import device_list, no_host_sync
from tokenreduce_plugins.adapters import sequence
from tokenreduce_plugins.adapters.sequence import PromptFacts, Shrink, placeholder_keep

pytestmark = pytest.mark.usefixtures("one_thread")

PH = 7  # the placeholder id of the synthetic prompts below


@st.composite
def prompts(draw):
    """Rows of text and images (each image a run of placeholders), padded on one side, with a kept count per image."""
    rows = draw(st.integers(1, 4))
    right = draw(st.booleans())
    seqs, stock, kept = [], [], []
    for _ in range(rows):
        seq = [1] * draw(st.integers(0, 3))
        for _ in range(draw(st.integers(0, 3))):
            n = draw(st.integers(1, 6))
            stock.append(n)
            kept.append(draw(st.integers(0, n)))
            seq += [PH] * n + [1] * draw(st.integers(0, 2))
        seqs.append(seq or [1])
    width = max(map(len, seqs))
    ids = torch.zeros(rows, width, dtype=torch.long)
    mask = torch.zeros(rows, width, dtype=torch.long)
    for r, seq in enumerate(seqs):
        cols = slice(0, len(seq)) if right else slice(width - len(seq), width)
        ids[r, cols] = torch.tensor(seq)
        mask[r, cols] = 1
    return ids, mask, stock, kept


@settings(max_examples=60, deadline=None)
@given(case=prompts(), seed=st.integers(0, 2**16), with_mask=st.booleans())
def test_host_row_lengths_equal_the_keep_masks(case, seed, with_mask):
    """``PromptFacts.lengths`` (host) equals the row sums of the keep mask the device builds."""
    ids, mask, stock, kept = case
    mask = mask if with_mask else None
    if mask is None:
        ids = ids.masked_fill(ids == 0, 1)  # without a mask every column is a real token
    gen = torch.Generator().manual_seed(seed)
    keeps = []
    for n, k in zip(stock, kept):
        keep = torch.zeros(n, dtype=torch.bool)
        keep[torch.randperm(n, generator=gen)[:k]] = True
        keeps.append(keep)
    facts = PromptFacts.read(ids, mask, [PH])
    keep = placeholder_keep(ids, PH, keeps, count=facts.count(PH))
    if mask is not None:
        keep &= mask.bool()
    lengths = facts.lengths({PH: kept}, {PH: stock})
    assert lengths == keep.sum(1).tolist()
    assert facts.right == (mask is not None and not bool(mask[:, -1].all()))
    host = Shrink.from_keep(keep, right=facts.right, lengths=lengths)
    read = Shrink.from_keep(keep, right=facts.right)
    assert torch.equal(host.index, read.index) and host.padded == read.padded


def test_facts_that_cannot_tell_give_none():
    ids = torch.tensor([[PH, PH, 1, PH]])
    mask = torch.tensor([[0, 1, 1, 1]])  # a placeholder in padding
    facts = PromptFacts.read(ids, mask, [PH])
    assert facts.stray and facts.lengths({PH: [1]}, {PH: [2]}) is None
    facts = PromptFacts.read(ids, None, [PH])
    assert facts.lengths({PH: [1, 1]}, {PH: [2, 1]}) == [3]
    assert facts.lengths({PH: [1]}, {PH: [2]}) is None  # fewer features than placeholders
    two = PromptFacts.read(torch.tensor([[PH, 1], [PH, 1]]), None, [PH])
    assert two.lengths({PH: [1]}, {PH: [2]}) is None  # one item across two rows


def test_a_wrong_host_length_is_caught_on_cpu():
    keep = torch.tensor([[True, False, True]])
    with pytest.raises(RuntimeError, match="host-known row lengths"):
        Shrink.from_keep(keep, lengths=[3])


def test_placeholder_count_mismatch_names_both_counts():
    ids = torch.tensor([[PH, PH, 1]])
    with pytest.raises(InvalidInputError, match="2 image placeholder tokens.*3 features"):
        placeholder_keep(ids, PH, [torch.ones(3, dtype=torch.bool)], count=2)


def test_device_list_makes_the_tensor_it_is_given():
    t = device_list([3, 1, 2], "cpu")
    assert t.dtype == torch.long and t.tolist() == [3, 1, 2]
    assert device_list([], "cpu", torch.int32).shape == (0,)
    with no_host_sync():  # the sanctioned copy: not refused like torch.tensor(host data)
        t = device_list([5], "cpu")
    assert t.tolist() == [5]


@pytest.mark.parametrize("reducer", ["random", "visionzip", "apet-llava"])
def test_llava_fast_generate_reads_the_device_only_for_the_prompt_facts(reducer, monkeypatch):
    """After the prompt's facts, the LLaVA-1.5 fast prefill (tower, reducer, shortening, decoder)
    queues everything without a host read. The reducer's finiteness read is left out here:
    on CUDA it waits in :func:`tokenreduce.validation.deferred_checks` until the prefill is
    queued (``tests/test_gpu_graphs.py`` covers it); on CPU a read is free."""
    model = tiny_llava(0)
    kw = llava.inputs([0, 1])
    pipe = Pipeline([Step("projector", create(reducer, budget=0.5))], fast=True)
    with torch.inference_mode(), tokenreduce.apply(model, pipe), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = model.generate(**kw, max_new_tokens=1, do_sample=False)
        facts = PromptFacts.read(kw["input_ids"], kw["attention_mask"], [llava.IMAGE_TOKEN])
        monkeypatch.setattr(sequence.PromptFacts, "read", classmethod(lambda cls, *a: facts))
        monkeypatch.setattr(reducer_module, "pending_sum", lambda tokens: None)
        with no_host_sync():
            got = model.generate(**kw, max_new_tokens=1, do_sample=False)
    assert torch.equal(got, expected)


def test_deferred_checks_read_at_once_off_cuda():
    """Off CUDA nothing waits: a bad input raises inside the block, as without it."""
    bad = torch.tensor([[[1.0, float("nan")]]])
    with pytest.raises(InvalidInputError, match="NaN or inf"):
        with validation.deferred_checks():
            validation.check_finite(bad, total=bad.sum(dtype=torch.float32), deferrable=True)
    with validation.deferred_checks():
        validation.flush_checks()  # nothing pending: no read
        create("random", 1)(torch.ones(1, 3, 2))
