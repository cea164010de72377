"""Difficulty-sensitive attention heads (METHOD.md, "Difficulty-sensitive attention heads").

For problems with difficulty labels (MATH levels 1-5 in ``extra_info.level``) this runs a
Hugging Face causal LM over each chat-formatted prompt with eager attention and
``output_attentions=True``, and computes per (layer, head) two statistics of the prompt's
attention pattern:

- ``entropy``: the attention entropy of each query position, normalised by log(number of keys
  it may attend to) so that it lies in [0, 1] and does not grow with prompt length (harder
  problems have longer statements; an unnormalised entropy would mostly measure length),
  averaged over query positions 1..T-1 (position 0 has a single key and entropy 0);
- ``question_mass``: the attention mass the positions *after* the question (the instruction
  and the assistant header, i.e. where the answer is planned) put on the question's tokens,
  averaged over those positions.

Each statistic's Spearman rank correlation with the level over problems (scipy) gives a
layer x head map, drawn as a heatmap; the heads with the largest |rho| are written to JSON with
the statistic's mean and standard deviation over the analysed problems, which is what
``estimate_difficulty`` needs to turn one new prompt's statistics into a difficulty score and
``branch_budget_for_difficulty`` into a per-prompt branching budget K (an option for the
trainer, off by default).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from data_prep.layouts import parse_level  # one definition of MATH levels

logger = logging.getLogger(__name__)

STATISTICS = ("entropy", "question_mass")


# ----------------------------------------------------------------------------- pure statistics


def prompt_attention_stats(attentions: Sequence[torch.Tensor], question_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per (layer, head) attention statistics of one prompt.

    Args:
        attentions: one tensor per layer, shape (heads, T, T) or (1, heads, T, T); row q is the
            attention distribution of query q over keys 0..q (causal).
        question_mask: bool tensor (T,), True on the question's tokens. At least one token must
            come after the last question token (the instruction / assistant header).
    Returns:
        {"entropy": (layers, heads), "question_mass": (layers, heads)} float64 tensors.
    """
    if not attentions:
        raise ValueError("no attention tensors")
    question_mask = question_mask.bool()
    if question_mask.ndim != 1 or not question_mask.any():
        raise ValueError("question_mask must be a 1-D bool tensor with at least one True")
    length = question_mask.shape[0]
    last_question = int(torch.nonzero(question_mask).max())
    if last_question >= length - 1:
        raise ValueError("no token after the question: question_mass needs the instruction / assistant header")
    if length < 2:
        raise ValueError("prompt must have at least 2 tokens")
    entropies, masses = [], []
    keys_visible = torch.arange(1, length + 1, dtype=torch.float64)  # query q sees q + 1 keys
    for layer, attn in enumerate(attentions):
        attn = attn.squeeze(0) if attn.ndim == 4 else attn
        if attn.ndim != 3 or attn.shape[-1] != length or attn.shape[-2] != length:
            raise ValueError(f"layer {layer}: attention shape {tuple(attn.shape)} does not match prompt length {length}")
        probs = attn.to(torch.float64)
        if not torch.isfinite(probs).all():
            raise ValueError(f"layer {layer}: non-finite attention weights")
        plogp = torch.where(probs > 0, probs * torch.log(probs.clamp_min(1e-300)), torch.zeros_like(probs))
        entropy = -plogp.sum(-1)  # (heads, T)
        normalised = entropy[:, 1:] / torch.log(keys_visible[1:])
        entropies.append(normalised.mean(-1))
        tail = probs[:, last_question + 1 :, :]  # queries after the question
        masses.append(tail[..., question_mask].sum(-1).mean(-1))
    return {"entropy": torch.stack(entropies), "question_mass": torch.stack(masses)}


