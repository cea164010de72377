"""IB scores, estimator registry, Top-N filter and iterative rounds (METHOD.md step 6)."""

import math
import random

import numpy as np
import pytest
import torch

from recipe.iib_lpo.algorithm.ib import (
    IBConfig,
    IBInputs,
    TextStats,
    best_branch_per_fork_source,
    echo_fraction,
    filler_fraction,
    get_ib_estimator,
    ib_estimator_spec,
    ib_score_bounds,
    list_ib_estimators,
    ngram_ib_score,
    own_tokens,
    register_ib_estimator,
    repeated_ngram_fraction,
    question_text,
    score_trajectories,
    text_stats,
    topn_keep_mask,
    trajectory_ib_inputs,
    word_tokens,
)

QUESTION = "A baker makes 24 muffins and sells 3/4 of them. How many muffins are left?"
MAX_TOKENS = 512

# Four responses in the spirit of the paper's case study (written for this test).
CONCISE = "He sells 3/4 * 24 = 18 muffins, so 24 - 18 = 6 are left. The answer is \\boxed{6}."
PADDED = (
    "Okay, let me restate the problem first. A baker makes 24 muffins and sells 3/4 of them. "
    "How many muffins are left? Hmm, well, so basically we need to think about this carefully, "
    "you know, step by step, and be really sure about every single detail before answering. "
    "So, basically, first we look at the fraction, and then, well, we look at the total. "
    "Alright, so 3/4 of 24 is 18, because 24 divided by 4 is 6 and 6 times 3 is 18. "
    "Then, well, 24 - 18 = 6. Hmm, let me double check that once more, just to be safe: "
    "yes, 18 plus 6 is 24, so that seems right, I am quite confident now. The answer is \\boxed{6}."
)
WRONG = "He sells 24 / 3 = 8 muffins, so 24 - 8 = 16 are left. The answer is \\boxed{16}."
LOOP = "He sells 3/4 of them. " + "Let me compute 3/4 of 24 again. " * 40


def test_tokenizer_and_statistics_closed_form():
    assert word_tokens("3.14 is Pi!") == ["3", ".", "14", "is", "pi", "!"]
    assert word_tokens("\\frac{1}{2}") == ["\\", "frac", "{", "1", "}", "{", "2", "}"]
    # "a b c d a b c d": 4-grams abcd, bcda, cdab, dabc, abcd -> 5 grams, 4 distinct -> 1 - 4/5
    toks = "a b c d a b c d".split()
    assert repeated_ngram_fraction(toks) == pytest.approx(0.2)
    assert repeated_ngram_fraction("a b c".split()) == 0.0
    # response 4-grams: (x y z w), (y z w v) -> only the first occurs in the question -> 1/2
    assert echo_fraction("x y z w".split(), "x y z w v".split()) == pytest.approx(0.5)
    assert echo_fraction("x y".split(), "a b c".split()) == 0.0


def test_filler_fraction_closed_form():
    q = "A shop has 12 pens and sells 5. How many are left?"
    # "So 12 - 5 = 7 pens." (8 word tokens, math) and "I am sure." (4 word tokens, filler)
    assert filler_fraction(q, "So 12 - 5 = 7 pens. I am sure.") == pytest.approx(4 / 12)
    assert filler_fraction(q, "") == 0.0 and filler_fraction(q, "  \n ") == 0.0
    assert filler_fraction(q, "Hmm, well, let me think.") == 1.0
    # restating the given numbers is filler; a new number, a variable or LaTeX is not
    assert filler_fraction(q, "The shop has 12 pens.") == 1.0
    assert filler_fraction(q, "Then 7 remain.") == 0.0
    assert filler_fraction(q, "Let n be the rest.") == 0.0
    assert filler_fraction(q, "So \\boxed{seven}.") == 0.0
    # hyphens, bullets, markdown emphasis, "a", "I", "e.g." and "it's" are not math
    for text in ["A step-by-step plan, e.g. careful work.", "- First, it's easy.", "**Answer** comes now.",
                 "I think a check helps, i.e. we verify."]:
        assert filler_fraction(q, text) == 1.0, text
    # operators between operands are
    for text in ["So 12 - 5 is what we need.", "Compute 12*5 first.", "Note x - y here."]:
        assert filler_fraction(q, text) == 0.0, text
    # word-weighted over sentences split at . ! ? + space and at line breaks
    assert filler_fraction(q, "Okay.\nSo 7 remain!") == pytest.approx(2 / 6)
    with pytest.raises(TypeError):
        filler_fraction(q, None)


