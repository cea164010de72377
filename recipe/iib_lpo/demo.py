"""CPU end-to-end demo of the recipe code (the README's main command).

    python -m recipe.iib_lpo.demo [--out outputs/demo] [--num-problems 64]

1. prepares the embedded offline demo dataset with data_prep (verl parquet),
2. scores sample answers with the recipe's verifiable reward (correct, equivalent form, wrong,
   unparseable, hostile),
3. builds a tiny random Qwen2 and runs one I2B-LPO rollout step for a few prompts on vLLM (CPU):
   initial rollouts with engine-side entropy, bifurcation points, latent branches (vLLM latent
   injection, CVAE prior), verifiable reward, IB scores, the Top-N filter and the advantage.

Everything printed comes from the same functions the verl trainer calls; nothing is mocked.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console(width=max(Console().width, 120))


def prepare_demo_data(out_dir: Path, num_problems: int, seed: int) -> Path:
    from data_prep.prepare import main as prepare_main

    data_dir = out_dir / "data"
    rc = prepare_main(
        ["--dataset", "demo", "--out", str(data_dir), "--num-problems", str(num_problems), "--seed", str(seed),
         "--val-size", "0.25"]
    )
    if rc != 0:
        raise SystemExit(f"data preparation failed (exit code {rc})")
    return data_dir


def score_sample_answers(data_dir: Path, num_rows: int = 3) -> list[dict]:
    """Score hand-made answers to the first prepared problems; returns the rows shown."""
    import pandas as pd

    from recipe.iib_lpo.reward import compute_score

    frame = pd.read_parquet(next(data_dir.glob("*_train.parquet")))
    shown = []
    for _, row in frame.head(num_rows).iterrows():
        gold = row["reward_model"]["ground_truth"]
        table = Table(title=f"[bold]{row['extra_info']['question']}[/bold]  (gold: {gold})", title_justify="left")
        for column in ("kind", "model output", "score", "extracted", "reason"):
            table.add_column(column, overflow="fold")
        samples = {
            "correct": f"Step by step we get {gold}. So the answer is \\boxed{{{gold}}}.",
            "equivalent form": f"The result is \\boxed{{\\dfrac{{{2 * int(gold)}}}{{2}}}}",
            "wrong": f"I think it is \\boxed{{{int(gold) + 1}}}",
            "no answer": "Let me think about this carefully",
            "hostile": "\\boxed{__import__('os').system('echo pwned')}",
        }
        for label, answer in samples.items():
            result = compute_score(row["data_source"], answer, gold, dict(row["extra_info"]))
            table.add_row(label, answer, f"{result['score']:.1f}", str(result["pred"]), str(result.get("reason", "")))
            shown.append({"label": label, "gold": gold, **{k: result[k] for k in ("score", "acc", "pred")}})
    console.print(table)
    return shown


def run_rollout_step(data_dir: Path, out_dir: Path, *, num_prompts: int, num_initial: int, num_branches: int,
                     max_tokens: int, seed: int) -> list[dict]:
    """One I2B-LPO rollout step (METHOD.md steps 1-7) for a few prompts on vLLM (CPU), tiny model.

    The CVAE is freshly initialised (the CVAE stage is `python -m recipe.iib_lpo.train_cvae`), so
    the latents steer randomly; what the demo shows is the data flow, with real engine calls.
    """
    import pandas as pd
    import torch
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from recipe.iib_lpo.advantage import AdvantageConfig, compute_iib_lpo_advantage
    from recipe.iib_lpo.agent_loop import assemble_branch_trajectory, derived_seed
    from recipe.iib_lpo.alpha_schedule import LatentSchedule, draw_latent_injection
    from recipe.iib_lpo.branching import BranchingConfig, choose_fork_position
    from recipe.iib_lpo.cvae import CVAEConfig, LatentCVAE
    from recipe.iib_lpo.ib import IBConfig, ngram_ib_score, topn_keep_mask
    from recipe.iib_lpo.latent_sampler import LatentSampler, build_condition_text
    from recipe.iib_lpo.reward import compute_score
    from recipe.iib_lpo.text_encoder import TextEncoder, build_tiny_encoder_dir
    from recipe.iib_lpo.tiny_models import build_tiny_model_dir, latent_placeholder_token_id
    from verl_patches.vllm_latent import build_latent_prompt, topk_entropy_from_vllm_logprobs
    from verl_patches.vllm_latent.testing import tiny_cpu_llm

    top_k = 20
    model_dir = build_tiny_model_dir(out_dir / "tiny_qwen2", family="qwen2", seed=seed)
    encoder_dir = build_tiny_encoder_dir(out_dir / "tiny_encoder", seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    placeholder = latent_placeholder_token_id(model_dir)
    encoder = TextEncoder(str(encoder_dir))
    torch.manual_seed(seed)
    cvae = LatentCVAE(CVAEConfig(embed_dim=int(encoder.embed_dim), latent_dim=16, hidden_width=64,
                                 policy_hidden_size=64, projector_hidden_width=64))
    sampler = LatentSampler(encoder, cvae)
    # The default latent schedule at step 0 of a 100-step run: p_inject = 1, embedding scale 1.
    schedule = LatentSchedule()
    p_inject, alpha = schedule.p_inject(0, 100), schedule.scale
    llm = tiny_cpu_llm(model_dir, placeholder_token_id=placeholder, max_model_len=1024, seed=seed)
    vocab_size = llm.llm_engine.model_config.get_vocab_size()

    frame = pd.read_parquet(next(data_dir.glob("*_train.parquet"))).head(num_prompts)
    prompts = [tokenizer.apply_chat_template(list(row["prompt"]), add_generation_prompt=True, tokenize=True)["input_ids"]
               for _, row in frame.iterrows()]

    # 1. initial rollouts, with the engine's top-k log-probs of the sampling distribution.
    initial_params = SamplingParams(n=num_initial, temperature=1.0, max_tokens=max_tokens, logprobs=top_k, seed=seed)
    initial = llm.generate([{"prompt_token_ids": p} for p in prompts], initial_params, use_tqdm=False)

    trajectories: list[dict] = []
    branch_requests, branch_meta = [], []
    generator = torch.Generator().manual_seed(seed)
    for prompt_index, (row, request) in enumerate(zip(frame.itertuples(), initial)):
        question = row.extra_info["question"]
        for parent_index, completion in enumerate(request.outputs):
            response_ids = list(completion.token_ids)
            entropies = topk_entropy_from_vllm_logprobs(completion.logprobs, top_k, vocab_size).estimate
            # 2. bifurcation point
            fork = choose_fork_position(entropies, BranchingConfig(), seed=seed * 1000 + prompt_index * 10 + parent_index)
            parent = dict(prompt=prompt_index, role="initial", parent=len(trajectories), branch=-1,
                          fork=fork.position, fork_entropy=fork.entropy, response_ids=response_ids,
                          response_mask=[1] * len(response_ids), question=question,
                          gold=row.reward_model["ground_truth"], data_source=row.data_source)
            trajectories.append(parent)
            if fork.position is None:
                console.print(f"prompt {prompt_index} rollout {parent_index}: not forked ({fork.reason})")
                continue
            # 3. latents from the CVAE prior on question + decoded prefix
            prefix_ids = response_ids[: fork.position]
            condition = build_condition_text(question, tokenizer.decode(prefix_ids, skip_special_tokens=True))
            latents = sampler.sample_latent_embeddings([condition], num_branches, alpha, generator=generator)
            for k in range(num_branches):
                injected = draw_latent_injection(p_inject, derived_seed(seed, prompt_index, parent_index, k))
                embedding = latents.embeddings[0, k] if injected else None
                # 4. branch: prompt + prefix (+ latent token), continued inside vLLM
                branch_requests.append(build_latent_prompt(prompts[prompt_index] + prefix_ids, embedding, placeholder))
                branch_meta.append((parent, k))
    # One seed per branch: with a shared seed, branches whose next-token distributions differ only
    # slightly would draw the same tokens (common random numbers) and hide the latent's effect.
    branch_params = [SamplingParams(n=1, temperature=1.0, max_tokens=max_tokens, seed=seed + 1 + i)
                     for i in range(len(branch_requests))]
    for (parent, k), request in zip(branch_meta, llm.generate(branch_requests, branch_params, use_tqdm=False)):
        ids, mask, _ = assemble_branch_trajectory(parent["response_ids"], None, parent["fork"],
                                                  list(request.outputs[0].token_ids), None, max_tokens * 2)
        trajectories.append({**parent, "role": "branch", "branch": k, "response_ids": ids, "response_mask": mask,
                             "cached_prompt_tokens": request.num_cached_tokens})

    # 5-7. verifiable reward, IB score, Top-N filter, advantage
    ib_config, adv_config = IBConfig(), AdvantageConfig()
    for t in trajectories:
        text = tokenizer.decode(t["response_ids"], skip_special_tokens=True)
        t["reward"] = compute_score(t["data_source"], text, t["gold"])["score"]
        t["ib_score"] = ngram_ib_score(t["question"], text, t["reward"], len(t["response_ids"]), max_tokens * 2,
                                       beta=ib_config.beta, w_rep=ib_config.w_rep, w_echo=ib_config.w_echo,
                                       w_len=ib_config.w_len)
    scores = torch.tensor([t["ib_score"] for t in trajectories])
    keep = topn_keep_mask(scores, [t["parent"] for t in trajectories], [t["role"] == "initial" for t in trajectories],
                          ib_config.top_n)
    width = max(len(t["response_ids"]) for t in trajectories)
    response_mask = torch.zeros(len(trajectories), width)
    for i, t in enumerate(trajectories):
        response_mask[i, : len(t["response_mask"])] = torch.tensor(t["response_mask"], dtype=torch.float32)
    advantages, _ = compute_iib_lpo_advantage(
        torch.tensor([t["reward"] for t in trajectories]), scores, [t["prompt"] for t in trajectories], keep,
        response_mask, adv_config.lambda_ib, adv_config.eps)

    table = Table(title=f"One I2B-LPO rollout step: M={num_initial} initial x K={num_branches} latent branches "
                        f"(p_inject={p_inject:.2f}, scale={alpha:.2f}), tiny random Qwen2 on vLLM-CPU")
    for column in ("prompt", "role", "parent", "t*", "H(t*)", "tokens (trained)", "cached", "r_v", "S_IB", "kept", "A"):
        table.add_column(column, justify="right")
    rows = []
    for i, t in enumerate(trajectories):
        advantage = float(advantages[i][response_mask[i] > 0][0]) if response_mask[i].sum() > 0 else 0.0
        trained = int(sum(t["response_mask"]))
        table.add_row(str(t["prompt"]), t["role"] + ("" if t["branch"] < 0 else f" {t['branch']}"), str(t["parent"]),
                      "-" if t["fork"] is None else str(t["fork"]),
                      "-" if t["fork_entropy"] is None else f"{t['fork_entropy']:.2f}",
                      f"{len(t['response_ids'])} ({trained})", str(t.get("cached_prompt_tokens", "-")),
                      f"{t['reward']:.0f}", f"{t['ib_score']:+.3f}", "yes" if bool(keep[i]) else "no", f"{advantage:+.2f}")
        rows.append({k: v for k, v in t.items() if k not in ("response_ids", "response_mask", "question")}
                    | {"kept": bool(keep[i]), "advantage": advantage, "num_tokens": len(t["response_ids"])})
    console.print(table)
    console.print("prefix tokens of a branch are trained through its parent (response_mask 0); dropped branches "
                  "get no loss weight; 'cached' = prompt tokens vLLM served from its prefix cache.")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/demo", help="output directory (default outputs/demo)")
    parser.add_argument("--num-problems", type=int, default=64, help="demo problems to generate (default 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rollout-prompts", type=int, default=3, help="prompts in the rollout step (default 3)")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens per generation (default 48)")
    args = parser.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    console.rule("1. data: the embedded offline demo dataset -> verl parquet (data_prep)")
    data_dir = prepare_demo_data(out_dir, args.num_problems, args.seed)

    console.rule("2. verifiable reward")
    scored = score_sample_answers(data_dir)
    wrong_scored_right = [s for s in scored if s["label"] in ("correct", "equivalent form") and not s["acc"]]
    right_scored_wrong = [s for s in scored if s["label"] not in ("correct", "equivalent form") and s["acc"]]
    (out_dir / "reward_samples.json").write_text(json.dumps(scored, indent=1))
    if wrong_scored_right or right_scored_wrong:
        console.print(f"[red]reward disagreed with the expected labels: {wrong_scored_right + right_scored_wrong}")
        return 1
    console.rule("3. one I2B-LPO rollout step on vLLM (CPU): fork, latent branches, reward, IB filter, advantage")
    rows = run_rollout_step(data_dir, out_dir, num_prompts=args.rollout_prompts, num_initial=2, num_branches=3,
                            max_tokens=args.max_tokens, seed=args.seed)
    (out_dir / "rollout_step.json").write_text(json.dumps(rows, indent=1, default=str))
    console.print(f"[green]demo finished; outputs in {out_dir}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
