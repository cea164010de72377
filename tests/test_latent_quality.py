"""recipe/iib_lpo/latent_quality.py: known answers of the pure metric arithmetic, the
first-token-distinct arm, the reward on prefix + continuation, and one end-to-end run on a tiny
random model (CLI without latents; in-process with a stand-in sampler for the latent arms)."""

import json
import math

import numpy as np
import pytest
import torch

from recipe.iib_lpo import latent_quality as lq
from recipe.iib_lpo.latent.reference import kl_divergence, tempered_logprobs

K = 3


# --------------------------------------------------------------------------------------------
# Pure arithmetic
# --------------------------------------------------------------------------------------------


def test_bootstrap_ci_of_a_constant_difference_is_that_constant():
    """Forks vary a lot but the arm is plain + 0.25 at every fork: a PAIRED bootstrap has no spread
    (mutation: resampling arm and plain indices independently gives a wide interval)."""
    plain = np.random.default_rng(1).uniform(0, 3, size=50)
    lower, upper = lq.paired_bootstrap_ci(plain + 0.25, plain, lq.mean_diff, num_resamples=500, seed=3)
    assert lower == pytest.approx(0.25, abs=1e-9) and upper == pytest.approx(0.25, abs=1e-9)


def test_bootstrap_ci_brackets_the_mean_and_ratio_of_identical_arms_is_one():
    rng = np.random.default_rng(0)
    plain = rng.uniform(0.2, 1.0, size=40)
    arm = plain + rng.normal(0.1, 0.2, size=40)
    lower, upper = lq.paired_bootstrap_ci(arm, plain, lq.mean_diff, 1000, seed=0)
    assert lower < float(np.mean(arm - plain)) < upper and upper - lower < 0.2
    assert lq.paired_bootstrap_ci(plain, plain, lq.mean_ratio, 200, seed=0) == pytest.approx([1.0, 1.0])
    assert float(lq.mean_ratio(np.array([0.5, 1.0]), np.array([0.25, 0.5]))) == pytest.approx(2.0)
    # undefined ratio everywhere (plain never right) -> no interval; no forks -> no interval
    assert lq.paired_bootstrap_ci(plain, np.zeros(40), lq.mean_ratio, 50) is None
    assert lq.paired_bootstrap_ci(np.zeros(0), np.zeros(0), lq.mean_diff, 50) is None


def test_paired_values_drop_undefined_forks_and_refuse_unpaired_lists():
    arm, plain = lq.paired_values([0.5, None, 0.2], [0.4, 0.3, None])
    assert arm.tolist() == [0.5] and plain.tolist() == [0.4]
    with pytest.raises(ValueError, match="share the forks"):
        lq.paired_values([1.0], [1.0, 2.0])


def test_kl_divergence_known_values():
    p = torch.log(torch.tensor([0.5, 0.5, 0.0]))
    q = torch.log(torch.tensor([0.25, 0.5, 0.25]))
    assert float(kl_divergence(p, p)) == 0.0
    assert float(kl_divergence(p, q)) == pytest.approx(0.5 * math.log(2.0))  # the 0 entry contributes 0
    assert float(kl_divergence(q, p)) == math.inf  # q has mass where p has none
    # row-wise on [..., V]: the fork-mode training's fork KL is the same function
    assert kl_divergence(torch.stack([p, q]), torch.stack([q, q])).tolist() == pytest.approx([0.5 * math.log(2.0), 0.0])


def test_tempered_logprobs_are_verls_actor_view():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    torch.testing.assert_close(tempered_logprobs(logits, 0.5), torch.log_softmax(logits / 0.5, dim=-1))
    with pytest.raises(ValueError):
        tempered_logprobs(logits, 0.0)


def test_truncated_share_and_threshold_spec():
    # weights exp(-r): e^1 and e^0.9 > 2 (truncated), 1, e^-0.8 (the arm's token is likelier: kept)
    assert lq.truncated_share(np.array([-1.0, -0.9, 0.0, 0.8]), 2.0) == 0.5
    assert lq.truncated_share(np.zeros(0), 2.0) is None
    assert lq.parse_is_threshold(2.0) == 2.0 and lq.parse_is_threshold("0.5_5.0") == 5.0
    with pytest.raises(TypeError):
        lq.parse_is_threshold(True)


