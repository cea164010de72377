"""Per-token entropy of the sampling distribution (METHOD.md step 1).

Two ways to get H_t for a generated token:

* ``entropy_from_logits``: exact, needs the full logits row (the actor / reference forward pass
  has them; verl's actor computes the same quantity for its ``entropy`` field).
* ``estimate_entropy_from_topk``: from the top-k log-probs a rollout engine returns (for the
  k most likely tokens vLLM returns log-probs normalised over the whole vocabulary, not over
  the k). The unseen tail is bounded from both sides, so the result carries a guaranteed
  bracket [lower, upper] and a point estimate (the midpoint). METHOD.md allows this with
  k >= 20 if the error is measured; the measurements are in the docstring below and in
  tests/test_core_entropy.py.

Which distribution: H_t is the entropy of the distribution the token was actually sampled from.
The rollout gets it from the engine's top-k log-probs in vLLM's
``logprobs_mode="processed_logprobs"`` (``verl_patches.vllm_latent.spec.SAMPLING_LOGPROBS_MODE``;
the rollout server refuses top-k requests in any other mode): log-probs of
softmax(logits / temperature) AFTER top-k / top-p truncation and renormalisation (truncated
tokens, and the banned latent placeholder, are -inf). So with top_p < 1 or top_k > 0 the
rollout's H_t is the entropy of the truncated sampling distribution; the bracket stays valid
for it (tail tokens may have probability 0). vLLM's default ``"raw_logprobs"`` are before
temperature and truncation, i.e. not the sampled distribution, and a raw top-k cannot be
re-tempered exactly (the normaliser over the unseen tail is unknown). ``entropy_from_logits``
applies the temperature only: it is the same quantity when top_p = 1 and top-k is off, or when
the caller sets the truncated tokens' logits to -inf.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = ["EntropyConfig", "EntropyEstimate", "entropy_from_logits", "estimate_entropy_from_topk"]

ENTROPY_SOURCES = ("logits", "topk")


@dataclass(frozen=True)
class EntropyConfig:
    """Where per-token entropies H_t come from (METHOD.md step 1).

    Attributes:
        source: "logits" (default): exact ``entropy_from_logits`` on the full logits row (for a
            caller that holds the logits: tests, offline analysis); "topk":
            ``estimate_entropy_from_topk`` on an engine's top-k log-probs (cheap; error measured
            in that function's docstring). The branching rollout always uses "topk" (vLLM does not
            return full logits): recipe/iib_lpo/config/iib_lpo.yaml offers only ``top_k``, and an
            ``iib_lpo.entropy.source`` other than "topk" is refused at start-up.
        top_k: k for source="topk". Default 20, the smallest k METHOD.md accepts and vLLM's
            default ``max_logprobs`` cap.
    """

    source: str = "logits"
    top_k: int = 20

    def __post_init__(self) -> None:
        if self.source not in ENTROPY_SOURCES:
            raise ValueError(f"EntropyConfig.source must be one of {ENTROPY_SOURCES}, got {self.source!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 1:
            raise ValueError(f"EntropyConfig.top_k must be an int >= 1, got {self.top_k!r}")


def _check_finite_or_neg_inf(x: torch.Tensor, what: str) -> None:
    """NaN or +inf means a broken forward pass; -inf is a legitimately masked-out token."""
    bad = torch.isnan(x) | torch.isposinf(x)
    if bool(bad.any()):
        first = tuple(int(i) for i in torch.nonzero(bad)[0].tolist())
        raise ValueError(f"{what} contains NaN or +inf (first at index {first})")


def _first_row(bad: torch.Tensor) -> tuple[int, ...]:
    """Index (a tuple, () for a single row) of the first set entry of a row-shaped bool ``bad``."""
    return tuple(int(i) for i in torch.nonzero(bad)[0].tolist())


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Exact entropy (nats) of softmax(logits / temperature) over the last dimension.

    Args:
        logits: ``[..., V]``, any float dtype; bf16/fp16 are upcast to fp32 (fp64 stays fp64)
            before the softmax, so bf16 logits give the fp32 entropy of the bf16 values.
            ``-inf`` entries (masked tokens) are allowed and contribute 0.
        temperature: sampling temperature, > 0.

    Returns:
        ``[...]`` tensor of entropies in nats, in the upcast dtype, each in [0, log V].

    For finite logits this equals ``verl.utils.torch_functional.entropy_from_logits(logits / T)``,
    the quantity verl's actor stores as ``entropy`` (tested); unlike it, masked ``-inf`` logits
    give no NaN and low-precision input is upcast. It materialises a few ``[..., V]`` fp32
    tensors: call it on chunks of positions for long sequences with a large vocabulary.

    Numerics: log_softmax is computed with the max-subtraction trick; the entropy is
    ``-sum p * log p`` with the 0 * log 0 = 0 convention applied explicitly, so a fully peaked
    row gives exactly 0 and masked tokens never produce NaN.
    """
    if not isinstance(temperature, (int, float)) or not temperature > 0 or temperature != temperature:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if logits.ndim == 0 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty last (vocabulary) dimension, got shape {tuple(logits.shape)}")
    if not torch.is_floating_point(logits):
        raise TypeError(f"logits must be a floating-point tensor, got {logits.dtype}")
    _check_finite_or_neg_inf(logits, "logits")
    work_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    scaled = logits.to(work_dtype) / float(temperature)
    if bool(torch.isneginf(scaled).all(dim=-1).any()):
        raise ValueError("a logits row is entirely -inf: no token can be sampled, entropy is undefined")
    log_p = torch.log_softmax(scaled, dim=-1)
    p = log_p.exp()
    plogp = torch.where(p > 0, p * log_p, torch.zeros_like(p))
    return -plogp.sum(dim=-1)


