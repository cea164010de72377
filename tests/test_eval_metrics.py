"""Eval metrics against closed forms, brute force and the reference libraries."""

import itertools
import math
from fractions import Fraction

import pytest

from recipe.iib_lpo.eval import metrics
from recipe.iib_lpo.eval.runner import summarize_records


# ----------------------------------------------------------------------------- pass@k


def _pass_at_k_exact(n: int, c: int, k: int) -> Fraction:
    """1 - C(n-c, k) / C(n, k) in exact rational arithmetic."""
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def _pass_at_k_enumerated(n: int, c: int, k: int) -> Fraction:
    """Fraction of all size-k subsets of n samples (first c correct) that contain a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_enumeration_of_subsets(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert metrics.pass_at_k(n, c, k) == pytest.approx(float(_pass_at_k_enumerated(n, c, k)), abs=1e-12)


@pytest.mark.parametrize("n,c,k", [(256, 1, 1), (256, 3, 128), (256, 20, 256), (256, 0, 16), (16, 5, 4), (100, 50, 10), (256, 250, 5)])
def test_pass_at_k_matches_exact_binomials_at_paper_sizes(n, c, k):
    assert metrics.pass_at_k(n, c, k) == pytest.approx(float(_pass_at_k_exact(n, c, k)), rel=1e-12, abs=1e-15)


def test_pass_at_k_closed_forms():
    assert metrics.pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 = c / n
    assert metrics.pass_at_k(10, 0, 5) == 0.0
    assert metrics.pass_at_k(10, 7, 4) == 1.0  # n - c = 3 < k: every 4-subset has a correct one
    assert metrics.pass_at_k(16, 1, 16) == 1.0  # k = n: any correct sample counts
    assert metrics.pass_at_k(16, 0, 16) == 0.0
    assert metrics.pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6


@pytest.mark.parametrize("n,c,k", [(4, 1, 5), (4, 5, 1), (4, -1, 1), (0, 0, 1), (4, 1, 0), (4, 1, 1.0), (4, True, 1)])
def test_pass_at_k_rejects_invalid(n, c, k):
    with pytest.raises(ValueError):
        metrics.pass_at_k(n, c, k)


def test_avg_at_k_and_k_values():
    assert metrics.avg_at_k([True, False, True, True]) == 0.75
    assert metrics.avg_at_k([True, False, True, True], k=2) == 0.5
    with pytest.raises(ValueError):
        metrics.avg_at_k([True], k=2)
    assert metrics.default_k_values(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert metrics.default_k_values(12) == [1, 2, 4, 8, 12]
    assert metrics.default_k_values(1) == [1]


# ----------------------------------------------------------------------------- maj@k


def _numeric_equivalent(a: str, b: str) -> bool:
    """Test equivalence: equal as exact rationals ("0.5" == "1/2"), else equal strings."""
    try:
        return Fraction(a) == Fraction(b)
    except (ValueError, ZeroDivisionError):
        return a == b


def test_maj_at_k_clusters_equivalent_answers():
    vote = metrics.maj_at_k(["3", "0.5", "1/2", "3", "2/4"], "1/2", equivalent=_numeric_equivalent)
    assert (vote.answer, vote.votes, vote.num_valid, vote.correct) == ("0.5", 3, 5, True)


def test_maj_at_k_tie_goes_to_earliest_first_appearance():
    vote = metrics.maj_at_k(["1", "2", "2", "1"], "2", equivalent=_numeric_equivalent)
    assert (vote.answer, vote.votes, vote.correct) == ("1", 2, False)
    vote = metrics.maj_at_k(["2", "1", "1", "2"], "2", equivalent=_numeric_equivalent)
    assert (vote.answer, vote.votes, vote.correct) == ("2", 2, True)
    # tie between clusters merged by equivalence: "0.5" (first seen at 0) beats "3"
    vote = metrics.maj_at_k(["0.5", "3", "1/2", "3"], "3", equivalent=_numeric_equivalent)
    assert (vote.answer, vote.correct) == ("0.5", False)


def test_maj_at_k_unparseable_never_wins_and_k_truncates():
    vote = metrics.maj_at_k([None, None, "  ", None, "4"], "4", equivalent=_numeric_equivalent)
    assert (vote.answer, vote.votes, vote.num_valid, vote.correct) == ("4", 1, 1, True)
    vote = metrics.maj_at_k([None, None], "4", equivalent=_numeric_equivalent)
    assert (vote.answer, vote.votes, vote.correct) == (None, 0, False)
    vote = metrics.maj_at_k(["1", "2", "2", "2"], "2", k=2, equivalent=_numeric_equivalent)
    assert (vote.answer, vote.correct) == ("1", False)
    with pytest.raises(ValueError):
        metrics.maj_at_k(["1"], "1", k=2, equivalent=_numeric_equivalent)


def test_maj_at_k_default_uses_recipe_answers_equivalent():
    vote = metrics.maj_at_k(["7", "3", "7"], "7")
    assert (vote.answer, vote.votes, vote.correct) == ("7", 2, True)


# ----------------------------------------------------------------------------- diversity

SENTENCE = "we add the two numbers and then we divide the sum by three to get the mean"
DISJOINT = [
    "alpha beta gamma delta epsilon zeta eta theta",
    "one two three four five six seven eight",
    "red green blue cyan magenta yellow black white",
]


def test_diversity_of_identical_samples():
    texts = [SENTENCE] * 4
    tokens = metrics.word_tokens(SENTENCE)
    unique_1 = len(set(tokens))
    assert metrics.distinct_n(texts, 1) == pytest.approx(unique_1 / (4 * len(tokens)))
    assert metrics.distinct_n(texts, 4) == pytest.approx(0.25)  # every 4-gram of SENTENCE is unique
    assert metrics.self_bleu(texts) == pytest.approx(1.0)
    assert metrics.self_rouge_l(texts) == pytest.approx(1.0)
    div = metrics.diversity_metrics(texts)
    assert div["self_bleu_diversity"] == pytest.approx(0.0, abs=1e-12) and div["self_bleu_diversity"] >= 0
    assert div["self_rouge_l_diversity"] == pytest.approx(0.0, abs=1e-12)
    assert div["rep4"] == 0.0


def test_diversity_of_disjoint_samples():
    assert metrics.distinct_n(DISJOINT, 1) == 1.0
    assert metrics.distinct_n(DISJOINT, 4) == 1.0
    assert metrics.self_bleu(DISJOINT) == 0.0
    assert metrics.self_rouge_l(DISJOINT) == 0.0
    div = metrics.diversity_metrics(DISJOINT)
    assert div["self_bleu_diversity"] == 1.0 and div["self_rouge_l_diversity"] == 1.0


def test_bleu_and_rouge_equal_the_libraries_called_directly():
    from rouge_score.rouge_scorer import RougeScorer
    from sacrebleu import sentence_bleu

    texts = [
        "First we compute 3 + 4 = 7, then multiply by 2 to get 14. The answer is \\boxed{14}.",
        "We multiply 7 by 2: 3 + 4 = 7 and 7 * 2 = 14, so the answer is \\boxed{14}.",
        "Let me think. 3 + 4 is 7. Doubling gives 14. Final answer: 14",
        "The sum is 7 and twice the sum is 15, so \\boxed{15}.",
    ]
    expected_bleu = sum(sentence_bleu(texts[i], texts[:i] + texts[i + 1 :]).score / 100 for i in range(4)) / 4
    assert 0.05 < expected_bleu < 0.95  # a non-trivial case
    assert metrics.self_bleu(texts) == pytest.approx(expected_bleu, rel=1e-12)
    scorer = RougeScorer(["rougeL"])
    pairs = [(i, j) for i in range(4) for j in range(4) if i != j]  # ordered pairs: F1 is symmetric
    expected_rouge = sum(scorer.score(texts[i], texts[j])["rougeL"].fmeasure for i, j in pairs) / len(pairs)
    assert metrics.self_rouge_l(texts) == pytest.approx(expected_rouge, rel=1e-12)


def test_repetition_rate_and_undefined_cases():
    assert metrics.repetition_rate("a b c d a b c d a b c d") == pytest.approx(1 - 4 / 9)
    assert metrics.repetition_rate("a b c d e") == 0.0
    assert metrics.repetition_rate("too short") is None
    assert metrics.distinct_n(["x", "y"], 4) is None
    assert metrics.self_bleu(["only one"]) is None
    assert metrics.mean_defined([0.5, None, float("nan"), 1.0]) == (0.75, 2)


# ----------------------------------------------------------------------------- benchmark summary


def _record(correct, tokens, preds, diversity=None):
    n, c = len(correct), sum(correct)
    rec = {
        "n": n,
        "correct": correct,
        "num_tokens": tokens,
        "preds": preds,
        "finish_reasons": ["stop"] * (n - 1) + ["length"],
        "pass_at_k": {str(k): metrics.pass_at_k(n, c, k) for k in metrics.default_k_values(n)},
        "maj_at_n": {"correct": c * 2 > n},
    }
    if diversity is not None:
        rec["diversity"] = diversity
    return rec


def test_summarize_records_averages_over_problems():
    div = {k: 0.5 for k in ("distinct_1", "distinct_4", "self_bleu_diversity", "self_rouge_l_diversity", "rep4")}
    records = [
        _record([True, True, False, False], [10, 20, 30, 40], ["1", "1", None, "2"], div),
        _record([False, False, False, True], [5, 5, 5, 5], ["3", None, None, "4"], {**div, "distinct_4": None}),
    ]
    s = summarize_records(records)
    assert s["p_at_1"] == pytest.approx((0.5 + 0.25) / 2)
    assert s["pass_at_k"]["2"] == pytest.approx((metrics.pass_at_k(4, 2, 2) + metrics.pass_at_k(4, 1, 2)) / 2)
    assert s["p_at_n"] == 1.0
    assert s["mean_tokens"] == pytest.approx(120 / 8)
    assert s["truncated_fraction"] == pytest.approx(2 / 8)
    assert s["unparseable_fraction"] == pytest.approx(3 / 8)
    assert s["distinct_4"] == 0.5 and s["undefined_counts"] == {"distinct_4": 1}
    with pytest.raises(ValueError):
        summarize_records([records[0], _record([True] * 2, [1, 1], ["1", "1"])])


def test_maj_at_k_uses_the_representatives_reward_verdict_when_given():
    # "x" wins the vote; its own sample was judged correct by the reward, whatever `equivalent` says
    vote = metrics.maj_at_k(["x", "y", "x"], "gold", equivalent=lambda a, b: a == b, sample_correct=[True, False, True])
    assert (vote.answer, vote.correct) == ("x", True)
    with pytest.raises(ValueError):
        metrics.maj_at_k(["x"], "gold", equivalent=lambda a, b: a == b, sample_correct=[True, False])