def test_the_threshold_is_verls_rollout_is_threshold():
    value, source = lq.rollout_is_threshold()
    assert value == 2.0 and "rollout_is_threshold" in source
    default, path = lq.verl_is_threshold_default()
    assert default == 2.0 and path.endswith("rollout_correction.yaml")


def test_distinct_answer_count():
    assert lq.distinct_answer_count(["7", " 7", None, "8", ""]) == 2
    assert lq.distinct_answer_count([None, None]) == 0


def _metrics(**overrides):
    base = dict(branch_acc=0.5, acc_ratio_ci=[0.85, 1.1], distinct4_diff_ci=[0.01, 0.05], answers_diff_ci=[0.1, 0.4],
                fork_kl_median=0.2, log_ratio_mean=0.1, truncated_share=0.05, z_usage=0.03, nll_ratio=1.05)
    base.update(overrides)
    return base


def test_acceptance_checks_each_criterion():
    assert all(lq.acceptance_checks(_metrics(), plain_branch_acc=0.5).values())
    failing = {
        "branch_acc": [dict(branch_acc=0.44), dict(acc_ratio_ci=[0.79, 1.0])],
        "diversity": [dict(distinct4_diff_ci=[0.0, 0.1]), dict(answers_diff_ci=[-0.1, 0.3])],
        "fork_kl_median": [dict(fork_kl_median=0.04), dict(fork_kl_median=1.01)],
        "log_ratio_mean": [dict(log_ratio_mean=0.21)],
        "truncated_share": [dict(truncated_share=0.11)],
        "z_usage": [dict(z_usage=0.019)],
        "nll_ratio": [dict(nll_ratio=1.11)],
    }
    for key, cases in failing.items():
        for case in cases:
            checks = lq.acceptance_checks(_metrics(**case), plain_branch_acc=0.5)
            assert checks[key] is False, (key, case)
            assert all(v for k, v in checks.items() if k != key), (key, case)
    nulls = lq.acceptance_checks(_metrics(fork_kl_median=None, z_usage=None, acc_ratio_ci=None), 0.5)
    assert nulls["fork_kl_median"] is None and nulls["z_usage"] is None and nulls["branch_acc"] is None


def _branch(correct, text, answer, log_ratios=(0.0, 0.0), nll=(1.0, 2.0), kl=None):
    return lq.Branch([1, 2], text, correct, answer, np.array(log_ratios), np.array(nll), kl)


def test_summary_of_plain_against_itself():
    """plain vs plain: ratio 1 with CI [1, 1], every difference 0, log ratio 0, NLL ratio 1."""
    forks = [
        [_branch(True, "a b c d e", "1"), _branch(False, "a b c d f", "2"), _branch(True, "x y z w v", "1")],
        [_branch(False, "p q r s t", None), _branch(True, "p q r s t", "3"), _branch(True, "u v w x y", "3")],
    ]
    m = lq.summarize_arm(forks, forks, threshold=2.0, num_resamples=100)
    assert m["branch_acc"] == pytest.approx(4 / 6) and m["acc_ratio"] == 1.0
    assert m["acc_ratio_ci"] == pytest.approx([1.0, 1.0])
    assert m["distinct4_diff"] == 0.0 and m["distinct4_diff_ci"] == [0.0, 0.0]
    assert m["answers_diff"] == 0.0 and m["answers_diff_ci"] == [0.0, 0.0]
    assert m["log_ratio_mean"] == 0.0 and m["truncated_share"] == 0.0 and m["nll_ratio"] == 1.0
    assert m["fork_kl_median"] is None and m["num_branches"] == 6 and m["num_tokens"] == 12
    # an arm with one more distinct answer at fork 0 and lower plain-model likelihood
    other = [[_branch(True, "a b c d e", "1"), _branch(False, "a b c d f", "2"), _branch(True, "x", "4", nll=(2, 4))],
             forks[1]]
    m2 = lq.summarize_arm(other, forks, threshold=2.0, num_resamples=100)
    assert m2["answers_diff"] == 0.5 and m2["nll_ratio"] == pytest.approx(21 / 18)


# --------------------------------------------------------------------------------------------
# Model glue on a tiny random model
# --------------------------------------------------------------------------------------------


