"""Per-step I2B-LPO metrics from the agent loop's ``extra_fields`` (pure; logged under ``iib_lpo/``).

Every metric is a plain float so verl's tracker (console, wandb, tensorboard, JSONL) logs it.
Meanings (README, "Metrics"):
- ``fork_rate``: share of initial rollouts that were forked; ``fork_reason/<r>``: share per reason.
- ``fork_pos_frac``: mean t*/L of forked parents; ``fork_entropy``: mean H(t*).
- ``latent_status/<s>``: share of branches per latent status; ``latent_prob``/``latent_scale``/
  ``latent_norm``: means over branches (scale 0 for branches without a latent; norm over
  injected ones).
- ``ib_score_kept`` / ``ib_score_dropped``: mean S_IB; ``keep_rate``: kept share of branches.
- ``acc_initial`` / ``acc_branch``: mean r_v of initial rollouts / branches.
- ``prefix_cache_hit``: cached prompt tokens / (prompt + prefix) tokens over forked branches.
- ``generated_tokens_per_prompt`` and ``generated_vs_plain``: tokens the engine generated per
  prompt, and that over what a plain group of the same size would generate (n x the mean length
  of the initial rollouts).
- ``response_length``: mean response length (prefix + continuation); ``rep4``: mean share of
  repeated 4-grams (``ib.repeated_ngram_fraction``) of the decoded responses.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from recipe.iib_lpo.ib import repeated_ngram_fraction, word_tokens
from recipe.iib_lpo.ib_step import ROW_BRANCH, ROW_INITIAL, RowRole

PREFIX = "iib_lpo/"


def _mean(values: Sequence[float]) -> float:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else math.nan


def iib_lpo_step_metrics(
    roles: Sequence[RowRole],
    extra_fields: Sequence[dict[str, Any]],
    rewards: torch.Tensor,
    scores: torch.Tensor,
    keep: torch.Tensor,
    prompt_lengths: Sequence[int],
    response_texts: Sequence[str],
) -> dict[str, float]:
    """The metrics listed in the module docstring, keyed ``iib_lpo/<name>``; undefined ones omitted."""
    n = len(roles)
    if not (len(extra_fields) == rewards.shape[0] == scores.shape[0] == keep.shape[0] == len(prompt_lengths)
            == len(response_texts) == n):
        raise ValueError("iib_lpo_step_metrics: every per-row input must have one entry per row")
    initial = [i for i, r in enumerate(roles) if r.kind == ROW_INITIAL]
    branches = [i for i, r in enumerate(roles) if r.kind == ROW_BRANCH]
    out: dict[str, float] = {}
    reasons = Counter(str(extra_fields[i].get("iib_fork_reason")) for i in initial)
    for reason, count in reasons.items():
        out[f"fork_reason/{reason}"] = count / len(initial)
    forked = [i for i in initial if int(extra_fields[i].get("iib_fork_position", -1)) >= 0]
    out["fork_rate"] = len(forked) / len(initial) if initial else math.nan
    out["fork_pos_frac"] = _mean(
        [extra_fields[i]["iib_fork_position"] / max(1, extra_fields[i]["iib_generated_length"]) for i in forked]
    )
    out["fork_entropy"] = _mean([extra_fields[i].get("iib_fork_entropy") for i in forked])
    statuses = Counter(str(extra_fields[i].get("iib_latent_status")) for i in branches)
    for status, count in statuses.items():
        out[f"latent_status/{status}"] = count / len(branches)
    out["latent_prob"] = _mean([extra_fields[i].get("iib_latent_prob") for i in branches])
    out["latent_scale"] = _mean([extra_fields[i].get("iib_latent_scale") for i in branches])
    out["latent_norm"] = _mean([extra_fields[i].get("iib_latent_norm") for i in branches])
    keep_list = keep.tolist()
    out["ib_score_kept"] = _mean([float(scores[i]) for i in range(n) if keep_list[i]])
    out["ib_score_dropped"] = _mean([float(scores[i]) for i in range(n) if not keep_list[i]])
    out["keep_rate"] = _mean([1.0 if keep_list[i] else 0.0 for i in branches])
    out["acc_initial"] = _mean([float(rewards[i]) for i in initial])
    out["acc_branch"] = _mean([float(rewards[i]) for i in branches])
    hits = [
        (extra_fields[i].get("iib_num_cached_tokens"), prompt_lengths[i] + int(extra_fields[i]["iib_prefix_length"]))
        for i in branches
        if int(extra_fields[i].get("iib_fork_position", -1)) >= 0
    ]
    hits = [(c, total) for c, total in hits if c is not None and total > 0]
    out["prefix_cache_hit"] = sum(c for c, _ in hits) / sum(t for _, t in hits) if hits else math.nan
    uids = {r.uid for r in roles}
    generated = sum(int(e.get("iib_generated_length", 0)) for e in extra_fields)
    out["generated_tokens_per_prompt"] = generated / len(uids) if uids else math.nan
    plain = len(roles) * _mean([extra_fields[i]["iib_generated_length"] for i in initial])
    out["generated_vs_plain"] = generated / plain if plain and not math.isnan(plain) else math.nan
    out["response_length"] = _mean(
        [int(e.get("iib_prefix_length", 0)) + int(e.get("iib_generated_length", 0)) for e in extra_fields]
    )
    out["rep4"] = _mean([repeated_ngram_fraction(word_tokens(t)) for t in response_texts])
    # undefined means (no branches, nothing dropped, ...) are left out rather than logged as NaN
    return {PREFIX + k: v for k, v in out.items() if not math.isnan(v)}