def test_ngram_score_closed_form():
    # response "a b c d a b c d" -> rep4 = 0.2, echo vs question "a b c d" = 2/5 (abcd twice),
    # filler 0 (single-letter variables b, c, d make the sentence mathematical)
    score = ngram_ib_score("a b c d", "a b c d a b c d", 1.0, 100, 400, beta=1.0, w_rep=0.5, w_echo=0.2, w_len=0.2)
    # 1.0 - (0.5*0.2 + 0.2*0.4 + 0.2*0.25 + 0.1*0) = 1.0 - (0.1 + 0.08 + 0.05) = 0.77
    assert score == pytest.approx(0.77)
    # length term saturates at 1 and "short" is all filler: 0 - (0.2 * 1 + 0.1 * 1)
    assert ngram_ib_score("q", "short", 0.0, 999, 10) == pytest.approx(-0.3)
    assert ngram_ib_score("q", "short", 0.0, 999, 10, w_fill=0.0) == pytest.approx(-0.2)
    # numpy scalars (how rewards and lengths often arrive) are accepted
    assert ngram_ib_score("q", "short", np.float32(0.0), np.int64(999), 10) == pytest.approx(-0.3)
    with pytest.raises(TypeError, match="unknown weight"):
        ngram_ib_score("q", "r", 1.0, 1, 10, gamma=1.0)
    with pytest.raises(ValueError, match=r"reward must be .* in \[0, 1\]"):
        ngram_ib_score("q", "r", -1.0, 1, 10)
    with pytest.raises(ValueError, match="max_tokens"):
        ngram_ib_score("q", "r", 1.0, 1, 0)


def test_text_stats_known_answer_and_precomputed_stats_give_the_same_score():
    # "a b c d a b c d" vs question "a b c d": rep4 = 1/5, echo = 2/5, filler 0 (closed form above)
    stats = text_stats("a b c d", "a b c d a b c d")
    assert (stats.rep4, stats.echo, stats.filler) == (pytest.approx(0.2), pytest.approx(0.4), 0.0)
    assert text_stats("q", "short") == TextStats(rep4=0.0, echo=0.0, filler=1.0)
    # the agent loop's stats stand in for the text: the same score for every estimator that reads
    # text, bit for bit (the stats are the same numbers combined in the same order)
    config = IBConfig(estimator="ngram")
    for text, reward in ((CONCISE, 1.0), (PADDED, 1.0), (WRONG, 0.0), (LOOP, 0.0)):
        kw = dict(reward=reward, num_tokens=len(word_tokens(text)), max_tokens=MAX_TOKENS)
        from_text = score_trajectories([IBInputs(QUESTION, text, **kw)], config)
        from_stats = score_trajectories([IBInputs(QUESTION, "", text_stats=text_stats(QUESTION, text), **kw)], config)
        assert torch.equal(from_text, from_stats), text[:20]
    # the stats are what decides: other stats, another score
    other = IBInputs(QUESTION, "", 1.0, 10, MAX_TOKENS, text_stats=TextStats(rep4=0.9, echo=0.0, filler=0.0))
    assert float(score_trajectories([other], IBConfig())[0]) == pytest.approx(1.0 - (0.5 * 0.9 + 0.2 * 10 / MAX_TOKENS))


