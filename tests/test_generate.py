"""generate.py against independent computations: cached and uncached decoding against full forwards and a loop of
them with a sampler written apart, the samplers' statistics (temperature, top-k, top-p and its exact boundary), and
speculative decoding against plain decoding (greedy token for token, sampling in distribution, drafts against a
whole forward)."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import generate as generate_py
from conftest import ARCHS, SMALL_MODELS, TINY_CONFIG, VARIANTS, randomize_router_bias, small, tiny
from generate import (KVCache, Sampling, accept_drafts, generate, next_logits, sample_logits, speculate, stream,
                      token_probs)
from model import ModelConfig, Transformer

GREEDY = Sampling(temperature=0)


# ---- the KV cache: cached decoding equals uncached ----

def test_mla_cache_holds_only_the_latent():
    model = tiny(attention="mla")
    caches = [KVCache(16) for _ in model.layers]
    with torch.no_grad():
        model.trunk(torch.randint(0, 97, (1, 4)), caches)
    per_layer = (TINY_CONFIG["kv_lora_rank"] + TINY_CONFIG["qk_rope_head_dim"]) * 4  # float32 numbers per token
    assert [c.bytes_per_token() for c in caches] == [per_layer] * TINY_CONFIG["n_layer"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decoding_matches_full_forward(variant):
    model = tiny(**VARIANTS[variant])
    randomize_router_bias(model)
    seq = torch.randint(0, 97, (2, 36))
    with torch.no_grad():
        full, _ = model(seq)
        caches = [KVCache(64) for _ in model.layers]
        steps = [next_logits(model, seq[:, :8], caches)]          # prefill: the last position's logits
        pos = 8
        while pos < 30:                                            # 22 single-token steps
            steps.append(next_logits(model, seq[:, pos:pos + 1], caches, start_pos=pos))
            pos += 1
        h, _ = model.trunk(seq[:, pos:], caches, start_pos=pos)   # a chunk appended to a cache (speculate's)
    assert torch.allclose(torch.stack(steps, 1), full[:, 7:30], atol=1e-4)
    assert torch.allclose(model.lm_head(h), full[:, 30:], atol=1e-4)



@pytest.mark.parametrize("variant", ["gqa", "mla_qlora_moe"])
def test_generate_greedy_matches_uncached_argmax(variant):
    model = tiny(**{**VARIANTS[variant], "block_size": 32})
    prompt = torch.randint(0, 97, (2, 5))
    out = generate(model, prompt, 40, GREEDY)                    # runs past block_size: cropping path
    assert out.shape == (2, 45) and torch.equal(out[:, :5], prompt)
    with torch.no_grad():
        for t in range(5, 45):
            context = out[:, max(0, t - 32):t]
            assert torch.equal(model(context)[0][:, -1].argmax(-1), out[:, t])


def test_generate_with_and_without_cache_agree():
    model = tiny(**VARIANTS["mla_qlora_moe"])
    prompt = torch.randint(0, 97, (2, 6))
    seeded = lambda: Sampling(temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(1))
    cached = generate(model, prompt, 25, seeded())
    uncached = generate(model, prompt, 25, seeded(), kv_cache=False)
    assert torch.equal(cached, uncached)  # (test_decoding_matches_a_loop_of_full_forwards checks both against a loop)


# decoding against a loop of full forwards, on the models of test_sample.py's checkpoints (conftest's SMALL_MODELS:
# a vocabulary of 512, block_size 32)

def run_stream(model, prompt, n, seed=None, kv_cache=True, **sampling):
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    tokens = stream(model, prompt, n, Sampling(**sampling, generator=generator), kv_cache=kv_cache)
    return [token.item() for token in tokens]


def reference_sample(logits, temperature, top_k, top_p, generator):
    """softmax(logits / T), kept to the top k, then to the nucleus of mass top_p of what is left (renormalised,
    as transformers' warpers do), drawn from: written out here, apart from generate.sample_logits."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    probs = (logits.float() / temperature).softmax(-1)[0]
    order = probs.argsort(descending=True).tolist()
    keep = order[:top_k] if top_k else order
    if top_p is not None:
        left = probs[keep].sum().item()
        kept, mass = [], 0.0
        for i in keep:
            if mass >= top_p:
                break
            kept.append(i)
            mass += probs[i].item() / left
        keep = kept
    masked = torch.zeros_like(probs)
    masked[keep] = probs[keep]
    return torch.multinomial(masked / masked.sum(), 1, generator=generator).view(1, 1)


def full_forward_decode(model, prompt, n, generator=None, **sampling):
    """The plainest decoding: a full forward over the last block_size tokens for every new token, no cache."""
    idx = prompt
    for _ in range(n):
        with torch.no_grad():
            logits, _ = model(idx[:, -model.config.block_size:])
        idx = torch.cat([idx, reference_sample(logits[:, -1], generator=generator, **sampling)], dim=1)
    return idx[0, prompt.size(1):].tolist()


@pytest.mark.parametrize("kv_cache", [True, False], ids=["cache", "no_cache"])
@pytest.mark.parametrize("name", list(SMALL_MODELS))
def test_decoding_matches_a_loop_of_full_forwards(name, kv_cache):
    """Greedy and seeded sampling, past block_size (32) too, where the context slides."""
    model = small(name)
    prompt = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(0))
    greedy = dict(temperature=0, top_k=None, top_p=None)
    assert run_stream(model, prompt, 20, kv_cache=kv_cache, **greedy) == \
        full_forward_decode(model, prompt, 20, **greedy)
    sampled = dict(temperature=1.0, top_k=50, top_p=0.9)
    assert run_stream(model, prompt, 20, seed=3, kv_cache=kv_cache, **sampled) == \
        full_forward_decode(model, prompt, 20, torch.Generator().manual_seed(3), **sampled)


