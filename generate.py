"""
Decoding with a model.py Transformer: the KV cache, the samplers and the decoding loops.

- `Sampling`: how the next token is picked (temperature, top-k, top-p, the random generator), one object that
  travels through every decoding function and sampler.
- `KVCache`: one layer's generation cache (for MLA the absorbed latent cache).
- `generate` and `stream`: plain decoding with the cache, one token at a time; past block_size the context is
  cropped and recomputed.
- `speculate`, `draft` and `accept_drafts`: speculative decoding (Leviathan et al. 2023) with the model's
  multi-token-prediction modules drafting, as DeepSeek-V3 proposes: the tokens follow the main model's distribution.
- `token_probs` and `sample_logits`: the distribution a token is drawn from (temperature, top-k, nucleus), and the draw.

The model is the first argument of every decoding function: generate(model, idx, max_new_tokens, Sampling(...)).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Sampling:
    """How the next token is picked from the logits (sample.py's --temperature, --top_k and --top_p)."""
    temperature: float = 1.0         # 0 = greedy; < 1 sharper, > 1 more random
    top_k: int | None = None         # keep the k most likely tokens only; None = all
    top_p: float | None = None       # nucleus: the smallest set of tokens whose probability reaches top_p; None = off
    generator: torch.Generator | None = None  # the random draws' generator; None = torch's global one


class KVCache:
    """Per-layer generation cache: tensors [B, heads, max_len, dim] filled at [start_pos, start_pos + T)."""

    def __init__(self, max_len):
        self.max_len = max_len
        self.buffers = {}

    def update(self, name, x, start_pos):
        """Store x [B, heads, T, dim] at start_pos and return everything cached so far."""
        if name not in self.buffers:  # allocated lazily, so it takes the activations' dtype (autocast)
            B, H, _, D = x.shape
            self.buffers[name] = x.new_zeros(B, H, self.max_len, D)
        buf = self.buffers[name]
        end = start_pos + x.size(2)
        buf[:, :, start_pos:end] = x
        return buf[:, :, :end]

    def bytes_per_token(self):
        return sum(b[0, :, 0].numel() * b.element_size() for b in self.buffers.values())


def next_logits(model, idx, caches=None, start_pos=0):
    """The main model's logits [B, vocab] for the token after idx [B, T] (at positions start_pos..), writing the new
    positions into caches when given. The output head reads the last position only: a prompt's other positions
    would cost a [B, T, vocab] tensor that decoding never reads."""
    h, _ = model.trunk(idx, caches, start_pos)
    return model.lm_head(h[:, -1])


@torch.no_grad()
def generate(model, idx, max_new_tokens, sampling, *, kv_cache=True):
    """idx [B, T] followed by exactly max_new_tokens new tokens (see `stream`)."""
    new = stream(model, idx, max_new_tokens, sampling, kv_cache=kv_cache)
    return torch.cat([idx, *new], dim=1)


@torch.no_grad()
def stream(model, idx, max_new_tokens, sampling, *, kv_cache=True):
    """Yield the next tokens [B, 1] after idx [B, T] one at a time, so a caller can print them or stop.

    Decodes with a KV cache (for MLA the absorbed latent cache); kv_cache=False recomputes the whole
    context for every token instead, to measure what the cache saves. Past block_size the context is
    cropped to its last block_size tokens and recomputed without a cache, since positions shift.
    """
    block_size = model.config.block_size
    caches = [KVCache(block_size) for _ in model.layers] if kv_cache else None
    logits = next_logits(model, idx[:, -block_size:], caches)
    for step in range(max_new_tokens):
        token = sample_logits(logits, sampling)  # [B, 1]
        yield token
        if step == max_new_tokens - 1:
            return
        idx = torch.cat([idx, token], dim=1)
        pos = idx.size(1) - 1  # the new token's position; the cache holds everything before it
        if caches and pos < block_size:
            logits = next_logits(model, token, caches, start_pos=pos)
        else:
            logits = next_logits(model, idx[:, -block_size:])


@dataclass
class Drafting:
    """What the MTP modules keep from one round of speculative decoding to the next."""
    hidden: torch.Tensor  # [depth, block_size, D]: hidden[k - 1] = h^{k-1} at every position
    caches: list          # one KVCache per MTP block, over its own positions
    start: int = 0        # the first position the main model verified in the last round


@torch.no_grad()
def speculate(model, idx, max_new_tokens, sampling, *, stats=None):
    """`stream` by speculative decoding (Leviathan et al. 2023), as DeepSeek-V3 proposes for its MTP modules, for
    one sequence idx [1, T]: the MTP modules draft the next tokens, one forward of the main model over [the
    newest token ; the drafts] checks them all, and `accept_drafts` keeps a prefix of them and draws one more
    token. The tokens follow the main model's distribution: at temperature 0 they are `stream`'s greedy tokens
    (up to float rounding, which a chunk of positions and a single one may do differently). stats, a dict, gets the
    counts of "drafted" and "accepted" tokens added to it.

    The KV caches (the main model's, and each MTP block's over its own positions) are written at
    [start_pos, start_pos + T) and read up to there only: the entries of refused drafts are never read, and the
    next forward overwrites them. Module k at position j reads token j + k, a draft for its last k - 1
    positions, so every round it redoes those, from h^{k-1} kept for every position (`Drafting.hidden`). Once the
    cache is full, decoding goes on as `stream` does past block_size.
    """
    if idx.size(0) != 1:
        raise ValueError("speculative decoding runs one sequence at a time (batch 1)")
    if not model.mtp:
        raise ValueError("speculative decoding drafts with the MTP modules, and this model has none (mtp_depth=0)")
    if max_new_tokens < 1:
        return
    stats = {} if stats is None else stats
    stats.setdefault("drafted", 0)
    stats.setdefault("accepted", 0)
    block_size, depth = model.config.block_size, len(model.mtp)
    caches = [KVCache(block_size) for _ in model.layers]
    h, _ = model.trunk(idx[:, -block_size:], caches)                      # [1, T, D]: the prompt
    mtp = Drafting(h.new_zeros(depth, block_size, h.size(-1)), [KVCache(block_size) for _ in model.mtp])
    token = sample_logits(model.lm_head(h[:, -1]), sampling)               # [1, 1]
    yield token
    seq, pos, n_new = torch.cat([idx, token], dim=1), h.size(1), 1
    while n_new < max_new_tokens:  # seq[:, pos] is the newest token; the main model has seen up to pos - 1
        if pos >= block_size:
            yield from stream(model, seq, max_new_tokens - n_new, sampling, kv_cache=False)
            return
        mtp.hidden[0, mtp.start:pos] = h[0, :pos - mtp.start]              # h^0 of the positions just verified
        n = min(depth, block_size - 1 - pos, max_new_tokens - n_new - 1)   # the drafts must fit, and be needed
        drafts, q = draft(model, seq, mtp, n, sampling)
        h, _ = model.trunk(torch.cat([seq[:, -1:], drafts], dim=1), caches, start_pos=pos)  # [1, 1 + n, D]
        p = token_probs(model.lm_head(h[0]), sampling)                     # [1 + n, vocab]
        m, token = accept_drafts(p, q, drafts[0], sampling.generator)
        stats["drafted"] += n
        stats["accepted"] += m
        new = torch.cat([drafts[0, :m], token])                           # [m + 1]
        for t in new:
            yield t.view(1, 1)
        seq, mtp.start, pos, n_new = torch.cat([seq, new.view(1, -1)], dim=1), pos, pos + m + 1, n_new + m + 1


def draft(model, seq, mtp, n, sampling):
    """n draft tokens [1, n] to follow seq [1, pos + 1], and the distributions q [n, vocab] they were drawn from.
    Module k at position pos - 1 (the newest the main model has seen) reads h^{k-1} there and token pos - 1 + k
    (the newest token for k = 1, then the drafts before), and predicts the token after. Its cache (mtp.caches[k - 1])
    is up to date before position mtp.start - k + 1, from where it runs again; mtp.hidden[k - 1] holds h^{k-1} to
    pos - 1."""
    pos = seq.size(1) - 1
    tokens, q = seq[0], mtp.hidden.new_zeros(n, model.config.vocab_size)
    for k, module in enumerate(model.mtp[:n], 1):
        s = max(mtp.start - k + 1, 0)
        emb = model.tok_embeddings(tokens[s + k:pos + k])                 # the tokens k later, [pos - s, D]
        h = model.norm(module(mtp.hidden[None, k - 1, s:pos], emb[None], *model.rope(s, pos - s),
                              cache=mtp.caches[k - 1], start_pos=s))
        if k < len(model.mtp):
            mtp.hidden[k, s:pos] = h[0]                                     # h^k [pos - s, D]
        q[k - 1] = token_probs(model.lm_head(h[:, -1]), sampling)[0]
        tokens = torch.cat([tokens, torch.multinomial(q[k - 1], 1, generator=sampling.generator)])
    return tokens[None, pos + 1:], q


def accept_drafts(p, q, drafts, generator=None):
    """Speculative sampling (Leviathan et al. 2023, Chen et al. 2023): the one accept/reject rule. drafts [n] were
    drawn from q [n, vocab]; p [n + 1, vocab] is the main model's distribution at the same positions and one more.
    Draft i is kept with probability min(1, p_i(d_i) / q_i(d_i)) while all before it were kept; the first one
    refused is replaced by a draw from norm(max(0, p_i - q_i)); when all are kept, one more token is drawn from
    p_n. Whatever q is, every token is then distributed as p alone would draw it. Greedy decoding is the case of
    one-hot p and q: a draft is kept when it is p's argmax, and else replaced by it.
    Returns (how many drafts are kept, the next token [1])."""
    n = drafts.size(0)
    rows = torch.arange(n, device=drafts.device)
    u = torch.rand(n, generator=generator, device=p.device)
    kept = u < p[rows, drafts] / q[rows, drafts]                  # u in [0, 1): with probability min(1, p / q)
    m = int(kept.cumprod(0).sum())                                # the leading run of kept drafts
    weights = (p[m] - q[m]).clamp_min(0) if m < n else p[n]       # multinomial normalises the weights
    return m, torch.multinomial(weights, 1, generator=generator)


def token_probs(logits, sampling):
    """The distribution that sample_logits draws from, per row of logits [B, V] -> [B, V]: one-hot on the argmax at
    temperature 0, else the temperature-scaled softmax restricted to the top_k tokens and to the smallest set of
    tokens whose probability reaches top_p (nucleus)."""
    if sampling.temperature == 0:
        return F.one_hot(logits.argmax(dim=-1), logits.size(-1)).float()
    logits = logits.float() / sampling.temperature
    if sampling.top_k is not None:
        kth = logits.topk(min(sampling.top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p
        drop = (probs.cumsum(dim=-1) - probs) >= sampling.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    return logits.softmax(dim=-1)


def sample_logits(logits, sampling):
    """Pick one token per row of logits [B, V]: greedy at temperature 0, else a draw from token_probs."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    return torch.multinomial(token_probs(logits, sampling), num_samples=1, generator=sampling.generator)
