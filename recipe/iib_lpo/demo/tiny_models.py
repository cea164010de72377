"""Tiny, offline, random-weight Qwen2 / Qwen3 checkpoints for CPU tests and the CPU demo.

The development and CI machines cannot reach the Hugging Face hub, so every test and the CPU demo
build their model locally: a byte-level BPE tokenizer trained in well under a second on a small
built-in math corpus, with a Qwen-style chat template, plus a randomly initialised causal LM saved
as safetensors. The result loads offline in transformers and in vLLM (CPU), so the same directory
serves the reference implementation, the vLLM engine and verl's rollout classes.

Shape constraints come from vLLM's CPU attention backend (ENVIRONMENT.md): head_dim >= 32, so the
defaults are hidden 64 with 2 query heads and 1 KV head (head_dim 32).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

ModelFamily = Literal["qwen2", "qwen3"]

# Special tokens in the order Qwen uses them; their ids are 0..2 in the tiny tokenizer.
PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# The placeholder position of the latent token (METHOD.md, "Latent injection"). Its embedding row
# is never used: the latent embedding alpha * P(z) replaces it. Real Qwen2.5 checkpoints use one of
# their ~270 unused embedding rows instead; the tiny tokenizer has a dedicated special token so a
# random model that happens to sample it still decodes cleanly.
LATENT_TOKEN = "<|latent|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END, LATENT_TOKEN]

# A Qwen-style ChatML template (no default system prompt, to keep prompts short on CPU).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _tokenizer_training_corpus() -> list[str]:
    """A few hundred lines of math-word-problem text: enough for BPE merges on common words."""
    words = (
        "Tom has apples . He buys more and gives some to his friend . How many does he have now ? "
        "Please reason step by step , and put your final answer within \\boxed{} . "
        "First , we compute the total . Then we subtract . So the answer is Therefore "
        "Let me think . Each box holds pencils . A train travels kilometers per hour . "
        "The sum of and is . The product of times equals . Wait , let us check again ."
    )
    lines = [words]
    for a in range(0, 100):
        b = (a * 7 + 3) % 50
        lines.append(f"{a} + {b} = {a + b}. {a} * {b} = {a * b}. {a} - {b} = {a - b}. \\boxed{{{a + b}}}")
    return lines


def build_tiny_tokenizer(out_dir: str | Path, vocab_size: int = 384):
    """Train and save a byte-level BPE tokenizer with a ChatML template; returns the HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_tokenizer_training_corpus(), trainer=trainer)
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START, LATENT_TOKEN],
    )
    hf_tokenizer.chat_template = CHAT_TEMPLATE
    hf_tokenizer.save_pretrained(str(out_dir))
    return hf_tokenizer


def tiny_model_config(
    family: ModelFamily,
    vocab_size: int,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_attention_heads: int = 2,
    num_key_value_heads: int = 1,
    intermediate_size: int = 128,
    max_position_embeddings: int = 4096,
    eos_token_id: int,
    pad_token_id: int,
):
    """A transformers config of the given family with vLLM-CPU-compatible attention shapes."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=None,
        dtype="float32",
    )
    head_dim = hidden_size // num_attention_heads
    if head_dim < 32:
        raise ValueError(f"head_dim={head_dim} < 32: vLLM's CPU attention backend needs head_dim >= 32")
    if family == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(**common)
    if family == "qwen3":
        from transformers import Qwen3Config

        return Qwen3Config(head_dim=head_dim, **common)
    raise ValueError(f"unknown model family {family!r}; expected 'qwen2' or 'qwen3'")


def build_tiny_model_dir(
    out_dir: str | Path,
    family: ModelFamily = "qwen2",
    seed: int = 0,
    *,
    tokenizer_vocab_size: int = 384,
    **config_overrides,
) -> Path:
    """Write a tiny random causal LM + tokenizer to ``out_dir`` and return the path.

    Deterministic for a given (family, seed, sizes). The vocabulary is exactly the tokenizer's;
    ``latent_placeholder_token_id`` names the token that marks the latent's position.
    """
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(out, vocab_size=tokenizer_vocab_size)
    config = tiny_model_config(
        family,
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
        **config_overrides,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init has std 0.02: logits are then nearly uniform over the vocabulary and every
    # sampled continuation is noise. A larger output scale gives peaked, varied next-token
    # distributions, which the entropy / branching tests need to be meaningful.
    with torch.no_grad():
        model.lm_head.weight.mul_(25.0)
    model.save_pretrained(str(out), safe_serialization=True)
    generation_config = {"eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id}
    (out / "generation_config.json").write_text(json.dumps(generation_config))
    return out


def latent_placeholder_token_id(model_dir: str | Path) -> int:
    """Token id of ``LATENT_TOKEN`` in a tiny model directory written by ``build_tiny_model_dir``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    token_id = tokenizer.convert_tokens_to_ids(LATENT_TOKEN)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"{model_dir} has no {LATENT_TOKEN} token: not built by build_tiny_model_dir")
    return token_id
