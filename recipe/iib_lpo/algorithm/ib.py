"""Information-Bottleneck scores, Top-N branch filter and iterative rounds (METHOD.md step 6).

S_IB(r) = beta * I_hat(r; a) - I_hat(q; r): a trajectory should be informative about the answer
a (first term) while carrying little of the question/prompt "noise" (second term: repetition,
echoing the question, length, filler). The paper's estimator is not available, so the estimators are
pluggable (``IBConfig.estimator``) and each returns a bounded float; the bounds are stated per
estimator and checked in tests/test_core_ib.py.

Registry: ``@register_ib_estimator("name", bounds=..., needs_token_advantages=...,
rounds_unsupported=...)`` on a function ``fn(traj: IBInputs, config: IBConfig) -> float``
(``IBEstimatorSpec``: a new estimator is this one registration); ``get_ib_estimator(name)``;
``score_trajectories(list, config)``. Registered: ``ngram`` (default), ``entropy``, ``ibro``; every
registered estimator is one the trainer can score with (its inputs are what the rollout and the
trainer supply).

Token-level estimators (``entropy``, ``ibro``) average over the trajectory's OWN tokens: for a
branch, the continuation it generated after its inherited prefix (``own_tokens``), never the
prefix it shares with its fork source. The prefix was sampled by the ancestor; averaging over it
would pull every sibling's score towards the parent's and let a long shared prefix outweigh the
continuation the Top-N filter is choosing between. The rollout (ranked rounds) and the trainer
both build the token vectors with ``own_tokens``, so they compute the same S_IB for the same row.

Tokenisation for the text statistics (decision): lower-cased words and single punctuation
marks, ``re.findall(r"\\w+|[^\\w\\s]", text.lower())`` -- cheap, model-independent, and
deterministic; "3.14" becomes ["3", ".", "14"], LaTeX "\\frac{1}{2}" becomes
["\\\\", "frac", "{", "1", "}", "{", "2", "}"]. Lengths for the length term are policy tokens
(``num_tokens``), not these words, so ``max_tokens`` is the rollout's response budget.

Where the text statistics are computed (decision): rep4, echo and filler (:class:`TextStats`) depend
on the trajectory alone, so the agent loop computes them as each trajectory finishes and stores them
in ``extra_fields``; the trainer's step only weighs them (BENCHMARKS.md: 0.85 s -> 0.05 s for 256 x
4000-token rows) and refuses a row without them. ``IBInputs.text_stats=None`` (tests, direct
callers) computes them from ``IBInputs.response``.

Filler (decision, :func:`filler_fraction`): the share of the response's words that lie in
sentences carrying no mathematical content of their own. Repetition, echo and length cannot tell
a concise derivation from one whose reasoning is replaced by hedges and paraphrases of the same
length (no repeated 4-gram, no 4-gram copied from the question): both score the same. A sentence
counts as mathematical when it contains an operator or relation symbol, a LaTeX command, a
single-letter variable, or a number that does not already occur in the question (restating the
given numbers adds nothing). Bounded in [0, 1], a few regex passes per sentence, deterministic.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "IBConfig",
    "IBInputs",
    "register_ib_estimator",
    "IBEstimatorSpec",
    "ib_estimator_spec",
    "get_ib_estimator",
    "list_ib_estimators",
    "ib_score_bounds",
    "score_trajectories",
    "ngram_ib_score",
    "word_tokens",
    "repeated_ngram_fraction",
    "echo_fraction",
    "filler_fraction",
    "TextStats",
    "text_stats",
    "question_text",
    "topn_keep_mask",
    "resolve_top_n",
    "best_branch_per_fork_source",
    "own_tokens",
    "trajectory_ib_inputs",
]

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
NGRAM = 4  # METHOD.md: 4-gram repetition and echo

# filler_fraction: sentence ends are . ! ? followed by whitespace (so "3.5" never splits) or a
# line break; a sentence is "mathematical" when one of the patterns below matches in it.
_SENTENCE_SPLIT_RE = re.compile(r"(?<=[.!?])\s+|\n+")
_NUMBER_RE = re.compile(r"\d+(?:[.,]\d+)*")
_MATH_SYMBOL_RE = re.compile(
    r"[=+/^<>\\{}|_$%\u00d7\u00f7\u00b1\u2264\u2265\u2260\u2248\u221a\u2211\u220f\u222b\u03c0\u221e]"
    # "-" and "*" only between operands: "24 - 18", "3*4", "2 * x"; not a hyphen ("step-by-step"),
    # a bullet ("- First") or markdown emphasis ("**Answer**"). Minus with a variable is caught
    # by the variable pattern, unary minus by its number.
    r"|\d\s*[-\u2212]\s*\d|[\w)]\s*\*\s*[\w(]"
)
# a single-letter variable: one letter standing alone, except the words "a" and "I" and the
# pieces of "e.g." / "i.e." / "it's" (a neighbouring word char, apostrophe or "." + letter)
_VARIABLE_RE = re.compile(r"(?<![\w'\u2019.])(?![aAiI](?![\w'\u2019]))[A-Za-z](?![\w'\u2019]|\.\w)")


@dataclass(frozen=True)
class IBConfig:
    """Knobs of the IB score and filter (METHOD.md step 6; the recipe YAML mirrors them).

    Attributes:
        estimator: registered estimator name; "ngram" (default, text statistics, no extra
            model calls), "entropy", "ibro".
        beta: weight of I_hat(r; a). Default 1.0, chosen >= w_rep + w_echo + w_len + w_fill
            (= 1.0; the penalty is strictly below the sum because rep4 < 1) so that with
            I_hat(r; a) = r_v in {0, 1} every correct trajectory outranks every wrong one: the
            IB terms only reorder trajectories with the same verifiable reward.
        w_rep: weight of the 4-gram repetition rate (loops, METHOD.md case study). Default 0.5,
            the largest penalty: a repetitive loop is the failure the paper's case study ranks
            last.
        w_echo: weight of the fraction of the response's 4-grams copied from the question.
            Default 0.2: restating the problem carries no new information about a.
        w_len: weight of min(1, num_tokens / max_tokens). Default 0.2: conciseness
            (IB compression) breaks ties between otherwise equal correct answers.
        w_fill: weight of :func:`filler_fraction` (share of the response's words in sentences
            with no math of their own: hedges, paraphrased restatements). Default 0.1: separates
            a derivation from reasoning replaced by same-length filler (which rep4, echo and
            length score identically) while keeping beta >= w_rep + w_echo + w_len + w_fill
            (= 1.0); with rep4 < 1 always (a response has at least one distinct 4-gram) the
            penalty stays strictly below beta, so every correct trajectory still outranks every
            wrong one. 0 = the estimator without the filler term.
        w_ent: ("entropy" estimator) weight of min(1, mean token entropy / entropy_ref).
            Default 0.2.
        entropy_ref: ("entropy") mean entropy (nats) at which the information-rate term
            saturates. Default 2.0 nats (a very uncertain policy; typical math rollouts
            average well below 1).
        ibro_scale: ("ibro") S = beta * tanh(mean_t(A_t * H_t) / ibro_scale). Default 1.0.
        top_n: branches kept per fork source; None -> ceil(K / 2) of that source's K branches
            (METHOD.md default), K or more keeps all (ablation "no filter"), 0 keeps only the
            originals.
        rounds: R, how many fork rounds per initial rollout ("Iterative", METHOD.md decision;
            default 1 = the paper's parallel K forks, no re-forking).
    """

    estimator: str = "ngram"
    beta: float = 1.0
    w_rep: float = 0.5
    w_echo: float = 0.2
    w_len: float = 0.2
    w_fill: float = 0.1
    w_ent: float = 0.2
    entropy_ref: float = 2.0
    ibro_scale: float = 1.0
    top_n: int | None = None
    rounds: int = 1

    def __post_init__(self) -> None:
        for name in ("beta", "w_rep", "w_echo", "w_len", "w_fill", "w_ent"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"IBConfig.{name} must be a finite number >= 0, got {value!r}")
        for name in ("entropy_ref", "ibro_scale"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"IBConfig.{name} must be a finite number > 0, got {value!r}")
        if self.top_n is not None and (not isinstance(self.top_n, int) or self.top_n < 0):
            raise ValueError(f"IBConfig.top_n must be None or an int >= 0, got {self.top_n!r}")
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"IBConfig.rounds must be an int >= 1, got {self.rounds!r}")


@dataclass(frozen=True)
class TextStats:
    """The text statistics of one (question, response) pair, each in [0, 1]: ``rep4``
    (:func:`repeated_ngram_fraction`), ``echo`` (:func:`echo_fraction`), ``filler``
    (:func:`filler_fraction`). They depend on the trajectory alone, so the agent loop computes them
    as the trajectory finishes and the trainer's step only combines them with the weights."""

    rep4: float
    echo: float
    filler: float

    FIELDS = {"rep4": "iib_text_rep4", "echo": "iib_text_echo", "filler": "iib_text_filler"}  # in extra_fields

    def __post_init__(self):
        for name in ("rep4", "echo", "filler"):
            value = getattr(self, name)
            if not (isinstance(value, numbers.Real) and 0.0 <= value <= 1.0):
                raise ValueError(f"TextStats.{name} must be a number in [0, 1], got {value!r}")

    def to_extra_fields(self) -> dict[str, float]:
        return {field: float(getattr(self, name)) for name, field in self.FIELDS.items()}

    @classmethod
    def from_extra_fields(cls, extra_fields: dict) -> TextStats | None:
        """The stats the agent loop stored, or None when the row has none (older rollouts)."""
        values = {name: extra_fields.get(field) for name, field in cls.FIELDS.items()}
        if all(v is None for v in values.values()):
            return None
        return cls(**values)


@dataclass(frozen=True)
class IBInputs:
    """Everything an estimator may look at for one trajectory.

    Attributes:
        question: raw problem text (``extra_info.question``).
        response: decoded response text (for a branch: parent prefix + continuation); read only
            when ``text_stats`` is None.
        reward: verifiable reward r_v in [0, 1].
        num_tokens: response length in policy tokens.
        max_tokens: the rollout's response-length budget (> 0).
        token_entropies: per-token entropies of the trajectory's OWN tokens ("entropy", "ibro"):
            for a branch only its continuation, ``own_tokens(entropies, prefix_length, num_tokens)``.
        token_advantages: advantages over the same tokens as ``token_entropies`` (or a scalar
            broadcast over them) ("ibro").
        text_stats: ``text_stats(question, response)`` computed earlier (the agent loop stores it
            in ``extra_fields`` as each trajectory finishes); None = computed from the text here.
    """

    question: str
    response: str
    reward: float
    num_tokens: int
    max_tokens: int
    token_entropies: torch.Tensor | None = None
    token_advantages: torch.Tensor | None = None
    text_stats: TextStats | None = None


IBEstimator = Callable[[IBInputs, IBConfig], float]


@dataclass(frozen=True)
class IBEstimatorSpec:
    """One registered IB estimator: everything the recipe needs to know about it.

    Attributes:
        score: ``fn(traj, config) -> float``.
        bounds: ``fn(config) -> (low, high)``, the closed interval every score lies in (tests
            and asserts), or None when the estimator documents none.
        needs_token_advantages: the trainer must fill ``IBInputs.token_advantages`` (the GRPO
            z(r_v) of each row, broadcast over its tokens).
        rounds_unsupported: why the rollout cannot rank a round's branches with it
            (``iib_lpo.ib.rounds`` > 1 is then refused with this reason); None when it can.
    """

    score: IBEstimator
    bounds: Callable[[IBConfig], tuple[float, float]] | None = None
    needs_token_advantages: bool = False
    rounds_unsupported: str | None = None


_IB_ESTIMATORS: dict[str, IBEstimatorSpec] = {}


def register_ib_estimator(
    name: str,
    *,
    bounds: Callable[[IBConfig], tuple[float, float]] | None = None,
    needs_token_advantages: bool = False,
    rounds_unsupported: str | None = None,
) -> Callable[[IBEstimator], IBEstimator]:
    """Decorator registering ``fn(traj: IBInputs, config: IBConfig) -> float`` under ``name``,
    with the properties of ``IBEstimatorSpec``.

    Registering a different function under a taken name raises (silent replacement would change
    what a config name means).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"IB estimator name must be a non-empty string, got {name!r}")

    def decorator(fn: IBEstimator) -> IBEstimator:
        if name in _IB_ESTIMATORS and _IB_ESTIMATORS[name].score is not fn:
            raise ValueError(f"IB estimator {name!r} is already registered to {_IB_ESTIMATORS[name].score!r}")
        _IB_ESTIMATORS[name] = IBEstimatorSpec(fn, bounds, needs_token_advantages, rounds_unsupported)
        return fn

    return decorator


def ib_estimator_spec(name: str) -> IBEstimatorSpec:
    if name not in _IB_ESTIMATORS:
        raise ValueError(f"unknown IB estimator {name!r}; known estimators: {sorted(_IB_ESTIMATORS)}")
    return _IB_ESTIMATORS[name]


def get_ib_estimator(name: str) -> IBEstimator:
    return ib_estimator_spec(name).score


def list_ib_estimators() -> list[str]:
    return sorted(_IB_ESTIMATORS)


# ----------------------------------------------------------------------------- text statistics


def word_tokens(text: str) -> list[str]:
    """Lower-cased words and single punctuation marks (see module docstring)."""
    if not isinstance(text, str):
        raise TypeError(f"expected str, got {type(text).__name__}")
    return _TOKEN_RE.findall(text.lower())


def _ngrams(tokens: Sequence[str], n: int = NGRAM) -> list[tuple[str, ...]]:
    return list(zip(*(tokens[i:] for i in range(n))))


def repeated_ngram_fraction(tokens: Sequence[str], n: int = NGRAM) -> float:
    """rep_n = 1 - (#distinct n-grams / #n-grams), in [0, 1); 0 when there are no n-grams.

    "Fraction of repeated 4-grams": the share of n-gram occurrences that repeat an earlier one.
    A loop of one sentence repeated c times gives about 1 - 1/c.
    """
    grams = _ngrams(tokens, n)
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def echo_fraction(question_tokens: Sequence[str], response_tokens: Sequence[str], n: int = NGRAM) -> float:
    """Fraction of the response's n-gram occurrences that also occur in the question, in [0, 1]."""
    grams = _ngrams(response_tokens, n)
    if not grams:
        return 0.0
    question_grams = set(_ngrams(question_tokens, n))
    return sum(g in question_grams for g in grams) / len(grams)


def filler_fraction(question: str, response: str) -> float:
    """Share of the response's words (:func:`word_tokens`) in sentences without math, in [0, 1].

    The response is split into sentences at . ! ? followed by whitespace and at line breaks. A
    sentence is mathematical when it contains an operator / relation symbol (= + / ^ < > and
    their Unicode forms; - and * only between operands, so hyphens, bullets and markdown
    emphasis do not count), a backslash (LaTeX command), braces, $ or %,
    a single-letter variable (not "a" / "I"), or a number that does not occur in ``question``.
    Every other sentence (hedges, plans without numbers, restatements of the given data) is
    filler. Returns (#words in filler sentences) / (#words), 0.0 for a response without words.
    Word-weighted, so a long filler sentence counts more than a short one.
    """
    if not isinstance(question, str) or not isinstance(response, str):
        raise TypeError("filler_fraction expects str question and response")
    given = set(_NUMBER_RE.findall(question))
    total = filler = 0
    for sentence in _SENTENCE_SPLIT_RE.split(response):
        n = len(word_tokens(sentence))
        if n == 0:
            continue
        total += n
        mathematical = (
            _MATH_SYMBOL_RE.search(sentence) is not None
            or _VARIABLE_RE.search(sentence) is not None
            or any(number not in given for number in _NUMBER_RE.findall(sentence))
        )
        if not mathematical:
            filler += n
    return filler / total if total else 0.0


def question_text(extra_info) -> str:
    """The problem text the IB scores compare a response with: ``extra_info.question`` (data_prep)."""
    question = extra_info.get("question") if isinstance(extra_info, dict) else None
    if not isinstance(question, str) or not question.strip():
        raise ValueError("I2B-LPO's IB scores need the problem text in extra_info.question (data_prep writes it)")
    return question


def text_stats(question: str, response: str) -> TextStats:
    """rep4, echo and filler of ``response`` (the response's words tokenised once)."""
    r_tokens = word_tokens(response)
    return TextStats(rep4=repeated_ngram_fraction(r_tokens), echo=echo_fraction(word_tokens(question), r_tokens),
                     filler=filler_fraction(question, response))


def _check_common(reward: float, num_tokens: int, max_tokens: int) -> None:
    # numbers.Real / Integral also admit numpy scalars (rewards often arrive as np.float32)
    if not (isinstance(reward, numbers.Real) and math.isfinite(reward) and 0.0 <= reward <= 1.0):
        raise ValueError(f"verifiable reward must be a finite number in [0, 1], got {reward!r}")
    if not isinstance(num_tokens, numbers.Integral) or isinstance(num_tokens, bool) or num_tokens < 0:
        raise ValueError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
    if not isinstance(max_tokens, numbers.Integral) or isinstance(max_tokens, bool) or max_tokens <= 0:
        raise ValueError(f"max_tokens must be an int > 0, got {max_tokens!r}")


def _text_compression_bounds(cfg: IBConfig) -> tuple[float, float]:
    return -(cfg.w_rep + cfg.w_echo + cfg.w_len + cfg.w_fill), cfg.beta


def _text_compression_term(traj: IBInputs, cfg: IBConfig) -> float:
    """w_rep * rep4(r) + w_echo * echo(q, r) + w_len * min(1, len / L_max) + w_fill * filler(q, r),
    in [0, w_rep + w_echo + w_len + w_fill]; the text statistics from ``traj.text_stats`` if given."""
    stats = traj.text_stats if traj.text_stats is not None else text_stats(traj.question, traj.response)
    return (cfg.w_rep * stats.rep4 + cfg.w_echo * stats.echo + cfg.w_len * min(1.0, traj.num_tokens / traj.max_tokens)
            + cfg.w_fill * stats.filler)


# ----------------------------------------------------------------------------- estimators


@register_ib_estimator("ngram", bounds=_text_compression_bounds)
def _ngram_estimator(traj: IBInputs, cfg: IBConfig) -> float:
    """I_hat(r; a) = r_v; I_hat(q; r) = text compression term.

    Bounds [-(w_rep+w_echo+w_len+w_fill), beta]."""
    _check_common(traj.reward, traj.num_tokens, traj.max_tokens)
    return cfg.beta * float(traj.reward) - _text_compression_term(traj, cfg)


def ngram_ib_score(
    question: str, response: str, reward: float, num_tokens: int, max_tokens: int, **weights: float
) -> float:
    """Default IB score of one trajectory:
    beta * r_v - (w_rep*rep4 + w_echo*echo + w_len*min(1, n/L) + w_fill*filler).

    ``weights`` may override ``beta``, ``w_rep``, ``w_echo``, ``w_len``, ``w_fill`` (IBConfig
    defaults otherwise); any other keyword raises TypeError.
    Result in [-(w_rep+w_echo+w_len+w_fill), beta].
    """
    allowed = {"beta", "w_rep", "w_echo", "w_len", "w_fill"}
    unknown = set(weights) - allowed
    if unknown:
        raise TypeError(f"ngram_ib_score got unknown weight(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    cfg = IBConfig(estimator="ngram", **weights)
    return _ngram_estimator(IBInputs(question, response, reward, num_tokens, max_tokens), cfg)


def _token_vector(x: torch.Tensor | None, what: str, estimator: str) -> torch.Tensor:
    if x is None:
        raise ValueError(f"IB estimator {estimator!r} needs {what} (got None)")
    vec = torch.as_tensor(x, dtype=torch.float64).detach().cpu().reshape(-1)
    if not bool(torch.isfinite(vec).all()):
        raise ValueError(f"{what} contains NaN/inf (IB estimator {estimator!r})")
    return vec


def own_tokens(values: torch.Tensor, prefix_length: int, num_tokens: int) -> torch.Tensor:
    """``values[prefix_length:num_tokens]``: a trajectory's per-token values on its OWN tokens.

    ``values`` is indexed in response coordinates (``[>= num_tokens]``, e.g. the actor's entropy row
    of a padded batch, or the rollout's entropies of prefix + continuation); ``prefix_length`` is the
    inherited prefix of a branch (0 for an initial rollout or a resample); ``num_tokens`` the
    response length. Raises ValueError when ``0 <= prefix_length <= num_tokens <= len(values)`` fails.
    """
    size = int(values.shape[-1]) if values.ndim else 0
    if not (isinstance(prefix_length, numbers.Integral) and isinstance(num_tokens, numbers.Integral)
            and 0 <= prefix_length <= num_tokens <= size):
        raise ValueError(f"own tokens [{prefix_length}:{num_tokens}] outside a response of {size} values "
                         "(need 0 <= prefix_length <= num_tokens <= len(values))")
    return values[..., int(prefix_length):int(num_tokens)]


def trajectory_ib_inputs(
    *,
    question: str,
    reward: float,
    num_tokens: int,
    max_tokens: int,
    prefix_length: int,
    text_stats: TextStats | None,
    entropies: torch.Tensor | None = None,
    token_advantage: torch.Tensor | float | None = None,
) -> IBInputs:
    """``IBInputs`` of one trajectory from what the rollout and the trainer hold, the one builder both
    use so they score a row the same way: ``entropies`` in response coordinates (the whole response,
    prefix included) is cut to the row's own tokens (``own_tokens(entropies, prefix_length,
    num_tokens)``); ``token_advantage`` is the row's scalar advantage broadcast over them ("ibro");
    the text statistics stand in for the text (``response=""``)."""
    return IBInputs(
        question=question, response="", reward=reward, num_tokens=num_tokens, max_tokens=max_tokens,
        token_entropies=None if entropies is None else own_tokens(entropies, prefix_length, num_tokens),
        token_advantages=None if token_advantage is None else torch.as_tensor(token_advantage),
        text_stats=text_stats,
    )


@register_ib_estimator("entropy", bounds=lambda cfg: (-(cfg.w_ent + cfg.w_len), cfg.beta))
def _entropy_estimator(traj: IBInputs, cfg: IBConfig) -> float:
    """I_hat(r; a) = r_v; I_hat(q; r) = w_ent * min(1, mean_t H_t / entropy_ref) + w_len * min(1, n/L).

    mean_t runs over ``token_entropies``, the trajectory's own tokens (module docstring); n is the
    whole response length ``num_tokens`` (a branch's prefix counts towards its length).

    The information a response carries is bounded by its total token entropy, which factors
    into information rate (mean H) times length; each factor is saturated separately so the
    term stays bounded. Bounds [-(w_ent + w_len), beta]. An empty response has rate 0.
    """
    _check_common(traj.reward, traj.num_tokens, traj.max_tokens)
    ent = _token_vector(traj.token_entropies, "token_entropies", "entropy")
    if bool((ent < -1e-4).any()):
        raise ValueError("token_entropies contains negative values")
    rate = float(ent.clamp(min=0).mean()) if ent.numel() else 0.0
    compression = cfg.w_ent * min(1.0, rate / cfg.entropy_ref) + cfg.w_len * min(1.0, traj.num_tokens / traj.max_tokens)
    return cfg.beta * float(traj.reward) - compression


@register_ib_estimator(
    "ibro",
    bounds=lambda cfg: (-cfg.beta, cfg.beta),
    needs_token_advantages=True,
    rounds_unsupported="its score is mean(A_t * H_t) with A the GRPO advantage z(r_v) over the whole prompt group, "
    "which does not exist until every session of the prompt has finished, so a round cannot be ranked by it",
)
def _ibro_estimator(traj: IBInputs, cfg: IBConfig) -> float:
    """beta * tanh(mean_t(A_t * H_t) / ibro_scale): the authors' regulariser as a score, mean_t over
    the trajectory's own tokens (module docstring).

    Bounds (-beta, beta). ``token_advantages`` may be a scalar (outcome advantage broadcast
    to all tokens) or ``[T]`` like ``token_entropies``; an empty response scores 0.
    """
    ent = _token_vector(traj.token_entropies, "token_entropies", "ibro")
    adv = _token_vector(traj.token_advantages, "token_advantages", "ibro")
    if adv.numel() == 1 and ent.numel() != 1:
        adv = adv.expand_as(ent)
    if adv.shape != ent.shape:
        raise ValueError(f"ibro: token_advantages {tuple(adv.shape)} and token_entropies {tuple(ent.shape)} differ")
    if ent.numel() == 0:
        return 0.0
    return cfg.beta * math.tanh(float((adv * ent).mean()) / cfg.ibro_scale)


def ib_score_bounds(config: IBConfig) -> tuple[float, float]:
    """Closed interval every score of ``config.estimator`` lies in (used by tests and asserts)."""
    spec = ib_estimator_spec(config.estimator)
    if spec.bounds is None:
        raise ValueError(f"no documented bounds for IB estimator {config.estimator!r}")
    return spec.bounds(config)


def score_trajectories(trajectories: Sequence[IBInputs], config: IBConfig) -> torch.Tensor:
    """S_IB for each trajectory with ``config.estimator``, as a float32 ``[B]`` tensor.

    Errors name the offending trajectory index. A non-finite score (an estimator bug) raises.
    """
    estimator = get_ib_estimator(config.estimator)
    scores = []
    for i, traj in enumerate(trajectories):
        try:
            value = float(estimator(traj, config))
        except (ValueError, TypeError) as err:
            raise type(err)(f"trajectory {i}: {err}") from err
        if not math.isfinite(value):
            raise ValueError(f"trajectory {i}: IB estimator {config.estimator!r} returned {value}")
        scores.append(value)
    return torch.tensor(scores, dtype=torch.float32)


# ----------------------------------------------------------------------------- Top-N filter


def _group_keys(ids: torch.Tensor | Sequence[Hashable], n: int, what: str) -> list[Hashable]:
    if isinstance(ids, torch.Tensor):
        if ids.ndim != 1:
            raise ValueError(f"{what} must be 1-D, got shape {tuple(ids.shape)}")
        keys = ids.tolist()
    else:
        keys = [k.item() if hasattr(k, "item") else k for k in ids]
    if len(keys) != n:
        raise ValueError(f"{what} has {len(keys)} entries for {n} trajectories")
    return keys


def _groups(keys: Sequence[Hashable]) -> dict[Hashable, list[int]]:
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return groups


def _check_scores(scores: torch.Tensor) -> torch.Tensor:
    scores = torch.as_tensor(scores).detach().cpu().to(torch.float64)
    if scores.ndim != 1:
        raise ValueError(f"scores must be 1-D [B], got shape {tuple(scores.shape)}")
    bad = ~torch.isfinite(scores)
    if bool(bad.any()):
        raise ValueError(f"IB score is NaN/inf at index {int(torch.nonzero(bad)[0])}")
    return scores


def resolve_top_n(top_n: int | None, num_branches: int) -> int:
    """None -> ceil(K / 2) (METHOD.md default); otherwise top_n (>= 0), capped at K."""
    if top_n is None:
        return math.ceil(num_branches / 2)
    if not isinstance(top_n, int) or top_n < 0:
        raise ValueError(f"top_n must be None or an int >= 0, got {top_n!r}")
    return min(top_n, num_branches)


def topn_keep_mask(
    scores: torch.Tensor,
    parent_ids: torch.Tensor | Sequence[Hashable],
    is_original: torch.Tensor | Sequence[bool],
    top_n: int | None,
) -> torch.Tensor:
    """Which trajectories survive the IB filter (METHOD.md step 6).

    Trajectories are grouped by ``parent_ids`` (the id of the trajectory a branch was forked
    from; an original carries its own id, so it sits in the group of its own branches). In
    each group the original (``is_original``, at most one per group) is always kept, and the
    ``top_n`` branches with the highest score are kept (None -> ceil(K/2) of the group's K
    branches). Ties are broken towards the lower batch index, so the mask is deterministic.
    A group of round-2 branches (forked from a round-1 branch, which lives in its own parent's
    group) has no original and keeps just its top_n branches.

    Returns:
        ``BoolTensor[B]``.
    """
    scores = _check_scores(scores)
    n = scores.shape[0]
    keys = _group_keys(parent_ids, n, "parent_ids")
    originals = [bool(x) for x in (is_original.tolist() if isinstance(is_original, torch.Tensor) else is_original)]
    if len(originals) != n:
        raise ValueError(f"is_original has {len(originals)} entries for {n} trajectories")
    keep = torch.zeros(n, dtype=torch.bool)
    for key, members in _groups(keys).items():
        parents = [i for i in members if originals[i]]
        if len(parents) > 1:
            raise ValueError(f"parent group {key!r} has {len(parents)} originals (indices {parents}); expected <= 1")
        for i in parents:
            keep[i] = True
        branches = [i for i in members if not originals[i]]
        n_keep = resolve_top_n(top_n, len(branches))
        ranked = sorted(branches, key=lambda i: (-float(scores[i]), i))
        for i in ranked[:n_keep]:
            keep[i] = True
    return keep


def best_branch_per_fork_source(
    scores: torch.Tensor,
    parent_ids: torch.Tensor | Sequence[Hashable],
    is_original: torch.Tensor | Sequence[bool],
    keep_mask: torch.Tensor,
    round_ids: torch.Tensor | Sequence[int],
    round_index: int,
) -> dict[Hashable, int]:
    """Where round ``round_index + 1`` forks from (iterative IB, METHOD.md step 6 decision).

    Round numbering: originals are round 0; branches forked from an original are round 1;
    branches forked from the best surviving round-r branch are round r + 1 (``round_ids``).
    For every fork source (``parent_ids`` key) whose round-``round_index`` branches include a
    kept one, returns {fork source key: batch index of its best kept round-``round_index``
    branch} (highest score, ties -> lower index). A source with no surviving branch gets no
    entry: the caller stops iterating it (and logs it) rather than re-forking from a dropped
    trajectory. ``round_index=0`` is not meaningful (originals are not branches) and raises.
    """
    if not isinstance(round_index, int) or round_index < 1:
        raise ValueError(f"round_index must be an int >= 1 (branches of that round), got {round_index!r}")
    scores = _check_scores(scores)
    n = scores.shape[0]
    keys = _group_keys(parent_ids, n, "parent_ids")
    rounds = [int(r) for r in (round_ids.tolist() if isinstance(round_ids, torch.Tensor) else round_ids)]
    originals = [bool(x) for x in (is_original.tolist() if isinstance(is_original, torch.Tensor) else is_original)]
    keep = [bool(x) for x in torch.as_tensor(keep_mask).tolist()]
    if not (len(rounds) == len(originals) == len(keep) == n):
        raise ValueError("scores, parent_ids, is_original, keep_mask and round_ids must have the same length")
    for i in range(n):
        if originals[i] != (rounds[i] == 0):
            raise ValueError(f"trajectory {i}: is_original={originals[i]} but round_ids={rounds[i]}")
    best: dict[Hashable, int] = {}
    for i in range(n):
        if rounds[i] != round_index or not keep[i]:
            continue
        current = best.get(keys[i])
        if current is None or float(scores[i]) > float(scores[current]):
            best[keys[i]] = i
    return best
