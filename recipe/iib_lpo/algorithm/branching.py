"""Bifurcation point selection (METHOD.md step 2).

For one response r with per-token entropies H[0..T-1], the candidate window is
positions t_min <= t < T - t_margin; Omega is the ceil(rho * |window|) positions of the window
with the highest entropy (at least 1; ties broken towards the earlier position); t* is drawn
uniformly from Omega (``strategy="uniform"``, the paper) or is Omega's highest-entropy position
(``strategy="argmax"``, what the authors' code did).

Convention for t*: it is the index (into the response tokens) of the first token that is
RE-generated. A branch keeps r[:t*] as its prefix and samples a new continuation from
position t* on, steered by the latent; the high-entropy token r[t*] itself is therefore
resampled, which is the point: H[t*] is the entropy of the distribution the token at t* was
drawn from, so that is where the policy hesitated and where a different choice is cheapest.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "BranchingConfig",
    "ForkDecision",
    "ForkRule",
    "FORK_RULES",
    "NO_FORK_TOO_SHORT",
    "FORK_OK",
    "candidate_positions",
    "choose_fork_position",
    "choose_fork_positions",
    "SIBLING_FIRST_TOKENS",
    "gumbel_top_k",
    "sibling_first_tokens",
    "without_replacement_log_ratios",
]

FORK_OK = "ok"
NO_FORK_TOO_SHORT = "too_short"
# BranchingConfig.sibling_first_tokens: how the K siblings of one fork point pick their token at t*
SIBLING_FIRST_TOKENS = ("independent", "distinct")


@dataclass(frozen=True)
class ForkRule:
    """How t* is picked from Omega (positions sorted by descending entropy, ties: earlier first).

    ``pick(omega, generator)`` returns one element of the non-empty ``omega``; ``generator`` is a
    ``torch.Generator`` when ``random`` is True (callers must then pass a seed or generator) and
    None otherwise. A new fork rule is one entry in ``FORK_RULES``; ``BranchingConfig.strategy``
    selects it by name.
    """

    pick: Callable[[tuple[int, ...], torch.Generator | None], int]
    random: bool


def _pick_uniform(omega: tuple[int, ...], generator: torch.Generator | None) -> int:
    return omega[int(torch.randint(len(omega), (1,), generator=generator).item())]


def _pick_argmax(omega: tuple[int, ...], generator: torch.Generator | None) -> int:
    return omega[0]


FORK_RULES: dict[str, ForkRule] = {
    "uniform": ForkRule(_pick_uniform, random=True),  # the paper: t* ~ Uniform(Omega)
    "argmax": ForkRule(_pick_argmax, random=False),  # the authors' code: the highest-entropy position
}


@dataclass(frozen=True)
class BranchingConfig:
    """Knobs of the bifurcation-point rule (METHOD.md step 2; the recipe YAML mirrors them).

    Attributes:
        rho: fraction of the candidate window kept as high-entropy set Omega. Default 0.05:
            the paper's "top 5% entropy tokens" (the 80/20 high-entropy-minority finding).
            ``ceil(rho * window)`` positions, never fewer than 1.
        t_min: number of leading response tokens that are never fork points. Default 1, so
            t* >= 1 and every branch shares at least one generated token with its parent
            (t* = 0 would be a fresh sample of the whole response: no shared prefix to reuse
            from the prefix cache and a latent conditioned on the question only).
        t_margin: number of trailing response tokens that are never fork points. Default 8:
            forking inside the last few tokens can only re-render the final answer line
            ("\\boxed{...}" plus EOS is ~5-8 tokens), i.e. a near-duplicate trajectory that
            explores no reasoning; small enough not to matter for math responses of hundreds
            of tokens. Decision (the paper does not say); set 0 to allow every position.
        strategy: "uniform" (paper: t* ~ Uniform(Omega)) or "argmax" (authors' code:
            highest-entropy position; ties -> earliest).
        sibling_first_tokens: "independent" (default: each sibling samples its token at t*
            on its own, as a plain resample) or "distinct" (the K siblings' tokens at t* are
            drawn WITHOUT replacement from the fork's sampling distribution,
            :func:`sibling_first_tokens`, then each continues plainly: siblings differ from
            their first token; the idea of LATR, arXiv 2510.24302; README "The latent").
    """

    rho: float = 0.05
    t_min: int = 1
    t_margin: int = 8
    strategy: str = "uniform"
    sibling_first_tokens: str = "independent"

    def __post_init__(self) -> None:
        if not (isinstance(self.rho, (int, float)) and 0.0 < self.rho <= 1.0):
            raise ValueError(f"BranchingConfig.rho must be in (0, 1], got {self.rho!r}")
        for name in ("t_min", "t_margin"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"BranchingConfig.{name} must be a non-negative int, got {value!r}")
        if self.strategy not in FORK_RULES:
            raise ValueError(f"BranchingConfig.strategy must be one of {tuple(FORK_RULES)}, got {self.strategy!r}")
        if self.sibling_first_tokens not in SIBLING_FIRST_TOKENS:
            raise ValueError(f"BranchingConfig.sibling_first_tokens must be one of {SIBLING_FIRST_TOKENS}, "
                             f"got {self.sibling_first_tokens!r}")

    @property
    def needs_seed(self) -> bool:
        """True when the strategy draws t* at random (a seed or generator must be passed)."""
        return FORK_RULES[self.strategy].random


@dataclass(frozen=True)
class ForkDecision:
    """Where (and whether) to fork one response.

    Attributes:
        position: t*, index of the first re-generated response token, or None for no fork.
        entropy: H[t*] (nats) or None.
        reason: ``FORK_OK`` or ``NO_FORK_TOO_SHORT`` (the window t_min <= t < T - t_margin is
            empty); callers log/count non-"ok" decisions.
        num_tokens: T, the response length that was considered.
        candidates: Omega, sorted by descending entropy (ties: earlier first); empty on no fork.
    """

    position: int | None
    entropy: float | None
    reason: str
    num_tokens: int
    candidates: tuple[int, ...] = ()

    @property
    def should_fork(self) -> bool:
        return self.position is not None


def _as_entropy_vector(entropies: torch.Tensor | Sequence[float]) -> torch.Tensor:
    vec = entropies if isinstance(entropies, torch.Tensor) else torch.as_tensor(list(entropies), dtype=torch.float64)
    if vec.ndim != 1:
        raise ValueError(f"entropies of one response must be 1-D [T], got shape {tuple(vec.shape)}")
    vec = vec.detach().to("cpu", torch.float64)
    nan = torch.isnan(vec)
    if bool(nan.any()):
        raise ValueError(f"entropy is NaN at response position(s) {torch.nonzero(nan).flatten().tolist()[:10]}")
    inf = torch.isinf(vec)
    if bool(inf.any()):
        raise ValueError(f"entropy is infinite at response position(s) {torch.nonzero(inf).flatten().tolist()[:10]}")
    # Entropies are >= 0; allow tiny negative rounding noise from upstream fp arithmetic.
    neg = vec < -1e-4
    if bool(neg.any()):
        raise ValueError(f"entropy is negative at response position(s) {torch.nonzero(neg).flatten().tolist()[:10]}")
    return vec


def _check_randomness(config: BranchingConfig, generator: torch.Generator | None, seed: int | None) -> None:
    if config.needs_seed and (generator is None) == (seed is None):
        raise ValueError(f"strategy={config.strategy!r} needs exactly one of generator= or seed= (reproducible draws)")


def candidate_positions(entropies: torch.Tensor | Sequence[float], config: BranchingConfig) -> tuple[int, ...]:
    """Omega for one response: the top ceil(rho * |window|) window positions by entropy.

    Sorted by descending entropy, ties broken towards the earlier position (deterministic).
    Empty when the window t_min <= t < T - t_margin is empty.
    """
    vec = _as_entropy_vector(entropies)
    start, stop = config.t_min, vec.shape[0] - config.t_margin
    if stop <= start:
        return ()
    window = vec[start:stop]
    # ceil with a small guard so float noise (0.07 * 100 = 7.000000000000001) does not add one.
    count = max(1, math.ceil(config.rho * window.shape[0] - 1e-9))
    # stable sort on -H keeps the earlier position first among equal entropies
    order = torch.sort(-window, stable=True).indices[:count]
    return tuple(int(i) + start for i in order.tolist())


def choose_fork_position(
    entropies: torch.Tensor | Sequence[float],
    config: BranchingConfig = BranchingConfig(),
    *,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> ForkDecision:
    """Pick the bifurcation point t* of one response (see module docstring for the convention).

    Args:
        entropies: ``[T]`` per-token entropies of the response (T = its real length, no padding).
        config: the rule's knobs.
        generator / seed: randomness for ``strategy="uniform"``; exactly one must be given for
            that strategy (reproducibility is required, there is no hidden global RNG use).
            ``argmax`` needs neither. A CPU ``torch.Generator`` is advanced by one draw.

    Returns:
        ``ForkDecision``; a response whose window is empty gets position None and reason
        ``NO_FORK_TOO_SHORT`` (never an exception, never a silent t* = 0).

    Raises:
        ValueError: NaN / inf / negative entropies (naming the positions), non-1-D input, or
            missing/duplicated randomness for the uniform strategy.
    """
    vec = _as_entropy_vector(entropies)
    _check_randomness(config, generator, seed)
    omega = candidate_positions(vec, config)
    if not omega:
        return ForkDecision(position=None, entropy=None, reason=NO_FORK_TOO_SHORT, num_tokens=int(vec.shape[0]))
    gen = None
    if config.needs_seed:
        gen = generator if generator is not None else torch.Generator().manual_seed(int(seed))
    position = FORK_RULES[config.strategy].pick(omega, gen)
    return ForkDecision(
        position=position,
        entropy=float(vec[position]),
        reason=FORK_OK,
        num_tokens=int(vec.shape[0]),
        candidates=omega,
    )


def choose_fork_positions(
    entropies: Sequence[torch.Tensor | Sequence[float]] | torch.Tensor,
    config: BranchingConfig = BranchingConfig(),
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    lengths: Sequence[int] | torch.Tensor | None = None,
) -> list[ForkDecision]:
    """Batched ``choose_fork_position``.

    Args:
        entropies: a list of ``[T_i]`` vectors, or a right-padded ``[B, T]`` tensor together
            with ``lengths`` (the real length of each row; required for a 2-D tensor so that
            padding is never mistaken for low-entropy tokens).
        seed / generator: one shared generator (created from ``seed``) is advanced row by
            row, so the result depends only on the seed and the inputs, not on batching.
    """
    _check_randomness(config, generator, seed)
    if isinstance(entropies, torch.Tensor):
        if entropies.ndim != 2:
            raise ValueError(f"a tensor of entropies must be [B, T], got shape {tuple(entropies.shape)}")
        if lengths is None:
            raise ValueError("lengths is required with a padded [B, T] entropy tensor")
        lengths_list = [int(x) for x in (lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths)]
        if len(lengths_list) != entropies.shape[0]:
            raise ValueError(f"{len(lengths_list)} lengths for {entropies.shape[0]} rows")
        for i, n in enumerate(lengths_list):
            if not 0 <= n <= entropies.shape[1]:
                raise ValueError(f"lengths[{i}]={n} outside [0, {entropies.shape[1]}]")
        rows = [entropies[i, :n] for i, n in enumerate(lengths_list)]
    else:
        if lengths is not None:
            raise ValueError("lengths is only meaningful with a padded [B, T] tensor")
        rows = list(entropies)
    gen = generator
    if gen is None and seed is not None:
        gen = torch.Generator().manual_seed(int(seed))
    decisions = []
    for i, row in enumerate(rows):
        try:
            decisions.append(choose_fork_position(row, config, generator=gen if config.needs_seed else None))
        except ValueError as err:
            raise ValueError(f"response {i}: {err}") from err
    return decisions


# -- the siblings' tokens at t* ("distinct") ---------------------------------------------------------


def gumbel_top_k(logprobs: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``min(k, support)`` DISTINCT indices drawn without replacement from ``softmax(logprobs)`` [V].

    Gumbel-top-k: the k largest of ``logprobs + Gumbel noise``, in decreasing order, are a draw of
    k items without replacement, in the order sequential sampling would pick them (the first is
    an ordinary sample). Entries with log-prob -inf (e.g. outside top-p) are never returned, so
    fewer than k come back when the support is smaller than k.
    """
    if logprobs.dim() != 1:
        raise ValueError(f"logprobs must be a vector [V], got shape {tuple(logprobs.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if bool(torch.isnan(logprobs).any()):
        raise ValueError("logprobs contain NaN")
    uniform = torch.rand(logprobs.shape, generator=generator, device=logprobs.device, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-300)))
    keys = logprobs.to(torch.float64) + gumbel
    support = int(torch.isfinite(logprobs).sum())
    return torch.topk(keys, min(k, support)).indices