# ---- the samplers ----

@pytest.mark.parametrize("temperature, top_k", [(0.5, 3), (2.0, 3), (0.7, None)])
def test_sampling_follows_softmax_of_logits_over_temperature_within_the_top_k(temperature, top_k):
    logits = torch.tensor([2.0, 0.5, 1.2, -1.0, 0.9, 1.6, -0.3, 0.1])
    expected = torch.zeros(8)
    keep = logits.topk(top_k or 8).indices
    expected[keep] = (logits[keep] / temperature).softmax(-1)
    n = 40_000
    sampling = Sampling(temperature, top_k, None, torch.Generator().manual_seed(0))
    draws = sample_logits(logits.repeat(n, 1), sampling).flatten()
    observed = torch.bincount(draws, minlength=8) / n
    # within 5 standard errors of a frequency (at most 0.0025 at this n); tokens outside the top k never drawn
    assert torch.all((observed - expected).abs() < 5 * (expected * (1 - expected) / n).sqrt() + 1e-9), (observed, expected)


def test_top_k_1_is_greedy_and_seeds_reproduce():
    model = small("mla_moe")
    prompt = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(0))
    greedy = run_stream(model, prompt, 16, temperature=0)
    assert run_stream(model, prompt, 16, seed=5, temperature=1.0, top_k=1) == greedy
    a = run_stream(model, prompt, 16, seed=7, temperature=1.0)
    assert a == run_stream(model, prompt, 16, seed=7, temperature=1.0)
    assert a != run_stream(model, prompt, 16, seed=8, temperature=1.0)
    assert a != greedy  # a random tiny model is close to uniform: sampling really samples


def nucleus(probs, p):
    """Naive reference: take tokens from the most likely down until their total reaches p."""
    kept, total = set(), 0.0
    for i in sorted(range(len(probs)), key=lambda i: -probs[i]):
        if total >= p:
            break
        kept.add(i)
        total += probs[i]
    return kept


@pytest.mark.parametrize("p", [0.3, 0.5, 0.75, 0.9, 0.99])
def test_top_p_keeps_the_smallest_set_reaching_p(p):
    logits = torch.tensor([2.0, 0.5, 1.2, -1.0, 0.9, 1.6, -0.3, 0.1])
    probs = logits.softmax(-1).tolist()
    want = nucleus(probs, p)
    draws = sample_logits(logits.repeat(4000, 1), Sampling(1.0, None, p, torch.Generator().manual_seed(0)))
    draws = draws.flatten()
    assert set(draws.tolist()) == want
    # and the kept tokens keep their relative odds
    total = sum(probs[i] for i in want)
    for i in want:
        assert abs((draws == i).float().mean().item() - probs[i] / total) < 0.04


@pytest.mark.parametrize("p, kept", [(0.75, [0.5, 0.25]), (0.5, [0.5])])
def test_top_p_drops_a_token_once_the_tokens_above_it_reach_p_exactly(p, kept):
    """Probabilities that are binary fractions, so that the sums are exact in float32: with p = 0.75, tokens 0 and 1
    reach exactly 0.75, and tokens 2 and 3 are dropped; with p = 0.5, token 0 alone reaches it."""
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])
    logits = probs.log()[None]                                      # [1, 4]
    assert torch.equal(logits.softmax(-1)[0], probs)                # the boundary really is exact
    sampling = Sampling(1.0, None, p, torch.Generator().manual_seed(0))
    expected = torch.zeros(4)
    expected[:len(kept)] = torch.tensor(kept) / sum(kept)
    assert torch.allclose(token_probs(logits, sampling)[0], expected, atol=0, rtol=1e-6)
    draws = sample_logits(logits.repeat(2000, 1), sampling).flatten()
    assert set(draws.tolist()) == set(range(len(kept)))