def _write_data(path, n):
    import pandas as pd

    rows = []
    for i in range(n):
        question = f"Tom has {i + 3} apples and eats 1. How many are left?"
        rows.append({
            "data_source": "demo_arith",
            "prompt": [{"role": "user", "content": question + "\nPut your final answer within \\boxed{}."}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": str(i + 2)},
            "extra_info": {"index": i, "question": question},
        })
    pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.fixture(scope="module")
def tiny_run(tiny_qwen2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_qwen2_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_qwen2_dir), dtype=torch.float32).eval()
    return lq._Run(model, tokenizer, tokenizer.eos_token_id, K, 24, 1.0, 1.0, 1.0, 0)


def _fork(run, parent_text, ground_truth, position=None):
    from recipe.iib_lpo.demo.warmstart import chat_prompt_ids

    messages = [{"role": "user", "content": "Tom has 8 apples and eats 1."}]
    parent = run.tokenizer.encode(parent_text)
    return lq.Fork(0, "demo_arith", ground_truth, {"index": 0, "question": messages[0]["content"]}, messages,
                   chat_prompt_ids(run.tokenizer, messages), parent, len(parent) if position is None else position, 1.0)


def test_first_token_distinct_siblings_start_with_distinct_tokens(tiny_run):
    fork = _fork(tiny_run, "First we count the apples and then", "7", position=3)
    branches = lq._first_token_distinct(tiny_run, fork, budget=6)
    firsts = [b.continuation[0] for b in branches]
    assert len(branches) == K and len(set(firsts)) == K
    assert all(1 <= len(b.continuation) <= 6 for b in branches)
    # only the first token's ratio differs from plain: 0 for the first sibling, > 0 after
    assert branches[0].log_ratios[0] == 0.0 and all(b.log_ratios[0] > 0 for b in branches[1:])
    assert all(np.all(b.log_ratios[1:] == 0.0) for b in branches)


def test_reward_scores_the_prefix_plus_continuation(tiny_run):
    """The answer sits in the prefix r[:t*]: the branch is right for gold 7, wrong for 8 (mutation:
    scoring the continuation alone fails the first)."""
    for gold, expected in (("7", True), ("8", False)):
        fork = _fork(tiny_run, "So the answer is \\boxed{7}.", gold)
        conts = lq._sample(tiny_run, fork.context, 4, torch.Generator().manual_seed(0), num_samples=2)
        conts = [[t for t in c if t < 300] or [17] for c in conts]  # keep clear of a second box
        branches = lq._score_branches(tiny_run, fork, conts)
        assert [b.correct for b in branches] == [expected, expected]
        assert all(b.answer == "7" for b in branches)
        assert all(np.all(b.log_ratios == 0.0) and b.fork_kl is None for b in branches)


class _RecordingSampler:
    """A real LatentSampler (tiny encoder, random CVAE) that records how the latent arms call it."""

    def __init__(self, inner):
        self.inner, self.couplings, self.z_usage_calls = inner, [], []
        self.device = inner.device

    def sample_latent_embeddings(self, condition_texts, num_samples, alpha, generator=None, coupling="independent"):
        self.couplings.append(coupling)
        return self.inner.sample_latent_embeddings(condition_texts, num_samples, alpha, generator=generator,
                                                   coupling=coupling)

    def z_usage(self, condition_texts, continuation_texts):
        self.z_usage_calls.append((list(condition_texts), list(continuation_texts)))
        return self.inner.z_usage(condition_texts, continuation_texts)


@pytest.fixture(scope="module")
def latent_sampler(tmp_path_factory, tiny_qwen2_dir):
    from transformers import AutoConfig

    from recipe.iib_lpo.latent.cvae import CVAEConfig, LatentCVAE
    from recipe.iib_lpo.latent.sampler import LatentSampler
    from recipe.iib_lpo.latent.text_encoder import TextEncoder, build_tiny_encoder_dir

    encoder = TextEncoder(build_tiny_encoder_dir(tmp_path_factory.mktemp("encoder"), hidden_size=32, seed=0),
                          max_length=64, micro_batch_size=8)
    torch.manual_seed(0)
    hidden = AutoConfig.from_pretrained(str(tiny_qwen2_dir)).hidden_size
    cvae = LatentCVAE(CVAEConfig(embed_dim=32, latent_dim=6, hidden_width=16, policy_hidden_size=hidden,
                                 projector_hidden_width=16))
    return _RecordingSampler(LatentSampler(encoder, cvae, device="cpu"))


