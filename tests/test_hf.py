"""Hugging Face integration: conversion both ways and accelerated models equal to the originals.

Models are randomly initialised from small configs (no download). Skipped without transformers >= 5.15.
"""

import copy
import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _helpers import ATTENTION_MODULE, NO_CUDA, REHEARSED, RunsOnLoad, assert_grads_close

from posbias.integrations.hf import TRANSFORMERS_FROM, too_old  # noqa: E402

transformers = pytest.importorskip("transformers")
if too_old(transformers.__version__):  # pragma: no cover
    pytest.skip(f"the integration needs transformers >= {TRANSFORMERS_FROM}", allow_module_level=True)

from posbias import build  # noqa: E402
from posbias.integrations.hf import _release  # noqa: E402
from posbias.integrations.hf import (POSBIAS_FROM, accelerate, mask_documents, mask_kind, restore,  # noqa: E402
                                     scheme_from_hf, schemes_from_pretrained, t5_to_hf)


def t5_config(**kw):
    base = dict(vocab_size=97, d_model=48, d_kv=12, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                relative_attention_num_buckets=16, relative_attention_max_distance=40, dropout_rate=0.0,
                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    base.update(kw)
    return transformers.T5Config(**base)


def randomize_bias(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_attention_bias" in name:
                p.normal_(0, 2.0)  # large, so a bias error cannot hide
    return model


def pair(model):
    model.eval()
    fast = accelerate(copy.deepcopy(model))
    return model, fast


@pytest.fixture(autouse=True)
def posbias_for_every_length(monkeypatch):
    """Inference on fewer than ``POSBIAS_FROM`` keys keeps transformers' path; these small models would
    then never reach posbias at inference, so every test but the one about that rule lowers it to 0."""
    import posbias.integrations.hf as hf

    monkeypatch.setattr(hf, "POSBIAS_FROM", 0)


@pytest.fixture
def fast_calls(monkeypatch):
    """Counts the calls that took posbias' attention (not the transformers fallback)."""
    import posbias.integrations.hf as hf

    class Calls(list):
        backends: list  # the backend each call asked for

    calls = Calls()
    calls.backends = backends = []
    real = hf.attention

    def counted(*args, **kw):
        calls.append(args[0].shape)
        backends.append((kw.get("backend", "auto"), kw.get("strict", True)))
        return real(*args, **kw)

    monkeypatch.setattr(hf, "attention", counted)
    return calls


@pytest.mark.parametrize("buckets,max_distance", [(16, 40), (32, 128), (8, 20)])
def test_t5_encoder_equal(buckets, max_distance, fast_calls):
    torch.manual_seed(0)
    cfg = t5_config(relative_attention_num_buckets=buckets, relative_attention_max_distance=max_distance)
    ref, fast = pair(randomize_bias(transformers.T5EncoderModel(cfg)))
    ids = torch.randint(2, 97, (2, 301))
    with torch.no_grad():
        a = ref(input_ids=ids).last_hidden_state
        b = fast(input_ids=ids).last_hidden_state
    torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)
    assert len(fast_calls) == 2  # both layers' self-attention on posbias


@pytest.mark.parametrize("device", REHEARSED)
def test_t5_seq2seq_logits_and_generate_with_cache(fast_calls, device):
    torch.manual_seed(0)
    ref, fast = pair(randomize_bias(transformers.T5ForConditionalGeneration(t5_config())).to(device))
    ids = torch.randint(2, 97, (2, 83), device=device)
    dec = torch.randint(2, 97, (2, 57), device=device)
    with torch.no_grad():
        a = ref(input_ids=ids, decoder_input_ids=dec).logits
        b = fast(input_ids=ids, decoder_input_ids=dec).logits
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)
        assert len(fast_calls) == 4  # encoder and decoder self-attention; cross-attention stays on SDPA
        ga = ref.generate(input_ids=ids, max_new_tokens=30, min_new_tokens=30, do_sample=False)
        gb = fast.generate(input_ids=ids, max_new_tokens=30, min_new_tokens=30, do_sample=False)
        gc = fast.generate(input_ids=ids, max_new_tokens=30, min_new_tokens=30, do_sample=False, use_cache=False)
    assert torch.equal(ga, gb) and torch.equal(ga, gc)
    assert any(shape[2] == 1 for shape in fast_calls)  # one-token decoding steps took the fast path


