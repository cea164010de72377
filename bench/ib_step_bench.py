"""The trainer's IB + filter + advantage block at the batch shape of a GPU run, on CPU.

    python -m bench.ib_step_bench [--prompts 32] [--words 3000] [--repeats 3] [--out FILE]

The rollout benchmark times the block on real tiny-model rollouts (128-token responses); the GPU
launchers run 32 prompts x 8 trajectories x up to 4096 response tokens (``run_scripts/common.sh``),
and the ``ngram`` estimator's cost grows with the text. This builds that shape synthetically:
per prompt M = 2 initial rows + M x K = 6 branch rows (``iib_lpo_step``'s roles from the same
``extra_fields`` the agent loop writes, fork points mid-response), each response a math-like text
of ``--words`` words (3000 words ~ 4000 Qwen tokens) with some repeated sentences, and times
``ib_step.iib_lpo_step`` + ``step_metrics.iib_lpo_step_metrics`` (everything inside the trainer's
``timing_s/iib_lpo_ib_filter_adv`` except TransferQueue I/O) with the per-trajectory text statistics
(``ib.text_stats``) precomputed, as the agent loop now delivers them, and with them computed in the
step (the fallback path, and the code before that change). The tokenizer's batch_decode, which the
fallback also needs, is reported apart when a tokenizer is given with ``--tokenizer``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

SENTENCES = [
    "We have {a} + {b} = {c}.",
    "So the total is {c} apples.",
    "Let x be the number of coins, then 2x = {d}.",
    "Therefore x = {e} and each friend has {e} coins.",
    "Now I will double-check the computation carefully before answering.",
    "It follows that \\frac{{{a}}}{{{b}}} is not an integer, so we reconsider.",
    "Next, subtract {b} from {c} to get {a}.",
    "Hmm, wait, let me think about this again.",
]


def synthetic_text(rng: random.Random, words: int) -> str:
    out, count = [], 0
    while count < words:
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        s = rng.choice(SENTENCES).format(a=a, b=b, c=a + b, d=2 * a, e=a)
        if out and rng.random() < 0.1:
            s = out[rng.randrange(len(out))]  # some repetition, as in real rollouts
        out.append(s)
        count += len(s.split())
    return " ".join(out) + f" The answer is \\boxed{{{rng.randint(1, 99)}}}."


def build_batch(prompts: int, words: int, m: int = 2, k: int = 3, max_tokens: int = 4096, seed: int = 0):
    import torch

    from recipe.iib_lpo.algorithm.ib import IBInputs
    from recipe.iib_lpo.algorithm.ib_step import row_role

    rng = random.Random(seed)
    inputs, roles, extras, prompt_lengths = [], [], [], []
    num_tokens = min(max_tokens, int(words * 4 / 3))
    for p in range(prompts):
        question = f"Tom has {p} apples and buys {p + 3} more. How many apples does he have now?"
        uid = f"u{p}"
        for s in range(m * (1 + k)):
            if s < m:
                extra = {"iib_role": "initial", "iib_parent_index": s, "iib_fork_position": num_tokens // 2,
                         "iib_generated_length": num_tokens, "iib_fork_reason": "ok", "iib_fork_entropy": 1.0}
            else:
                j = s - m
                extra = {"iib_role": "branch", "iib_parent_index": j // k, "iib_branch_index": j % k,
                         "iib_fork_position": num_tokens // 2, "iib_is_resample": False, "iib_round": 1,
                         "iib_generated_length": num_tokens - num_tokens // 2, "iib_prefix_length": num_tokens // 2,
                         "iib_latent_status": "injected", "iib_latent_prob": 1.0, "iib_latent_scale": 1.0,
                         "iib_latent_norm": 1.0, "iib_num_cached_tokens": 256, "iib_fork_reason": "ok"}
            reward = float(rng.random() < 0.3)
            inputs.append(IBInputs(question=question, response=synthetic_text(rng, words), reward=reward,
                                   num_tokens=num_tokens, max_tokens=max_tokens))
            roles.append(row_role(uid, s, extra))
            extras.append(extra)
            prompt_lengths.append(200)
    mask = torch.ones(len(inputs), num_tokens, dtype=torch.int64)
    for i, e in enumerate(extras):
        if e["iib_role"] == "branch":
            mask[i, : num_tokens // 2] = 0
    return inputs, roles, extras, prompt_lengths, mask


def measure(prompts: int, words: int, repeats: int, tokenizer: str | None = None) -> dict:
    """Median seconds of the block two ways: as the trainer runs it (the text statistics came from the
    agent loop in ``extra_fields``) and with the statistics computed in the step (the fallback for
    rows without them, and the code before the change); plus the statistics' own cost, which the
    agent loop now pays per trajectory as it finishes."""
    import dataclasses

    import torch

    from recipe.iib_lpo.algorithm.ib import IBConfig, text_stats
    from recipe.iib_lpo.algorithm.ib_step import iib_lpo_step
    from recipe.iib_lpo.trainer.step_metrics import iib_lpo_step_metrics

    inputs, roles, extras, prompt_lengths, mask = build_batch(prompts, words)
    rewards = torch.tensor([t.reward for t in inputs], dtype=torch.float64)
    texts = [t.response for t in inputs]
    parts: dict[str, list[float]] = {"text_stats": [], "step_with_loop_stats": [], "metrics_with_loop_stats": [],
                                     "block_stats_in_step": []}
    for _ in range(repeats):
        start = time.perf_counter()
        stats = [text_stats(t.question, t.response) for t in inputs]
        parts["text_stats"].append(time.perf_counter() - start)
        with_stats = [dataclasses.replace(t, response="", text_stats=st) for t, st in zip(inputs, stats)]
        start = time.perf_counter()
        result = iib_lpo_step(with_stats, roles, mask, IBConfig(), 0.5)
        mid = time.perf_counter()
        iib_lpo_step_metrics(roles, extras, rewards, result.scores, result.keep, prompt_lengths,
                             [st.rep4 for st in stats], recomputed_keep=result.recomputed_keep)
        parts["step_with_loop_stats"].append(mid - start)
        parts["metrics_with_loop_stats"].append(time.perf_counter() - mid)
        start = time.perf_counter()
        in_step = [text_stats(t.question, t.response) for t in inputs]
        result = iib_lpo_step([dataclasses.replace(t, text_stats=st) for t, st in zip(inputs, in_step)], roles, mask,
                              IBConfig(), 0.5)
        iib_lpo_step_metrics(roles, extras, rewards, result.scores, result.keep, prompt_lengths,
                             [st.rep4 for st in in_step], recomputed_keep=result.recomputed_keep)
        parts["block_stats_in_step"].append(time.perf_counter() - start)
    out = {"rows": len(inputs), "words_per_response": words, "tokens_per_response": int(mask.shape[1]),
           "chars_per_response": statistics.mean(len(t) for t in texts),
           **{f"{k}_s": statistics.median(v) for k, v in parts.items()}}
    out["block_s"] = out["step_with_loop_stats_s"] + out["metrics_with_loop_stats_s"]
    out["text_stats_per_trajectory_ms"] = 1000 * out["text_stats_s"] / len(inputs)
    if tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer)
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        start = time.perf_counter()
        tok.batch_decode(ids, skip_special_tokens=True)
        out["batch_decode_s"] = time.perf_counter() - start
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, nargs="+", default=[32])
    parser.add_argument("--words", type=int, nargs="+", default=[100, 1000, 3000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokenizer", default=None, help="a local tokenizer dir to time batch_decode too")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    import os

    rows = []
    for prompts in args.prompts:
        for words in args.words:
            load = os.getloadavg()[0]
            row = {"prompts": prompts, "load1": load, **measure(prompts, words, args.repeats, args.tokenizer)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