# ---- speculative decoding ----

WALK = dict(vocab_size=32, block_size=32, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, intermediate_size=64,
            attention="mla", q_lora_rank=0, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
            n_routed_experts=4, n_activated_experts=2, n_shared_experts=1, moe_intermediate_size=16, first_k_dense=1)


def walk(n, length, generator):
    """Walks up the vocabulary by 1 or 2 at random: two next tokens about equally likely, so that a model's
    greedy choice and its MTP modules' can differ, and drafts are both accepted and refused."""
    start = torch.randint(0, 32, (n, 1), generator=generator)
    return (start + torch.randint(1, 3, (n, length), generator=generator).cumsum(1)) % 32


@pytest.fixture(scope="module")
def walker():
    """An MLA + MoE model with two MTP modules, trained on walks for 40 steps (about a second)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**WALK, mtp_depth=2))
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):
        batch = walk(8, 33, generator)
        _, losses = model(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad()
        losses.total.backward()
        optimizer.step()
        model.update_router_bias(model.pop_expert_counts())
    assert losses.mtp.max() < 1.2  # ln 2 = 0.69 is what a walk leaves to chance
    return model.eval()


@pytest.mark.parametrize("name", ["random gqa", "random mla_moe", "trained mla_moe"])
def test_speculative_greedy_is_plain_greedy_token_for_token(name, walker):
    """Past block_size (32) too, where both go on without the cache. The random models' drafts are nearly all
    refused; the trained model's are accepted and refused."""
    if name == "trained mla_moe":
        model, prompts = walker, walk(3, 6, torch.Generator().manual_seed(1))
    else:
        model = tiny(**ARCHS[name.split()[1]], block_size=32, mtp_depth=3)
        randomize_router_bias(model)
        prompts = torch.randint(0, 97, (2, 5))
    stats = {}
    for prompt in prompts:
        plain = [t.item() for t in stream(model, prompt[None], 40, GREEDY)]
        speculative = [t.item() for t in speculate(model, prompt[None], 40, GREEDY, stats=stats)]
        assert speculative == plain
    if name == "trained mla_moe":
        assert 0.2 * stats["drafted"] < stats["accepted"] < 0.9 * stats["drafted"], stats


def test_decoding_runs_the_output_head_on_the_sampled_positions_only(walker):
    """A prompt's logits are the last position's (plain decoding), or the newest token's and the drafts' (speculative
    decoding: one row per draft and one more, one per MTP module drafting): never the whole prompt's."""
    rows = []
    hook = walker.lm_head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[:-1].numel()))
    prompt = walk(1, 20, torch.Generator().manual_seed(3))
    list(stream(walker, prompt, 6, GREEDY))
    assert rows == [1] * 6
    rows.clear()
    list(speculate(walker, prompt, 12, GREEDY))
    hook.remove()
    assert rows[0] == 1 and 1 < max(rows) <= 1 + len(walker.mtp), rows

def test_drafts_are_the_mtp_modules_over_the_whole_sequence(walker, monkeypatch):
    """Every round's drafts come from the MTP modules' own caches, which hold positions computed from refused
    drafts until they are redone. A whole forward of the sequence so far, without caches, gives the same
    distributions q: module k's logits at the newest position the main model has seen, given the drafts before."""
    rounds, draft = [], generate_py.draft

    def recorded(model, seq, *args):
        drafts, q = draft(model, seq, *args)
        rounds.append((seq, drafts, q))
        return drafts, q
    monkeypatch.setattr(generate_py, "draft", recorded)
    stats, generator = {}, torch.Generator().manual_seed(2)
    for prompt in walk(2, 5, generator):
        sampling = Sampling(temperature=1.0, top_k=20, generator=generator)
        list(speculate(walker, prompt[None], 24, sampling, stats=stats))
    assert 0 < stats["accepted"] < stats["drafted"]
    assert sum(drafts.size(1) for _, drafts, _ in rounds) == stats["drafted"]
    for seq, drafts, q in rounds:
        for k in range(1, drafts.size(1) + 1):
            with torch.no_grad():
                states = walker.mtp_states(*walker.trunk(torch.cat([seq, drafts[:, :k - 1]], 1)))
                logits = walker.lm_head(states[k - 1][:, -1])
            assert torch.allclose(q[k - 1], token_probs(logits, Sampling(1.0, 20)), atol=1e-5)
            assert q[k - 1, drafts[0, k - 1]] > 0