@pytest.mark.cuda
@NO_CUDA
def test_t5_on_the_triton_backend_trains_and_generates_like_the_unpatched_model(fast_calls):
    """``accelerate(model, backend="triton")`` on CUDA (issue 12's fused candidate, before ``auto`` takes
    it): logits and ``generate()`` with cache equal to the unpatched model's, gradients to the bucket table
    too, and the calls ran on triton (prefill and one-token steps alike)."""
    torch.manual_seed(0)
    model = randomize_bias(transformers.T5ForConditionalGeneration(t5_config())).to("cuda").eval()
    fast = accelerate(copy.deepcopy(model), backend="triton")
    ids = torch.randint(2, 97, (2, 83), device="cuda")
    dec = torch.randint(2, 97, (2, 57), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(fast(input_ids=ids, decoder_input_ids=dec).logits,
                                   model(input_ids=ids, decoder_input_ids=dec).logits, atol=2e-5, rtol=1e-4)
        gen = dict(input_ids=ids, max_new_tokens=30, min_new_tokens=30, do_sample=False)
        assert torch.equal(fast.generate(**gen), model.generate(**gen))
    assert set(fast_calls.backends) == {("triton", False)}
    grads = []
    for m in (model, fast):
        m(input_ids=ids, decoder_input_ids=dec).logits.square().mean().backward()
        grads.append(m.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("scattered", [False, True])
def test_t5_padding_mask_runs_on_posbias_exactly(scattered, fast_calls):
    """A padded batch (right padding, or keys hidden anywhere: T5's bias reads raw positions) takes
    posbias with the padding as its key mask, and equals the unpatched encoder."""
    torch.manual_seed(0)
    ref, fast = pair(randomize_bias(transformers.T5EncoderModel(t5_config())))
    ids = torch.randint(2, 97, (3, 50))
    mask = torch.ones(3, 50, dtype=torch.long)
    mask[1, 40:] = 0
    if scattered:
        mask[2, 5:50:4] = 0
    with torch.no_grad():
        a = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        b = fast(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)
    assert len(fast_calls) == 2  # both layers' self-attention took posbias


def _packed(lengths, causal, batch=1, additive=False):
    """A block-diagonal 4D mask: documents of these lengths, each attending only within itself."""
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    allowed = ids[:, None] == ids[None, :]
    if causal:
        allowed &= torch.tril(torch.ones_like(allowed))
    allowed = allowed[None, None].expand(batch, 1, -1, -1).clone()
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min) if additive else allowed


def _grads_equal(ref, fast):
    names, want = zip(*((n, p.grad) for n, p in ref.named_parameters()))
    assert_grads_close([p.grad for p in fast.parameters()], list(want), atol=2e-5, rtol=1e-4, names=names)


@pytest.mark.parametrize("additive", [False, True])
def test_t5_packed_documents_run_on_posbias_exactly(additive, fast_calls):
    """Packed sequences: a block-diagonal mask in the encoder (documents attending fully within
    themselves) and in the decoder (causally) takes posbias' document_ids path; outputs, losses and
    every gradient equal the unpatched model's, and each document alone gives the same encoder output.
    A mask that is not block-diagonal keeps transformers' path. (transformers' T5 takes a 4D encoder
    mask in the encoder alone: its cross-attention would need a mask of its own.)"""
    torch.manual_seed(0)
    cfg = t5_config()
    ref, fast = pair(randomize_bias(transformers.T5EncoderModel(cfg)))
    ids = torch.randint(2, 97, (2, 60))
    enc = _packed([17, 30, 13], False, 2, additive)
    for m in (ref, fast):
        m.train()
        m(input_ids=ids, attention_mask=enc).last_hidden_state.square().sum().backward()
    assert [tuple(s) for s in fast_calls] == [(2, 4, 60, 12)] * 2  # both layers on posbias
    _grads_equal(ref, fast)
    with torch.no_grad():
        whole = fast(input_ids=ids[:1], attention_mask=enc[:1]).last_hidden_state
        torch.testing.assert_close(whole, ref(input_ids=ids[:1], attention_mask=enc[:1]).last_hidden_state,
                                   atol=2e-5, rtol=1e-4)
        alone = torch.cat([fast(input_ids=ids[:1, a:b]).last_hidden_state for a, b in ((0, 17), (17, 47), (47, 60))], 1)
    torch.testing.assert_close(whole, alone, atol=2e-5, rtol=1e-4)
    fast_calls.clear()
    holed = enc.clone()
    holed[:, :, 20, 25] = torch.finfo(torch.float32).min if additive else False  # one pair hidden in a document
    with torch.no_grad():
        torch.testing.assert_close(fast(input_ids=ids, attention_mask=holed).last_hidden_state,
                                   ref(input_ids=ids, attention_mask=holed).last_hidden_state, atol=2e-5, rtol=1e-4)
    assert not fast_calls
    ref, fast = pair(randomize_bias(transformers.T5ForConditionalGeneration(cfg)))
    labels = torch.randint(2, 97, (2, 45))
    kw = dict(input_ids=ids, decoder_input_ids=labels, decoder_attention_mask=_packed([20, 5, 20], True, 2, additive))
    losses = []
    for m in (ref, fast):
        m.train()
        out = m(**kw).logits
        losses.append(torch.nn.functional.cross_entropy(out.flatten(0, 1), labels.flatten()))
        losses[-1].backward()
    assert (2, 4, 45, 12) in [tuple(s) for s in fast_calls]  # the decoder's packed self-attention on posbias
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    _grads_equal(ref, fast)


def test_mask_documents():
    ids, kind = mask_documents(_packed([2, 3], True), 5)[1], mask_documents(_packed([2, 3], True), 5)[0]
    assert kind == "causal" and ids.tolist() == [[0, 0, 1, 1, 1]]
    assert mask_documents(_packed([2, 3], False, additive=True), 5)[0] == "full"
    assert mask_documents(_packed([1, 1, 1], False), 3)[1].tolist() == [[0, 1, 2]]
    assert mask_documents(_packed([2, 3], True), 6) is None  # another length
    assert mask_documents(None, 5) is None
    odd = _packed([2, 3], True)
    odd[0, 0, 4, 2] = False  # hidden from one query inside a document
    assert mask_documents(odd, 5) is None
    half = _packed([2, 3], False)
    half[0, 0, 0, 1] = False  # causal in one document, full in the other
    assert mask_documents(half, 5) is None
    assert mask_documents(torch.ones(1, 2, 5, 5, dtype=torch.bool), 5) is None  # per head


def test_t5_padded_seq2seq_generate_and_training(fast_calls):
    torch.manual_seed(0)
    ref, fast = pair(randomize_bias(transformers.T5ForConditionalGeneration(t5_config())))
    ids = torch.randint(2, 97, (2, 60))
    mask = torch.ones(2, 60, dtype=torch.long)
    mask[0, 45:] = 0
    with torch.no_grad():
        ga = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False)
        gb = fast.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert torch.equal(ga, gb) and fast_calls
    labels = torch.randint(2, 97, (2, 12))
    la = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
    lb = fast(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(lb, la, atol=1e-5, rtol=1e-5)
    w = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    ga_, gb_ = (torch.autograd.grad(loss, dict(m.named_parameters())[w]) [0] for loss, m in ((la, ref), (lb, fast)))
    torch.testing.assert_close(gb_, ga_, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device", REHEARSED)
def test_t5_training_gradients_reach_the_hf_weight(device):
    torch.manual_seed(0)
    ref, fast = pair(randomize_bias(transformers.T5EncoderModel(t5_config())).to(device))
    ids = torch.randint(2, 97, (1, 120), device=device)
    grads = []
    for m in (ref, fast):
        m.zero_grad()
        m(input_ids=ids).last_hidden_state.square().sum().backward()
        grads.append(m.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], atol=1e-4, rtol=1e-3)
    assert grads[0].abs().sum() > 0
    assert set(fast.state_dict()) == set(ref.state_dict())


# transformers 5.15-5.17 build UMT5's decoder self-attention with is_causal = False (read in their wheels; 5.18 sets it)
UMT5_LEAKS = _release(transformers.__version__) < (5, 18)


def causal_umt5_decoder(model):
    """On transformers 5.15-5.17, the unpatched UMT5 as 5.18 builds it: its decoder's self-attention
    causal (those releases leave ``is_causal`` False, and SDPA without a mask then lets each decoder
    token see the later ones)."""
    if UMT5_LEAKS and getattr(model, "decoder", None) is not None:
        for block in model.decoder.block:
            block.layer[0].SelfAttention.is_causal = True
    return model


def test_accelerated_umt5_decoder_is_causal_and_warns_where_transformers_is_not(recwarn):
    """A decoder position's logits do not move when a later decoder token changes, on the accelerated UMT5
    whatever the release; the unpatched one moves them on transformers 5.15-5.17, where ``accelerate``
    says so."""
    torch.manual_seed(0)
    cfg = transformers.UMT5Config(vocab_size=97, d_model=48, d_kv=12, d_ff=64, num_layers=1, num_decoder_layers=1,
                                  num_heads=4, dropout_rate=0.0, decoder_start_token_id=0)
    ref = transformers.UMT5ForConditionalGeneration(cfg).eval()
    fast = accelerate(copy.deepcopy(ref))
    warned = [w for w in recwarn.list if "decoder self-attention has is_causal = False" in str(w.message)]
    assert len(warned) == UMT5_LEAKS
    ids, dec = torch.randint(2, 97, (1, 9)), torch.randint(2, 97, (1, 6))
    later = dec.clone()
    later[0, -1] = (later[0, -1] + 1) % 97
    with torch.no_grad():
        moved = {name: float((m(input_ids=ids, decoder_input_ids=dec).logits[0, 0]
                              - m(input_ids=ids, decoder_input_ids=later).logits[0, 0]).abs().max())
                 for name, m in (("unpatched", ref), ("accelerated", fast))}
    assert moved["accelerated"] == 0
    assert (moved["unpatched"] > 0) == UMT5_LEAKS
    leaking = copy.deepcopy(ref)  # as 5.15-5.17 build it, on whichever release runs this: warned once
    for block in leaking.decoder.block:
        block.layer[0].SelfAttention.is_causal = False
    recwarn.clear()
    accelerate(leaking)
    assert len([w for w in recwarn.list if "decoder self-attention has is_causal = False" in str(w.message)]) == 1


def test_umt5_per_layer_bias_equal():
    torch.manual_seed(0)
    cfg = transformers.UMT5Config(vocab_size=97, d_model=48, d_kv=12, d_ff=64, num_layers=2, num_heads=4,
                                  relative_attention_num_buckets=16, relative_attention_max_distance=40,
                                  dropout_rate=0.0, decoder_start_token_id=0)
    ref, fast = pair(randomize_bias(transformers.UMT5EncoderModel(cfg)))
    ids = torch.randint(2, 97, (2, 140))
    with torch.no_grad():
        torch.testing.assert_close(fast(input_ids=ids).last_hidden_state, ref(input_ids=ids).last_hidden_state,
                                   atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("device", REHEARSED)
@pytest.mark.parametrize("heads", [4, 6])
def test_bloom_logits_and_generate(heads, fast_calls, device):
    torch.manual_seed(0)
    cfg = transformers.BloomConfig(vocab_size=97, hidden_size=12 * heads, n_layer=2, n_head=heads,
                                   hidden_dropout=0.0, attention_dropout=0.0)
    ref, fast = pair(transformers.BloomForCausalLM(cfg).to(device))
    ids = torch.randint(0, 97, (2, 150), device=device)
    with torch.no_grad():
        torch.testing.assert_close(fast(input_ids=ids).logits, ref(input_ids=ids).logits, atol=2e-5, rtol=1e-4)
        fast_calls.clear()  # no cache at all (layer_past None), as a training step may ask
        torch.testing.assert_close(fast(input_ids=ids, use_cache=False).logits, ref(input_ids=ids).logits, atol=2e-5,
                                   rtol=1e-4)
        assert fast_calls
        ga, gb = (m.generate(input_ids=ids[:, :40], max_new_tokens=25, min_new_tokens=25, do_sample=False,
                             output_scores=True, return_dict_in_generate=True) for m in (ref, fast))
    assert torch.equal(ga.sequences, gb.sequences)
    # each decoding step's logits too, not only their argmax (a step that read no cached keys kept it here)
    torch.testing.assert_close(torch.stack(gb.scores), torch.stack(ga.scores), atol=2e-5, rtol=1e-4)
    assert len(fast_calls) > 2 and any(shape[2] == 1 for shape in fast_calls)


def test_bloom_slow_but_exact_tensor_parallel_keeps_transformers_path(fast_calls):
    """BLOOM's ``slow_but_exact`` with ``pretraining_tp > 1`` splits its output projection into slices
    (other rounding, on purpose): that model keeps transformers' attention. Either setting alone is
    BLOOM's usual computation, which runs on posbias, with the same logits."""
    torch.manual_seed(0)
    ids = torch.randint(0, 97, (2, 60))
    for tp, exact, on_posbias in [(2, True, False), (1, True, True), (2, False, True)]:
        cfg = transformers.BloomConfig(vocab_size=97, hidden_size=48, n_layer=2, n_head=4, hidden_dropout=0.0,
                                       attention_dropout=0.0, pretraining_tp=tp, slow_but_exact=exact)
        ref, fast = pair(transformers.BloomForCausalLM(cfg))
        fast_calls.clear()
        with torch.no_grad():
            torch.testing.assert_close(fast(input_ids=ids).logits, ref(input_ids=ids).logits, atol=2e-5, rtol=1e-4)
        assert bool(fast_calls) is on_posbias, (tp, exact)


def test_bloom_left_padding_runs_on_posbias_and_scattered_keys_fall_back(fast_calls):
    """Left padding (how one batches prompts for generation): each sequence keeps one run of keys, whose
    offsets BLOOM's ALiBi (positions counted over the kept keys) shares, so posbias takes it; logits at
    the real positions and the generated tokens equal the unpatched model's. Keys hidden in the middle
    change BLOOM's positions: that mask keeps transformers' path, with the same logits."""
    torch.manual_seed(0)
    cfg = transformers.BloomConfig(vocab_size=97, hidden_size=48, n_layer=2, n_head=4, hidden_dropout=0.0,
                                   attention_dropout=0.0)
    ref, fast = pair(transformers.BloomForCausalLM(cfg))
    ids = torch.randint(3, 97, (2, 70))
    mask = torch.ones(2, 70, dtype=torch.long)
    mask[1, :15] = 0
    with torch.no_grad():
        a = ref(input_ids=ids, attention_mask=mask).logits
        b = fast(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(b[mask.bool()], a[mask.bool()], atol=2e-5, rtol=1e-4)
        assert fast_calls
        ga = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=15, min_new_tokens=15, do_sample=False)
        gb = fast.generate(input_ids=ids, attention_mask=mask, max_new_tokens=15, min_new_tokens=15, do_sample=False)
        assert torch.equal(ga, gb)
        one = torch.ones_like(mask)
        one[1, 0] = 0  # a single padding key: still one run
        fast_calls.clear()
        a, b = (m(input_ids=ids, attention_mask=one).logits for m in (ref, fast))
        torch.testing.assert_close(b[one.bool()], a[one.bool()], atol=2e-5, rtol=1e-4)
        assert fast_calls
        fast_calls.clear()
        mask[0, 30:40] = 0
        a = ref(input_ids=ids, attention_mask=mask).logits
        b = fast(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)
    assert not fast_calls


def mpt_config(heads, bias_max=8, clip_qkv=None, **kw):
    return transformers.MptConfig(vocab_size=97, d_model=8 * heads, n_heads=heads, n_layers=2, max_seq_len=128,
                                  attn_config={"attn_pdrop": 0, "alibi": True, "alibi_bias_max": bias_max,
                                               "clip_qkv": clip_qkv}, **kw)


def test_mpt_clips_its_queries_keys_and_values_as_the_unpatched_model(fast_calls):
    torch.manual_seed(0)
    ref, fast = pair(transformers.MptForCausalLM(mpt_config(4, clip_qkv=0.02)))
    unclipped = transformers.MptForCausalLM(mpt_config(4))
    unclipped.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 97, (2, 60))
    with torch.no_grad():
        a, b = ref(input_ids=ids).logits, fast(input_ids=ids).logits
        assert not torch.allclose(unclipped(input_ids=ids).logits, a, atol=1e-4)  # the clip changes the model
    torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)
    assert fast_calls


