"""Difficulty-sensitive attention heads: closed-form statistics, planted correlations, the
difficulty / budget mapping, and the CLI on a tiny Qwen2."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from recipe.iib_lpo.eval import attention_heads as ah


def _uniform_causal(heads: int, length: int) -> torch.Tensor:
    rows = torch.tril(torch.ones(length, length))
    return (rows / rows.sum(-1, keepdim=True)).expand(heads, length, length)


def test_stats_closed_form_uniform_and_one_hot_attention():
    mask = torch.tensor([False, True, True, False, False])
    uniform = _uniform_causal(2, 5)
    one_hot = torch.eye(5).expand(2, 5, 5)
    stats = ah.prompt_attention_stats([uniform, one_hot.unsqueeze(0)], mask)
    assert stats["entropy"].shape == (2, 2)
    # uniform over the q + 1 visible keys: normalised entropy exactly 1; one-hot: 0
    assert torch.allclose(stats["entropy"][0], torch.ones(2, dtype=torch.float64))
    assert torch.allclose(stats["entropy"][1], torch.zeros(2, dtype=torch.float64))
    # queries 3 and 4 put 2/4 and 2/5 of their mass on the two question tokens
    assert torch.allclose(stats["question_mass"][0], torch.full((2,), (2 / 4 + 2 / 5) / 2, dtype=torch.float64))
    assert torch.allclose(stats["question_mass"][1], torch.zeros(2, dtype=torch.float64))


def test_stats_reject_bad_input():
    attn = [_uniform_causal(2, 4)]
    with pytest.raises(ValueError, match="after the question"):
        ah.prompt_attention_stats(attn, torch.tensor([False, False, True, True]))
    with pytest.raises(ValueError, match="at least one True"):
        ah.prompt_attention_stats(attn, torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not match"):
        ah.prompt_attention_stats([_uniform_causal(2, 3)], torch.tensor([True, False, False, False]))
    nan_attn = _uniform_causal(2, 4).clone()
    nan_attn[0, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        ah.prompt_attention_stats([nan_attn], torch.tensor([True, False, False, False]))


def test_planted_correlation_is_found_and_constant_head_is_undefined():
    rng = np.random.default_rng(0)
    levels = np.array([1, 2, 3, 4, 5, 1, 2, 3, 4, 5])
    stat = rng.normal(size=(10, 3, 4))
    stat[:, 2, 1] = levels * 0.1  # rank-identical to level (ties included)
    stat[:, 0, 0] = 0.7  # constant: no correlation defined
    rho, pvalue = ah.head_difficulty_correlation(stat, levels)
    assert rho[2, 1] == pytest.approx(1.0)
    assert np.isnan(rho[0, 0]) and np.isnan(pvalue[0, 0])
    from scipy.stats import spearmanr

    assert rho[1, 3] == pytest.approx(spearmanr(stat[:, 1, 3], levels).statistic)
    negated = -stat
    top = ah.select_top_heads({"entropy": stat, "question_mass": negated}, {"entropy": rho, "question_mass": -rho}, {"entropy": pvalue, "question_mass": pvalue}, top_k=3)
    assert [(t["stat"], t["layer"], t["head"]) for t in top[:2]] == [("entropy", 2, 1), ("question_mass", 2, 1)]
    assert top[0]["rho"] == pytest.approx(1.0) and top[1]["rho"] == pytest.approx(-1.0)
    assert top[0]["mean"] == pytest.approx(stat[:, 2, 1].mean()) and top[0]["std"] == pytest.approx(stat[:, 2, 1].std())
    with pytest.raises(ValueError):
        ah.head_difficulty_correlation(stat, np.full(10, 3))


def test_estimate_difficulty_and_branch_budget():
    head = {"stat": "entropy", "layer": 0, "head": 1, "rho": 0.8, "mean": 0.5, "std": 0.1}
    stats_at = lambda v: {"entropy": np.array([[0.0, v]])}  # noqa: E731
    assert ah.estimate_difficulty(stats_at(0.5), [head]) == pytest.approx(0.5)
    phi1 = 0.5 * (1 + math.erf(1 / math.sqrt(2)))
    assert ah.estimate_difficulty(stats_at(0.6), [head]) == pytest.approx(phi1)
    assert ah.estimate_difficulty(stats_at(0.6), [{**head, "rho": -0.8}]) == pytest.approx(1 - phi1)
    # two heads, weights |rho|: z = +1 (rho 0.8) and z = -1 signed by rho -0.2 -> +1 -> (0.8 + 0.2) / 1.0
    other = {"stat": "question_mass", "layer": 0, "head": 0, "rho": -0.2, "mean": 0.3, "std": 0.1}
    both = {"entropy": np.array([[0.0, 0.6]]), "question_mass": np.array([[0.2, 0.0]])}
    assert ah.estimate_difficulty(both, [head, other]) == pytest.approx(phi1)
    with pytest.raises(ValueError):
        ah.estimate_difficulty(stats_at(0.5), [])
    with pytest.raises(ValueError):
        ah.estimate_difficulty(stats_at(float("nan")), [head])

    assert [ah.branch_budget_for_difficulty(d, 1, 3) for d in (0.0, 0.33, 0.34, 0.66, 0.67, 1.0)] == [1, 1, 2, 2, 3, 3]
    assert ah.branch_budget_for_difficulty(0.9, 2, 2) == 2
    for bad in ((1.5, 1, 3), (float("nan"), 1, 3), (0.5, 3, 1), (0.5, 1.0, 3)):
        with pytest.raises(ValueError):
            ah.branch_budget_for_difficulty(*bad)


def test_parse_level():
    assert [ah.parse_level(x) for x in ("Level 3", "level 5", 2, "4", None, "Level ?", np.int64(1))] == [3, 5, 2, 4, None, None, 1]


QUESTIONS = [
    ("What is 2 + 3?", 1),
    ("Tom has 4 apples and buys 3 more. How many apples does he have?", 2),
    ("Compute 12 * 7 and then subtract 5 from the product.", 3),
    ("A train travels 60 kilometers per hour for 3 hours. How far does it travel in total?", 4),
    ("Each box holds 8 pencils. There are 9 boxes and 5 pencils are lost. How many pencils are left?", 5),
    ("What is 9 - 4?", 1),
    ("The sum of 15 and 27 is multiplied by 2. What is the result?", 3),
    ("Let me think: 7 times 8 plus 6 times 9 minus 10, what is the total?", 5),
]


def _write_levelled_parquet(path, with_unlabelled=True):
    from data_prep.prompt_template import build_chat_prompt

    rows = [
        {
            "data_source": "math500",
            "prompt": build_chat_prompt(q),
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": "0"},
            "extra_info": {"index": i, "split": "test", "question": q, "answer": "0", "level": f"Level {lvl}"},
        }
        for i, (q, lvl) in enumerate(QUESTIONS)
    ]
    if with_unlabelled:
        rows.append({**rows[0], "extra_info": {"index": 99, "split": "test", "question": "What is 1 + 1?", "answer": "2", "level": None}})
    pd.DataFrame(rows).to_parquet(path)


def test_question_mask_covers_exactly_the_question(tiny_qwen2_dir):
    from transformers import AutoTokenizer

    from data_prep.prompt_template import build_chat_prompt

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_qwen2_dir))
    question = QUESTIONS[1][0]
    ids, mask = ah.question_token_mask(tokenizer, build_chat_prompt(question), question)
    assert len(ids) == mask.shape[0]
    assert tokenizer.decode([t for t, m in zip(ids, mask) if m]).strip() == question
    with pytest.raises(ValueError):
        ah.question_token_mask(tokenizer, build_chat_prompt(question), "not in the prompt")


def test_heads_cli_on_tiny_qwen2(tiny_qwen2_dir, tmp_path):
    from scipy.stats import entropy as scipy_entropy
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recipe.iib_lpo.eval.cli import main

    data = tmp_path / "math_levels.parquet"
    _write_levelled_parquet(data)
    out = tmp_path / "heads"
    assert main(["heads", "--model", str(tiny_qwen2_dir), "--data", str(data), "--out", str(out), "--top-k", "3", "--no-progress"]) == 0
    result = json.loads((out / "attention_heads.json").read_text())
    png = (out / "attention_heads.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert result["num_problems"] == len(QUESTIONS) and result["skipped"]["no_level"] == 1
    assert result["level_counts"] == {"1": 2, "2": 1, "3": 2, "4": 1, "5": 2}
    assert np.array(result["rho"]["entropy"], dtype=float).shape == (2, 2)  # tiny model: 2 layers x 2 heads
    top = result["top_heads"]
    assert len(top) == 3 and all(abs(a["rho"]) >= abs(b["rho"]) for a, b in zip(top, top[1:]))
    assert ah.load_top_heads(out / "attention_heads.json") == top

    # recompute one head's statistic over the problems independently (scipy entropy of each row)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_qwen2_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_qwen2_dir), attn_implementation="eager").eval()
    head = top[0]
    values, levels, lengths = [], [], []
    from data_prep.prompt_template import build_chat_prompt

    for question, level in QUESTIONS:
        ids, mask = ah.question_token_mask(tokenizer, build_chat_prompt(question), question)
        with torch.no_grad():
            attn = model(input_ids=torch.tensor([ids]), output_attentions=True).attentions[head["layer"]][0, head["head"]].double()
        assert torch.allclose(attn.sum(-1), torch.ones(len(ids), dtype=torch.float64), atol=1e-5)
        if head["stat"] == "entropy":
            values.append(np.mean([scipy_entropy(attn[q, : q + 1].numpy()) / math.log(q + 1) for q in range(1, len(ids))]))
        else:
            last_q = int(torch.nonzero(mask).max())
            values.append(float(attn[last_q + 1 :][:, mask].sum(-1).mean()))
        levels.append(level)
        lengths.append(int(mask.sum()))
    from scipy.stats import spearmanr

    assert result["question_length_rho"] == pytest.approx(spearmanr(lengths, levels).statistic)

    assert head["rho"] == pytest.approx(spearmanr(values, levels).statistic, abs=1e-9)
    assert head["mean"] == pytest.approx(np.mean(values), rel=1e-6)
    difficulty = ah.estimate_difficulty({head["stat"]: np.full((2, 2), head["mean"])}, [head])
    assert difficulty == pytest.approx(0.5)