class EntropyEstimate(NamedTuple):
    """Entropy of a distribution known only through its top-k probabilities (all ``[...]``, nats).

    ``lower <= exact <= upper`` is guaranteed whenever the inputs are the top-k log-probs of
    the full distribution over ``vocab_size`` tokens (up to the effect of their float rounding,
    see ``estimate_entropy_from_topk``); ``estimate`` is the midpoint, and always
    ``lower <= estimate <= upper``.
    ``tail_mass`` is m = 1 - sum(top-k probs), the probability not covered by the top-k.
    """

    estimate: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor
    tail_mass: torch.Tensor


def estimate_entropy_from_topk(
    topk_logprobs: torch.Tensor,
    vocab_size: int,
    *,
    eps: float | None = None,
) -> EntropyEstimate:
    r"""Bracket and estimate the entropy from the top-k log-probs of the full distribution.

    Args:
        topk_logprobs: ``[..., k]`` log-probs (natural log) of the k most likely tokens of the
            sampling distribution over all V tokens (vLLM's processed log-probs: after
            temperature and top-k/top-p, see the module docstring), in any order; k distinct
            tokens (drop the extra "sampled token" entry vLLM appends when it is not in the top
            k). ``-inf`` entries (fewer than k tokens with non-zero probability) count as
            probability 0, exactly.
        vocab_size: V, the number of tokens the distribution is over (the model's logits
            width, e.g. 151936 for Qwen2.5), V >= k.
        eps: machine epsilon of the arithmetic that produced the log-probs; default
            ``torch.finfo(topk_logprobs.dtype).eps``. Pass float32's eps for float32
            log-probs that were upcast to float64 before this call.

    Float rounding (the acceptance rule). The log-probs are a rounded log_softmax (vLLM: float32
    over V logits), so each finite entry l_i is taken as exact only up to
    tol_i = eps * (2 |l_i| + V + 2) in log space, a worst-case bound on a float log_softmax's
    error: at most eps |l_i| for each of the two subtractions in
    l_i = (x_i - max x) - log sum_j exp(x_j - max x) (|l_i| bounds their operands), and below
    0.7 V eps + (eps / 2) log V for the normaliser (rounding of a sum of V terms, of their exp
    arguments and of the log), which V + 2 covers. Write p_i = exp(l_i) and
    p_i^-, p_i^+ = p_i exp(-tol_i), p_i exp(+tol_i). The input is rejected only when NO
    distribution within those bounds fits the model below, i.e. when sum_i p_i^- > 1 (the top k
    alone hold more than all the mass) or when 1 - sum_i p_i^+ > (V - k) min_i p_i^+ (the tail
    cannot fit in V - k tokens each <= p_min). Otherwise the tail mass m = 1 - sum_i p_i is
    clamped into [0, (V - k) p_min] (the derivation's premise, so lower <= estimate <= upper)
    and a positive l_i <= tol_i is read as 0; the exact entropy then lies in the bracket up to
    the effect of the input's rounding. For float32 (eps = 1.19e-7) the mass slack is about
    eps * V: 0.018 at V = 151936, where CPU torch's float32 log_softmax over 151936 equal tail
    logits was measured off by up to 1e-3 (tests/test_core_entropy.py), and far below what a
    wrong ``vocab_size`` or log-probs of another distribution produce on spread-out rows. For
    bf16/fp16 input with V >~ 1/eps the bounds are wider than the probability simplex: nothing
    is rejected and the result is only as good as such log-probs allow.

    Derivation. Let p_1..p_k be the top-k probabilities, p_min = min_i p_i, known part
    H_k = -sum_i p_i log p_i, tail mass m = 1 - sum_i p_i, and n = V - k tail tokens with
    probabilities q_1..q_n, each 0 <= q_j <= p_min (they are not in the top k) and
    sum_j q_j = m. The exact entropy is H = H_k + T with T = -sum_j q_j log q_j.
    T is a concave function of q over the polytope {0 <= q_j <= p_min, sum q_j = m}:

    * upper bound: the maximum of a symmetric concave function under a sum constraint is at
      the uniform point q_j = m / n (feasible because m <= n p_min), so
      T <= -m log(m / n) = m log(n / m).
    * lower bound: the minimum of a concave function over a polytope is at a vertex; the
      vertices put J = floor(m / p_min) tokens at p_min, one token at the remainder
      r = m - J p_min (0 <= r < p_min) and the rest at 0, so
      T >= J p_min (-log p_min) - r log r.
      (This is tighter than the simpler bound T >= m (-log p_min), which follows from
      -log q_j >= -log p_min, because -log r >= -log p_min.)

    Both bounds are 0 when m = 0, so a distribution whose top-k covers all the mass is exact;
    both equal m (-log p_min) when m = n p_min (the tail is uniform at the k-th probability).
    Point estimate (decision): the midpoint (lower + upper) / 2. Real tails lie between the
    two extremes; on the families below the midpoint was the most robust of {lower, upper,
    midpoint, a power-law tail extrapolation}. Measured absolute error of the midpoint for
    k = 20, V = 32000 (float64, 200-2000 rows each): Gaussian logits with std 1/2/3/4/6:
    mean 0.88/0.53/0.12/0.31/0.13 nats (max 0.98/0.66/0.28/0.67/0.52), exact H 9.9/8.4/6.1/4.1/2.1;
    Dirichlet(alpha=0.01/0.1/1) samples: mean 1.03/0.02/0.58 (max 1.15/0.07/0.63);
    Zipf-like (logit = -s log rank + N(0, 0.5^2), s = 1.0/1.2/1.5/2.0): mean 0.64/0.14/0.10/0.05
    (max 0.74/0.25/0.17/0.10); peaked (one logit boosted by U(0, 20)): mean 0.49 (max 0.95).
    The error is driven by the tail mass: it is small exactly where LLM sampling
    distributions usually are (top-20 covering >90% of the mass), and the bracket width
    ``upper - lower`` is returned so callers can see when the estimate is loose. For ranking
    positions inside one response (bifurcation, METHOD.md step 2) a monotone estimate is
    enough; use exact entropies (``entropy_from_logits``) when absolute values matter.
    tests/test_core_entropy.py re-measures the error for k = 20, V = 4096 and prints it.

    Returns:
        ``EntropyEstimate`` of ``[...]`` tensors (fp32, or fp64 for fp64 input).

    Raises:
        ValueError: NaN/+inf input, k > V, a row entirely -inf, and, beyond the rounding
            tolerance above: positive log-probs, top-k probabilities summing above 1, or a tail
            mass that cannot fit in V - k tokens each <= p_min (wrong ``vocab_size`` or
            log-probs not from one full distribution). The message names the first bad row.
    """
    if not torch.is_floating_point(topk_logprobs):
        raise TypeError(f"topk_logprobs must be a floating-point tensor, got {topk_logprobs.dtype}")
    if topk_logprobs.ndim == 0 or topk_logprobs.shape[-1] == 0:
        raise ValueError(f"topk_logprobs must have a non-empty last dimension, got shape {tuple(topk_logprobs.shape)}")
    k = topk_logprobs.shape[-1]
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < k:
        raise ValueError(f"vocab_size must be an int >= k={k}, got {vocab_size!r}")
    if eps is None:
        eps = torch.finfo(topk_logprobs.dtype).eps
    if not isinstance(eps, (int, float)) or not 0 <= eps < 1:
        raise ValueError(f"eps must be a number in [0, 1), got {eps!r}")
    _check_finite_or_neg_inf(topk_logprobs, "topk_logprobs")
    out_dtype = torch.float64 if topk_logprobs.dtype == torch.float64 else torch.float32
    # float64 inside: m = 1 - sum p suffers cancellation when the top-k covers nearly all mass.
    raw = topk_logprobs.to(torch.float64)
    finite = torch.isfinite(raw)  # the rest is -inf: probability exactly 0, no rounding
    tol = torch.where(finite, eps * (2.0 * raw.abs() + (vocab_size + 2)), torch.zeros_like(raw))
    if bool((raw > tol).any()):
        row = _first_row((raw > tol).any(dim=-1))
        raise ValueError(
            f"topk_logprobs contains positive values beyond float rounding (row {row}: max "
            f"{float(raw[row].max()):.3e}, tolerance eps*(V+2) = {eps * (vocab_size + 2):.3e}): "
            "these are not log-probabilities"
        )
    log_p = raw.clamp(max=0.0)
    p = log_p.exp()
    total = p.sum(dim=-1)
    if bool((total == 0).any()):
        raise ValueError("a row of topk_logprobs is entirely -inf (zero probability mass)")
    known = -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(dim=-1)
    p_low, p_high = p * torch.exp(-tol), p * torch.exp(tol)  # exact probabilities lie in between
    total_low = p_low.sum(dim=-1)
    if bool((total_low > 1.0).any()):
        row = _first_row(total_low > 1.0)
        raise ValueError(
            f"top-k probabilities sum to {float(total[row]):.6f} (row {row}), above 1 by more than "
            f"float rounding allows ({float(total[row] - total_low[row]):.3e} at eps={eps:.3e}): "
            "not log-probs of a single distribution"
        )
    inf = torch.full_like(p, float("inf"))
    # p_min over the tokens with non-zero probability (a -inf entry means "fewer than k").
    p_min = torch.where(p > 0, p, inf).min(dim=-1).values
    p_min_high = torch.where(p > 0, p_high, inf).min(dim=-1).values
    n_tail = vocab_size - k
    capacity = n_tail * p_min
    excess = (1.0 - p_high.sum(dim=-1)) - n_tail * p_min_high  # > 0: no rounding of the input fits
    if bool((excess > 0).any()):
        row = _first_row(excess > 0)
        raise ValueError(
            f"tail mass {float(1.0 - total[row]):.6f} (row {row}) cannot be spread over V-k={n_tail} "
            f"tokens each no more likely than the k-th token (p_k = {float(p_min[row]):.3e}, capacity "
            f"{float(capacity[row]):.6f}), not even within float rounding (tolerance "
            f"{float(1.0 - total[row] - capacity[row] - excess[row]):.3e} at eps={eps:.3e}): vocab_size "
            "is too small or the log-probs are not the top-k of the full distribution"
        )
    # Within rounding: clamp m into [0, capacity], the premise of the bracket below.
    tail_mass = torch.minimum((1.0 - total).clamp(min=0.0), capacity)
    has_tail = tail_mass > 0
    safe_m = torch.where(has_tail, tail_mass, torch.ones_like(tail_mass))
    upper_tail = torch.where(
        has_tail, tail_mass * (torch.log(torch.tensor(float(max(n_tail, 1)), dtype=torch.float64)) - safe_m.log()), 0.0
    )
    num_full = torch.floor(tail_mass / p_min)
    remainder = (tail_mass - num_full * p_min).clamp(min=0.0)
    safe_r = torch.where(remainder > 0, remainder, torch.ones_like(remainder))
    lower_tail = num_full * p_min * (-p_min.log()) + torch.where(remainder > 0, -remainder * safe_r.log(), 0.0)
    lower_tail = torch.minimum(lower_tail, upper_tail)  # equal up to rounding when the tail is uniform at p_min
    lower = known + lower_tail
    upper = known + upper_tail
    estimate = 0.5 * (lower + upper)
    return EntropyEstimate(
        estimate=estimate.to(out_dtype),
        lower=lower.to(out_dtype),
        upper=upper.to(out_dtype),
        tail_mass=tail_mass.to(out_dtype),
    )