def test_text_stats_through_extra_fields_and_bad_values():
    stats = TextStats(rep4=0.25, echo=0.5, filler=1.0)
    assert TextStats.from_extra_fields(stats.to_extra_fields()) == stats
    assert TextStats.from_extra_fields({"iib_role": "initial"}) is None  # rows from verl's own loops
    with pytest.raises(ValueError, match=r"TextStats.echo must be a number in \[0, 1\], got None"):
        TextStats.from_extra_fields({"iib_text_rep4": 0.1, "iib_text_filler": 0.0})
    with pytest.raises(ValueError, match="TextStats.rep4"):
        TextStats(rep4=float("nan"), echo=0.0, filler=0.0)
    with pytest.raises(ValueError, match="extra_info.question"):
        question_text({"index": 3})
    assert question_text({"question": "Why?"}) == "Why?"


def test_case_study_ordering():
    """concise correct > padded correct > wrong derivation > repetitive loop.

    The paper's case study printed reward 0 for its padded response; here the padded response
    reaches the right final answer, so with I_hat(r; a) = r_v it is correct (r_v = 1). It still
    ranks below the concise one (echoed question, filler sentences, 4x the length) and above
    the wrong derivation because beta (1.0) exceeds the largest possible penalty (< 1.0).
    """

    def n_tok(text):  # ~policy tokens; any monotone proxy works for the ordering
        return len(word_tokens(text))

    scores = {
        name: ngram_ib_score(QUESTION, text, reward, n_tok(text), MAX_TOKENS)
        for name, text, reward in [
            ("concise", CONCISE, 1.0),
            ("padded", PADDED, 1.0),
            ("wrong", WRONG, 0.0),
            ("loop", LOOP, 0.0),
        ]
    }
    assert scores["concise"] > scores["padded"] > scores["wrong"] > scores["loop"], scores
    assert repeated_ngram_fraction(word_tokens(LOOP)) > 0.8
    assert echo_fraction(word_tokens(QUESTION), word_tokens(PADDED)) > 0.05
    assert filler_fraction(QUESTION, PADDED) > 0.3 and filler_fraction(QUESTION, CONCISE) == 0.0


# Reasoning replaced by filler of the same length: hedges and paraphrased restatements, no
# repeated 4-gram and no 4-gram from the question, so rep4, echo and length cannot tell them apart.
SAME_LENGTH_CASES = [
    (
        QUESTION,
        "Sold: 3/4 * 24 = 18 muffins. Left: 24 - 18 = 6 muffins. The answer is \\boxed{6}.",
        "Okay, basically the baker sold most of the batch, and we want what remains, I believe. "
        "The answer is \\boxed{6}.",
    ),
    (
        "Sam buys some pencils. Twice the number of pencils plus 4 equals 10. How many pencils did Sam buy?",
        "Let x be the pencil count. Then 2x + 4 = 10, so 2x = 6 and x = 3. The answer is \\boxed{3}.",
        "Hmm, let me think about this one very carefully now. We need how many Sam bought, so careful indeed. "
        "The answer is \\boxed{3}.",
    ),
]


@pytest.mark.parametrize("question,concise,filler", SAME_LENGTH_CASES)
def test_filler_of_the_same_length_scores_clearly_below_the_derivation(question, concise, filler):
    c_tok, f_tok = word_tokens(concise), word_tokens(filler)
    assert len(c_tok) == len(f_tok)  # same length, also in the length term's num_tokens below
    for tok in (c_tok, f_tok):
        assert repeated_ngram_fraction(tok) == 0.0 and echo_fraction(word_tokens(question), tok) == 0.0
    n = len(c_tok)
    # without the filler term the two are indistinguishable ...
    old = [ngram_ib_score(question, t, 1.0, n, MAX_TOKENS, w_fill=0.0) for t in (concise, filler)]
    assert abs(old[0] - old[1]) < 1e-3
    # ... with the default estimator the derivation wins by a clear margin
    scores = [score_trajectories([IBInputs(question, t, 1.0, n, MAX_TOKENS)], IBConfig())[0].item()
              for t in (concise, filler)]
    assert scores[0] - scores[1] >= 0.05, scores