ARM_KEYS = {"branch_acc", "acc_ratio", "acc_ratio_ci", "distinct4_diff", "distinct4_diff_ci", "answers_diff",
            "answers_diff_ci", "fork_kl_median", "log_ratio_mean", "truncated_share", "z_usage", "nll_ratio"}
CRITERIA = {"branch_acc", "diversity", "fork_kl_median", "log_ratio_mean", "truncated_share", "z_usage", "nll_ratio"}


def test_end_to_end_json_with_every_key(tmp_path, tiny_qwen2_dir, latent_sampler, capsys):
    data = _write_data(tmp_path / "val.parquet", 5)
    # CLI, no latent checkpoint: the non-latent arms only
    out = tmp_path / "plain.json"
    assert lq.main(["--policy", str(tiny_qwen2_dir), "--data", str(data), "--num-forks", "2", "--k", str(K),
                    "--max-new-tokens", "20", "--bootstrap", "20", "--out", str(out), "--no-progress"]) == 0
    report = json.loads(out.read_text())
    assert set(report["arms"]) == {"plain", "first_token_distinct"} and "first_token_distinct" in capsys.readouterr().out
    # in-process with a sampler: every arm, the same forks
    sampler = latent_sampler
    out = tmp_path / "all.json"
    report = lq.measure_latent_quality(tiny_qwen2_dir, data, sampler=sampler, num_forks=2, k=K, max_new_tokens=20,
                                       bootstrap=20, out=out, progress=False, alpha=4.0)
    assert json.loads(out.read_text()) == report
    assert set(report) == {"default_arm", "meta", "arms", "acceptance"} and report["default_arm"] == "plain"  # the YAML default: latent.mode=none
    assert list(report["arms"]) == list(lq.ARMS)
    meta = report["meta"]
    assert meta["num_forks"] == 2 and meta["is_threshold"] == 2.0
    assert meta["parents_sampled"] == 2 + meta["skipped_too_short"] and meta["seconds"] > 0
    assert meta["args"]["k"] == K and meta["branching"]["t_margin"] == 8
    for arm, metrics in report["arms"].items():
        assert ARM_KEYS <= set(metrics), arm
        assert set(report["acceptance"][arm]) == CRITERIA
        assert metrics["num_branches"] == 2 * K
    plain, latent = report["arms"]["plain"], report["arms"]["latent"]
    assert plain["log_ratio_mean"] == 0.0 and plain["nll_ratio"] == 1.0 and plain["distinct4_diff"] == 0.0
    for arm in ("plain", "first_token_distinct"):
        assert report["arms"][arm]["fork_kl_median"] is None and report["arms"][arm]["z_usage"] is None
        assert report["acceptance"][arm]["z_usage"] is None
    for arm in ("latent", "latent_orthogonal"):
        assert report["arms"][arm]["fork_kl_median"] > 0 and report["arms"][arm]["z_usage"] >= 0
    assert latent["log_ratio_mean"] != 0.0
    assert sampler.couplings == ["independent", "orthogonal"] * 2
    [(conditions, continuations)] = sampler.z_usage_calls
    assert len(conditions) == 2 and all("\x1e" in c for c in conditions) and len(continuations) == 2
    assert latent["z_usage"] == pytest.approx(float(sampler.inner.z_usage(conditions, continuations).mean()))
    # the same forks as the CLI run (seeds keyed on the row, not on the arms that run)
    assert meta["fork_points"] == json.loads((tmp_path / "plain.json").read_text())["meta"]["fork_points"]


def test_too_few_problems_is_a_clear_error(tmp_path, tiny_qwen2_dir):
    data = _write_data(tmp_path / "val.parquet", 2)
    with pytest.raises(ValueError, match="fewer than --num-forks=3"):
        lq.measure_latent_quality(tiny_qwen2_dir, data, num_forks=3, progress=False)
    assert lq.main(["--policy", str(tiny_qwen2_dir), "--data", str(data), "--num-forks", "0"]) == 2