def without_replacement_log_ratios(logprobs: torch.Tensor, tokens: Sequence[int]) -> list[float]:
    """log pi_arm(y_k) - log p(y_k) for siblings k whose first tokens were drawn without replacement.

    In the sequential view, sibling k draws from p renormalised over the tokens its earlier
    siblings did not take: pi_arm(y_k) = p(y_k) / (1 - sum_{j<k} p(y_j)), so the log ratio is
    ``-log(1 - sum_{j<k} p(y_j))`` (0 for the first sibling, >= 0 after). ``logprobs`` [V]: the
    (normalised) distribution the ratio is taken against.
    """
    probs = logprobs.to(torch.float64).exp()
    out, taken = [], 0.0
    for token in tokens:
        out.append(-math.log1p(-min(taken, 1.0 - 1e-12)))
        taken += float(probs[int(token)])
    return out


def sibling_first_tokens(
    topk_ids: Sequence[int], topk_logprobs: Sequence[float] | torch.Tensor, num_siblings: int, seed: int
) -> tuple[list[int], list[float]]:
    """The tokens at t* of the K siblings of one fork point under ``sibling_first_tokens="distinct"``.

    ``topk_ids`` / ``topk_logprobs`` [k]: the fork row the engine returned for the parent's token
    at t* (the k most likely tokens of the sampling distribution, after temperature / top-p, and
    their log-probs; -inf outside top-p). The draw is over these k tokens renormalised (mass S),
    so every sibling of one fork point computes the same draw from the same ``seed``.

    Returns (tokens, behaviour log-probs), ``min(num_siblings, support)`` of each, in draw order:
    sibling j's token is what sequential sampling without replacement picks j-th (Gumbel-top-k),
    and its behaviour log-prob is that of the distribution it was drawn from, p renormalised over
    the tokens its earlier siblings did not take: ``log p_j - log(S - sum_{i<j} p_i)``. Siblings
    beyond the support are the caller's (plain resamples).
    """
    lp = torch.as_tensor(topk_logprobs, dtype=torch.float64).flatten()
    if lp.numel() != len(topk_ids) or lp.numel() == 0:
        raise ValueError(f"a fork row needs as many ids as log-probs (>= 1), got {len(topk_ids)} and {lp.numel()}")
    if num_siblings < 1:
        raise ValueError(f"num_siblings must be >= 1, got {num_siblings}")
    if not bool(torch.isfinite(lp).any()):
        raise ValueError("the fork row has no finite log-prob")
    order = gumbel_top_k(lp, num_siblings, torch.Generator().manual_seed(int(seed))).tolist()
    probs = lp.exp()
    remaining = float(probs.sum())
    tokens, behaviour = [], []
    for index in order:
        p = float(probs[index])
        tokens.append(int(topk_ids[index]))
        behaviour.append(float(lp[index]) - math.log(max(remaining, p)))  # max: float rounding near the last
        remaining -= p
    return tokens, behaviour