@pytest.mark.parametrize("version", ["4.57.6", "5.0.0", "5.14.1"])
def test_an_older_transformers_is_refused_in_one_line(version, monkeypatch):
    """transformers 5.0-5.14 fail the integration's tests (T5 outside the attention interface): a
    model is refused with the version found and the one needed, before anything is patched."""
    model = transformers.T5EncoderModel(t5_config())
    # the module posbias imports: transformers puts a lazy module in sys.modules in place of the one
    # first imported, which this file's name still holds
    monkeypatch.setattr(sys.modules["transformers"], "__version__", version)
    with pytest.raises(ValueError, match=rf"needs transformers >= 5\.15 .*found {re.escape(version)}"):
        accelerate(model)
    assert model.config._attn_implementation != "posbias"


def test_mpt_attention_reads_its_cache_under_either_name(fast_calls):
    """transformers renamed MPT attention's cache argument (``past_key_values`` in 5.20, ``cache`` in
    5.25). The patched attention reads the name it is given, fills the cache as the unpatched module
    does and equals its output through a prefill and a decoding step; reading only ``cache`` left a
    5.20 cache unfilled and generation diverged."""
    import inspect

    torch.manual_seed(0)
    ref, fast = pair(transformers.MptForCausalLM(mpt_config(4)))
    accepted = inspect.signature(type(ref.transformer.blocks[0].attn).forward).parameters
    names = ["past_key_values"] + (["cache"] if "cache" in accepted else [])  # 5.25 still takes the old name
    bias = ref.transformer.build_mpt_alibi_tensor(4, 128, device="cpu")
    hidden = torch.randn(1, 9, 32)
    prefill_mask = torch.ones(8, 8, dtype=torch.bool).triu(1)[None, None]  # MPT: True where hidden
    step_mask = torch.zeros(1, 1, 1, 9, dtype=torch.bool)
    for name in names:
        outs = []
        for model in (ref, fast):
            attn, cache = model.transformer.blocks[0].attn, transformers.DynamicCache(config=model.config)
            with torch.no_grad():
                first = attn(hidden[:, :8], position_bias=bias, attention_mask=prefill_mask, **{name: cache})[0]
                step = attn(hidden[:, 8:], position_bias=bias, attention_mask=step_mask, **{name: cache})[0]
            outs.append((first, step, cache.get_seq_length()))
        assert outs[0][2] == outs[1][2] == 9, name
        torch.testing.assert_close(outs[1][0], outs[0][0], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(outs[1][1], outs[0][1], atol=2e-5, rtol=1e-4)
    assert len(fast_calls) == 2 * len(names)  # every call took posbias' path


@pytest.mark.parametrize("heads, bias_max", [(4, 8), (6, 12)])  # 12: transformers 5 ignores it (the model's slopes)
def test_mpt_logits_generate_padding_and_training(heads, bias_max, fast_calls):
    torch.manual_seed(0)
    ref, fast = pair(transformers.MptForCausalLM(mpt_config(heads, bias_max)))
    ids = torch.randint(0, 97, (2, 100))
    mask = torch.ones(2, 100, dtype=torch.long)
    mask[1, :20] = 0  # left padding
    with torch.no_grad():
        torch.testing.assert_close(fast(input_ids=ids).logits, ref(input_ids=ids).logits, atol=2e-5, rtol=1e-4)
        a, b = (m(input_ids=ids, attention_mask=mask).logits for m in (ref, fast))
        torch.testing.assert_close(b[mask.bool()], a[mask.bool()], atol=2e-5, rtol=1e-4)
        kw = dict(attention_mask=mask[:, :60], max_new_tokens=20, min_new_tokens=20, do_sample=False, use_cache=True)
        assert torch.equal(ref.generate(input_ids=ids[:, :60], **kw), fast.generate(input_ids=ids[:, :60], **kw))
    assert len(fast_calls) > 4 and any(shape[2] == 1 for shape in fast_calls)
    la, lb = (m(input_ids=ids, labels=ids).loss for m in (ref, fast))
    torch.testing.assert_close(lb, la, atol=1e-5, rtol=1e-5)
    w = "transformer.blocks.0.attn.Wqkv.weight"
    ga, gb = (torch.autograd.grad(loss, dict(m.named_parameters())[w])[0] for loss, m in ((la, ref), (lb, fast)))
    torch.testing.assert_close(gb, ga, atol=1e-5, rtol=1e-4)


def test_mpt_runs_past_max_seq_len_and_keeps_attention_weights_on_its_own_path(fast_calls):
    """transformers cannot add MPT's bias past ``config.max_seq_len``; posbias has no such limit, and what
    it computes there is what the same weights give with a larger ``max_seq_len``. Attention weights
    asked for take transformers' path (posbias never forms them)."""
    torch.manual_seed(0)
    ref, fast = pair(transformers.MptForCausalLM(mpt_config(4, )))
    ids = torch.randint(0, 97, (1, 200))
    with torch.no_grad():
        with pytest.raises(RuntimeError):
            ref(input_ids=ids)
        got = fast(input_ids=ids).logits
        ref.config.max_seq_len = 256
        torch.testing.assert_close(got, ref(input_ids=ids).logits, atol=2e-5, rtol=1e-4)
        fast_calls.clear()
        a = ref(input_ids=ids[:, :50], output_attentions=True).attentions
        b = fast(input_ids=ids[:, :50], output_attentions=True).attentions
    assert not fast_calls and all(x is not None for x in b)
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_t5_attention_weights_asked_for_are_given(fast_calls, implementation):
    """``output_attentions=True`` on an accelerated T5 takes the model's own eager attention: the weights
    of every layer (encoder with padding, causal decoder, cross) equal the unpatched eager model's, whatever
    implementation the model had. They were an empty tuple under a warning about ``sdpa`` — for a model
    set to ``eager`` to get them too."""
    torch.manual_seed(0)
    eager = randomize_bias(transformers.T5ForConditionalGeneration(t5_config(attn_implementation="eager"))).eval()
    model = transformers.T5ForConditionalGeneration(t5_config(attn_implementation=implementation))
    model.load_state_dict(eager.state_dict())
    fast = accelerate(model.eval())
    x, y = torch.randint(2, 97, (2, 70)), torch.randint(2, 97, (2, 9))
    pad = torch.ones(2, 70, dtype=torch.long)
    pad[1, 55:] = 0
    # without a mask, SDPA's None mask is read as causal or not by the module (two decoder queries: causal)
    for mask, dec in ((pad, y), (None, y), (None, y[:, :2])):
        with torch.no_grad():
            a = eager(input_ids=x, attention_mask=mask, decoder_input_ids=dec, output_attentions=True)
            fast_calls.clear()
            b = fast(input_ids=x, attention_mask=mask, decoder_input_ids=dec, output_attentions=True)
            assert not fast_calls
            plain = fast(input_ids=x, attention_mask=mask, decoder_input_ids=dec)
        for name in ("encoder_attentions", "decoder_attentions", "cross_attentions"):
            assert len(getattr(b, name)) == 2, name
            for u, v in zip(getattr(a, name), getattr(b, name)):
                torch.testing.assert_close(v, u, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(b.logits, a.logits, atol=2e-5, rtol=1e-4)
        assert fast_calls  # without the weights asked for, the self-attention runs on posbias again
        torch.testing.assert_close(plain.logits, a.logits, atol=2e-5, rtol=1e-4)
    with torch.no_grad():  # decoding: one query a step against the cache (its mask None: every key)
        ga, gb = (m.generate(input_ids=x, max_new_tokens=4, min_new_tokens=4, do_sample=False, output_attentions=True,
                             return_dict_in_generate=True) for m in (eager, fast))
    assert torch.equal(ga.sequences, gb.sequences) and len(gb.decoder_attentions) == 4
    for step_a, step_b in zip(ga.decoder_attentions, gb.decoder_attentions):
        for u, v in zip(step_a, step_b):
            torch.testing.assert_close(v, u, atol=1e-6, rtol=1e-5)


def test_mpt_slopes_conversion_and_restore():
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    for heads in (4, 6, 12):
        hf_row = build_mpt_alibi_tensor(heads, 9)[:, 0, -2]  # one key before the last: −m
        for bias_max in (8, 12):
            # transformers 5 builds the model's bias with the default maximum, whatever the config says
            assert torch.equal(scheme_from_hf(mpt_config(heads, bias_max)).slopes, -hf_row)
        # with the default maximum, MPT's slopes are the paper's for every head count
        torch.testing.assert_close(-hf_row, build("alibi", n_heads=heads, head_dim=4).slopes)
    with pytest.raises(ValueError, match="alibi = False"):
        accelerate(transformers.MptForCausalLM(transformers.MptConfig(
            vocab_size=97, d_model=32, n_heads=4, n_layers=1, attn_config={"attn_pdrop": 0, "alibi": False})))
    model = accelerate(transformers.MptForCausalLM(mpt_config(4)))
    attn = model.transformer.blocks[0].attn
    assert "forward" in attn.__dict__ and "_posbias_slopes" in attn.__dict__
    restore(model)
    assert "forward" not in attn.__dict__ and "_posbias_slopes" not in attn.__dict__
    assert "forward" not in model.transformer.blocks[0].__dict__


@pytest.fixture
def same_attention_dropout(monkeypatch):
    """The unpatched models' dropout of attention probabilities (a 4-D ``[B, H, Lq, Lk]`` tensor handed to
    ``F.dropout`` while training) made posbias' own: a seed drawn from torch's generator as
    :func:`posbias.attention` draws it, and the per-pair mask of :mod:`posbias.kernels.dropout` in its
    64-bit definition. Hidden-state dropout keeps torch's. With one ``torch.manual_seed`` both models
    then drop the same pairs and the same hidden units."""
    from posbias.kernels import dropout as kd

    real = torch.nn.functional.dropout

    def shared(input, p=0.5, training=True, inplace=False):
        if training and p > 0 and input.dim() == 4:
            b, h, lq, lk = input.shape
            drop = kd.dropped_reference(kd.draw_seed(), p, b, h, torch.arange(lq), torch.arange(lk))
            return input.masked_fill(drop.to(input.device), 0.0) / (1 - p)
        return real(input, p, training, inplace)

    monkeypatch.setattr(torch.nn.functional, "dropout", shared)


def dropout_model(family: str):
    """A small model of ``family`` with attention dropout, and the weight whose gradient is compared."""
    if family == "t5":
        model = randomize_bias(transformers.T5EncoderModel(t5_config(dropout_rate=0.1)))
        model.set_attn_implementation("eager")
        weight = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    elif family == "switch":  # (no router jitter: its random noise would differ between the two models)
        model = randomize_bias(transformers.SwitchTransformersEncoderModel(switch_config(dropout_rate=0.1,
                                                                                         router_jitter_noise=0.0)))
        weight = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    elif family == "bloom":
        model = transformers.BloomForCausalLM(transformers.BloomConfig(
            vocab_size=97, hidden_size=48, n_layer=2, n_head=4, hidden_dropout=0.1, attention_dropout=0.2))
        weight = "transformer.h.0.self_attention.query_key_value.weight"
    else:
        model = transformers.MptForCausalLM(mpt_config(4))
        for block in model.transformer.blocks:  # (transformers 5.24's MptAttentionConfig takes an int attn_pdrop)
            block.attn.attn_dropout_p = 0.2
        weight = "transformer.blocks.0.attn.Wqkv.weight"
    return model, weight


def train_with_dropout(family: str, fast_calls, device: str = "cpu", backend: str = "auto") -> None:
    """With the same dropout mask (``same_attention_dropout``) the accelerated model's outputs and weight
    gradients equal the unpatched model's, the accelerated one ran posbias' attention, and dropout did
    change the output (against the same model evaluated)."""
    torch.manual_seed(0)
    model, weight = dropout_model(family)
    ref = model.to(device).eval()
    fast = accelerate(copy.deepcopy(ref), backend=backend)
    ids = torch.randint(2, 97, (2, 90), device=device)
    results = []
    for m in (ref, fast, fast):
        m.train(m is not fast or len(results) < 2)
        torch.manual_seed(5)
        out = m(input_ids=ids)
        out = out.last_hidden_state if family in ("t5", "switch") else out.logits
        results.append((out, torch.autograd.grad(out.square().mean(), dict(m.named_parameters())[weight])[0]))
    (a, ga), (b, gb), (evaluated, _) = results
    torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(gb, ga, atol=2e-5, rtol=1e-4)
    assert fast_calls and not torch.allclose(b, evaluated, atol=1e-3)


@pytest.mark.parametrize("family", ["t5", "switch", "bloom", "mpt"])
def test_training_with_attention_dropout_runs_on_posbias(family, fast_calls, same_attention_dropout):
    """Attention dropout in training (T5's default ``dropout_rate=0.1``) no longer sends the model back to
    transformers' O(N²) path on the CPU: the unpatched (eager) model's outputs and gradients, given the
    same mask (:func:`train_with_dropout`)."""
    train_with_dropout(family, fast_calls)


@pytest.mark.cuda
@NO_CUDA
@pytest.mark.parametrize("family", ["t5", "bloom"])
def test_training_with_attention_dropout_on_the_triton_backend_on_cuda(family, fast_calls, same_attention_dropout,
                                                                       monkeypatch):
    """On CUDA, ``accelerate(model, backend="triton")`` takes training with dropout too, the mask drawn
    inside the triton programs: the unpatched model's outputs and gradients given the same mask."""
    pa = ATTENTION_MODULE
    rates = []  # the dropout rate of each call the triton programs ran
    real = pa.table_flash_kernel
    monkeypatch.setattr(pa, "table_flash_kernel", lambda *a, **kw: rates.append(kw.get("dropout_p", 0)) or real(*a, **kw))
    train_with_dropout(family, fast_calls, "cuda", "triton")
    assert set(fast_calls.backends) == {("triton", False)} and any(p > 0 for p in rates)


def test_dropout_runs_on_posbias_only_on_the_devices_listed():
    """Issue 12's rule for a path no GPU run has timed: dropout on other devices than
    ``DROPOUT_DEVICES`` (the CPU) keeps transformers' path, except on CUDA where the model asks for the
    ``triton`` backend (its programs drop the probabilities themselves); without dropout every device
    goes on."""
    from types import SimpleNamespace

    from posbias.attention import CUDA_VALIDATED
    from posbias.integrations.hf import DROPOUT_DEVICES, _takes_dropout

    assert DROPOUT_DEVICES == ("cpu",)
    cpu, elsewhere = torch.empty(1), torch.empty(1, device="meta")
    assert _takes_dropout(0.1, cpu) and _takes_dropout(0.0, elsewhere) and not _takes_dropout(0.1, elsewhere)
    cuda = SimpleNamespace(device=torch.device("cuda", 0))  # (what _takes_dropout reads of a tensor)
    assert _takes_dropout(0.1, cuda, "triton") and not _takes_dropout(0.1, elsewhere, "triton")
    assert not _takes_dropout(0.1, cuda, "banded")
    assert _takes_dropout(0.1, cuda) == ("triton" in CUDA_VALIDATED)


def test_short_inference_keeps_transformers_path_and_training_does_not(fast_calls, monkeypatch):
    """Below ``POSBIAS_FROM`` keys inference keeps transformers' own attention (measured faster there:
    BLOOM's, T5's SDPA with the dense bias), with the same tokens; with autograd on, the same short
    inputs run on posbias."""
    import posbias.integrations.hf as hf

    monkeypatch.setattr(hf, "POSBIAS_FROM", POSBIAS_FROM)
    torch.manual_seed(0)
    bloom = transformers.BloomConfig(vocab_size=97, hidden_size=48, n_layer=2, n_head=4, hidden_dropout=0.0,
                                     attention_dropout=0.0)
    for ref, fast in [pair(transformers.BloomForCausalLM(bloom)),
                      pair(randomize_bias(transformers.T5ForConditionalGeneration(t5_config())))]:
        fast_calls.clear()
        ids = torch.randint(2, 97, (2, 40))
        with torch.no_grad():
            ga = ref.generate(input_ids=ids, max_new_tokens=10, min_new_tokens=10, do_sample=False)
            gb = fast.generate(input_ids=ids, max_new_tokens=10, min_new_tokens=10, do_sample=False)
        assert torch.equal(ga, gb) and not fast_calls
        loss = fast(input_ids=ids, labels=ids).loss
        torch.testing.assert_close(loss, ref(input_ids=ids, labels=ids).loss, atol=1e-5, rtol=1e-5)
        assert fast_calls
    with torch.no_grad():  # where posbias takes over: at POSBIAS_FROM keys
        assert hf._few_keys_at_inference(POSBIAS_FROM - 1) and not hf._few_keys_at_inference(POSBIAS_FROM)
    assert not hf._few_keys_at_inference(1)


def test_the_oldest_transformers_release_the_integration_runs_on():
    """``too_old`` compares a version's first two release numbers with ``TRANSFORMERS_FROM`` (5.15):
    5.15.0 and its pre-releases and patch releases run, 5.14.x and 4.x do not."""
    assert TRANSFORMERS_FROM == (5, 15)
    for version, old in [("5.14.9", True), ("4.57.1", True), ("5.15.0", False), ("5.15.0.dev0", False),
                         ("5.15.2", False), ("5.16.0rc1", False), ("6.0", False)]:
        assert too_old(version) is old, version
    assert _release("5.16.0.dev0") == (5, 16)


def test_restore_and_conversion_round_trip():
    torch.manual_seed(0)
    model = randomize_bias(transformers.T5EncoderModel(t5_config()))
    att = model.encoder.block[0].layer[0].SelfAttention
    scheme = scheme_from_hf(model.config, att.relative_attention_bias.weight)
    assert scheme.bidirectional and scheme.num_buckets == 16 and scheme.max_distance == 40
    # the converted scheme reproduces HF's dense bias exactly
    hf_bias = att.compute_bias(37, 37)[0]
    torch.testing.assert_close(scheme.bias(torch.arange(37), torch.arange(37)), hf_bias, atol=0, rtol=0)
    fields, weight = t5_to_hf(scheme)
    assert fields["relative_attention_num_buckets"] == 16 and torch.equal(weight, att.relative_attention_bias.weight)
    assert fields["is_decoder"] is False and t5_to_hf(build("t5", n_heads=2, head_dim=4))[0]["is_decoder"] is True
    accelerate(model)
    assert "compute_bias" in att.__dict__ and model.config._attn_implementation == "posbias"
    restore(model)
    assert "compute_bias" not in att.__dict__ and model.config._attn_implementation != "posbias"
    bloom = scheme_from_hf(transformers.BloomConfig(hidden_size=48, n_head=6))
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor  # public in every 5.x release
    torch.testing.assert_close(bloom.slopes, build_alibi_tensor(torch.ones(1, 2), 6, torch.float32)[:, 0, 1])


def _t5_table(stack, layer=0):
    return stack.block[layer].layer[0].SelfAttention.relative_attention_bias.weight


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin"])
def test_schemes_from_a_saved_model_read_only_the_tables(tmp_path, layout):
    torch.manual_seed(0)
    model = randomize_bias(transformers.T5ForConditionalGeneration(t5_config()))
    if layout == "bin":  # the older format, written by hand (transformers 5 saves safetensors)
        torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
        model.config.save_pretrained(tmp_path)
    else:
        model.save_pretrained(tmp_path, **({"max_shard_size": "20KB"} if layout == "sharded" else {}))
    if layout == "sharded":
        assert (tmp_path / "model.safetensors.index.json").exists() and len(list(tmp_path.glob("*.safetensors"))) > 3
    got = schemes_from_pretrained(tmp_path)
    assert list(got) == ["encoder", "decoder"]
    assert got["encoder"].bidirectional and not got["decoder"].bidirectional
    assert torch.equal(got["encoder"].table, _t5_table(model.encoder))
    assert torch.equal(got["decoder"].table, _t5_table(model.decoder))
    # the scheme is the model's bias: HF's own dense bias, exactly
    att = model.decoder.block[0].layer[0].SelfAttention
    torch.testing.assert_close(got["decoder"].bias(torch.arange(30), torch.arange(30)), att.compute_bias(30, 30)[0],
                               atol=0, rtol=0)


def test_schemes_from_pretrained_umt5_layers_switch_and_alibi_models(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.UMT5Config(vocab_size=97, d_model=48, d_kv=12, d_ff=64, num_layers=2, num_heads=4,
                                  relative_attention_num_buckets=16, decoder_start_token_id=0)
    umt5 = randomize_bias(transformers.UMT5ForConditionalGeneration(cfg))
    umt5.save_pretrained(tmp_path / "umt5")
    got = schemes_from_pretrained(tmp_path / "umt5")
    assert list(got) == ["encoder layer 0", "encoder layer 1", "decoder layer 0", "decoder layer 1"]
    assert torch.equal(got["encoder layer 1"].table, _t5_table(umt5.encoder, 1))
    assert not torch.equal(got["encoder layer 1"].table, got["encoder layer 0"].table)
    switch = randomize_bias(transformers.SwitchTransformersForConditionalGeneration(switch_config()))
    switch.save_pretrained(tmp_path / "switch")
    got = schemes_from_pretrained(tmp_path / "switch")
    assert list(got) == ["encoder", "decoder"] and got["encoder"].bidirectional and not got["decoder"].bidirectional
    assert torch.equal(got["decoder"].table, _t5_table(switch.decoder, 0))
    bloom = transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=97, hidden_size=48, n_layer=1, n_head=6))
    bloom.save_pretrained(tmp_path / "bloom")
    (only,) = schemes_from_pretrained(tmp_path / "bloom").values()
    torch.testing.assert_close(only.slopes, scheme_from_hf(bloom.config).slopes, atol=0, rtol=0)


def test_schemes_from_pretrained_bad_folders(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        schemes_from_pretrained(tmp_path)
    transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="'gpt2' model; positional biases are read from t5"):
        schemes_from_pretrained(tmp_path / "gpt2")
    t5_config().save_pretrained(tmp_path / "t5")
    with pytest.raises(ValueError, match="has no weights"):
        schemes_from_pretrained(tmp_path / "t5")
    (tmp_path / "t5" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors' cannot be read"):
        schemes_from_pretrained(tmp_path / "t5")
    torch.save({"shared.weight": torch.zeros(2, 2)}, tmp_path / "t5" / "pytorch_model.bin")
    (tmp_path / "t5" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="hold no relative_attention_bias table"):
        schemes_from_pretrained(tmp_path / "t5")
    marker = tmp_path / "ran"  # a weights file that names code is refused unrun
    torch.save({"shared.weight": RunsOnLoad(marker)}, tmp_path / "t5" / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model.bin' cannot be read \(UnpicklingError: "):
        schemes_from_pretrained(tmp_path / "t5")
    assert not marker.exists()
    (tmp_path / "t5" / "model.safetensors.index.json").write_text('{"metadata": {}}')  # no weight_map
    with pytest.raises(ValueError, match=r"model.safetensors.index.json' is not a weight index \(KeyError\)$"):
        schemes_from_pretrained(tmp_path / "t5")
    (tmp_path / "t5" / "config.json").write_text('{"model_type": "t5", ')  # cut short
    with pytest.raises(ValueError, match=r"t5/config.json' cannot be read as a transformers config: "):
        schemes_from_pretrained(tmp_path / "t5")


def test_plot_checkpoint_draws_posbias_and_hf_models(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from posbias import checkpoint as ckpt
    from posbias.cli import main
    from posbias.model import ModelConfig, TransformerLM

    torch.manual_seed(0)
    tiny = dict(d_model=16, n_layers=1, n_heads=2)
    lm = TransformerLM(ModelConfig(scheme="t5", scheme_options={"max_distance": 20}, **tiny))
    with torch.no_grad():
        lm.scheme.table.copy_(torch.linspace(-3, 5, lm.scheme.table.numel()).view_as(lm.scheme.table))
    ckpt.save_checkpoint(tmp_path / "t5-seed0-abc" / "final", lm)
    randomize_bias(transformers.T5ForConditionalGeneration(t5_config())).save_pretrained(tmp_path / "tiny-t5")
    out = tmp_path / "plots"
    assert main(["plot", "--checkpoint", str(tmp_path / "t5-seed0-abc" / "final"), str(tmp_path / "tiny-t5"),
                 "--out", str(out), "--max-plot-distance", "64"]) == 0
    said = capsys.readouterr().out
    lo, hi = lm.scheme.table.detach().aminmax()
    assert f"t5-seed0-abc: t5 (n_heads=2, head_dim=8, num_buckets=32, max_distance=20, bidirectional=False); " \
           f"bias from {float(lo):+.3f} to {float(hi):+.3f} over distances 0–64" in said
    assert "tiny-t5 encoder: t5 (" in said and "over distances ±64" in said and "tiny-t5 decoder: t5 (" in said
    names = {p.name for p in out.glob("*.png")}
    assert names == {"heatmap_t5-seed0-abc.png", "heatmap_tiny-t5_encoder.png", "heatmap_tiny-t5_decoder.png",
                     "learned_bias_vs_distance.png", "t5_bucket_map_32_20_causal.png",
                     "t5_bucket_map_16_40_bidirectional.png", "t5_bucket_map_16_40_causal.png"}
    shutil.copytree(tmp_path / "tiny-t5", tmp_path / "other" / "tiny-t5")  # two folders of one name: both drawn
    assert main(["plot", "--checkpoint", str(tmp_path / "tiny-t5"), str(tmp_path / "other" / "tiny-t5"),
                 "--out", str(out / "2")]) == 0
    assert "tiny-t5 encoder #2: t5" in capsys.readouterr().out and (out / "2" / "heatmap_tiny-t5_encoder_2.png").exists()
    assert main(["plot", "--checkpoint", str(tmp_path / "tiny-t5"), str(tmp_path / "tiny-t5") + "/", "--out",
                 str(out / "2b")]) == 0  # one folder named twice: drawn once
    assert "#2" not in capsys.readouterr().out and not (out / "2b" / "heatmap_tiny-t5_encoder_2.png").exists()
    ckpt.save_checkpoint(tmp_path / "rope-seed0-abc" / "final", TransformerLM(ModelConfig(scheme="rope", **tiny)))
    assert main(["plot", "--checkpoint", str(tmp_path / "rope-seed0-abc" / "final"), str(tmp_path / "tiny-t5"),
                 "--out", str(out / "3")]) == 0
    said = capsys.readouterr().out  # a rotary model has no bias: its wavelengths are drawn, with its L
    assert "rope-seed0-abc: rope (" in said and "rotary, fixed: its wavelengths in rope_wavelengths.png" in said
    assert (out / "3" / "rope_wavelengths.png").exists() and (out / "3" / "learned_bias_vs_distance.png").exists()
    assert main(["plot", "--checkpoint", str(tmp_path / "rope-seed0-abc" / "final"), "--out", str(out / "4")]) == 0
    assert {p.name for p in (out / "4").glob("*.png")} == {"rope_wavelengths.png"}
    rope_config = tmp_path / "rope-seed0-abc" / "final" / ckpt.CONFIG_FILE
    meta = json.loads(rope_config.read_text())
    rope_config.write_text(json.dumps({**meta, "train": {"train_len": 0}}))  # a damaged record is said, not skipped
    assert main(["plot", "--checkpoint", str(rope_config.parent), "--out", str(out / "4c")]) == 2
    assert "records no valid training length: the checkpoint's train.train_len must be an integer >= 1, got 0" in \
        capsys.readouterr().err and not (out / "4c").exists()
    rope_config.write_text(json.dumps(meta))
    ckpt.save_checkpoint(tmp_path / "nope" / "final", TransformerLM(ModelConfig(scheme="nope", **tiny)))
    assert main(["plot", "--checkpoint", str(tmp_path / "nope" / "final"), "--out", str(out / "4b")]) == 2
    assert "none of these checkpoints has an attention bias or a rotation to draw" in capsys.readouterr().err
    # a model folder (its final/) and a folder of model folders (a study's) are read as diagnose reads them
    assert main(["plot", "--checkpoint", str(tmp_path / "t5-seed0-abc"), "--out", str(out / "5")]) == 0
    assert (out / "5" / "heatmap_t5-seed0-abc.png").exists()
    assert main(["plot", "--checkpoint", str(tmp_path), "--out", str(out / "6")]) == 0
    said = capsys.readouterr().out
    assert "skipping nope (none: no attention bias to draw)" in said and "t5-seed0-abc: t5 (" in said
    assert "rope-seed0-abc: rope (" in said and (out / "6" / "rope_wavelengths.png").exists()
    (tmp_path / "empty").mkdir()
    assert main(["plot", "--checkpoint", str(tmp_path / "empty"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "neither a posbias checkpoint, a folder of them nor a Hugging Face model folder" in err
    assert main(["plot", "--checkpoint", str(tmp_path), "--schemes", "t5", "--out", str(out)]) == 2
    assert "not allowed with" in capsys.readouterr().err


def test_rotary_models_are_read_from_their_config_exactly_or_refused(tmp_path, capsys):
    """Any model with rope parameters (here Llama, Qwen2, Phi, Gemma 3, saved without weights): its base,
    rotated dimensions and scaling as a posbias RoPE whose frequencies and attention factor are
    transformers' own (linear → PI, dynamic → dynamic NTK, yarn → YaRN); what posbias cannot reproduce
    exactly (llama3, YaRN with other betas or without truncation) is refused, naming it."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from posbias.cli import main
    from posbias.integrations.hf import rope_from_hf, schemes_from_pretrained

    small = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=1, intermediate_size=64, vocab_size=100,
                 max_position_embeddings=4096)
    cases = {"plain": None, "linear": {"rope_type": "linear", "factor": 4.0},
             "dynamic": {"rope_type": "dynamic", "factor": 2.0},
             "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}}
    for name, rs in cases.items():
        config = transformers.LlamaConfig(**small, **({"rope_scaling": rs} if rs else {}))
        config.save_pretrained(tmp_path / name)
        (scheme,) = schemes_from_pretrained(tmp_path / name).values()
        assert (scheme.head_dim, scheme.n_heads, scheme.scaling) == (16, 4, {"plain": None, "linear": "pi", "dynamic":
                                                                            "dynamic-ntk", "yarn": "yarn"}[name])
        if rs:  # transformers' frequencies (dynamic NTK at twice its length) and attention factor
            context = 8192 if name == "dynamic" else None
            inv, factor = ROPE_INIT_FUNCTIONS[rs["rope_type"]](config, "cpu", context)
            torch.testing.assert_close(scheme.effective_frequencies(context).float(), inv.float(), rtol=1e-5, atol=0)
            assert scheme.attention_factor == pytest.approx(factor, abs=1e-6)
    assert schemes_from_pretrained(tmp_path / "yarn")[""].train_len == 1024
    qwen = transformers.Qwen2Config(hidden_size=256, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1,
                                    intermediate_size=64, vocab_size=100, max_position_embeddings=131072,
                                    rope_theta=1e6, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                                  "original_max_position_embeddings": 32768})
    assert rope_from_hf(qwen)[""].extra_repr().endswith("base=1000000.0, layout='half', scaling='yarn', factor=4.0, "
                                                        "train_len=32768")
    phi = transformers.PhiConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1, intermediate_size=64,
                                 vocab_size=100, partial_rotary_factor=0.5)
    assert rope_from_hf(phi)[""].head_dim == 8  # only the rotated half of each head
    gemma = transformers.Gemma3TextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                          num_hidden_layers=2, intermediate_size=64, vocab_size=100)
    assert {k: v.base for k, v in rope_from_hf(gemma).items()} == {"full_attention": 1e6, "sliding_attention": 1e4}
    for bad, why in (({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 1024}, "^rope_type 'llama3' has no exact equivalent in posbias "
                      r"\(it has default → plain, linear → pi, dynamic → dynamic-ntk, yarn → yarn\)$"),
                     ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "beta_fast": 16},
                      "gives other frequencies or attention factor in transformers"),
                     ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "truncate": False},
                      "gives other frequencies or attention factor in transformers")):
        with pytest.raises(ValueError, match=why):
            rope_from_hf(transformers.LlamaConfig(**small, rope_scaling=bad))
    odd = transformers.LlamaConfig(**small)
    odd.rope_parameters = {"rope_type": "default"}  # laid out otherwise: said in one line, no traceback
    with pytest.raises(ValueError, match="rope parameters of model_type 'llama' cannot be read .KeyError: 'rope_theta'"):
        rope_from_hf(odd)
    for missing in ({}, None):  # no rotary parameters to read
        odd.rope_parameters = missing
        with pytest.raises(ValueError, match="^model_type 'llama' has no rope parameters$"):
            rope_from_hf(odd)
    # plot --checkpoint draws them (config.json alone: nothing else is read)
    assert main(["plot", "--checkpoint", str(tmp_path / "yarn"), str(tmp_path / "plain"), "--out",
                 str(tmp_path / "plots")]) == 0
    said = capsys.readouterr().out
    assert "yarn: rope (n_heads=4, head_dim=16, base=10000.0, layout='half', scaling='yarn', factor=4.0, " \
           "train_len=1024) — rotary" in said
    assert {p.name for p in (tmp_path / "plots").glob("*.png")} == {"rope_wavelengths.png"}


def test_bad_inputs():
    with pytest.raises(ValueError, match="model_type"):
        scheme_from_hf(transformers.GPT2Config())
    with pytest.raises(ValueError, match=r"\[num_buckets, heads\]"):
        scheme_from_hf(t5_config(), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="accelerate supports"):
        accelerate(transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2)))
    with pytest.raises(ValueError, match="T5Bias"):
        t5_to_hf(build("alibi", n_heads=2, head_dim=4))


def switch_config(**kw):
    base = dict(vocab_size=97, d_model=48, d_kv=12, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                num_experts=4, encoder_sparse_step=1, decoder_sparse_step=2, relative_attention_num_buckets=16,
                relative_attention_max_distance=40, dropout_rate=0.0, dense_act_fn="gelu_new",
                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    base.update(kw)
    return transformers.SwitchTransformersConfig(**base)


def test_switch_transformers_padded_logits_generate_and_training(fast_calls):
    """Switch Transformers (a T5 with mixture-of-experts feed-forward layers) has T5's attention: its
    padded encoder, whose mask is ``[batch, 1, 1, Lk]`` (one row for every query), runs on posbias too,
    with logits, greedy generation through the cache and the tables' gradients equal to the unpatched
    model's."""
    torch.manual_seed(0)
    ref, fast = pair(randomize_bias(transformers.SwitchTransformersForConditionalGeneration(switch_config())))
    assert ref.config._attn_implementation == "eager"  # transformers' default for Switch; posbias replaces it
    ids = torch.randint(2, 97, (2, 150))
    mask = torch.ones(2, 150, dtype=torch.long)
    mask[1, 100:] = 0
    dec = torch.randint(2, 97, (2, 30))
    with torch.no_grad():
        a = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        b = fast(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)
        assert sorted(shape[2] for shape in fast_calls) == [30, 30, 150, 150]  # every self-attention on posbias
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert torch.equal(fast.generate(**kw), ref.generate(**kw))
    grads = []
    for m in (ref, fast):
        m.zero_grad()
        m(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits.square().sum().backward()
        grads.append([m.get_submodule(f"{part}.block.0.layer.0.SelfAttention").relative_attention_bias.weight.grad
                      for part in ("encoder", "decoder")])
    for got, want in zip(grads[1], grads[0]):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, atol=1e-4 * float(want.abs().max()), rtol=1e-3)
    scheme = scheme_from_hf(ref.config, ref.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight)
    assert scheme.bidirectional and scheme.num_buckets == 16 and scheme.max_distance == 40
    restore(fast)
    assert fast.config._attn_implementation == "eager"


def test_pop2piano_encoder_decoder_equal(fast_calls):
    """Pop2Piano's attention is T5's too (its encoder reads embeddings of audio features)."""
    torch.manual_seed(0)
    cfg = transformers.Pop2PianoConfig(vocab_size=97, d_model=48, d_kv=12, d_ff=64, num_layers=2, num_decoder_layers=2,
                                       num_heads=4, relative_attention_num_buckets=16, relative_attention_max_distance=40,
                                       dropout_rate=0.0, dense_act_fn="gelu_new")
    ref, fast = pair(randomize_bias(transformers.Pop2PianoForConditionalGeneration(cfg)))
    emb, dec = torch.randn(2, 200, 48), torch.randint(2, 97, (2, 25))
    with torch.no_grad():
        a = ref(inputs_embeds=emb, decoder_input_ids=dec).logits
        b = fast(inputs_embeds=emb, decoder_input_ids=dec).logits
    torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)
    assert sorted(shape[2] for shape in fast_calls) == [25, 25, 200, 200]


def test_mask_kind():
    causal = torch.tril(torch.ones(5, 5, dtype=torch.bool))
    assert mask_kind(None, 0, 5, 5, causal_if_none=True) == ("causal", None)
    assert mask_kind(None, 0, 5, 5, causal_if_none=False) == ("full", None)
    assert mask_kind(causal[None, None], 0, 5, 5, causal_if_none=False) == ("causal", None)
    assert mask_kind(torch.ones(1, 1, 5, 5, dtype=torch.bool), 0, 5, 5, causal_if_none=False) == ("full", None)
    additive = torch.zeros(1, 1, 5, 5).masked_fill(~causal, torch.finfo(torch.float32).min)
    assert mask_kind(additive, 0, 5, 5, causal_if_none=False) == ("causal", None)
    padded = causal.clone()
    padded[:, 0] = False  # key 0 hidden from every query (left padding; query 0 then sees nothing)
    kind, keys = mask_kind(padded[None, None], 0, 5, 5, causal_if_none=False)
    assert kind == "causal" and keys.tolist() == [[False, True, True, True, True]]
    kind, keys = mask_kind(torch.ones(2, 1, 5, 5, dtype=torch.bool).index_fill(-1, torch.tensor([3]), False), 0, 5, 5,
                           causal_if_none=False)
    assert kind == "full" and keys.tolist() == [[True, True, True, False, True]] * 2
    # [batch, 1, 1, lk] (Switch Transformers' encoder mask), one padding per sequence: read as the full mask
    rows = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    rows[1, ..., :2] = False
    kind, keys = mask_kind(rows, 0, 5, 5, causal_if_none=False)
    assert kind == "full" and keys.tolist() == [[True] * 5, [False, False, True, True, True]]
    odd = causal.clone()
    odd[4, 1] = False  # hidden from one query only: not a key mask
    assert mask_kind(odd[None, None], 0, 5, 5, causal_if_none=False) is None
    assert mask_kind(torch.ones(1, 2, 5, 5, dtype=torch.bool), 0, 5, 5, causal_if_none=False) is None  # per head
    assert mask_kind(torch.full((1, 1, 5, 5), 0.5), 0, 5, 5, causal_if_none=False) is None
    hidden = ~padded[None, None]  # MPT's convention: True where a pair is hidden
    assert mask_kind(hidden, 0, 5, 5, causal_if_none=False, hides=True)[0] == "causal"
    # [batch, 1, 1, Lk] (Switch Transformers' encoder): the same keys for every query
    row = torch.zeros(2, 1, 1, 5).index_fill(-1, torch.tensor([0]), torch.finfo(torch.float32).min)
    kind, keys = mask_kind(row, 0, 5, 5, causal_if_none=False)
    assert kind == "full" and keys.tolist() == [[False, True, True, True, True]] * 2
    assert mask_kind(torch.zeros(1, 1, 1, 5), 0, 5, 5, causal_if_none=False) == ("full", None)
    assert mask_kind(torch.zeros(1, 1, 2, 5), 0, 5, 5, causal_if_none=False) is None  # neither 1 nor Lq rows


def test_mask_kind_reads_a_mask_once_until_it_changes(monkeypatch):
    """Every layer hands over the same mask: one reading, kept on the tensor; another shape or start, an
    in-place change of the mask, or an inference-mode tensor (no version counter) reads it again."""
    import posbias.integrations.hf as hf

    reads = []
    real = hf._read_mask
    monkeypatch.setattr(hf, "_read_mask", lambda *a: reads.append(a[1:]) or real(*a))
    mask = torch.tril(torch.ones(5, 5, dtype=torch.bool))[None, None].clone()
    for _ in range(4):  # four layers
        assert mask_kind(mask, 0, 5, 5, causal_if_none=False) == ("causal", None)
    assert len(reads) == 1
    assert mask_kind(mask, 1, 5, 5, causal_if_none=False) is None and len(reads) == 2  # another query start
    mask[..., 0] = False  # left padding written in place
    kind, keys = mask_kind(mask, 0, 5, 5, causal_if_none=False)
    assert kind == "causal" and keys.tolist() == [[False, True, True, True, True]] and len(reads) == 3
    with torch.inference_mode():
        frozen = torch.tril(torch.ones(1, 1, 5, 5, dtype=torch.bool))
        assert mask_kind(frozen, 0, 5, 5, causal_if_none=False) == mask_kind(frozen, 0, 5, 5, causal_if_none=False)
    assert len(reads) == 5


def test_import_posbias_imports_neither_transformers_nor_flex():
    code = ("import sys, posbias; bad = [m for m in ('transformers', 'torch.nn.attention.flex_attention') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _bench(monkeypatch):
    """``benchmarks/bench_hf.py`` as a module, imported as when run as a script (bench_attention beside it)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_hf.py"
    monkeypatch.syspath_prepend(str(path.parent))
    spec = importlib.util.spec_from_file_location("bench_hf", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_hf_benchmark_on_padded_batches(capsys, monkeypatch, fast_calls):
    """``--padded``: four sequences with their attention mask (right padding for T5, left for BLOOM and MPT) run on
    posbias, and the real positions agree with the unpatched model; ``--packed`` likewise for packed documents."""
    for model in ("t5", "switch", "bloom", "mpt"):
        fast_calls.clear()
        _bench(monkeypatch).main(["--model", model, "--padded", "--lengths", "60", "--layers", "1", "--reps", "1",
                                  "--device", "cpu"])
        lines = capsys.readouterr().out.strip().splitlines()
        assert "4 padded sequences" in lines[0] and fast_calls
        assert float(lines[-1].split("|")[7]) < 1e-4
    fast_calls.clear()  # --packed: four documents in one T5 sequence, on posbias' document path
    _bench(monkeypatch).main(["--packed", "--lengths", "64", "--layers", "1", "--reps", "1", "--device", "cpu"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert "4 packed documents" in lines[0] and fast_calls and float(lines[-1].split("|")[7]) < 1e-4
    with pytest.raises(SystemExit):
        _bench(monkeypatch).main(["--packed", "--model", "bloom"])


def test_hf_benchmark_runs_training_and_checks_agreement(capsys, monkeypatch):
    """``benchmarks/bench_hf.py --train`` (what a GPU session runs at flan-t5-base size), tiny here:
    both models train one step from the same weights and their losses agree."""
    bench = _bench(monkeypatch)
    bench.main(["--train", "--lengths", "40", "--layers", "1", "--reps", "2", "--target-len", "8", "--device", "cpu"])
    captured = capsys.readouterr()
    last = captured.out.strip().splitlines()[-1].split("|")
    # progress on stderr (where a run cut off by a time limit was), the table alone on stdout
    assert "] N=40: posbias warm-up call" in captured.err and "[bench_hf" not in captured.out
    assert last[1].strip() == "40" and "OOM" not in last
    assert float(last[7]) < 1e-4  # the losses of the HF and the posbias model
    bench.main(["--model", "switch", "--train", "--lengths", "40", "--layers", "2", "--reps", "1", "--target-len", "8",
                "--device", "cpu"])
    out = capsys.readouterr().out
    assert "switch small" in out and "HF attention 'eager'" in out and float(out.strip().splitlines()[-1].split("|")[7]) < 1e-4
    bench.main(["--train", "--dropout", "0.1", "--lengths", "40", "--layers", "1", "--reps", "1", "--target-len", "8",
                "--device", "cpu"])
    out = capsys.readouterr().out
    assert "dropout_rate 0.1" in out and out.strip().splitlines()[-1].split("|")[7].strip() == "(dropout)"
    with pytest.raises(SystemExit):
        bench.main(["--dropout", "0.1"])  # dropout goes with --train


def test_hf_benchmark_in_bf16_compares_each_side_with_float32(capsys, monkeypatch):
    """In bf16 the two models differ by both their roundings; the benchmark's two last columns say
    how far each is from the float32 output (the same rounded weights): BLOOM's own path rounds its
    ALiBi bias to bf16, posbias keeps it in float32."""
    bench = _bench(monkeypatch)
    bench.main(["--model", "bloom", "--dtype", "bfloat16", "--lengths", "700", "--layers", "1", "--reps", "1",
                "--device", "cpu"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-3].split("|")[-3:-1] == [" HF err vs fp32 ", " posbias err vs fp32 "]
    hf_err, posbias_err = (float(c) for c in lines[-1].split("|")[-3:-1])
    assert 0 < posbias_err < hf_err


@pytest.mark.parametrize("model_type, builder", [("t5", False), ("bloom", False), ("mpt", False), ("mpt", True)])
def test_accelerate_refuses_a_model_of_a_supported_type_with_no_layer_it_patches(model_type, builder):
    """A model whose config names a supported family but which holds none of that family's positional
    attention (a custom stack under a copied config) is refused in one ValueError naming its class
    (an MPT one without MPT's bias builder was a StopIteration traceback), and is left as it was:
    unmarked, its configs' attention implementation unchanged."""
    import types

    from transformers.models.mpt.modeling_mpt import MptModel

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    if builder:  # MPT's slopes are read, but no MptBlock takes them
        model.build_mpt_alibi_tensor = MptModel.build_mpt_alibi_tensor.__get__(model)
    model.config = types.SimpleNamespace(model_type=model_type, attn_config=types.SimpleNamespace(alibi=True),
                                         n_heads=2, _attn_implementation="sdpa")
    model[0].config = model.config
    with pytest.raises(ValueError, match="^found no positional self-attention to accelerate in Sequential$"):
        accelerate(model)
    assert model.config._attn_implementation == "sdpa" and not hasattr(model, "_posbias_accelerated")


def test_the_patched_compute_bias_starts_at_query_0_unless_told_and_densifies_to_the_unpatched_bias():
    """``compute_bias(lq, lk)`` called as transformers' own is (``past_seen_tokens`` 0 by default) on an
    accelerated T5 attention: a lazy bias whose dense form is the unpatched method's tensor, at the first
    query and at a later one."""
    torch.manual_seed(0)
    model = randomize_bias(transformers.T5ForConditionalGeneration(t5_config()))
    layer = model.decoder.block[0].layer[0].SelfAttention
    want = layer.compute_bias(5, 9)
    later = layer.compute_bias(1, 9, past_seen_tokens=8)
    accelerate(model)
    lazy = layer.compute_bias(5, 9)
    assert lazy.q_start == 0
    torch.testing.assert_close(lazy.dense(5, 9, torch.float32), want, atol=0, rtol=0)
    torch.testing.assert_close(layer.compute_bias(1, 9, past_seen_tokens=8).dense(1, 9, torch.float32), later,
                               atol=0, rtol=0)


def test_a_dynamic_scaling_is_compared_with_posbias_past_the_length_it_was_trained_at(monkeypatch):
    """Dynamic NTK is plain RoPE up to the trained length, so ``rope_from_hf`` compares transformers'
    frequencies with posbias's at twice that length: a dynamic scaling that parts from posbias's only
    past it (here transformers' own, moved by 1% beyond ``max_position_embeddings``) is refused."""
    from transformers import modeling_rope_utils

    from posbias.integrations.hf import rope_from_hf

    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1,
                                      intermediate_size=64, vocab_size=100, max_position_embeddings=4096,
                                      rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    assert rope_from_hf(config)[""].scaling == "dynamic-ntk"
    real = modeling_rope_utils.ROPE_INIT_FUNCTIONS["dynamic"]

    def parted(config, device, seq_len=None, **kw):
        inv, factor = real(config, device, seq_len, **kw)
        return (inv * 1.01 if seq_len is not None and seq_len > config.max_position_embeddings else inv), factor

    monkeypatch.setitem(modeling_rope_utils.ROPE_INIT_FUNCTIONS, "dynamic", parted)
    with pytest.raises(ValueError, match="rope_type 'dynamic' .* gives other frequencies or attention factor"):
        rope_from_hf(config)


def test_a_preferred_backend_is_taken_where_it_runs_exactly(fast_calls):
    """``accelerate(model, backend=...)``: every call asks for that path, not strictly (``attention``'s
    ``strict=False``), so one it cannot run exactly (here ``alibi`` for a T5 bias) takes the automatic
    choice; outputs and generation equal the unpatched model's either way."""
    torch.manual_seed(0)
    model = randomize_bias(transformers.T5ForConditionalGeneration(t5_config())).eval()
    ids, dec = torch.randint(2, 97, (2, 83)), torch.randint(2, 97, (2, 57))
    with torch.no_grad():
        want = model(input_ids=ids, decoder_input_ids=dec).logits
        gen = model.generate(input_ids=ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        for backend in ("blockwise", "banded", "alibi", "triton"):  # (triton: CUDA only, gives way here)
            fast = accelerate(copy.deepcopy(model), backend=backend)
            fast_calls.backends.clear()
            torch.testing.assert_close(fast(input_ids=ids, decoder_input_ids=dec).logits, want, atol=2e-5, rtol=1e-4)
            assert torch.equal(fast.generate(input_ids=ids, max_new_tokens=12, min_new_tokens=12, do_sample=False), gen)
            assert set(fast_calls.backends) == {(backend, False)}
    with pytest.raises(ValueError, match="backend 'fast' is not a posbias backend; valid: auto, reference"):
        accelerate(copy.deepcopy(model), backend="fast")


@pytest.mark.parametrize("family", ["bloom", "mpt"])
def test_a_preferred_backend_that_cannot_run_gives_way_in_the_alibi_models_too(family, fast_calls):
    """BLOOM's and MPT's calls ask for the preferred path not strictly either: ``triton`` (CUDA only)
    gives way on the CPU, and the logits are the unpatched model's."""
    torch.manual_seed(0)
    model = (transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=97, hidden_size=48, n_layer=2, n_head=4))
             if family == "bloom" else transformers.MptForCausalLM(mpt_config(4))).eval()
    ids = torch.randint(3, 97, (2, 40))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        torch.testing.assert_close(accelerate(copy.deepcopy(model), backend="triton")(input_ids=ids).logits, want,
                                   atol=2e-5, rtol=1e-4)
    assert set(fast_calls.backends) == {("triton", False)}


def test_the_guide_states_the_key_count_from_which_inference_runs_on_posbias():
    """``POSBIAS_FROM``, the break-even measured for generation, is the number docs/huggingface.md gives."""
    guide = " ".join((Path(__file__).parents[1] / "docs" / "huggingface.md").read_text().split())
    assert f"Inference on fewer than {POSBIAS_FROM} keys (`posbias.integrations.hf.POSBIAS_FROM`" in guide
    assert f"Below {POSBIAS_FROM} keys inference keeps transformers' path" in guide


def _random_model(rng: random.Random):
    """A random small T5, UMT5, Switch Transformers, BLOOM or MPT (smooth activations: a ReLU whose input sits within rounding
    of 0 would flip its gate and move a gradient by a finite step, which says nothing about attention)."""
    kind = rng.choice(["t5", "t5", "umt5", "switch", "bloom", "mpt"])
    heads = rng.choice([1, 2, 3, 4, 6, 8])
    if kind in ("t5", "umt5", "switch"):
        buckets = rng.choice([4, 6, 8, 16, 32, 33, 64])
        layers = rng.choice([1, 2])  # as many decoder layers: transformers 5.25's generate() fails otherwise (its cache)
        kw = dict(vocab_size=97, d_model=8 * heads, d_kv=rng.choice([4, 8, 16]), d_ff=32, num_layers=layers,
                  num_decoder_layers=layers, num_heads=heads, relative_attention_num_buckets=buckets,
                  relative_attention_max_distance=rng.choice([buckets // 2 + 1, buckets, 40, 128, 1000]),
                  dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        if kind == "switch":  # experts in every layer, or every other one
            model = transformers.SwitchTransformersForConditionalGeneration(transformers.SwitchTransformersConfig(
                **kw, num_experts=rng.choice([2, 4]), encoder_sparse_step=rng.choice([1, 2]), decoder_sparse_step=1,
                dense_act_fn="gelu_new"))
        else:
            cls = transformers.T5Config if kind == "t5" else transformers.UMT5Config
            model = (transformers.T5ForConditionalGeneration if kind == "t5" else
                     transformers.UMT5ForConditionalGeneration)(cls(**kw, feed_forward_proj="gated-gelu"))
        return kind, randomize_bias(model)
    if kind == "bloom":
        return kind, transformers.BloomForCausalLM(transformers.BloomConfig(
            vocab_size=97, hidden_size=8 * heads, n_layer=rng.choice([1, 2]), n_head=heads, pad_token_id=0))
    return kind, transformers.MptForCausalLM(transformers.MptConfig(
        vocab_size=97, d_model=8 * heads, n_layers=rng.choice([1, 2]), n_heads=heads, max_seq_len=512, pad_token_id=0,
        attn_config={"alibi": True, "alibi_bias_max": rng.choice([8, 16])}))


@pytest.mark.parametrize("seed", [pytest.param(s, id=f"case_{s}") for s in range(40)])
def test_random_models_equal_the_unpatched_ones(seed, fast_calls):
    """Random architectures (head counts 1–8, T5 bucket counts 4–64 with any max distance, one or two
    layers), batches of 1–3 sequences of 1–300 tokens, no / right / left / scattered padding, inference or
    training: the accelerated model's logits at every real position, and the gradient of every parameter
    under a loss over those positions, equal the unpatched model's; at inference without scattered
    padding, so do 8 greedily generated tokens (through the cache). 300 such cases ran clean on
    2026-12-04, and 300 with Switch Transformers among them on transformers 5.25.0 and 5.15.0 (a UMT5
    reference there with its decoder made causal: :func:`causal_umt5_decoder`); the loss leaves out padded positions, whose outputs no one reads and the two paths fill
    differently."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    kind, ref = _random_model(rng)
    ref, fast = pair(causal_umt5_decoder(ref))
    b, n = rng.choice([1, 2, 3]), rng.choice([1, 2, 7, 33, 130, 300])
    padding, train = rng.choice([None, "right", "left", "scattered"]), rng.random() < 0.5
    ids, mask = torch.randint(2, 97, (b, n)), torch.ones(b, n, dtype=torch.long)
    for r in range(b if padding else 0):
        kept = rng.randrange(1, n + 1)
        if padding == "right":
            mask[r, kept:] = 0
        elif padding == "left":
            mask[r, :n - kept] = 0
        else:
            mask[r] = (torch.rand(n) < 0.7).long()
            mask[r, rng.randrange(n)] = 1
    inputs = dict(input_ids=ids, attention_mask=mask)
    if kind in ("t5", "umt5", "switch"):
        inputs["decoder_input_ids"] = torch.randint(2, 97, (b, rng.choice([1, 5, 40])))
    real = mask.bool() if kind in ("bloom", "mpt") else slice(None)  # a decoder's positions are all real
    results = []
    for model in (ref, fast):
        with torch.set_grad_enabled(train):
            logits = model(**inputs).logits[real]
            params = [p for _, p in model.named_parameters()]
            grads = torch.autograd.grad(logits.square().sum(), params, allow_unused=True) if train else ()
        results.append((logits, grads))
    (want, want_grads), (got, got_grads) = results
    assert fast_calls or padding == "scattered"  # scattered keys may fall back to transformers' path
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4, msg=lambda m: f"{kind} b={b} n={n} {padding}: {m}")
    if not train and padding != "scattered":
        kw = dict(inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        kw.pop("decoder_input_ids", None)
        with torch.no_grad():
            assert torch.equal(fast.generate(**kw), ref.generate(**kw)), f"{kind} b={b} n={n} {padding}"
    names = [name for name, _ in ref.named_parameters()]
    # a gradient that is exactly 0 (one key: the softmax is constant) comes out as terms that cancel to the
    # rounding of the case's gradients: tolerated on that scale, not on its own
    scale = max((float(g.abs().max()) for g in want_grads if g is not None), default=0.0)
    for name, g_ref, g_fast in zip(names, want_grads, got_grads):
        assert (g_ref is None) == (g_fast is None), name
        if g_ref is not None:
            torch.testing.assert_close(g_fast, g_ref, atol=1e-4 * max(1.0, float(g_ref.abs().max())) + 1e-6 * scale, rtol=1e-3,
                                       msg=lambda m: f"{kind} b={b} n={n} {padding} {name}: {m}")
