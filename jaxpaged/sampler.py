"""Jitted sampling: penalties, min_tokens bans, temperature, min-p / top-k / top-p, seeded draws, raw logprobs.

The runner builds a `SamplingTensors` on the host each step (`SamplingTensors.build`, numpy only, one row
per scheduled sequence that samples, padding rows greedy) and calls `sample(logits, tensors, ...)` inside
its jitted step. Per row, in vLLM's order:

  1. penalties (static `use_penalties`): repetition on tokens of prompt + output, then frequency and
     presence on output counts. Counts are built on device by scatter-add from a padded token history;
  2. logit_bias: `bias_vals` added at `bias_ids` (width 0 when no row has a bias: no work);
     min_tokens: ids in `banned_ids` (eos + stop_token_ids while the row is short of min_tokens) -> -inf;
     structured output: tokens whose bit is clear in the row's packed `allowed` mask -> -inf (width 0
     when no row has a grammar: no work; rows without one are all ones);
  3. greedy rows (temperature 0, or top_k 1) take the argmax of these logits (padding rows, temperature
     -1, return token 0);
  4. other rows: divide by temperature, keep tokens with s >= threshold where the threshold combines
     min-p (s >= max + log(min_p)), top-k (s >= k-th largest) and top-p (the smallest set of most likely
     tokens of the min-p/top-k-filtered distribution whose mass reaches p, vLLM's rule); ties at a
     threshold are kept;
  5. draw from the kept tokens by inverse CDF with the row's two uniforms (a two-level search:
     groups of GROUP tokens, then one group), which is exact and far cheaper than Gumbel noise over V.

Thresholds: one `lax.top_k` with a static cap (`topk_cap`) finds them for top_k <= cap and nuclei inside
the cap's candidates; any row beyond that sends the batch through an exact 32-step bisection over the
float bit patterns (no full sort: sorting [256, 49152] costs seconds on CPU). Both branches sit under
`lax.cond`, so an all-greedy batch pays for neither.

Randomness: each row carries its two uniforms, drawn on the host. A seeded request's pair is a
counter-based hash (splitmix64) of (seed, number of tokens it has generated), so its draws do not depend
on the rest of the batch, on its row, or on preemption; unseeded rows take theirs from the engine's numpy
Generator. (Drawing them on device with jax.random.fold_in/uniform costs ~1.2 s of extra XLA compile per
step shape on CPU and buys nothing: the host knows everything the draw depends on.)

Logprobs are those of the raw model distribution (log_softmax of the unprocessed logits), rank is 1-based
and counts tokens with logit >= the token's (vLLM's convention).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged.sampling_params import SamplingParams

GROUP = 256            # tokens per group in the two-level inverse-CDF draw
DEFAULT_TOPK_CAP = 128  # candidates of the fast top-k / top-p path
MIN_BANNED_WIDTH = 8


@dataclass
class SamplingRow:
    """Host description of one sampling sequence for this step."""
    params: SamplingParams
    prompt_token_ids: Sequence[int] = ()   # read only for penalties
    output_token_ids: Sequence[int] = ()   # tokens generated so far (their count is the seed offset)
    grammar: Any = None                    # structured_output.GrammarState of a constrained row


@jax.tree_util.register_dataclass
@dataclass
class SamplingTensors:
    """Per-row sampling arrays (numpy on the host, jax inside the step)."""
    temperature: jax.Array         # [B] f32; 0 = greedy (also top_k == 1), -1 = padding row
    top_k: jax.Array               # [B] i32; 0 = off
    top_p: jax.Array               # [B] f32; 1 = off
    min_p: jax.Array               # [B] f32; 0 = off
    presence_penalty: jax.Array    # [B] f32
    frequency_penalty: jax.Array   # [B] f32
    repetition_penalty: jax.Array  # [B] f32
    uniforms: jax.Array            # [B, 2] f32 in [0, 1); the row's draws for this step
    banned_ids: jax.Array          # [B, S] i32; -1 padded; ids set to -inf this step (min_tokens)
    history: jax.Array             # [B, H] i32; -1 padded; prompt + output ids (H == 0 without penalties)
    prompt_len: jax.Array          # [B] i32; history[b, :prompt_len[b]] is the prompt
    bias_ids: jax.Array            # [B, S2] i32; -1 padded; logit_bias ids (S2 == 0 when no row has one)
    bias_vals: jax.Array           # [B, S2] f32; their biases
    allowed: jax.Array             # [B, W] i32 packed token mask, W = ceil(V / 32) (W == 0: no grammar rows)

    @property
    def batch_size(self) -> int:
        return self.temperature.shape[0]

    @classmethod
    def build(cls, rows: Sequence[Optional[SamplingRow]], pad_to: int, vocab_size: int, *,
              generator: Optional[np.random.Generator] = None, eos_token_ids: Sequence[int] = (),
              history_len: Optional[int] = None, banned_width: Optional[int] = None) -> "SamplingTensors":
        """numpy SamplingTensors for `rows` (None = padding), padded with greedy rows to `pad_to`.

        generator: draws the uniforms of unseeded rows (pass the engine's, seeded from EngineConfig.seed).
        eos_token_ids: banned with stop_token_ids while a row has fewer than min_tokens outputs.
        history_len: width H of the token history (static shape); default 0 when no row uses penalties,
            else the next power of two >= 64 holding the longest prompt + output. Pin it (e.g. to
            max_model_len) to keep the compiled shape fixed.
        banned_width: width S of banned_ids; default the next power of two >= 8 that fits.
        """
        if len(rows) > pad_to:
            raise ValueError(f"pad_to must be >= number of rows ({len(rows)}), got {pad_to}")
        gen = generator if generator is not None else np.random.default_rng()
        B, V = pad_to, vocab_size
        temperature = np.full(B, -1.0, np.float32)          # -1 marks padding rows
        top_k = np.zeros(B, np.int32)
        top_p = np.ones(B, np.float32)
        min_p = np.zeros(B, np.float32)
        presence = np.zeros(B, np.float32)
        frequency = np.zeros(B, np.float32)
        repetition = np.ones(B, np.float32)
        uniforms = gen.random((B, 2), dtype=np.float32)
        seeded_rows, seeds, offsets = [], [], []
        banned: list[list[int]] = [[] for _ in range(B)]
        any_pen, max_hist = False, 0
        for b, row in enumerate(rows):
            if row is None:
                continue
            p = row.params
            n_out = len(row.output_token_ids)
            temperature[b] = 0.0
            if not p.is_greedy:
                temperature[b] = p.temperature
                top_k[b] = p.top_k if 0 < p.top_k < V else 0
                top_p[b] = p.top_p
                min_p[b] = p.min_p
                if p.seed is not None:
                    seeded_rows.append(b)
                    seeds.append(p.seed % 2 ** 64)
                    offsets.append(n_out)
            if p.uses_penalties:
                presence[b] = p.presence_penalty
                frequency[b] = p.frequency_penalty
                repetition[b] = p.repetition_penalty
                any_pen = True
                max_hist = max(max_hist, len(row.prompt_token_ids) + n_out)
            if n_out < p.min_tokens:
                banned[b] = sorted(i for i in p.all_stop_token_ids(eos_token_ids) if 0 <= i < V)
        S = banned_width if banned_width is not None else _pow2_at_least(
            max(MIN_BANNED_WIDTH, max(len(x) for x in banned)))
        banned_ids = np.full((B, S), -1, np.int32)
        for b, ids in enumerate(banned):
            if len(ids) > S:
                raise ValueError(f"banned_width={S} is too small for {len(ids)} stop/eos ids")
            banned_ids[b, :len(ids)] = ids
        H = history_len if history_len is not None else (_pow2_at_least(max(64, max_hist)) if any_pen else 0)
        history = np.full((B, H), -1, np.int32)
        prompt_len = np.zeros(B, np.int32)
        if any_pen:
            for b, row in enumerate(rows):
                if row is None or not row.params.uses_penalties:
                    continue
                ids = np.concatenate([np.asarray(row.prompt_token_ids, np.int32),
                                      np.asarray(row.output_token_ids, np.int32)])
                if len(ids) > H:
                    raise ValueError(f"history_len={H} is too small for {len(ids)} prompt + output tokens")
                history[b, :len(ids)] = ids
                prompt_len[b] = len(row.prompt_token_ids)
        if seeded_rows:
            uniforms[seeded_rows] = seeded_uniforms(np.array(seeds, np.uint64), np.array(offsets, np.uint64))
        bias_ids, bias_vals = _bias_arrays(rows, B)
        return cls(temperature, top_k, top_p, min_p, presence, frequency, repetition, uniforms,
                   banned_ids, history, prompt_len, bias_ids, bias_vals, _allowed_mask(rows, B, V))


@jax.tree_util.register_dataclass
@dataclass
class SamplerOutput:
    tokens: jax.Array        # [B] i32 sampled ids
    logprob: jax.Array       # [B] f32 raw logprob of the sampled id
    rank: jax.Array          # [B] i32 1-based rank of the sampled id in the raw distribution
    top_ids: jax.Array       # [B, K] i32 top-K ids of the raw distribution (K = num_logprobs)
    top_logprobs: jax.Array  # [B, K] f32 their logprobs


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's output function on uint64 arrays (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def seeded_uniforms(seeds: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """[N, 2] f32 uniforms in [0, 1) of seeded rows: a hash of (seed, tokens generated so far) only.
    seeds, offsets: [N] uint64 (seed taken modulo 2**64)."""
    with np.errstate(over="ignore"):
        h = _splitmix64(_splitmix64(np.asarray(seeds, np.uint64)) ^ np.asarray(offsets, np.uint64))
    hi = (h >> np.uint64(40)).astype(np.float32)                       # top 24 bits
    lo = ((h >> np.uint64(8)) & np.uint64(0xFFFFFF)).astype(np.float32)  # bits 8..31
    return np.stack([hi, lo], axis=-1) * np.float32(2.0 ** -24)


def _bias_arrays(rows: Sequence[Optional[SamplingRow]], B: int) -> tuple[np.ndarray, np.ndarray]:
    """[B, S2] ids (-1 padded) and f32 biases of the rows' logit_bias; S2 = 0 when no row has one, else
    the next power of two >= 8 (few compiled widths)."""
    biases = [(r.params.logit_bias or {}) if r is not None else {} for r in rows]
    width = max((len(b) for b in biases), default=0)
    S = _pow2_at_least(max(MIN_BANNED_WIDTH, width)) if width else 0
    ids = np.full((B, S), -1, np.int32)
    vals = np.zeros((B, S), np.float32)
    for b, bias in enumerate(biases):
        ids[b, :len(bias)] = list(bias.keys())
        vals[b, :len(bias)] = list(bias.values())
    return ids, vals


def _allowed_mask(rows: Sequence[Optional[SamplingRow]], B: int, V: int) -> np.ndarray:
    """[B, W] packed masks of the constrained rows (others all ones); W = 0 when no row has a grammar."""
    constrained = [(r.grammar, b) for b, r in enumerate(rows) if r is not None and r.grammar is not None]
    if not constrained:
        return np.zeros((B, 0), np.int32)
    from jaxpaged.structured_output.state import fill_bitmasks, mask_width
    mask = np.full((B, mask_width(V)), -1, np.int32)
    fill_bitmasks(constrained, mask)
    return mask


def needs_penalties(rows: Sequence[Optional[SamplingRow]]) -> bool:
    return any(r is not None and r.params.uses_penalties for r in rows)


def max_num_logprobs(rows: Sequence[Optional[SamplingRow]]) -> Optional[int]:
    """The `num_logprobs` for `sample`: None when no row asks for logprobs, else the largest N."""
    wanted = [r.params.logprobs for r in rows if r is not None and r.params.logprobs is not None]
    return max(wanted) if wanted else None


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# ---------------------------------------------------------------------------------------------------
# device side
# ---------------------------------------------------------------------------------------------------

def sample(logits: jax.Array, t: SamplingTensors, *, num_logprobs: Optional[int] = 0,
           use_penalties: Optional[bool] = None, topk_cap: int = DEFAULT_TOPK_CAP) -> SamplerOutput:
    """Samples one token per row of logits [B, V]. Static arguments:
      num_logprobs: top-N logprobs to return (K = N); 0 = only the sampled token's logprob and rank;
          None = no logprobs at all (logprob and rank are zeros: saves two passes over [B, V]);
      use_penalties: default `t.history.shape[1] > 0`;
      topk_cap: candidates of the fast top-k / top-p path.
    Padding rows (temperature < 0) return token 0."""
    logits = logits.astype(jnp.float32)
    B, V = logits.shape
    if use_penalties is None:
        use_penalties = t.history.shape[1] > 0
    x = apply_penalties(logits, t) if use_penalties else logits
    if t.bias_ids.shape[1]:
        x = _add_bias(x, t.bias_ids, t.bias_vals)
    # a scatter of B*S entries: in place when logits are an intermediate of the step (a jit argument
    # that is not donated costs one [B, V] copy here)
    banned = _ban(x, t.banned_ids)
    if t.allowed.shape[1]:
        # the grammar wins over min_tokens: a row whose grammar allows only banned ids (eos at the
        # grammar's end) keeps the grammar's tokens, so it never samples a masked token
        keep = unpack_token_bitmask(t.allowed, x.shape[1])                     # [B, V] bool
        masked = jnp.where(keep, banned, -jnp.inf)
        dead = jnp.all(masked == -jnp.inf, axis=-1, keepdims=True)              # [B, 1]
        x = jnp.where(keep & dead, x, masked)
    else:
        x = banned
    greedy = t.temperature <= 0.0                                  # [B] greedy or padding
    zeros = jnp.zeros((B,), jnp.int32)
    # each branch runs only when some row needs it (lax.cond executes one side)
    greedy_tokens = jax.lax.cond(jnp.any(t.temperature == 0.0), lambda: _argmax(x), lambda: zeros)
    random_tokens = jax.lax.cond(jnp.any(~greedy), lambda: _random_sample(x, t, greedy, topk_cap),
                                 lambda: zeros)
    tokens = jnp.where(greedy, greedy_tokens, random_tokens)
    tokens = jnp.where(t.temperature < 0.0, 0, tokens)             # padding rows
    if num_logprobs is None:
        return SamplerOutput(tokens, jnp.zeros((B,), jnp.float32), zeros, jnp.zeros((B, 0), jnp.int32),
                             jnp.zeros((B, 0), jnp.float32))
    logprob, rank, top_ids, top_logprobs = token_logprobs(logits, tokens, num_logprobs)
    return SamplerOutput(tokens, logprob, rank, top_ids, top_logprobs)


def token_logprobs(logits: jax.Array, token_ids: jax.Array, num_logprobs: int = 0):
    """Raw logprobs of `token_ids` [N] under logits [N, V], their 1-based ranks (count of logits >= the
    token's, vLLM's rule), and the top-K ids / logprobs (K = num_logprobs, static). Also serves prompt
    logprobs (logits of position i, token i+1)."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)                                     # [N]
    tok_logit = jnp.take_along_axis(logits, token_ids[:, None].astype(jnp.int32), axis=-1)  # [N, 1]
    logprob = tok_logit[:, 0] - lse
    # counted as an f32 sum: XLA:CPU reduces f32 sums much faster than int32 ones (exact below 2**24)
    rank = jnp.sum(jnp.where(logits >= tok_logit, 1.0, 0.0), axis=-1).astype(jnp.int32)
    if num_logprobs > 0:
        top_vals, top_ids = jax.lax.top_k(logits, num_logprobs)
        top_logprobs = top_vals - lse[:, None]
        top_ids = top_ids.astype(jnp.int32)
    else:
        top_ids = jnp.zeros((logits.shape[0], 0), jnp.int32)
        top_logprobs = jnp.zeros((logits.shape[0], 0), jnp.float32)
    return logprob, rank, top_ids, top_logprobs


def apply_penalties(logits: jax.Array, t: SamplingTensors) -> jax.Array:
    """vLLM's penalties: repetition on tokens of prompt or output, frequency/presence on output counts."""
    B, V = logits.shape
    H = t.history.shape[1]
    valid = t.history >= 0                                                     # [B, H]
    is_out = valid & (jnp.arange(H, dtype=jnp.int32)[None, :] >= t.prompt_len[:, None])
    ids = jnp.where(valid, t.history, V)                                       # V is dropped below
    rows = jnp.broadcast_to(jnp.arange(B)[:, None], (B, H))
    out_counts = jnp.zeros((B, V), jnp.float32).at[rows, ids].add(is_out.astype(jnp.float32), mode="drop")
    seen = jnp.zeros((B, V), jnp.bool_).at[rows, ids].set(True, mode="drop")
    rp = t.repetition_penalty[:, None]
    x = jnp.where(seen, jnp.where(logits > 0, logits / rp, logits * rp), logits)
    x = x - t.frequency_penalty[:, None] * out_counts
    return x - t.presence_penalty[:, None] * (out_counts > 0).astype(jnp.float32)


def _ban(x: jax.Array, banned_ids: jax.Array) -> jax.Array:
    B, V = x.shape
    if banned_ids.shape[1] == 0:
        return x
    ids = jnp.where(banned_ids >= 0, banned_ids, V)
    rows = jnp.broadcast_to(jnp.arange(B)[:, None], ids.shape)
    return x.at[rows, ids].set(-jnp.inf, mode="drop")


def _add_bias(x: jax.Array, ids: jax.Array, vals: jax.Array) -> jax.Array:
    B, V = x.shape
    ids = jnp.where(ids >= 0, ids, V)                                      # padding -> dropped
    rows = jnp.broadcast_to(jnp.arange(B)[:, None], ids.shape)
    return x.at[rows, ids].add(vals, mode="drop")


def unpack_token_bitmask(allowed: jax.Array, V: int) -> jax.Array:
    """allowed [B, W] packed int32 (token t is bit t % 32 of word t // 32) -> [B, V] bool."""
    B = allowed.shape[0]
    bits = jnp.right_shift(allowed[:, :, None], jnp.arange(32, dtype=jnp.int32)[None, None, :]) & 1
    return bits.reshape(B, -1)[:, :V] != 0                                # [B, W*32] -> [B, V]


def apply_token_bitmask(x: jax.Array, allowed: jax.Array) -> jax.Array:
    """x [B, V] with the tokens allowed [B, W] does not allow set to -inf."""
    return jnp.where(unpack_token_bitmask(allowed, x.shape[1]), x, -jnp.inf)


def _argmax(x: jax.Array) -> jax.Array:
    """First index of the row maximum, like jnp.argmax, in two levels: the max of each group of GROUP
    tokens, the first group holding the row max, then the first index inside it. ~10x cheaper on
    XLA:CPU than argmax's variadic reduce over [B, V] (a plain max reduce vectorizes)."""
    B, V = x.shape
    C = min(GROUP, V)
    G = -(-V // C)
    if G * C != V:
        x = jnp.pad(x, ((0, 0), (0, G * C - V)), constant_values=-jnp.inf)
    xg = x.reshape(B, G, C)
    g = jnp.argmax(jnp.max(xg, axis=-1), axis=-1)                             # [B]
    j = jnp.argmax(jnp.take_along_axis(xg, g[:, None, None], axis=1)[:, 0], axis=-1)
    return (g * C + j).astype(jnp.int32)


def _random_sample(x: jax.Array, t: SamplingTensors, greedy: jax.Array, topk_cap: int) -> jax.Array:
    temp = jnp.where(greedy, 1.0, t.temperature)
    s = x / temp[:, None]                                      # [B, V] scaled logits
    m = jnp.max(s, axis=-1)                                    # [B]
    e = jnp.exp(s - m[:, None])                                # [B, V] unnormalized probs, max 1
    thr = _thresholds(s, e, m, t, greedy, topk_cap)            # [B]: keep s >= thr
    w = jnp.where(s >= thr[:, None], e, 0.0)
    return _categorical(w, t.uniforms)


def _thresholds(s, e, m, t: SamplingTensors, greedy, topk_cap: int) -> jax.Array:
    B, V = s.shape
    thr_min_p = jnp.where(t.min_p > 0, m + jnp.log(jnp.maximum(t.min_p, 1e-30)), -jnp.inf)
    need = ~greedy & ((t.top_k > 0) | (t.top_p < 1.0))
    K = min(topk_cap, V)

    def fast():
        vals = _top_values(s, K)                               # [B, K] descending
        thr, fallback = _topk_topp_from_candidates(vals, s, e, m, t, thr_min_p)
        fallback = need & fallback
        return jax.lax.cond(jnp.any(fallback), lambda: _exact_thresholds(s, e, t, thr_min_p, vals),
                            lambda: thr)

    return jax.lax.cond(jnp.any(need), fast, lambda: thr_min_p)


def _top_values(s: jax.Array, k: int) -> jax.Array:
    """The k largest values per row, descending. Read back through the indices: in some graphs XLA:CPU
    turns a values-only lax.top_k into a full sort of the row (seconds at [256, 49152])."""
    _, idx = jax.lax.top_k(s, k)
    return jnp.take_along_axis(s, idx, axis=-1)


def _topk_topp_from_candidates(vals, s, e, m, t, thr_min_p):
    """Thresholds from the K largest scaled logits; fallback[b] when they do not suffice for row b."""
    B, K = vals.shape
    kk = t.top_k
    kth = jnp.take_along_axis(vals, jnp.clip(kk - 1, 0, K - 1)[:, None], axis=-1)[:, 0]
    thr1 = jnp.maximum(jnp.where(kk > 0, kth, -jnp.inf), thr_min_p)
    z1 = jnp.sum(jnp.where(s >= thr1[:, None], e, 0.0), axis=-1)          # mass kept by min-p/top-k
    pc = jnp.where(vals >= thr1[:, None], jnp.exp(vals - m[:, None]), 0.0) / z1[:, None]
    incl = jnp.cumsum(pc, axis=-1)
    excl = incl - pc
    # vLLM's rule: a token stays while the mass of the tokens before it is < top_p
    n_keep = jnp.sum(excl < t.top_p[:, None], axis=-1)
    last = jnp.take_along_axis(vals, jnp.clip(n_keep - 1, 0, K - 1)[:, None], axis=-1)[:, 0]
    thr_p = jnp.where(t.top_p < 1.0, last, -jnp.inf)
    thr = jnp.maximum(thr1, thr_p)
    beyond = (t.top_p < 1.0) & (incl[:, -1] < t.top_p) & (thr1 <= vals[:, -1])
    return thr, (kk > K) | beyond


def _exact_thresholds(s, e, t, thr_min_p, vals):
    """Exact top-k / top-p thresholds over the whole vocabulary by bisection on the f32 bit patterns
    (32 masked-sum passes each; the top-k one only when some top_k exceeds the candidates)."""
    B, V = s.shape
    K = vals.shape[1]
    keys = _sortable(s)                                                   # [B, V] i32, order of s
    lo = jnp.min(keys, axis=-1)
    hi = jnp.max(keys, axis=-1)
    kth = jnp.take_along_axis(vals, jnp.clip(t.top_k - 1, 0, K - 1)[:, None], axis=-1)[:, 0]
    kth = jax.lax.cond(
        jnp.any(t.top_k > K),
        lambda: jnp.where(t.top_k > K, _unsortable(_bisect(keys, jnp.ones_like(s),
                                                           t.top_k.astype(jnp.float32), lo, hi)), kth),
        lambda: kth)
    thr1 = jnp.maximum(jnp.where(t.top_k > 0, kth, -jnp.inf), thr_min_p)
    w = jnp.where(s >= thr1[:, None], e, 0.0)
    w = w / jnp.sum(w, axis=-1, keepdims=True)
    thr_p = jnp.where(t.top_p < 1.0, _unsortable(_bisect(keys, w, t.top_p, lo, hi)), -jnp.inf)
    return jnp.maximum(thr1, thr_p)


def _bisect(keys, w, target, lo, hi):
    """Per row, the largest key k in [lo, hi] with sum(w[keys >= k]) >= target (lo when none)."""
    def body(_, carry):
        lo, hi = carry
        # mid = lo + ceil((hi - lo) / 2) in uint32 arithmetic (the range can exceed int32)
        d = hi.astype(jnp.uint32) - lo.astype(jnp.uint32)
        mid = (lo.astype(jnp.uint32) + (d >> 1) + (d & 1)).astype(jnp.int32)
        ok = jnp.sum(jnp.where(keys >= mid[:, None], w, 0.0), axis=-1) >= target
        ok = ok & (hi > lo)
        return jnp.where(ok, mid, lo), jnp.where(ok | (hi <= lo), hi, mid - 1)

    lo, _ = jax.lax.fori_loop(0, 32, body, (lo, hi))
    return lo


def _sortable(x):
    """f32 -> i32 with the same order (negative floats have their magnitude bits flipped)."""
    i = jax.lax.bitcast_convert_type(x, jnp.int32)
    return jnp.where(i < 0, i ^ 0x7FFFFFFF, i)


def _unsortable(k):
    return jax.lax.bitcast_convert_type(jnp.where(k < 0, k ^ 0x7FFFFFFF, k), jnp.float32)


def _categorical(w: jax.Array, u: jax.Array) -> jax.Array:
    """Draws index i with probability w[b, i] / sum(w[b]) by a two-level inverse CDF. w [B, V] >= 0 with
    a positive entry per row; u [B, 2] uniforms in [0, 1)."""
    B, V = w.shape
    C = min(GROUP, V)
    G = -(-V // C)
    if G * C != V:
        w = jnp.pad(w, ((0, 0), (0, G * C - V)))
    wg = w.reshape(B, G, C)
    gs = jnp.sum(wg, axis=-1)                                         # [B, G] group masses
    g = _search(gs, u[:, 0])
    row = jnp.take_along_axis(wg, g[:, None, None], axis=1)[:, 0]     # [B, C]
    j = _search(row, u[:, 1])
    return (g * C + j).astype(jnp.int32)


def _search(w: jax.Array, u: jax.Array) -> jax.Array:
    """First index whose inclusive cumsum exceeds u * total, never an index of zero weight."""
    n = w.shape[1]
    c = jnp.cumsum(w, axis=-1)
    idx = jnp.sum(c <= (u * c[:, -1])[:, None], axis=-1)
    last_pos = n - 1 - jnp.argmax((w > 0)[:, ::-1], axis=-1)          # rounding guard
    return jnp.minimum(idx, last_pos).astype(jnp.int32)
