"""CVAE training data, step cuts and the train_cvae CLI end to end (recipe/iib_lpo/latent/training.py)."""

import logging

import pytest
import torch

from recipe.iib_lpo.latent.cvae import CVAEConfig, LatentCVAE, load_cvae_checkpoint
from recipe.iib_lpo.latent.sampler import build_condition_text
from recipe.iib_lpo.latent.text_encoder import build_tiny_encoder_dir
from recipe.iib_lpo.latent.training import (
    TrainingPair,
    load_training_rows,
    main,
    make_training_pairs,
    step_boundaries,
    train_projector_through_lm,
)

SOLUTION = "Tom has 3 apples. He buys 5 more.\nSo he has 3 + 5 = 8 apples.\nThe answer is 8."


def _row(i, question, solution=None, answer="8"):
    extra = {"index": i, "split": "train", "question": question, "answer": answer}
    if solution is not None:
        extra["solution"] = solution
    return {
        "data_source": "toy",
        "prompt": [{"role": "user", "content": f"{question}\nPlease reason step by step."}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": answer},
        "extra_info": extra,
    }


def _write_parquet(path, rows):
    import pandas as pd

    pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    return build_tiny_encoder_dir(tmp_path_factory.mktemp("tiny_encoder"), hidden_size=32, seed=0)


@pytest.fixture(scope="module")
def train_parquet(tmp_path_factory):
    rows = [
        _row(i, f"Tom has {i} apples and buys {i + 2} more. How many?",
             f"Tom has {i} apples. He buys {i + 2} more.\nSo {i} + {i + 2} = {2 * i + 2}.\nThe answer is {2 * i + 2}.",
             answer=str(2 * i + 2))
        for i in range(12)
    ]
    return _write_parquet(tmp_path_factory.mktemp("data") / "train.parquet", rows)


def test_step_boundaries_cut_at_sentences_and_newlines_not_decimals():
    text = "We have 3.5 kg. Then add 2.\nSo 5.5 kg!  Done"
    cuts = step_boundaries(text)
    pieces = [text[:c] for c in cuts]
    assert pieces == ["We have 3.5 kg. ", "We have 3.5 kg. Then add 2.\n", "We have 3.5 kg. Then add 2.\nSo 5.5 kg!  "]
    assert step_boundaries("One sentence only.") == []
    assert step_boundaries("\nLeading newline and trailing.\n") == []


def test_make_training_pairs_lars_and_prefix():
    from recipe.iib_lpo.latent.training import TrainingRow

    rows = [TrainingRow("What is 3+5?", SOLUTION), TrainingRow("Q2?", "Single step.")]
    lars = make_training_pairs(rows, "lars")
    assert [(p.condition, p.target) for p in lars] == [
        (build_condition_text("What is 3+5?", ""), SOLUTION), (build_condition_text("Q2?", ""), "Single step.")]
    prefix = make_training_pairs(rows, "prefix", cuts_per_example=2, seed=1)
    assert len(prefix) == 3  # two cuts of the first solution, the one-step solution is kept whole
    for pair in prefix[:2]:
        assert pair.prefix and pair.prefix + pair.target == SOLUTION
        assert pair.condition == build_condition_text("What is 3+5?", pair.prefix)
        assert len(pair.prefix) in step_boundaries(SOLUTION)
    assert (prefix[2].prefix, prefix[2].condition, prefix[2].target) == (
        "", build_condition_text("Q2?", ""), "Single step.")
    assert prefix == make_training_pairs(rows, "prefix", cuts_per_example=2, seed=1)  # seeded
    cut_sets = {tuple(p.prefix for p in make_training_pairs(rows[:1], "prefix", seed=s)) for s in range(20)}
    assert len(cut_sets) == len(step_boundaries(SOLUTION))  # every boundary gets drawn
    with pytest.raises(ValueError, match="mode"):
        make_training_pairs(rows, "psa")


class _RecordingEncoder:
    """Stands in for the text encoder: records what the sampler encodes."""

    def __init__(self, embed_dim):
        self.embed_dim, self.calls = embed_dim, []

    def encode(self, texts):
        self.calls.append(list(texts))
        return torch.zeros(len(texts), self.embed_dim)


@pytest.mark.parametrize("mode", ["lars", "prefix", "lm"])
def test_training_and_rollout_conditions_come_from_the_same_function(monkeypatch, mode):
    """make_training_pairs builds its conditions with latent_sampler.build_condition_text, and the
    rollout sampler (with the scheme the checkpoint of ``mode`` records) encodes exactly the training
    condition for the same question and prefix."""
    from recipe.iib_lpo.latent import training as train_cvae
    from recipe.iib_lpo.latent.cvae import MODE_CONDITION_SCHEME
    from recipe.iib_lpo.latent.sampler import LatentSampler
    from recipe.iib_lpo.latent.training import TrainingRow

    calls = []

    def recording(question, prefix_text):
        calls.append((question, prefix_text))
        return build_condition_text(question, prefix_text)

    monkeypatch.setattr(train_cvae, "build_condition_text", recording)
    rows = [TrainingRow("What is 3+5?", SOLUTION), TrainingRow("Q2?", "Single step.")]
    pairs = make_training_pairs(rows, mode, cuts_per_example=2, seed=3)
    assert calls == [(("What is 3+5?" if i < len(pairs) - 1 else "Q2?"), p.prefix) for i, p in enumerate(pairs)]
    if mode == "lars":
        assert all(p.prefix == "" for p in pairs)
    else:
        assert sum(bool(p.prefix) for p in pairs) == 2

    encoder = _RecordingEncoder(8)
    cvae = LatentCVAE(CVAEConfig(embed_dim=8, latent_dim=4, hidden_width=8, policy_hidden_size=8,
                                 projector_hidden_width=8))
    sampler = LatentSampler(encoder, cvae, condition_scheme=MODE_CONDITION_SCHEME[mode])
    # rollout: the fork's prefix is the training prefix (prefix/lm) or any response prefix (lars)
    rollout_prefixes = [p.prefix if mode != "lars" else "He buys 5 more." for p in pairs]
    questions = ["What is 3+5?"] * (len(pairs) - 1) + ["Q2?"]
    sampler.sample_latent_embeddings([build_condition_text(q, r) for q, r in zip(questions, rollout_prefixes)], 1, 1.0)
    assert encoder.calls == [[p.condition for p in pairs]]


def test_load_rows_answer_fallback_and_skips(tmp_path, caplog):
    rows = [_row(0, "Q0?", SOLUTION), _row(1, "Q1?", None, answer="7"), _row(2, "", SOLUTION),
            _row(3, "Q3?", None, answer="")]
    path = _write_parquet(tmp_path / "t.parquet", rows)
    with caplog.at_level(logging.WARNING):
        loaded, stats = load_training_rows([path])
    assert [(r.question, r.target) for r in loaded] == [("Q0?", SOLUTION), ("Q1?", "7")]
    assert stats.rows_read == 4 and stats.answer_fallbacks == 1
    assert stats.skipped == {"no extra_info.question": 1, "no extra_info.solution and no extra_info.answer": 1}
    assert "using extra_info.answer" in caplog.text
    assert loaded[0].prompt[0]["role"] == "user"
    bad = _write_parquet(tmp_path / "bad.parquet", [_row(0, "", None, answer="")])
    with pytest.raises(ValueError, match="no usable training rows"):
        load_training_rows([bad])


@pytest.mark.parametrize("mode", ["lars", "prefix"])
def test_cli_end_to_end(tmp_path, encoder_dir, train_parquet, mode):
    out = tmp_path / f"{mode}.pt"
    main(["--train-parquet", str(train_parquet), "--out", str(out), "--mode", mode, "--encoder", str(encoder_dir),
          "--policy-hidden-size", "64", "--latent-dim", "8", "--hidden-width", "32", "--epochs", "3",
          "--batch-size", "8", "--cuts-per-example", "2", "--device", "cpu", "--no-progress"])
    model, info = load_cvae_checkpoint(out, expected_embed_dim=32, expected_latent_dim=8,
                                       expected_policy_hidden_size=64, expected_encoder_name=str(encoder_dir),
                                       expected_mode=mode)
    assert info.train_summary["rows_used"] == 12 and info.train_summary["epochs"] == 3
    assert info.train_summary["pairs"] == (12 if mode == "lars" else 24)
    assert info.train_summary["final_kl"] >= 0
    assert model.sample_prior(torch.randn(2, 32), 3).shape == (2, 3, 8)


def test_projector_trained_through_the_lm_on_prior_samples(tiny_qwen2_dir, monkeypatch):
    """lm mode fits P to what the rollout feeds it: draws from the prior p(z | e_x) (the posterior,
    made to raise here, is never consulted), with the prior and the policy frozen."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(str(tiny_qwen2_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_qwen2_dir))
    cvae = LatentCVAE(CVAEConfig(embed_dim=8, latent_dim=4, hidden_width=16, policy_hidden_size=64,
                                 projector_hidden_width=16))
    prompt = [{"role": "user", "content": "What is 3 + 5?"}]
    pairs = [TrainingPair("c", "So 3 + 5 = 8.", "First, ", prompt), TrainingPair("c", "The answer is 8.", "", prompt)]
    e = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))

    def no_posterior(*args, **kwargs):
        raise AssertionError("lm mode must not sample the posterior")

    prior_rows = []
    real_sample_prior = cvae.sample_prior

    def spy_sample_prior(e_x, num_samples, generator=None):
        prior_rows.append(e_x.detach().clone())
        return real_sample_prior(e_x, num_samples, generator=generator)

    monkeypatch.setattr(cvae, "posterior_params", no_posterior)
    monkeypatch.setattr(cvae, "posterior", None)  # not even the raw network
    monkeypatch.setattr(cvae, "sample_prior", spy_sample_prior)
    before = [p.detach().clone() for p in cvae.prior.parameters()]
    history = train_projector_through_lm(cvae, policy, tokenizer, pairs, e, alpha=1.0, epochs=6, lr=3e-2,
                                         show_progress=False)
    assert len(history) == 6 and history[-1] < history[0] - 0.05
    assert len(prior_rows) == 12  # one prior draw per pair and epoch, conditioned on that pair's e_x
    assert all(any(torch.equal(row[0], e[i]) for i in range(2)) for row in prior_rows)
    assert all(torch.equal(a, b) for a, b in zip(before, cvae.prior.parameters()))  # only P trains
    assert all(p.grad is None for p in policy.parameters())
    with pytest.raises(ValueError, match="prompt"):
        train_projector_through_lm(cvae, policy, tokenizer, [TrainingPair("c", "x", "", None)], e[:1])


def test_cli_lm_mode_needs_a_policy_model(tmp_path, train_parquet, encoder_dir):
    with pytest.raises(SystemExit):
        main(["--train-parquet", str(train_parquet), "--out", str(tmp_path / "x.pt"), "--mode", "lm",
              "--encoder", str(encoder_dir), "--policy-hidden-size", "64"])


def test_cli_lm_mode_end_to_end(tmp_path, train_parquet, encoder_dir, tiny_qwen2_dir):
    out = tmp_path / "lm.pt"
    main(["--train-parquet", str(train_parquet), "--out", str(out), "--mode", "lm", "--encoder", str(encoder_dir),
          "--policy-model", str(tiny_qwen2_dir), "--latent-dim", "8", "--hidden-width", "32", "--epochs", "2",
          "--max-rows", "4", "--lm-max-pairs", "3", "--lm-max-suffix-tokens", "16", "--device", "cpu",
          "--no-progress"])
    _, info = load_cvae_checkpoint(out, expected_policy_hidden_size=64, expected_mode="lm")
    assert info.train_summary["lm_pairs"] == 3 and info.train_summary["lm_final_suffix_nll"] > 0
    assert info.train_summary["lm_latent_source"] == "prior" and info.condition_scheme == "question_prefix"


def test_cli_reads_data_prep_output(tmp_path, encoder_dir, caplog):
    """Schema agreement with data_prep: its parquet (struct extra_info, numpy prompt arrays, a null
    solution for answer-only datasets) trains without adaptation."""
    from data_prep.prepare import main as prepare_main
    from data_prep.testing_fixtures import write_fixture

    outputs = []
    for dataset in ("gsm8k", "math", "dapo_math"):
        source = write_fixture(dataset, tmp_path / "src")
        assert prepare_main(["--dataset", dataset, "--source", str(source), "--out", str(tmp_path / dataset)]) == 0
        outputs += sorted(str(p) for p in (tmp_path / dataset).glob("*.parquet"))
    rows, stats = load_training_rows(outputs)
    assert stats.answer_fallbacks > 0  # dapo_math has answers only
    assert any("<<3*12=36>>" in r.target for r in rows)  # a gsm8k solution, not its answer
    with caplog.at_level(logging.WARNING):
        main(["--train-parquet", *outputs, "--out", str(tmp_path / "c.pt"), "--mode", "prefix",
              "--encoder", str(encoder_dir), "--policy-hidden-size", "64", "--latent-dim", "8",
              "--hidden-width", "16", "--epochs", "1", "--device", "cpu", "--no-progress"])
    assert "using extra_info.answer" in caplog.text
    _, info = load_cvae_checkpoint(tmp_path / "c.pt", expected_mode="prefix")
    assert info.train_summary["answer_fallbacks"] == stats.answer_fallbacks


def test_sampler_from_a_trained_checkpoint(tmp_path, encoder_dir, train_parquet):
    from recipe.iib_lpo.latent.sampler import LatentSampler

    out = tmp_path / "c.pt"
    main(["--train-parquet", str(train_parquet), "--out", str(out), "--mode", "prefix", "--encoder", str(encoder_dir),
          "--policy-hidden-size", "64", "--latent-dim", "8", "--hidden-width", "16", "--epochs", "1",
          "--encoder-max-length", "48", "--encoder-truncation-side", "right", "--device", "cpu", "--no-progress"])
    sampler = LatentSampler.from_checkpoint(out, expected_policy_hidden_size=64)
    assert sampler.encoder.max_length == 48 and sampler.encoder.tokenizer.truncation_side == "right"
    assert sampler.condition_scheme == "question_prefix"
    samples = sampler.sample_latent_embeddings([build_condition_text("Tom has 2 apples.", "First")], 2, alpha=0.5)
    assert samples.embeddings.shape == (1, 2, 64)
    with pytest.raises(ValueError, match="policy_hidden_size=64 but config expects 128"):
        LatentSampler.from_checkpoint(out, expected_policy_hidden_size=128)


def test_sampler_from_a_lars_checkpoint_ignores_the_fork_prefix(tmp_path, encoder_dir, train_parquet):
    """The scheme recorded by a lars run reaches the rollout sampler at load time: forks of one
    question get the same prior whatever their prefix, as in training."""
    from recipe.iib_lpo.latent.sampler import LatentSampler

    out = tmp_path / "lars.pt"
    main(["--train-parquet", str(train_parquet), "--out", str(out), "--mode", "lars", "--encoder", str(encoder_dir),
          "--policy-hidden-size", "64", "--latent-dim", "8", "--hidden-width", "16", "--epochs", "1",
          "--device", "cpu", "--no-progress"])
    sampler = LatentSampler.from_checkpoint(out)
    assert sampler.condition_scheme == "question"
    conditions = [build_condition_text("Tom has 2 apples.", p) for p in ("First", "First, 2 + 2 = 4. So")]
    draws = sampler.sample_latent_embeddings(conditions, 3, alpha=1.0,
                                             generator=[torch.Generator().manual_seed(0) for _ in conditions])
    torch.testing.assert_close(draws.z[0], draws.z[1])