def _random_inputs(rng: random.Random, n: int) -> list[IBInputs]:
    words = ["the", "sum", "is", "x", "=", "3", "+", "4", "so", "we", "get", "\\boxed{7}", "."]
    out = []
    for _ in range(n):
        length = rng.randint(0, 60)
        text = " ".join(rng.choice(words) for _ in range(length))
        if rng.random() < 0.3:
            text = text + " loop again and again" * rng.randint(1, 30)
        question = " ".join(rng.choice(words) for _ in range(rng.randint(0, 20)))
        t = rng.randint(0, 40)
        out.append(
            IBInputs(
                question=question if rng.random() < 0.5 else text[:50],
                response=text,
                reward=float(rng.random() < 0.5),
                num_tokens=rng.randint(0, 1000),
                max_tokens=rng.randint(1, 600),
                token_entropies=torch.rand(t) * rng.choice([0.1, 1.0, 8.0]),
                token_advantages=torch.randn(t) * rng.choice([0.5, 3.0, 30.0]),
            )
        )
    return out


@pytest.mark.parametrize("estimator", ["ngram", "entropy", "ibro"])
def test_every_estimator_is_bounded(estimator):
    cfg = IBConfig(estimator=estimator)
    low, high = ib_score_bounds(cfg)
    scores = score_trajectories(_random_inputs(random.Random(estimator), 300), cfg)
    assert scores.shape == (300,) and scores.dtype == torch.float32
    assert bool(torch.isfinite(scores).all())
    assert float(scores.min()) >= low - 1e-6 and float(scores.max()) <= high + 1e-6
    assert float(scores.max() - scores.min()) > 0.1  # not a constant


def test_other_estimators_closed_form():
    ent = torch.tensor([0.5, 1.5, 1.0])  # mean 1.0
    traj = IBInputs("q", "r", 1.0, 128, 512, token_entropies=ent, token_advantages=torch.tensor(2.0))
    # entropy: 1 - (0.2 * min(1, 1.0 / 2.0) + 0.2 * 128/512) = 1 - (0.1 + 0.05) = 0.85
    assert get_ib_estimator("entropy")(traj, IBConfig()) == pytest.approx(0.85)
    # ibro: tanh(mean(2 * H)) = tanh(2.0)
    assert get_ib_estimator("ibro")(traj, IBConfig()) == pytest.approx(math.tanh(2.0))
    with pytest.raises(ValueError, match="needs token_entropies"):
        get_ib_estimator("entropy")(IBInputs("q", "r", 1.0, 1, 2), IBConfig())


