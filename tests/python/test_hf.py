"""attention_echo.hf: a tiny Llama (built from a config, CPU, no downloads)
running its attention through the cache."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import attention_echo.hf as echo_hf  # noqa: E402
from attention_echo import EchoConfig  # noqa: E402


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


def logits_with(model, implementation, ids, **kwargs):
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model(ids, **kwargs).logits


@pytest.fixture
def ids():
    return torch.randint(0, 128, (1, 72), generator=torch.Generator().manual_seed(1))


def test_echo_is_registered():
    from transformers import AttentionInterface

    assert "echo" in AttentionInterface._global_mapping


def test_miss_matches_eager_and_sdpa_and_second_call_hits(model, ids):
    eager = logits_with(model, "eager", ids)
    sdpa = logits_with(model, "sdpa", ids)
    echo_hf.enable(model, EchoConfig(capacity=16))
    assert model.config._attn_implementation == "echo"
    with torch.no_grad(), echo_hf.echo_context(prefix_length=64):
        first = model(ids).logits
        metas1 = echo_hf.last_meta(model)
        second = model(ids).logits
        metas2 = echo_hf.last_meta(model)
    assert sorted(metas1) == [0, 1]
    assert all(not m["echo_hit"] for m in metas1.values())
    assert (first - eager).abs().max().item() < 1e-5
    assert (first - sdpa).abs().max().item() < 1e-5
    assert all(m["echo_hit"] and m["tokens_echoed"] == 64 for m in metas2.values())
    assert all(m["layer_id"] == layer for layer, m in metas2.items())
    assert (second - eager).abs().max().item() < 1e-3
    s = echo_hf.stats(model)
    assert (s["hits"], s["misses"], s["layers"]) == (2, 2, 2)


def test_exact_tier_through_prefix_tokens_kwargs(model, ids):
    eager = logits_with(model, "eager", ids)
    echo_hf.enable(model)
    with torch.no_grad():
        model(ids, echo_prefix_tokens=ids[0, :48]).logits
        again = model(ids, echo_prefix_tokens=ids[0, :48]).logits
    metas = echo_hf.last_meta(model)
    assert all(m["tier"] == "exact" and m["tokens_echoed"] == 48 for m in metas.values())
    assert (again - eager).abs().max().item() < 1e-5


def test_left_padding_is_served_per_sequence(model, ids):
    padded = torch.cat([torch.zeros(1, 8, dtype=torch.long), ids[:, :40]], dim=1)
    mask = torch.cat([torch.zeros(1, 8, dtype=torch.long), torch.ones(1, 40, dtype=torch.long)], dim=1)
    sdpa_padded = logits_with(model, "sdpa", padded, attention_mask=mask)
    echo_hf.enable(model)
    with torch.no_grad():
        echo_padded = model(padded, attention_mask=mask).logits
        assert all(not m["echo_hit"] and m["tokens_computed"] == 40 for m in echo_hf.last_meta(model).values())
        again = model(padded, attention_mask=mask).logits
    # Every position, the padding rows too (SDPA computes those).
    assert (echo_padded - sdpa_padded).abs().max().item() < 1e-5
    assert (again - sdpa_padded).abs().max().item() < 1e-3
    assert all(m["echo_hit"] for m in echo_hf.last_meta(model).values())
    s = echo_hf.stats(model)
    assert (s["total_lookups"], s["hits"]) == (4, 2)  # 2 layers x 2 calls


def test_batched_prompts_of_different_lengths(model):
    """Left padding (what generate() gets from a tokenizer padding left) and
    right padding: the real positions match SDPA, each sequence reaches the
    cache on its own tokens, and greedy generation is SDPA's."""
    gen = torch.Generator().manual_seed(4)
    lengths = (40, 31, 24)
    prompts = [torch.randint(1, 128, (n,), generator=gen) for n in lengths]
    for side in ("left", "right"):
        ids = torch.zeros(3, 40, dtype=torch.long)
        mask = torch.zeros(3, 40, dtype=torch.long)
        for b, p in enumerate(prompts):
            span = slice(40 - len(p), 40) if side == "left" else slice(0, len(p))
            ids[b, span], mask[b, span] = p, 1
        sdpa = logits_with(model, "sdpa", ids, attention_mask=mask)
        echo_hf.enable(model)
        with torch.no_grad(), echo_hf.echo_context(prefix_length=16):
            echo = model(ids, attention_mask=mask).logits
        real = mask.bool()
        assert (echo[real] - sdpa[real]).abs().max().item() < 1e-5, side
        assert echo_hf.stats(model)["total_lookups"] == 3 * 2, side
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    model.set_attn_implementation("echo")
    with torch.no_grad():
        got = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, want)


def test_other_masks_and_decode_fall_back_to_sdpa(model, ids):
    # A hole in the middle is no padding: SDPA serves it.
    mask = torch.ones(1, 40, dtype=torch.long)
    mask[0, 10:14] = 0
    sdpa = logits_with(model, "sdpa", ids[:, :40], attention_mask=mask)
    echo_hf.enable(model)
    with torch.no_grad():
        echo = model(ids[:, :40], attention_mask=mask).logits
    assert (echo - sdpa).abs().max().item() < 1e-5
    assert echo_hf.stats(model)["total_lookups"] == 0
    # Greedy generation (prefill through the cache, decode steps through SDPA).
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        want = model.generate(ids[:, :24], max_new_tokens=6, do_sample=False)
    model.set_attn_implementation("echo")
    with torch.no_grad():
        got = model.generate(ids[:, :24], max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)


def test_batched_prompts(model):
    ids = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(3))
    eager = logits_with(model, "eager", ids)
    echo_hf.enable(model)
    with torch.no_grad(), echo_hf.echo_context(prefix_length=32):
        out = model(ids).logits
    assert (out - eager).abs().max().item() < 1e-5
    assert echo_hf.stats(model)["total_lookups"] == 3 * 2


def test_gradients_fall_back_with_a_warning(model, ids):
    echo_hf.enable(model)
    echo_hf._warned_grad = False
    with pytest.warns(UserWarning, match="inference-only"):
        out = model(ids[:, :16]).logits
    out.sum().backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
    model.zero_grad()


def test_from_pretrained_with_attn_implementation_echo(model, ids, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="echo").eval()
    assert loaded.config._attn_implementation == "echo"
    want = logits_with(model, "eager", ids)
    with torch.no_grad(), echo_hf.echo_context(prefix_length=48, namespace="tenant-a"):
        first = loaded(ids).logits
        second = loaded(ids).logits
    assert (first - want).abs().max().item() < 1e-5
    assert all(m["echo_hit"] for m in echo_hf.last_meta(loaded).values())
    assert (second - want).abs().max().item() < 1e-3
    echo_hf.clear(loaded)
    assert echo_hf.stats(loaded)["total_lookups"] == 0
