"""Evaluation metrics: pass@k, avg@k, maj@k, response length and diversity.

Every function here is pure (lists / numbers in, numbers out) so it can be tested against closed
forms and reused by the trainer's validation hooks.

Conventions (the paper does not state its protocol; see docs/PAPER_RESULTS.md):
- **P@1** is avg@n: the mean accuracy over all n samples of a problem, averaged over problems.
- **P@k** is the unbiased pass@k estimator of Chen et al. (2021) from n >= k samples with c
  correct, averaged over problems.
- **maj@k** votes over the *extracted* answers of the first k samples.
- **Diversity** metrics are computed among the samples of one problem and then averaged over
  problems. Self-BLEU and Self-ROUGE-L are similarities; the reports show them as diversity
  ``1 - similarity`` (higher = more diverse), the way the paper's diversity table does.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = [
    "pass_at_k",
    "avg_at_k",
    "MajorityVote",
    "maj_at_k",
    "mean_response_tokens",
    "word_tokens",
    "ngrams",
    "distinct_n",
    "repetition_rate",
    "self_bleu",
    "self_rouge_l",
    "diversity_metrics",
    "default_k_values",
]


# ----------------------------------------------------------------------------- correctness


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): P(at least one of k draws without replacement is correct).

    With n samples of which c are correct, pass@k = 1 - C(n-c, k) / C(n, k). Computed in the
    numerically stable product form 1 - prod_{i=n-c+1}^{n} (1 - k / i), which never forms the
    huge binomials (n = 256, k = 128 would overflow floats otherwise).

    Raises ValueError for k > n (the estimator is undefined: sample more), k < 1, n < 1, or
    c outside [0, n].
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"pass_at_k: {name} must be an int, got {value!r}")
    n, c, k = int(n), int(c), int(k)
    if n < 1:
        raise ValueError(f"pass_at_k: n must be >= 1, got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: c must be in [0, n={n}], got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: k must be in [1, n={n}], got k={k} (pass@k needs n >= k samples)")
    if n - c < k:
        # every size-k subset contains at least one correct sample
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def avg_at_k(correct: Sequence[bool], k: int | None = None) -> float:
    """avg@k: mean accuracy over the first k samples (all samples when k is None). P@1 = avg@n."""
    samples = list(correct) if k is None else list(correct)[:k]
    if k is not None and (k < 1 or k > len(correct)):
        raise ValueError(f"avg_at_k: k must be in [1, {len(correct)}], got {k}")
    if not samples:
        raise ValueError("avg_at_k: no samples")
    return sum(bool(x) for x in samples) / len(samples)


@dataclass(frozen=True)
class MajorityVote:
    """Outcome of a majority vote: the winning answer (None if no sample had a parseable answer),
    its vote count, the number of parseable votes, and whether it matches the gold answer."""

    answer: str | None
    votes: int
    num_valid: int
    correct: bool


def maj_at_k(
    preds: Sequence[str | None],
    gold: str,
    k: int | None = None,
    equivalent: Callable[[str, str], bool] | None = None,
    sample_correct: Sequence[bool] | None = None,
) -> MajorityVote:
    """Majority vote (maj@k) over the extracted answers of the first k samples.

    Clustering: answers are first grouped by exact string; distinct strings are then merged
    greedily, in order of first appearance, into the first earlier cluster whose representative
    (its first-seen answer) is ``equivalent`` to them (default: the recipe's
    ``answers_equivalent``, so "1/2" and "\\frac{1}{2}" vote together).
    Unparseable answers (None or blank) never vote, so they can never win; if no sample has a
    parseable answer the vote is wrong (answer None).
    Tie-breaking: among clusters with the most votes, the one whose first member appears
    earliest in sample order wins (deterministic, and independent of answer text).
    The winner is correct iff its representative is ``equivalent`` to ``gold``; when
    ``sample_correct`` (per-sample correctness from the reward) is given, the representative's
    own sample's correctness is used instead, so maj@k and P@1 judge answers identically.
    """
    if equivalent is None:
        from recipe.iib_lpo.reward.score import answers_equivalent as equivalent
    preds = list(preds)
    if sample_correct is not None and len(sample_correct) != len(preds):
        raise ValueError(f"maj_at_k: {len(sample_correct)} correctness flags for {len(preds)} preds")
    if k is not None:
        if k < 1 or k > len(preds):
            raise ValueError(f"maj_at_k: k must be in [1, {len(preds)}], got {k}")
        preds = preds[:k]
    # exact-string groups in order of first appearance
    counts: dict[str, int] = {}
    first_index: dict[str, int] = {}
    for index, pred in enumerate(preds):
        if pred is None or not str(pred).strip():
            continue
        key = str(pred).strip()
        counts[key] = counts.get(key, 0) + 1
        first_index.setdefault(key, index)
    num_valid = sum(counts.values())
    if not counts:
        return MajorityVote(answer=None, votes=0, num_valid=0, correct=False)
    clusters: list[list] = []  # [representative, votes], in order of first appearance
    for answer, votes in counts.items():
        for cluster in clusters:
            if equivalent(answer, cluster[0]):
                cluster[1] += votes
                break
        else:
            clusters.append([answer, votes])
    best_votes = max(votes for _, votes in clusters)
    winner = next(rep for rep, votes in clusters if votes == best_votes)  # earliest on ties
    if sample_correct is not None:
        correct = bool(sample_correct[first_index[winner]])
    else:
        correct = bool(equivalent(winner, gold))
    return MajorityVote(answer=winner, votes=best_votes, num_valid=num_valid, correct=correct)


def mean_response_tokens(token_counts: Sequence[int]) -> float:
    """Mean number of generated tokens per response (#Tok in the paper's table)."""
    if not token_counts:
        raise ValueError("mean_response_tokens: no responses")
    if any(t < 0 for t in token_counts):
        raise ValueError("mean_response_tokens: negative token count")
    return sum(token_counts) / len(token_counts)


def default_k_values(n: int) -> list[int]:
    """k = 1, 2, 4, ... up to n, plus n itself: the points of a pass@k curve."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ks = [2**i for i in range(n.bit_length()) if 2**i <= n]
    if ks[-1] != n:
        ks.append(n)
    return ks


# ----------------------------------------------------------------------------- diversity


def word_tokens(text: str) -> list[str]:
    """The word tokens of Distinct-n and the repetition rate: the IB score's tokenisation
    (``recipe.iib_lpo.algorithm.ib.word_tokens``: lower-cased words and single punctuation marks), so the
    eval's Rep-4 is the same quantity the IB score penalises."""
    from recipe.iib_lpo.algorithm.ib import word_tokens as ib_word_tokens

    return ib_word_tokens(text)


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """All contiguous n-grams of ``tokens`` (empty when there are fewer than n tokens)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float | None:
    """Distinct-n (Li et al. 2016): unique n-grams / total n-grams, pooled over ``texts``.

    Word n-grams over ``word_tokens``. Returns None (undefined) when the texts contain no
    n-gram at all, e.g. all responses shorter than n words; callers count such problems.
    """
    grams = [g for text in texts for g in ngrams(word_tokens(text), n)]
    if not grams:
        return None
    return len(set(grams)) / len(grams)


def repetition_rate(text: str, n: int = 4) -> float | None:
    """Fraction of a response's word n-grams that repeat an earlier n-gram of the same response
    (1 - unique/total; 0 = no repetition, -> 1 for a loop): the IB score's rep4
    (``recipe.iib_lpo.algorithm.ib.repeated_ngram_fraction``). None if the response has no n-gram."""
    from recipe.iib_lpo.algorithm.ib import repeated_ngram_fraction

    tokens = word_tokens(text)
    if len(tokens) < n:
        return None
    return repeated_ngram_fraction(tokens, n)


def self_bleu(texts: Sequence[str]) -> float | None:
    """Self-BLEU (Zhu et al. 2018) in [0, 1]: mean over i of sentence-BLEU(text_i, others).

    sacrebleu's ``sentence_bleu`` with its defaults (13a tokenizer, exponential smoothing,
    effective order), all other texts as references; the 0-100 score is divided by 100.
    A similarity: the diversity reported is 1 - self_bleu. None for fewer than 2 texts.
    """
    from sacrebleu import sentence_bleu

    texts = list(texts)
    if len(texts) < 2:
        return None
    # sacrebleu returns 100.00000000000004 for identical texts: clip the float error so that
    # the reported diversity 1 - Self-BLEU is never negative
    scores = [min(1.0, sentence_bleu(texts[i], texts[:i] + texts[i + 1 :]).score / 100.0) for i in range(len(texts))]
    return sum(scores) / len(scores)


_ROUGE_SCORER = None


def self_rouge_l(texts: Sequence[str]) -> float | None:
    """Self-ROUGE-L in [0, 1]: mean ROUGE-L F1 over all unordered pairs of texts.

    rouge-score's ``RougeScorer(["rougeL"])`` (its default tokenizer, no stemming). F1 is
    symmetric, so each unordered pair is scored once. A similarity: the diversity reported is
    1 - self_rouge_l. None for fewer than 2 texts.
    """
    global _ROUGE_SCORER
    if _ROUGE_SCORER is None:
        from rouge_score.rouge_scorer import RougeScorer

        _ROUGE_SCORER = RougeScorer(["rougeL"], use_stemmer=False)
    texts = list(texts)
    if len(texts) < 2:
        return None
    pairs = list(itertools.combinations(range(len(texts)), 2))
    total = sum(_ROUGE_SCORER.score(texts[i], texts[j])["rougeL"].fmeasure for i, j in pairs)
    return total / len(pairs)


def diversity_metrics(texts: Sequence[str]) -> dict[str, float | None]:
    """All diversity metrics for the samples of one problem.

    Keys: distinct_1, distinct_4, self_bleu, self_rouge_l (similarities, as computed by the
    libraries), self_bleu_diversity and self_rouge_l_diversity (1 - similarity, as reported),
    rep4 (mean 4-gram repetition rate over the responses that have a 4-gram). None = undefined.
    """
    texts = list(texts)
    bleu = self_bleu(texts)
    rouge = self_rouge_l(texts)
    reps = [r for r in (repetition_rate(t, 4) for t in texts) if r is not None]
    return {
        "distinct_1": distinct_n(texts, 1),
        "distinct_4": distinct_n(texts, 4),
        "self_bleu": bleu,
        "self_rouge_l": rouge,
        "self_bleu_diversity": None if bleu is None else 1.0 - bleu,
        "self_rouge_l_diversity": None if rouge is None else 1.0 - rouge,
        "rep4": sum(reps) / len(reps) if reps else None,
    }


def mean_defined(values: Sequence[float | None]) -> tuple[float | None, int]:
    """Mean of the values that are not None/NaN, and how many were skipped as undefined."""
    defined = [v for v in values if v is not None and not math.isnan(v)]
    skipped = len(values) - len(defined)
    return (sum(defined) / len(defined) if defined else None), skipped