def test_token_estimators_average_over_a_branchs_own_tokens_only():
    """A branch forked at t* = 4 of an 8-token response: the 4 inherited tokens carry the parent's
    entropies (3.0 each), its own continuation 0.5, 1.5, 0.5, 1.5 (mean 1.0). The score sees the
    continuation only; the prefix-inclusive mean (2.0) would give another value."""
    entropies = torch.tensor([3.0, 3.0, 3.0, 3.0, 0.5, 1.5, 0.5, 1.5, 9.0])  # one padding position past the response
    assert torch.equal(own_tokens(entropies, 4, 8), torch.tensor([0.5, 1.5, 0.5, 1.5]))
    assert torch.equal(own_tokens(entropies, 0, 8), entropies[:8])  # an initial rollout: its whole response
    stats = TextStats(rep4=0.0, echo=0.0, filler=0.0)
    branch = trajectory_ib_inputs(question="q", reward=1.0, num_tokens=8, max_tokens=16, prefix_length=4,
                                  text_stats=stats, entropies=entropies, token_advantage=torch.tensor(2.0))
    # entropy: 1 - (0.2 * min(1, 1.0 / 2.0) + 0.2 * 8/16) = 0.8; prefix-inclusive: 1 - (0.2 * 1 + 0.1) = 0.7
    assert get_ib_estimator("entropy")(branch, IBConfig()) == pytest.approx(0.8)
    # ibro: tanh(mean(2 * H_own)) = tanh(2.0); prefix-inclusive tanh(4.0)
    assert get_ib_estimator("ibro")(branch, IBConfig()) == pytest.approx(math.tanh(2.0))
    assert branch.response == "" and branch.text_stats is stats and branch.num_tokens == 8
    for prefix, num_tokens in ((-1, 8), (9, 8), (0, 10)):
        with pytest.raises(ValueError, match="own tokens"):
            own_tokens(entropies, prefix, num_tokens)
    no_entropy = trajectory_ib_inputs(question="q", reward=0.0, num_tokens=8, max_tokens=16, prefix_length=4,
                                      text_stats=stats)
    assert no_entropy.token_entropies is None and no_entropy.token_advantages is None


def test_registry():
    assert {"ngram", "entropy", "ibro"} <= set(list_ib_estimators())
    assert "answer_likelihood" not in list_ib_estimators()  # needed a forward pass no stage runs: removed
    with pytest.raises(ValueError, match=r"unknown IB estimator 'nope'; known estimators: \[.*'ngram'"):
        get_ib_estimator("nope")

    @register_ib_estimator("test_core_ib_constant")
    def constant(traj, cfg):
        return 0.25

    assert get_ib_estimator("test_core_ib_constant") is constant
    register_ib_estimator("test_core_ib_constant")(constant)  # same function again: fine
    with pytest.raises(ValueError, match="already registered"):
        register_ib_estimator("ngram")(constant)
    with pytest.raises(ValueError, match="unknown IB estimator"):
        score_trajectories([], IBConfig(estimator="nope"))
    with pytest.raises(ValueError, match="trajectory 1: verifiable reward"):
        score_trajectories([IBInputs("q", "r", 1.0, 1, 2), IBInputs("q", "r", 2.0, 1, 2)], IBConfig())


def test_a_new_estimator_is_one_registration():
    """Bounds, the trainer's inputs and the round refusal all come from the registration
    (mutation: rounds_problems or the start-up check ignoring the registration fails this)."""
    from recipe.iib_lpo.algorithm.ib_step import rounds_problems
    from recipe.iib_lpo.trainer.startup_checks import estimator_problems

    @register_ib_estimator("test_core_ib_declared", bounds=lambda cfg: (-1.0, 2.0 * cfg.beta),
                           needs_token_advantages=True, rounds_unsupported="no rounds for me")
    def declared(traj, cfg):
        return 0.0

    cfg = IBConfig(estimator="test_core_ib_declared", beta=1.5)
    assert ib_score_bounds(cfg) == (-1.0, 3.0)
    spec = ib_estimator_spec("test_core_ib_declared")
    assert spec.score is declared and spec.needs_token_advantages
    problems = rounds_problems(IBConfig(estimator="test_core_ib_declared", rounds=2), num_branches=2)
    assert len(problems) == 1 and "no rounds for me" in problems[0]
    assert rounds_problems(IBConfig(estimator="test_core_ib_declared", rounds=1), num_branches=2) == []
    assert estimator_problems("test_core_ib_declared") == []  # a registered estimator trains
    # the built-in ones: ngram / entropy rank rounds and train; ibro needs the advantages
    assert rounds_problems(IBConfig(estimator="entropy", rounds=2), num_branches=2) == []
    assert ib_estimator_spec("ibro").needs_token_advantages and not ib_estimator_spec("ngram").needs_token_advantages
    assert estimator_problems("ngram") == []
    assert any("is unknown" in p for p in estimator_problems("answer_likelihood"))
    with pytest.raises(ValueError, match="no documented bounds"):
        ib_score_bounds(IBConfig(estimator="test_core_ib_constant"))