def test_accept_drafts_keeps_the_main_model_s_distribution():
    """Drafts from q, tokens from p: the first token is distributed as p_0, the one after an accepted draft as
    p_1 (these p do not depend on the tokens before), and the first draft is kept with probability sum min(p, q).
    One-hot p and q (greedy) keep a draft exactly when it is p's argmax, and else give that argmax."""
    generator = torch.Generator().manual_seed(0)
    p = (torch.randn(3, 6, generator=generator) * 1.5).softmax(-1)
    q = (torch.randn(2, 6, generator=generator) * 1.5).softmax(-1)
    n = 10_000
    drafts = torch.stack([torch.multinomial(q[i], n, replacement=True, generator=generator) for i in range(2)], 1)
    first, second, kept = torch.zeros(6), torch.zeros(6), 0
    for d in drafts:
        m, token = accept_drafts(p, q, d, generator)
        tokens = [*d[:m].tolist(), token.item()]
        first[tokens[0]] += 1
        if m:
            kept += 1
            second[tokens[1]] += 1
    for observed, expected, count in ((first, p[0], n), (second, p[1], kept)):
        assert torch.all((observed / count - expected).abs() < 5 * (expected * (1 - expected) / count).sqrt() + 1e-9)
    assert kept / n == pytest.approx(torch.minimum(p[0], q[0]).sum().item(), abs=0.015)
    one_hot = lambda *ids: F.one_hot(torch.tensor(ids), 6).float()
    m, token = accept_drafts(one_hot(2, 5, 1), one_hot(2, 3), torch.tensor([2, 3]))
    assert (m, token.item()) == (1, 5)  # the second draft is not p's argmax: refused, and replaced by it
    m, token = accept_drafts(one_hot(2, 5, 1), one_hot(2, 5), torch.tensor([2, 5]))
    assert (m, token.item()) == (2, 1)  # both kept, and the token after them is p's argmax


def test_speculative_sampling_draws_from_the_main_model():
    """End to end, vocabulary 8, two MTP modules that draft from their own (different) distributions: four sampled
    tokens (the first from the prompt, then two drafts and the one after them) against their exact distribution
    under the main model alone, from full forwards over every continuation."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=8, block_size=16, n_layer=1, n_embd=16, n_head=2, n_kv_head=1,
                                    intermediate_size=32, tie_embeddings=False, mtp_depth=2)).eval()
    model.lm_head.weight.data *= 40                                # peaked distributions, far from uniform
    prompt = torch.tensor([[1, 5, 2]])
    exact = torch.ones(())                                         # P(t1 .. tk) = prod_j p(t_j | prompt, t1 .. t_j-1)
    with torch.no_grad():
        for k in range(4):
            before = torch.tensor(list(itertools.product(range(8), repeat=k)), dtype=torch.long).view(8 ** k, k)
            p = model(torch.cat([prompt.expand(8 ** k, 3), before], 1))[0][:, -1].softmax(-1)
            exact = exact.unsqueeze(-1) * p.view(*[8] * (k + 1))
    n, counts, stats = 500, torch.zeros(8, 8, 8, 8), {}
    sampling = Sampling(temperature=1.0, generator=torch.Generator().manual_seed(0))
    for _ in range(n):
        counts[tuple(t.item() for t in speculate(model, prompt, 4, sampling, stats=stats))] += 1
    assert 0.1 * stats["drafted"] < stats["accepted"] < 0.7 * stats["drafted"], stats  # q is not p
    for k in range(4):                                             # each token's marginal
        others = tuple(d for d in range(4) if d != k)
        expected, observed = exact.sum(others), counts.sum(others) / n
        assert torch.all((observed - expected).abs() < 5 * (expected * (1 - expected) / n).sqrt() + 2e-3), (k, observed, expected)
    pairs = (counts.sum((2, 3)) / n, exact.sum((2, 3))), (counts.sum((0, 1)) / n, exact.sum((0, 1)))
    assert all(0.5 * (observed - expected).abs().sum() < 0.1 for observed, expected in pairs)  # (t1, t2), (t3, t4)


def test_speculate_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="has none"):
        next(speculate(tiny(), torch.zeros(1, 3, dtype=torch.long), 4, Sampling()))
    with pytest.raises(ValueError, match="batch 1"):
        next(speculate(tiny(mtp_depth=1), torch.zeros(2, 3, dtype=torch.long), 4, Sampling()))