def head_difficulty_correlation(stat: np.ndarray, difficulty: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Spearman rho and p-value between each head's statistic and difficulty over problems.

    stat: (problems, layers, heads); difficulty: (problems,). A head whose statistic is constant
    over problems gets rho = NaN (undefined), never 0.
    """
    from scipy.stats import spearmanr

    stat, difficulty = np.asarray(stat, dtype=np.float64), np.asarray(difficulty, dtype=np.float64)
    if stat.ndim != 3 or stat.shape[0] != difficulty.shape[0]:
        raise ValueError(f"stat must be (problems, layers, heads) matching difficulty; got {stat.shape}, {difficulty.shape}")
    if stat.shape[0] < 3:
        raise ValueError(f"need at least 3 problems for a rank correlation, got {stat.shape[0]}")
    if len(np.unique(difficulty)) < 2:
        raise ValueError("all problems have the same difficulty: no correlation can be computed")
    _, layers, heads = stat.shape
    rho = np.full((layers, heads), np.nan)
    pvalue = np.full((layers, heads), np.nan)
    for layer in range(layers):
        for head in range(heads):
            values = stat[:, layer, head]
            if np.ptp(values) == 0:
                continue
            result = spearmanr(values, difficulty)
            rho[layer, head], pvalue[layer, head] = float(result.statistic), float(result.pvalue)
    return rho, pvalue


def select_top_heads(
    stats: dict[str, np.ndarray], rho: dict[str, np.ndarray], pvalue: dict[str, np.ndarray], top_k: int
) -> list[dict]:
    """The ``top_k`` (statistic, layer, head) triples with the largest |rho| (NaN excluded), each
    with the statistic's mean and std over the analysed problems (for ``estimate_difficulty``)."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    candidates = []
    for name, matrix in rho.items():
        for (layer, head), value in np.ndenumerate(matrix):
            if np.isnan(value):
                continue
            values = stats[name][:, layer, head]
            candidates.append(
                {
                    "stat": name,
                    "layer": int(layer),
                    "head": int(head),
                    "rho": float(value),
                    "p_value": float(pvalue[name][layer, head]),
                    "mean": float(values.mean()),
                    "std": float(values.std()),
                }
            )
    candidates.sort(key=lambda c: (-abs(c["rho"]), c["stat"], c["layer"], c["head"]))
    return candidates[:top_k]


def estimate_difficulty(attention_stats: dict[str, np.ndarray | torch.Tensor], top_heads: Sequence[dict]) -> float:
    """Difficulty of one prompt in (0, 1) from its attention statistics at the top heads.

    Each top head's statistic is standardised with the analysis set's mean / std, signed by its
    correlation (so larger always means harder) and averaged with weights |rho|; the normal CDF
    maps the result to (0, 1): 0.5 = as hard as the average analysed problem.
    ``attention_stats`` is ``prompt_attention_stats``'s output for the prompt.
    """
    if not top_heads:
        raise ValueError("no top heads: run the attention-head analysis first")
    weighted, total_weight = 0.0, 0.0
    for head in top_heads:
        matrix = attention_stats[head["stat"]]
        value = float(matrix[head["layer"]][head["head"]])
        if not math.isfinite(value):
            raise ValueError(f"non-finite {head['stat']} at layer {head['layer']} head {head['head']}")
        if not head["std"] > 0:
            raise ValueError(f"top head {head} has zero std: it cannot be standardised")
        z = (value - head["mean"]) / head["std"]
        weighted += head["rho"] * z  # = |rho| * sign(rho) * z
        total_weight += abs(head["rho"])
    if total_weight == 0:
        raise ValueError("all top heads have rho = 0")
    score = weighted / total_weight
    return 0.5 * (1.0 + math.erf(score / math.sqrt(2.0)))


def branch_budget_for_difficulty(difficulty: float, k_min: int, k_max: int) -> int:
    """Branching budget K in [k_min, k_max] growing with difficulty in [0, 1].

    The difficulty range is cut into k_max - k_min + 1 equal intervals, one per budget, so every
    K is equally likely for a uniformly distributed difficulty: K = k_min + floor(d * (k_max -
    k_min + 1)), with d = 1 mapped to k_max.
    """
    if isinstance(k_min, bool) or isinstance(k_max, bool) or not isinstance(k_min, int) or not isinstance(k_max, int):
        raise ValueError(f"k_min and k_max must be ints, got {k_min!r}, {k_max!r}")
    if not 0 <= k_min <= k_max:
        raise ValueError(f"need 0 <= k_min <= k_max, got k_min={k_min}, k_max={k_max}")
    if not (isinstance(difficulty, (int, float)) and math.isfinite(difficulty) and 0.0 <= difficulty <= 1.0):
        raise ValueError(f"difficulty must be a finite number in [0, 1], got {difficulty!r}")
    return min(k_max, k_min + math.floor(difficulty * (k_max - k_min + 1)))


def load_top_heads(path: str | Path) -> list[dict]:
    """The ``top_heads`` list of an analysis JSON written by ``analyze_attention_heads``."""
    payload = json.loads(Path(path).read_text(encoding="utf-8"))
    heads = payload.get("top_heads")
    if not heads:
        raise ValueError(f"{path}: no top_heads")
    required = {"stat", "layer", "head", "rho", "mean", "std"}
    for head in heads:
        if not required <= set(head):
            raise ValueError(f"{path}: top head {head} lacks {sorted(required - set(head))}")
    return heads


# ----------------------------------------------------------------------------- model side


def question_token_mask(tokenizer, messages: list[dict], question: str) -> tuple[list[int], torch.Tensor]:
    """Chat-template token ids of ``messages`` and the mask of the tokens that overlap ``question``.

    The question is located by its characters in the templated text (data_prep puts the raw
    problem verbatim into the user message) and mapped to tokens with the fast tokenizer's
    offsets. A question that is not in the prompt is an error.
    """
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    start = text.find(question)
    if not question or start < 0:
        raise ValueError("the question text does not occur in the chat-formatted prompt")
    end = start + len(question)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = torch.tensor([s < end and e > start for s, e in encoding["offset_mapping"]], dtype=torch.bool)
    return list(encoding["input_ids"]), mask


@torch.no_grad()
def model_prompt_attention_stats(model, input_ids: list[int], question_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run ``model`` (loaded with attn_implementation="eager") on one prompt and return its stats."""
    device = next(model.parameters()).device
    ids = torch.tensor([input_ids], device=device)
    output = model(input_ids=ids, output_attentions=True, use_cache=False)
    if output.attentions is None or any(a is None for a in output.attentions):
        raise RuntimeError("the model returned no attention weights: load it with attn_implementation='eager'")
    return prompt_attention_stats([a.float().cpu() for a in output.attentions], question_mask)


def collect_attention_stats(
    model, tokenizer, problems: Sequence, progress: bool = True
) -> tuple[dict[str, np.ndarray], np.ndarray, dict, np.ndarray]:
    """Stats (problems, layers, heads) per statistic, the levels, the skip counts and the
    question lengths in tokens, for the problems that have a level.

    Problems without a parseable level or whose question cannot be found in the prompt are
    skipped and counted rather than guessed.
    """
    from tqdm.auto import tqdm

    per_stat: dict[str, list[np.ndarray]] = {name: [] for name in STATISTICS}
    levels, lengths, skipped = [], [], {"no_level": 0, "question_not_in_prompt": 0}
    for problem in tqdm(problems, desc="attention stats", unit="problem", disable=not progress):
        level = parse_level(problem.extra_info.get("level"))
        if level is None:
            skipped["no_level"] += 1
            continue
        question = problem.extra_info.get("question")
        try:
            input_ids, mask = question_token_mask(tokenizer, problem.messages, question or "")
        except ValueError:
            skipped["question_not_in_prompt"] += 1
            continue
        stats = model_prompt_attention_stats(model, input_ids, mask)
        for name in STATISTICS:
            per_stat[name].append(stats[name].numpy())
        levels.append(level)
        lengths.append(int(mask.sum()))
    if any(skipped.values()):
        logger.warning("attention-head analysis skipped problems: %s", skipped)
    if not levels:
        raise ValueError(f"no problem with a difficulty level and a locatable question (skipped: {skipped})")
    return {name: np.stack(v) for name, v in per_stat.items()}, np.array(levels), skipped, np.array(lengths)


def plot_head_heatmap(rho: dict[str, np.ndarray], top_heads: Sequence[dict], out_png: str | Path) -> Path:
    """Layer x head heatmap of Spearman rho per statistic; top heads outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    names = list(rho)
    layers, heads = next(iter(rho.values())).shape
    fig, axes = plt.subplots(1, len(names), figsize=(max(4.0, 0.35 * heads + 2.5) * len(names), max(3.0, 0.3 * layers + 1.5)), squeeze=False)
    for ax, name in zip(axes[0], names):
        image = ax.imshow(np.ma.masked_invalid(rho[name]), cmap="coolwarm", vmin=-1, vmax=1, aspect="auto", origin="lower")
        ax.set_title(f"Spearman rho: {name} vs level")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(heads))
        ax.set_yticks(range(layers))
        if layers * heads <= 64:
            for (layer, head), value in np.ndenumerate(rho[name]):
                ax.text(head, layer, "nan" if np.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=8)
        for top in top_heads:
            if top["stat"] == name:
                ax.add_patch(Rectangle((top["head"] - 0.5, top["layer"] - 0.5), 1, 1, fill=False, lw=2, ec="black"))
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    path = Path(out_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def analyze_attention_heads(
    model_path: str | Path,
    data_path: str | Path,
    out_dir: str | Path,
    *,
    limit: int | None = None,
    top_k: int = 10,
    device: str = "auto",
    dtype: str = "auto",
    progress: bool = True,
) -> dict:
    """The full analysis: writes ``attention_heads.json`` and ``attention_heads.png`` to ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recipe.iib_lpo.eval.generate import load_eval_parquet

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32, "float32": torch.float32,
                   "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    model = AutoModelForCausalLM.from_pretrained(str(model_path), attn_implementation="eager", dtype=torch_dtype).to(device).eval()
    problems = load_eval_parquet(data_path, limit=limit)
    stats, levels, skipped, question_tokens = collect_attention_stats(model, tokenizer, problems, progress)
    rho, pvalue = {}, {}
    for name in STATISTICS:
        rho[name], pvalue[name] = head_difficulty_correlation(stats[name], levels)
    top_heads = select_top_heads(stats, rho, pvalue, top_k)
    # Confound check: harder problems have longer statements, and both statistics depend on
    # length. A head whose |rho| does not exceed this may be tracking length, not difficulty.
    length_rho, _ = head_difficulty_correlation(question_tokens.reshape(-1, 1, 1), levels)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    level_values, level_counts = np.unique(levels, return_counts=True)
    result = {
        "model_path": str(model_path),
        "data_path": str(data_path),
        "num_problems": int(len(levels)),
        "level_counts": {str(int(v)): int(c) for v, c in zip(level_values, level_counts)},
        "skipped": skipped,
        "statistics": {
            "entropy": "attention entropy / log(#visible keys), mean over query positions 1..T-1",
            "question_mass": "attention mass on question tokens, mean over query positions after the question",
        },
        "rho": {name: np.where(np.isnan(m), None, m).tolist() for name, m in rho.items()},
        "p_value": {name: np.where(np.isnan(m), None, m).tolist() for name, m in pvalue.items()},
        "question_length_rho": None if np.isnan(length_rho[0, 0]) else float(length_rho[0, 0]),
        "question_length_note": "Spearman rho of question length (tokens) with level: a head whose |rho| "
        "is not above it may track prompt length rather than difficulty",
        "top_heads": top_heads,
    }
    (out / "attention_heads.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    plot_head_heatmap(rho, top_heads, out / "attention_heads.png")
    return result