def test_topn_keep_mask():
    # parent 0: original row 0 + branches rows 1..4; parent 1: original row 5 + branches 6..8
    scores = torch.tensor([-9.0, 0.1, 0.9, 0.5, 0.9, -9.0, 0.3, 0.2, 0.1])
    parents = [0, 0, 0, 0, 0, 1, 1, 1, 1]
    orig = [True, False, False, False, False, True, False, False, False]
    keep = topn_keep_mask(scores, parents, orig, top_n=2)
    # parent 0: top-2 of {1:0.1, 2:0.9, 3:0.5, 4:0.9} -> rows 2 and 4 (tie 0.9, both fit)
    # parent 1: top-2 of {6:0.3, 7:0.2, 8:0.1} -> rows 6, 7; originals always kept
    assert keep.tolist() == [True, False, True, False, True, True, True, True, False]
    # tie at the cut: top-1 of {2:0.9, 4:0.9} -> the lower index (2)
    assert topn_keep_mask(scores, parents, orig, top_n=1).tolist() == [
        True, False, True, False, False, True, True, False, False,
    ]
    # None -> ceil(K/2): K=4 -> 2, K=3 -> 2 (same as above)
    assert torch.equal(topn_keep_mask(scores, parents, orig, top_n=None), keep)
    assert topn_keep_mask(scores, parents, orig, top_n=10).all()
    assert topn_keep_mask(scores, parents, orig, top_n=0).tolist() == orig
    # string parent ids work the same; a group without an original keeps its top_n
    keep_str = topn_keep_mask(scores[1:5], ["b"] * 4, [False] * 4, top_n=1)
    assert keep_str.tolist() == [False, True, False, False]
    with pytest.raises(ValueError, match="2 originals"):
        topn_keep_mask(torch.zeros(3), [0, 0, 0], [True, True, False], top_n=1)
    with pytest.raises(ValueError, match="NaN/inf at index 1"):
        topn_keep_mask(torch.tensor([0.0, float("nan")]), [0, 0], [True, False], top_n=1)


def test_best_branch_per_fork_source_rounds():
    # round 0: originals 0 and 5; round 1: branches 1-4 of 0, 6-8 of 5; round 2: branches 9-10 of row 2
    scores = torch.tensor([0.0, 0.1, 0.9, 0.5, 0.9, 0.0, 0.3, 0.2, 0.1, 0.4, 0.6])
    parents = [0, 0, 0, 0, 0, 5, 5, 5, 5, 2, 2]
    rounds = [0, 1, 1, 1, 1, 0, 1, 1, 1, 2, 2]
    orig = [r == 0 for r in rounds]
    keep = topn_keep_mask(scores, parents, orig, top_n=2)
    # round 1 survivors: {2, 4} (tie -> 2) and {6, 7}; round 2 survivors: {9, 10} (top_n=2 keeps both)
    assert best_branch_per_fork_source(scores, parents, orig, keep, rounds, 1) == {0: 2, 5: 6}
    assert best_branch_per_fork_source(scores, parents, orig, keep, rounds, 2) == {2: 10}
    # nothing survives with top_n=0 -> no fork source for the next round
    keep0 = topn_keep_mask(scores, parents, orig, top_n=0)
    assert best_branch_per_fork_source(scores, parents, orig, keep0, rounds, 1) == {}
    with pytest.raises(ValueError, match="round_index"):
        best_branch_per_fork_source(scores, parents, orig, keep, rounds, 0)
    with pytest.raises(ValueError, match="is_original=True but round_ids=1"):
        best_branch_per_fork_source(scores, parents, [True] * 11, keep, rounds, 1)
