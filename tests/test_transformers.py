"""attn_implementation="attnkit" in Hugging Face transformers: tiny random models built offline from configs
(Llama with GQA, Mistral with a sliding window, Gemma2 with softcapping, gpt-oss with attention sinks) give the
logits, greedy generations and gradients of transformers' own SDPA (or eager, where SDPA cannot run the model)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import attnkit
import attnkit.integrations.transformers as hf

TINY = dict(
    vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=128, pad_token_id=0,
)  # fmt: skip


def _config(kind: str):
    if kind == "llama":
        return transformers.LlamaConfig(**TINY), "sdpa"
    if kind == "mistral":
        return transformers.MistralConfig(**TINY, sliding_window=4), "sdpa"
    if kind == "gemma2":  # SDPA has no softcap: transformers' eager path is the oracle
        cfg = transformers.Gemma2Config(
            **TINY, sliding_window=4, attn_logit_softcapping=2.0, final_logit_softcapping=None, query_pre_attn_scalar=8
        )
        return cfg, "eager"
    if kind == "gpt_oss":  # sinks have no SDPA path in transformers either
        cfg = transformers.GptOssConfig(**TINY, num_local_experts=2, num_experts_per_tok=1, sliding_window=4)
        return cfg, "eager"
    raise AssertionError(kind)


KINDS = ["llama", "mistral", "gemma2"] + (["gpt_oss"] if hasattr(transformers, "GptOssConfig") else [])


def _model(kind: str, device: str = "cpu", dtype=torch.float32):
    cfg, oracle = _config(kind)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="attnkit", dtype=dtype).to(device).eval()
    if kind == "gpt_oss":  # sinks start at zero: make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_(0.0, 2.0)
    return model, oracle


def _batch(padding: str, device: str = "cpu"):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, TINY["vocab_size"], (3, 11), generator=gen)
    mask = torch.ones(3, 11, dtype=torch.long)
    if padding == "left":
        mask[0, :4], mask[2, :1] = 0, 0
    elif padding == "right":
        mask[0, 7:], mask[1, 10:] = 0, 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids.to(device), mask.to(device)


def _logits(model, impl, ids, mask, **kw):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(ids, attention_mask=mask, **kw).logits


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_logits_match(kind, padding):
    model, oracle = _model(kind)
    ids, mask = _batch(padding)
    ours = _logits(model, "attnkit", ids, mask)
    theirs = _logits(model, oracle, ids, mask)
    keep = mask.bool()
    torch.testing.assert_close(ours[keep], theirs[keep], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generation_identical(kind):
    model, oracle = _model(kind)
    ids, mask = _batch("left")
    kw = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    model.set_attn_implementation("attnkit")
    ours = model.generate(ids, **kw)
    model.set_attn_implementation(oracle)
    theirs = model.generate(ids, **kw)
    assert ours.shape == (3, 11 + 16)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("kind", KINDS)
def test_training_step_gradients_match(kind):
    model, oracle = _model(kind)
    twin = copy.deepcopy(model)
    twin.set_attn_implementation(oracle)
    ids, mask = _batch("right")
    labels = ids.masked_fill(mask == 0, -100)
    grads = []
    for m in (model, twin):
        m.train()
        m.zero_grad()
        m(ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 5
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], atol=1e-5, rtol=1e-4, msg=name)
    if kind == "gpt_oss":
        assert grads[0]["model.layers.0.self_attn.sinks"].abs().sum() > 0


def test_packed_batches_through_position_ids_and_cu_seq_lens():
    model, _ = _model("llama")
    gen = torch.Generator().manual_seed(2)
    lengths = [4, 7, 2]
    ids = torch.randint(1, TINY["vocab_size"], (1, sum(lengths)), generator=gen)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, 4, 11, 13], dtype=torch.int32)
    model.set_attn_implementation("attnkit")
    with torch.no_grad():
        by_positions = model(ids, position_ids=position_ids).logits
        by_offsets = model(
            ids, position_ids=position_ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=7, max_length_k=7
        ).logits
        separate = [model(ids[:, a:b]).logits for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    expected = torch.cat(separate, dim=1)
    torch.testing.assert_close(by_positions, expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(by_offsets, expected, atol=2e-5, rtol=1e-4)
    # and transformers' SDPA path (packed mask from the same position_ids) agrees
    sdpa = _logits(model, "sdpa", ids, None, position_ids=position_ids, use_cache=False)  # packing needs no cache
    torch.testing.assert_close(sdpa, expected, atol=2e-5,
                               rtol=1e-4)  # fmt: skip


def test_registration_and_loading(tmp_path):
    hf.register()
    hf.register()  # idempotent
    assert transformers.AttentionInterface._global_mapping["attnkit"] is hf.attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    assert ALL_MASK_ATTENTION_FUNCTIONS["attnkit"] is hf.padding_mask
    model, _ = _model("llama")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="attnkit")
    assert loaded.config._attn_implementation == "attnkit"
    cfg, _ = _config("llama")
    built = AutoModelForCausalLM.from_config(cfg)
    built.set_attn_implementation("attnkit")
    assert built.config._attn_implementation == "attnkit"
    ids, mask = _batch("left")
    torch.testing.assert_close(_logits(loaded, "attnkit", ids, mask), _logits(model, "attnkit", ids, mask))


def test_every_layer_calls_attnkit(monkeypatch):
    calls = []
    real = hf.attention_forward

    def spy(module, query, key, value, attention_mask, **kw):
        calls.append((tuple(query.shape), None if attention_mask is None else tuple(attention_mask.shape)))
        return real(module, query, key, value, attention_mask, **kw)

    monkeypatch.setitem(transformers.AttentionInterface._global_mapping, "attnkit", spy)
    model, _ = _model("llama")
    ids, mask = _batch("left")
    _logits(model, "attnkit", ids, mask)
    assert calls == [((3, 4, 11, 8), (3, 11))] * 2  # the padding mask reaches the attention function


def test_dropout_in_training_is_reproducible():
    cfg, _ = _config("llama")
    cfg.attention_dropout = 0.3
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="attnkit").train()
    ids, mask = _batch("left")
    torch.manual_seed(5)
    a = model(ids, attention_mask=mask).logits
    torch.manual_seed(5)
    b = model(ids, attention_mask=mask).logits
    model.eval()
    c = model(ids, attention_mask=mask).logits
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_compiled_model_matches_eager():
    model, _ = _model("llama")
    ids, _ = _batch("none")
    model.set_attn_implementation("attnkit")
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model, backend="aot_eager")(ids).logits
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_logits_and_generation(kind):
    model, oracle = _model(kind, device="cuda")
    ids, mask = _batch("left", device="cuda")
    ours, theirs = _logits(model, "attnkit", ids, mask), _logits(model, oracle, ids, mask)
    keep = mask.bool()
    torch.testing.assert_close(ours[keep], theirs[keep], atol=1e-4, rtol=1e-3)
    kw = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    model.set_attn_implementation("attnkit")
    ours = model.generate(ids, **kw)
    model.set_attn_implementation(oracle)
    assert torch.equal(ours, model.generate(ids, **kw))
    with attnkit.use_backend("reference"):  # the GPU kernels, not a fallback, ran above: the reference agrees too
        model.set_attn_implementation("attnkit")
        torch.testing.assert_close(_logits(model, "attnkit", ids, mask)[keep], theirs[keep], atol=1e-4, rtol=1e-3)
