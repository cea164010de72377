"""Paired comparisons over held-out problems and seeds (arrays in, numbers out).

A study cell is one (arm, seed) run evaluated on the same held-out problems with the same eval seed.
The difference of two arms is taken problem by problem within a seed, d[s, p] = acc_a[s, p] -
acc_b[s, p], so each problem's difficulty cancels. Its uncertainty has two sources: which problems
were drawn and which RL seeds were run (run-to-run spread on the demo is as large as the effects,
README "Does it learn?"). ``crossed_bootstrap`` resamples both, seeds and problems independently.
"""

from __future__ import annotations

import numpy as np


def accuracy_matrix(records_by_seed: dict[int, list[dict]], problem_ids: list[str]) -> np.ndarray:
    """[seeds, problems] of per-problem accuracy (share of correct samples), seeds in sorted order and
    problems in ``problem_ids`` order. ValueError when a seed lacks a problem or a record has no samples."""
    rows = []
    for seed in sorted(records_by_seed):
        by_id = {r["problem_id"]: r for r in records_by_seed[seed]}
        missing = [p for p in problem_ids if p not in by_id]
        if missing:
            raise ValueError(f"seed {seed}: no eval record for {len(missing)} problems (first {missing[:3]})")
        row = []
        for p in problem_ids:
            correct = by_id[p]["correct"]
            if not correct:
                raise ValueError(f"seed {seed}, problem {p}: an eval record without samples")
            row.append(sum(bool(c) for c in correct) / len(correct))
        rows.append(row)
    return np.asarray(rows, dtype=float)


def crossed_bootstrap(diffs: np.ndarray, num_resamples: int = 10000, level: float = 0.95, seed: int = 0) -> dict:
    """Mean of ``diffs`` [seeds, problems] with a bootstrap that resamples seeds and problems independently
    (the grid of the resampled seeds x the resampled problems; weights are multinomial counts).

    Returns ``diff`` (the plain mean), ``se`` (the bootstrap standard deviation), ``ci`` ([low, high]
    percentile interval at ``level``), ``seeds`` and ``problems``. With one seed only the problems are
    resampled, so ``se`` is then the problem-paired standard error and says nothing about seed spread."""
    d = np.asarray(diffs, dtype=float)
    if d.ndim != 2 or d.shape[0] < 1 or d.shape[1] < 2:
        raise ValueError(f"diffs must be [seeds >= 1, problems >= 2], got shape {d.shape}")
    if not np.isfinite(d).all():
        raise ValueError("diffs contain NaN or inf")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    num_seeds, num_problems = d.shape
    rng = np.random.default_rng(seed)
    seed_w = rng.multinomial(num_seeds, np.full(num_seeds, 1 / num_seeds), size=num_resamples)
    prob_w = rng.multinomial(num_problems, np.full(num_problems, 1 / num_problems), size=num_resamples)
    stats = np.einsum("bs,sp,bp->b", seed_w, d, prob_w) / (num_seeds * num_problems)
    alpha = (1 - level) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    return {"diff": float(d.mean()), "se": float(stats.std(ddof=1)), "ci": [float(low), float(high)],
            "level": level, "seeds": num_seeds, "problems": num_problems}


def per_seed_paired(diffs: np.ndarray) -> list[dict]:
    """For each seed (row): the mean difference over problems and its problem-paired standard error."""
    d = np.asarray(diffs, dtype=float)
    return [{"diff": float(row.mean()), "se": float(row.std(ddof=1) / np.sqrt(row.size))} for row in d]


def verdict(ci: list[float]) -> str:
    """``beats`` when the whole interval is above 0, ``loses`` when below, else ``ties`` (no difference shown)."""
    low, high = ci
    return "beats" if low > 0 else "loses" if high < 0 else "ties"


def spread(values) -> dict:
    """mean, min, max and the sample standard deviation (None below 2 values) of per-seed values."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if v.size == 0:
        return {"mean": None, "min": None, "max": None, "sd": None, "n": 0}
    return {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max()),
            "sd": float(v.std(ddof=1)) if v.size > 1 else None, "n": int(v.size)}
