"""Are latent branches better explorations than plain resampling? (``python -m recipe.iib_lpo.latent_quality``)

At the fork points of a validation split, every arm draws K branches that continue
``prompt + r[:t*]`` with the SAME forks, K and sampling settings (temperature, top-p, the
continuation budget), differing only in what the arm says:

* ``plain``: K plain resamples from t*.
* ``latent``: K independent prior draws z, v = alpha * P(z) added to the fork token's embedding.
* ``latent_orthogonal``: the same with ``coupling="orthogonal"`` (siblings' noise orthogonal,
  each marginally from the prior).
* ``first_token_distinct``: the K siblings' first tokens at t* drawn WITHOUT replacement from the
  fork's sampling distribution (temperature and top-p applied; Gumbel-top-k), each then
  continued plainly (the idea of LATR, arXiv 2510.24302).

Fork points. One parent per problem, in file order, sampled from the policy with the reference
generator (``latent.reference.generate_with_latents_batched``, ``max_new_tokens`` tokens: the
rollout's response length); t* by the recipe's fork rule (``algorithm.branching``) with the
``branching`` group of ``config/iib_lpo.yaml`` read through the rollout's own parser
(``BranchingRolloutConfig.from_trainer_config``; its ``latent`` block is set to mode "none"
for that parse only, because the YAML's cvae default needs a placeholder token id that the
branching rule does not use). The per-token entropies are EXACT: the entropy of the sampling
distribution (``softmax(top_p(logits / T))``) from the full HF logits, whereas the rollout
estimates them from vLLM's top-k log-probs (``entropy.estimate_entropy_from_topk``). Parents
too short to fork are counted (``meta.skipped_too_short``) and skipped. A branch may generate
``max_new_tokens - t*`` tokens, as the rollout's ``response_length - t*``. Every seed is keyed
on (``--seed``, the problem's row, a stream), and all arms of one fork share the sampling
stream (common random numbers: paired differences are less noisy).

Metrics per arm (``arms.<arm>``; shares in [0, 1], log-probs in nats; "tempered" = verl's actor
view ``log_softmax(logits / T)``, without top-p; :func:`summarize_arm`):

* ``branch_acc``: share of branches whose prefix + continuation, decoded as verl's reward
  manager decodes (``skip_special_tokens=True``), is correct under ``reward.compute_score`` with
  the row's ``data_source``, ``reward_model.ground_truth`` and ``extra_info``.
* ``acc_ratio`` / ``acc_ratio_ci``: branch_acc / plain's, and a paired bootstrap 95 % interval
  over forks (:func:`paired_bootstrap_ci`).
* ``distinct4_diff`` / ``_ci``: per fork, ``eval.metrics.distinct_n(texts, 4)`` over the K
  continuation texts, arm minus plain (forks where either is undefined are left out and
  counted in ``distinct4_forks``).
* ``answers_diff`` / ``_ci``: per fork, the number of distinct final answers
  (``reward.extraction.extract_answer``; no answer counts as none) among the K siblings.
* ``fork_kl_median``: median over branches of KL(p_arm || p_plain) of the tempered next-token
  distribution at t* (null for the non-latent arms).
* ``log_ratio_mean``: mean over continuation tokens of tempered log pi_arm(y) - log pi_plain(y).
  For ``first_token_distinct`` only the first token differs: sibling k's first token is, in
  the sequential view of sampling without replacement, drawn from p renormalised over the
  tokens its earlier siblings did not take (:func:`without_replacement_log_ratios`).
* ``truncated_share``: share of continuation tokens whose importance weight
  pi_plain(y) / pi_arm(y) exceeds verl's rollout IS truncation threshold
  (``algorithm.rollout_correction.rollout_is_threshold``; :func:`rollout_is_threshold`).
* ``z_usage``: mean over latent dims of KL(q(z|x, y) || p(z|x)) at the forks
  (``sampler.z_usage``), y = the plain arm's first branch (null for the non-latent arms).
* ``nll_ratio``: per-token NLL of the arm's continuations under the plain model at
  temperature 1, arm mean / plain mean.

``acceptance.<arm>`` holds one boolean per criterion (:data:`ACCEPTANCE`, :func:`acceptance_checks`),
null where the metric is null; ``default_arm`` is the arm the recipe's default YAML corresponds
to (``latent`` unless ``iib_lpo.latent.mode`` is "none").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recipe.iib_lpo.algorithm.branching import gumbel_top_k, without_replacement_log_ratios
from recipe.iib_lpo.latent.reference import kl_divergence, tempered_logprobs

ARMS = ("plain", "latent", "latent_orthogonal", "first_token_distinct")
PLAIN_ARMS = ("plain", "first_token_distinct")
LATENT_COUPLING = {"latent": "independent", "latent_orthogonal": "orthogonal"}
DISTINCT_N = 4
CI_LEVEL = 0.95
# The acceptance bounds of each criterion (acceptance_checks).
ACCEPTANCE = {
    "acc_ratio_min": 0.9,  # branch_acc >= 0.9 x plain's
    "acc_ratio_ci_lower_min": 0.8,
    "fork_kl_range": (0.05, 1.0),
    "log_ratio_mean_max": 0.2,
    "truncated_share_max": 0.1,
    "z_usage_min": 0.02,
    "nll_ratio_max": 1.1,
}
RECIPE_DIR = Path(__file__).resolve().parent
RECIPE_YAML = RECIPE_DIR / "config" / "iib_lpo.yaml"
TRAINER_YAML = RECIPE_DIR / "config" / "iib_lpo_trainer.yaml"
# Seed streams (derived_seed): which draw a seed is for.
_STREAM_PARENT, _STREAM_FORK, _STREAM_BRANCHES, _STREAM_Z = range(4)


# --------------------------------------------------------------------------------------------
# Pure arithmetic
# --------------------------------------------------------------------------------------------


def derived_seed(seed: int, row: int, stream: int) -> int:
    """A 63-bit seed for one draw, from the run's seed, the problem's row and the stream."""
    return int(np.random.SeedSequence([int(seed), int(row), int(stream)]).generate_state(1, np.uint64)[0] >> 1)


def parse_is_threshold(spec: float | int | str) -> float:
    """The upper bound of a verl ``rollout_is_threshold`` spec: a float (TIS) or ``"lower_upper"`` (IcePop)."""
    if isinstance(spec, bool):
        raise TypeError("rollout_is_threshold must be a number or a string, not a boolean")
    upper = float(str(spec).split("_", 1)[-1]) if isinstance(spec, str) else float(spec)
    if not upper > 0:
        raise ValueError(f"rollout_is_threshold upper bound must be > 0, got {spec!r}")
    return upper


def truncated_share(log_ratios: np.ndarray, threshold: float) -> float | None:
    """Share of tokens whose importance weight pi_plain / pi_arm = exp(-log_ratio) exceeds ``threshold``."""
    log_ratios = np.asarray(log_ratios, dtype=np.float64)
    if log_ratios.size == 0:
        return None
    return float(np.mean(-log_ratios > math.log(threshold)))


def distinct_answer_count(answers: Sequence[str | None]) -> int:
    """Number of distinct final answers among siblings (stripped; a missing answer is not one)."""
    return len({a.strip() for a in answers if a is not None and a.strip()})


def paired_values(arm: Sequence[float | None], plain: Sequence[float | None]) -> tuple[np.ndarray, np.ndarray]:
    """The per-fork pairs (arm_i, plain_i) where both are defined, as two float arrays."""
    if len(arm) != len(plain):
        raise ValueError(f"{len(arm)} arm values but {len(plain)} plain values: the arms must share the forks")
    pairs = [(a, b) for a, b in zip(arm, plain) if a is not None and b is not None]
    return np.array([a for a, _ in pairs], dtype=np.float64), np.array([b for _, b in pairs], dtype=np.float64)


def mean_diff(arm: np.ndarray, plain: np.ndarray) -> np.ndarray:
    """Per-fork differences averaged over the last axis: mean(arm - plain)."""
    return np.mean(arm - plain, axis=-1)


def mean_ratio(arm: np.ndarray, plain: np.ndarray) -> np.ndarray:
    """mean(arm) / mean(plain) over the last axis (NaN where plain's mean is 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        num, den = np.mean(arm, axis=-1), np.mean(plain, axis=-1)
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def paired_bootstrap_ci(
    arm: np.ndarray,
    plain: np.ndarray,
    statistic: Callable[[np.ndarray, np.ndarray], np.ndarray],
    num_resamples: int,
    seed: int = 0,
    level: float = CI_LEVEL,
) -> list[float] | None:
    """Percentile bootstrap interval of ``statistic(arm, plain)``, resampling FORKS (pairs) together.

    ``statistic`` maps [..., n] arrays to [...] (:func:`mean_diff`, :func:`mean_ratio`). Returns
    [lower, upper], or None without forks or when every resample's statistic is undefined (NaN).
    """
    arm, plain = np.asarray(arm, dtype=np.float64), np.asarray(plain, dtype=np.float64)
    if arm.shape != plain.shape or arm.ndim != 1:
        raise ValueError(f"paired values must be two vectors of one length, got {arm.shape} and {plain.shape}")
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be >= 1, got {num_resamples}")
    if arm.size == 0:
        return None
    index = np.random.default_rng(seed).integers(0, arm.size, size=(num_resamples, arm.size))
    stats = statistic(arm[index], plain[index])
    if np.all(np.isnan(stats)):
        return None
    tail = 100.0 * (1.0 - level) / 2.0
    lower, upper = np.nanpercentile(stats, [tail, 100.0 - tail])
    return [float(lower), float(upper)]


def acceptance_checks(metrics: dict, plain_branch_acc: float) -> dict[str, bool | None]:
    """One boolean per criterion (:data:`ACCEPTANCE`) for one arm's metrics; None where a metric is null."""

    def check(value, test):
        return None if value is None else bool(test(value))

    acc_ci, d4_ci, ans_ci = metrics["acc_ratio_ci"], metrics["distinct4_diff_ci"], metrics["answers_diff_ci"]
    low_kl, high_kl = ACCEPTANCE["fork_kl_range"]
    return {
        "branch_acc": None if acc_ci is None else bool(
            metrics["branch_acc"] >= ACCEPTANCE["acc_ratio_min"] * plain_branch_acc
            and acc_ci[0] >= ACCEPTANCE["acc_ratio_ci_lower_min"]
        ),
        "diversity": None if d4_ci is None or ans_ci is None else bool(d4_ci[0] > 0 and ans_ci[0] > 0),
        "fork_kl_median": check(metrics["fork_kl_median"], lambda v: low_kl <= v <= high_kl),
        "log_ratio_mean": check(metrics["log_ratio_mean"], lambda v: v <= ACCEPTANCE["log_ratio_mean_max"]),
        "truncated_share": check(metrics["truncated_share"], lambda v: v <= ACCEPTANCE["truncated_share_max"]),
        "z_usage": check(metrics["z_usage"], lambda v: v >= ACCEPTANCE["z_usage_min"]),
        "nll_ratio": check(metrics["nll_ratio"], lambda v: v <= ACCEPTANCE["nll_ratio_max"]),
    }


# --------------------------------------------------------------------------------------------
# Branches and their summary
# --------------------------------------------------------------------------------------------


@dataclass
class Branch:
    """One sibling at one fork: what the summary needs of it."""

    continuation: list[int]  # the continuation's token ids
    text: str  # the continuation, decoded
    correct: bool  # prefix + continuation under the recipe's reward
    answer: str | None  # extract_answer(prefix + continuation)
    log_ratios: np.ndarray  # per continuation token: tempered log pi_arm - log pi_plain
    plain_nll: np.ndarray  # per continuation token: -log p_plain at temperature 1
    fork_kl: float | None  # KL(p_arm || p_plain) at t*, tempered (latent arms)


def _pooled(branches: Sequence[Branch], field: str) -> np.ndarray:
    return np.concatenate([getattr(b, field) for b in branches]) if branches else np.zeros(0)


def summarize_arm(
    forks: Sequence[Sequence[Branch]],
    plain_forks: Sequence[Sequence[Branch]],
    *,
    threshold: float,
    num_resamples: int,
    seed: int = 0,
    z_usage: float | None = None,
) -> dict:
    """``arms.<arm>`` of the report from the arm's and plain's branches (one list of K per fork)."""
    from recipe.iib_lpo.eval.metrics import distinct_n

    if len(forks) != len(plain_forks):
        raise ValueError(f"{len(forks)} forks for the arm but {len(plain_forks)} for plain")
    per_fork = {}
    for name, arm_forks in (("arm", forks), ("plain", plain_forks)):
        per_fork[name] = {
            "acc": [float(np.mean([b.correct for b in f])) for f in arm_forks],
            "distinct4": [distinct_n([b.text for b in f], DISTINCT_N) for f in arm_forks],
            "answers": [float(distinct_answer_count([b.answer for b in f])) for f in arm_forks],
        }
    arm, plain = per_fork["arm"], per_fork["plain"]
    branches = [b for f in forks for b in f]
    plain_branches = [b for f in plain_forks for b in f]
    branch_acc = float(np.mean([b.correct for b in branches]))
    plain_acc = float(np.mean([b.correct for b in plain_branches]))
    acc_arm, acc_plain = paired_values(arm["acc"], plain["acc"])
    d4_arm, d4_plain = paired_values(arm["distinct4"], plain["distinct4"])
    ans_arm, ans_plain = paired_values(arm["answers"], plain["answers"])
    kls = [b.fork_kl for b in branches if b.fork_kl is not None]
    log_ratios = _pooled(branches, "log_ratios")
    nll, plain_nll = _pooled(branches, "plain_nll"), _pooled(plain_branches, "plain_nll")

    def ci(a, b, statistic):
        return paired_bootstrap_ci(a, b, statistic, num_resamples, seed)

    return {
        "branch_acc": branch_acc,
        "acc_ratio": branch_acc / plain_acc if plain_acc > 0 else None,
        "acc_ratio_ci": ci(acc_arm, acc_plain, mean_ratio),
        "distinct4_diff": float(mean_diff(d4_arm, d4_plain)) if d4_arm.size else None,
        "distinct4_diff_ci": ci(d4_arm, d4_plain, mean_diff),
        "distinct4_forks": int(d4_arm.size),
        "answers_diff": float(mean_diff(ans_arm, ans_plain)),
        "answers_diff_ci": ci(ans_arm, ans_plain, mean_diff),
        "fork_kl_median": float(np.median(kls)) if kls else None,
        "log_ratio_mean": float(np.mean(log_ratios)) if log_ratios.size else None,
        "truncated_share": truncated_share(log_ratios, threshold),
        "z_usage": z_usage,
        "nll_ratio": float(np.mean(nll) / np.mean(plain_nll)) if nll.size and np.mean(plain_nll) > 0 else None,
        "num_branches": len(branches),
        "num_tokens": int(log_ratios.size),
    }


# --------------------------------------------------------------------------------------------
# Configuration read from the recipe and from verl
# --------------------------------------------------------------------------------------------


def recipe_defaults(yaml_path: Path = RECIPE_YAML) -> tuple[Any, str]:
    """(BranchingConfig, latent.mode) of the recipe's default YAML, through the rollout's parser."""
    from omegaconf import OmegaConf

    from recipe.iib_lpo.rollout.config import BranchingRolloutConfig

    config = OmegaConf.load(yaml_path)
    latent_mode = str(OmegaConf.select(config, "iib_lpo.latent.mode", default="cvae"))
    # mode=none for this parse only: the cvae default needs a placeholder id the fork rule never reads.
    parsed = BranchingRolloutConfig.from_trainer_config(
        OmegaConf.merge(config, {"iib_lpo": {"latent": {"mode": "none"}}})
    )
    return parsed.branching, latent_mode


def verl_is_threshold_default() -> tuple[float, str]:
    """(default, file) of verl's ``algorithm.rollout_correction.rollout_is_threshold`` in the installed
    verl (``verl/trainer/config/algorithm/rollout_correction.yaml``, the same default as
    ``verl.trainer.config.algorithm.RolloutCorrectionConfig``), read as YAML so verl is not imported."""
    import importlib.util

    from omegaconf import OmegaConf

    spec = importlib.util.find_spec("verl")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("verl is not installed: cannot read its rollout_is_threshold default")
    path = Path(list(spec.submodule_search_locations)[0]) / "trainer" / "config" / "algorithm" / "rollout_correction.yaml"
    return parse_is_threshold(OmegaConf.load(path)["rollout_is_threshold"]), str(path)


def rollout_is_threshold(trainer_yaml: Path = TRAINER_YAML) -> tuple[float, str]:
    """(threshold, where it was read) of verl 0.9.1's rollout IS truncation: the recipe trainer
    config's ``algorithm.rollout_correction.rollout_is_threshold`` (what the recipe trains with),
    else verl's default (:func:`verl_is_threshold_default`)."""
    from omegaconf import OmegaConf

    key = "algorithm.rollout_correction.rollout_is_threshold"
    value = OmegaConf.select(OmegaConf.load(trainer_yaml), key) if trainer_yaml.is_file() else None
    if value is None:
        return verl_is_threshold_default()
    return parse_is_threshold(value), f"{trainer_yaml.relative_to(RECIPE_DIR.parents[1])}: {key}"


# --------------------------------------------------------------------------------------------
# Forks and arms (model glue)
# --------------------------------------------------------------------------------------------


@dataclass
class Fork:
    """One fork point: a problem's parent and t*."""

    row: int
    data_source: str
    ground_truth: str
    extra_info: dict
    messages: list
    prompt_ids: list[int]
    parent_ids: list[int]
    position: int
    entropy: float

    @property
    def context(self) -> list[int]:
        return self.prompt_ids + self.parent_ids[: self.position]


@dataclass
class _Run:
    model: Any
    tokenizer: Any
    eos_token_id: int | None
    k: int
    max_new_tokens: int
    temperature: float
    top_p: float
    alpha: float
    seed: int
    sampler: Any = None

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def generator(self, row: int, stream: int, device=None) -> torch.Generator:
        return torch.Generator(device=device or self.device).manual_seed(derived_seed(self.seed, row, stream))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def _sample(run: _Run, context: list[int], budget: int, generator, latents=None, num_samples=None):
    from recipe.iib_lpo.latent.reference import generate_with_latents_batched

    out = generate_with_latents_batched(
        run.model, context, latents, budget, run.temperature, run.top_p, run.eos_token_id, generator,
        num_samples=num_samples, logprobs_mode="processed_logprobs",
    )
    return [list(ids) for ids, _ in out]


def collect_forks(run: _Run, problems: Sequence, num_forks: int, branching, progress: bool) -> tuple[list[Fork], int]:
    """Sample one parent per problem in file order until ``num_forks`` fork points exist.

    Returns (forks, number of parents too short to fork). Raises ValueError when the problems
    run out first."""
    from recipe.iib_lpo.algorithm.branching import choose_fork_position
    from recipe.iib_lpo.algorithm.entropy import entropy_from_logits
    from recipe.iib_lpo.demo.warmstart import chat_prompt_ids
    from recipe.iib_lpo.latent.reference import continuation_logits, top_p_filter

    forks, skipped = [], 0
    bar = _progress(progress, num_forks, "fork points")
    for row, problem in enumerate(problems):
        if len(forks) == num_forks:
            break
        prompt_ids = chat_prompt_ids(run.tokenizer, problem.messages)
        [parent] = _sample(run, prompt_ids, run.max_new_tokens, run.generator(row, _STREAM_PARENT), num_samples=1)
        with torch.no_grad():
            logits = continuation_logits(run.model, prompt_ids, parent, None)
        entropies = entropy_from_logits(top_p_filter(logits / run.temperature, run.top_p))
        decision = choose_fork_position(
            entropies.cpu(), branching, seed=derived_seed(run.seed, row, _STREAM_FORK) if branching.needs_seed else None
        )
        if not decision.should_fork:
            skipped += 1
            continue
        forks.append(Fork(row, problem.data_source, problem.ground_truth, problem.extra_info, problem.messages,
                          list(prompt_ids), parent, decision.position, decision.entropy))
        bar.update(1)
    bar.close()
    if len(forks) < num_forks:
        raise ValueError(
            f"only {len(forks)} fork points from {len(problems)} problems ({skipped} parents too short to fork); "
            f"--num-forks={num_forks} needs more problems (or a lower --num-forks)"
        )
    return forks, skipped


def _score_branches(run: _Run, fork: Fork, continuations, latents=None,
                    first_token_log_ratios=None) -> list[Branch]:
    """Branch records of one arm at one fork (one no-cache forward per branch and model view)."""
    from recipe.iib_lpo.latent.reference import continuation_logits
    from recipe.iib_lpo.reward import compute_score
    from recipe.iib_lpo.reward.extraction import extract_answer

    context, prefix = fork.context, fork.parent_ids[: fork.position]
    branches = []
    for k, cont in enumerate(continuations):
        with torch.no_grad():
            plain_logits = continuation_logits(run.model, context, cont, None)
            arm_logits = plain_logits if latents is None else continuation_logits(
                run.model, context, cont, latents[k])
        ids = torch.tensor(cont, dtype=torch.long, device=plain_logits.device).unsqueeze(-1)
        lp_plain, lp_arm = tempered_logprobs(plain_logits, run.temperature), tempered_logprobs(arm_logits, run.temperature)
        log_ratios = (lp_arm.gather(-1, ids) - lp_plain.gather(-1, ids)).squeeze(-1).double().cpu().numpy()
        if first_token_log_ratios is not None:
            log_ratios[0] = first_token_log_ratios[k]
        nll = -torch.log_softmax(plain_logits, dim=-1).gather(-1, ids).squeeze(-1).double().cpu().numpy()
        full_text = run.decode(prefix + cont)
        score = compute_score(fork.data_source, full_text, fork.ground_truth, fork.extra_info)
        branches.append(Branch(
            continuation=list(cont), text=run.decode(cont), correct=bool(score["acc"]), answer=extract_answer(full_text),
            log_ratios=log_ratios, plain_nll=nll,
            fork_kl=None if latents is None else float(kl_divergence(lp_arm[0], lp_plain[0])),
        ))
    return branches


def _first_token_distinct(run: _Run, fork: Fork, budget: int) -> list[Branch]:
    """K siblings whose first tokens are distinct (Gumbel-top-k on the fork's sampling distribution),
    each continued plainly; siblings beyond the support (top-p) draw their first token plainly."""
    from recipe.iib_lpo.latent.reference import continuation_logits, top_p_filter

    context = fork.context
    generator = run.generator(fork.row, _STREAM_BRANCHES)
    with torch.no_grad():  # the logits after the whole context (the dummy next token is not read)
        fork_logits = continuation_logits(run.model, context, context[-1:], None)[0]
    sampling = torch.log_softmax(top_p_filter(fork_logits.float() / run.temperature, run.top_p), dim=-1)
    firsts = gumbel_top_k(sampling, run.k, generator).tolist()
    extra = run.k - len(firsts)
    if extra:
        firsts += torch.multinomial(sampling.exp(), extra, replacement=True, generator=generator).tolist()
    ratios = without_replacement_log_ratios(tempered_logprobs(fork_logits, run.temperature), firsts[: run.k - extra])
    ratios += [0.0] * extra
    continuations = []
    for token in firsts:
        rest = [] if token == run.eos_token_id or budget <= 1 else _sample(
            run, context + [token], budget - 1, generator, num_samples=1)[0]
        continuations.append([token] + rest)
    return _score_branches(run, fork, continuations, first_token_log_ratios=ratios)


def _question_kwargs(fork: Fork) -> dict:
    return {"extra_info": fork.extra_info, "raw_prompt": fork.messages}


def condition_texts(run: _Run, forks: Sequence[Fork]) -> list[str]:
    """The CVAE condition of each fork as the rollout builds it: question + decoded r[:t*]."""
    from recipe.iib_lpo.latent.sampler import build_condition_text
    from recipe.iib_lpo.rollout.agent_loop import _question_text  # the rollout's reading of the row

    return [build_condition_text(_question_text(_question_kwargs(f)), run.decode(f.parent_ids[: f.position]))
            for f in forks]


def run_arms(run: _Run, forks: Sequence[Fork], arms: Sequence[str], progress: bool) -> dict[str, list[list[Branch]]]:
    """Every arm's K branches at every fork."""
    conditions = condition_texts(run, forks) if any(a in LATENT_COUPLING for a in arms) else None
    results: dict[str, list[list[Branch]]] = {arm: [] for arm in arms}
    bar = _progress(progress, len(forks), "forks x arms")
    for i, fork in enumerate(forks):
        budget = run.max_new_tokens - fork.position
        for arm in arms:
            if arm == "first_token_distinct":
                results[arm].append(_first_token_distinct(run, fork, budget))
                continue
            generator = run.generator(fork.row, _STREAM_BRANCHES)
            if arm == "plain":
                conts = _sample(run, fork.context, budget, generator, num_samples=run.k)
                results[arm].append(_score_branches(run, fork, conts))
                continue
            sampler = run.sampler
            z_generator = run.generator(fork.row, _STREAM_Z, device=getattr(sampler, "device", "cpu"))
            samples = sampler.sample_latent_embeddings(
                [conditions[i]], run.k, run.alpha, generator=z_generator, coupling=LATENT_COUPLING[arm])
            latents = samples.embeddings[0].to(device=run.device, dtype=torch.float32)
            conts = _sample(run, fork.context, budget, generator, latents=latents)
            results[arm].append(_score_branches(run, fork, conts, latents=latents))
        bar.update(1)
    bar.close()
    return results


def _progress(enabled: bool, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr)


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def write_json_atomic(path: str | Path, payload: dict) -> None:
    """Write ``payload`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2)
    os.replace(tmp, path)


def measure_latent_quality(
    policy: str | Path,
    data: str | Path,
    *,
    latent: str | Path | None = None,
    sampler: Any = None,
    num_forks: int = 200,
    k: int = 4,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    alpha: float = 1.0,
    seed: int = 0,
    bootstrap: int = 1000,
    out: str | Path | None = None,
    progress: bool = True,
    encoder: str | None = None,
    device: str | None = None,
) -> dict:
    """Measure every arm at the same fork points and return the report (module docstring).

    ``latent`` (a train_cvae checkpoint) or an in-memory ``sampler`` (LatentSampler's contract:
    ``sample_latent_embeddings(..., coupling=)``, ``z_usage``) enables the latent
    arms; without either only ``plain`` and ``first_token_distinct`` run. ``out``: where the JSON
    is written (atomically). Raises ValueError on bad arguments or too few fork points.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recipe.iib_lpo.eval.generate import load_eval_parquet

    if num_forks < 1 or k < 1 or max_new_tokens < 1 or bootstrap < 1:
        raise ValueError(f"num_forks, k, max_new_tokens and bootstrap must be >= 1, got {num_forks}, {k}, "
                         f"{max_new_tokens}, {bootstrap}")
    if not temperature > 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature must be > 0 and top_p in (0, 1], got {temperature}, {top_p}")
    if (latent is not None or sampler is not None) and not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be finite and > 0 for the latent arms, got {alpha}")
    started = time.monotonic()
    problems = load_eval_parquet(data)
    if len(problems) < num_forks:
        raise ValueError(f"{data} has {len(problems)} problems, fewer than --num-forks={num_forks} "
                         "(one parent, so at most one fork point, per problem)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(str(policy))
    model = AutoModelForCausalLM.from_pretrained(str(policy), dtype=torch.float32).to(device).eval()
    if sampler is None and latent is not None:
        from recipe.iib_lpo.latent.sampler import LatentSampler

        sampler = LatentSampler.from_checkpoint(str(latent), encoder_name_or_path=encoder, device=device)
    run = _Run(model, tokenizer, tokenizer.eos_token_id, k, max_new_tokens, temperature, top_p, alpha, seed, sampler)
    branching, latent_mode = recipe_defaults()
    threshold, threshold_source = rollout_is_threshold()
    arms = [a for a in ARMS if sampler is not None or a in PLAIN_ARMS]

    forks, skipped = collect_forks(run, problems, num_forks, branching, progress)
    results = run_arms(run, forks, arms, progress)
    z_usage = None
    if sampler is not None:
        texts = [f[0].text for f in results["plain"]]
        z_usage = float(torch.as_tensor(sampler.z_usage(condition_texts(run, forks), texts)).float().mean())
    report_arms = {
        arm: summarize_arm(results[arm], results["plain"], threshold=threshold, num_resamples=bootstrap, seed=seed,
                           z_usage=z_usage if arm in LATENT_COUPLING else None)
        for arm in arms
    }
    plain_acc = report_arms["plain"]["branch_acc"]
    report = {
        "default_arm": "plain" if latent_mode == "none" else "latent",
        "meta": {
            "args": {
                "policy": str(policy), "latent": None if latent is None else str(latent), "data": str(data),
                "num_forks": num_forks, "k": k, "max_new_tokens": max_new_tokens, "temperature": temperature,
                "top_p": top_p, "alpha": alpha, "seed": seed, "bootstrap": bootstrap, "encoder": encoder,
                "device": device, "out": None if out is None else str(out),
            },
            "arms": arms,
            "num_forks": len(forks),
            "parents_sampled": len(forks) + skipped,
            "skipped_too_short": skipped,
            "branching": asdict(branching),
            "latent_mode_default": latent_mode,
            "is_threshold": threshold,
            "is_threshold_source": threshold_source,
            "is_threshold_verl_default": verl_is_threshold_default()[0],
            "entropy": "exact, from the HF logits of the sampling distribution (the rollout estimates it from top-k)",
            "fork_points": [{"row": f.row, "t_star": f.position, "entropy": f.entropy,
                             "parent_tokens": len(f.parent_ids)} for f in forks],
            "seconds": None,
        },
        "arms": report_arms,
        "acceptance": {arm: acceptance_checks(report_arms[arm], plain_acc) for arm in arms},
    }
    report["meta"]["seconds"] = round(time.monotonic() - started, 3)
    if out is not None:
        write_json_atomic(out, report)
    return report


TABLE_COLUMNS = (
    ("branch_acc", "acc"), ("acc_ratio", "acc/plain"), ("distinct4_diff", "d4 diff"),
    ("answers_diff", "ans diff"), ("fork_kl_median", "KL@t*"), ("log_ratio_mean", "log ratio"),
    ("truncated_share", "trunc"), ("z_usage", "z usage"), ("nll_ratio", "NLL ratio"),
)


def format_table(report: dict) -> str:
    """A compact text table: one row per arm, the metrics, CIs in brackets, and the passed criteria."""

    def cell(metrics, key):
        value, interval = metrics[key], metrics.get(key + "_ci")
        if value is None:
            return "-"
        text = f"{value:.3f}"
        return text + (f" [{interval[0]:.2f},{interval[1]:.2f}]" if interval else "")

    header = ["arm"] + [label for _, label in TABLE_COLUMNS] + ["accepted"]
    rows = [header]
    for arm, metrics in report["arms"].items():
        checks = report["acceptance"][arm]
        passed = sum(v is True for v in checks.values())
        defined = sum(v is not None for v in checks.values())
        rows.append([arm] + [cell(metrics, key) for key, _ in TABLE_COLUMNS] + [f"{passed}/{defined}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    meta = report["meta"]
    lines.append(f"{meta['num_forks']} forks x K={meta['args']['k']} ({meta['skipped_too_short']} parents too short), "
                 f"IS threshold {meta['is_threshold']}, default arm {report['default_arm']}, {meta['seconds']:.0f} s")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m recipe.iib_lpo.latent_quality", description=__doc__.split("\n")[0])
    parser.add_argument("--policy", required=True, help="HF checkpoint directory of the policy")
    parser.add_argument("--latent", default=None, help="latent/CVAE checkpoint (train_cvae); without it only the non-latent arms run")
    parser.add_argument("--data", required=True, help="verl-format parquet (data_prep): a validation split")
    parser.add_argument("--num-forks", type=int, default=200, help="fork points to measure (>= 200 for reported numbers)")
    parser.add_argument("--k", type=int, default=4, help="branches per fork and arm")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="parent length; branches get max_new_tokens - t*")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--alpha", type=float, default=1.0, help="latent scale: v = alpha * P(z)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the CIs")
    parser.add_argument("--out", default=None, help="write the JSON report here")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--encoder", default=None, help="override the checkpoint's encoder path")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = measure_latent_quality(
            args.policy, args.data, latent=args.latent, num_forks=args.num_forks, k=args.k,
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, alpha=args.alpha,
            seed=args.seed, bootstrap=args.bootstrap, out=args.out, progress=not args.no_progress,
            encoder=args.encoder, device=args.device,
        )
    except ValueError as err:
        print(f"latent_quality: {err}", file=sys.stderr)
        return 2
    print(format_table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
