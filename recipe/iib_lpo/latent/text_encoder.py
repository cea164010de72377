"""Frozen text encoder E for the CVAE condition / target embeddings (METHOD.md step 3).

Any Hugging Face encoder (``AutoModel``) works; the default is ``microsoft/deberta-v2-xlarge``
(1536-d), as in the paper's code. The embedding of a text is the mean of the encoder's last
hidden state over the non-padding tokens (the attention mask), so padding a batch never changes
an item's embedding. Inputs are cut to ``max_length`` tokens (512, the paper code's limit),
special tokens included.

Truncation (decision). Two kinds of text are encoded, and they are cut differently:

* **Condition texts** (question + response prefix, built by
  ``latent.sampler.build_condition_text``, which joins the two parts with
  :data:`CONDITION_SEPARATOR`): the question and the prefix are tokenized separately; the
  question is always kept (only its first tokens, if it alone exceeds the limit), and the
  remaining budget holds the *end* of the prefix, the text closest to the fork point. Cutting the
  joined text from the left (the previous rule) dropped the question entirely for long prefixes;
  cutting from the right would encode only the question and the first steps, giving every fork
  point of a response the same latent distribution.
* **Plain texts** (no separator: the CVAE targets, i.e. solutions / suffixes): cut on
  ``truncation_side``, ``"left"`` (default, keep the end) or ``"right"`` (keep the start, the
  tokenizer default and paper-code parity).

Cost (ENVIRONMENT.md): the xlarge encoder takes ~6 ms per 512-token sequence batched on an H100
and ~7 s per sequence on a 2-core CPU, so callers must encode all conditions of a step in one
:meth:`TextEncoder.encode` call on a GPU; ``micro_batch_size`` bounds the activation memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

DEFAULT_ENCODER = "microsoft/deberta-v2-xlarge"

# Joins the question and the response prefix inside a condition text (ASCII "record separator",
# which no question or decoded response contains in practice; build_condition_text replaces any
# occurrence in its inputs). The encoder splits on it and never tokenizes it.
CONDITION_SEPARATOR = "\x1e"


def split_condition_text(text: str) -> tuple[str, str] | None:
    """(question, prefix) of a condition text built by ``build_condition_text``; None for a
    plain text (no :data:`CONDITION_SEPARATOR`). Splits at the first separator."""
    if CONDITION_SEPARATOR not in text:
        return None
    question, prefix = text.split(CONDITION_SEPARATOR, 1)
    return question, prefix


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``last_hidden_state`` [B, T, H] over positions where ``attention_mask`` [B, T] is 1.

    Computed in float32. A row with no unmasked token is an error (its mean is undefined).
    """
    mask = attention_mask.to(torch.float32).unsqueeze(-1)
    counts = mask.sum(dim=1)
    if (counts == 0).any():
        raise ValueError("mean_pool: a row has no unmasked tokens")
    return (last_hidden_state.to(torch.float32) * mask).sum(dim=1) / counts


class TextEncoder:
    """Batched, no-grad, mean-pooled sentence embeddings from a Hugging Face encoder.

    name_or_path: hub id or local directory of an encoder + tokenizer (offline runs need a local
        copy / HF cache).
    max_length: token limit per text (default 512, paper code).
    micro_batch_size: texts per forward pass (default 32; 64 fits the xlarge encoder in bf16 in
        ~8 GB on an H100 at 512 tokens).
    truncation_side: how *plain* texts are cut: "left" (keep the end, default) or "right" (keep
        the start, paper parity). Condition texts always keep the question and the end of the
        prefix (module docstring).
    device / dtype: where and in which precision the encoder runs (bf16 on GPU is fine: the pooled
        output is returned in float32).
    """

    def __init__(
        self,
        name_or_path: str | Path = DEFAULT_ENCODER,
        *,
        max_length: int = 512,
        micro_batch_size: int = 32,
        truncation_side: str = "left",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        from transformers import AutoModel, AutoTokenizer

        if truncation_side not in ("left", "right"):
            raise ValueError(f"truncation_side must be 'left' or 'right', got {truncation_side!r}")
        if max_length < 1 or micro_batch_size < 1:
            raise ValueError(f"max_length and micro_batch_size must be >= 1, got {max_length}, {micro_batch_size}")
        self.name = str(name_or_path)
        self.max_length = max_length
        self.micro_batch_size = micro_batch_size
        self.device = torch.device(device)
        self.dtype = dtype
        self.truncation_side = truncation_side
        self.tokenizer = AutoTokenizer.from_pretrained(self.name)
        self.tokenizer.truncation_side = truncation_side
        if self.tokenizer.pad_token is None:
            raise ValueError(f"encoder tokenizer {self.name} has no pad token; mean pooling needs padded batches")
        self._special_head, self._special_tail = self._special_token_frame()
        self.content_budget = max_length - len(self._special_head) - len(self._special_tail)
        if self.content_budget < 1:
            raise ValueError(
                f"max_length={max_length} leaves no room for text after the tokenizer's "
                f"{len(self._special_head) + len(self._special_tail)} special tokens"
            )
        self.model = AutoModel.from_pretrained(self.name, dtype=dtype).to(self.device)
        self.model.eval()
        self.model.requires_grad_(False)

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.hidden_size)

    def _special_token_frame(self) -> tuple[list[int], list[int]]:
        """The special tokens the tokenizer puts before / after a single text (e.g. [CLS] / [SEP]),
        read off one probe encoding, so that texts cut at the id level are framed exactly as the
        tokenizer frames them."""
        probe = "probe text"
        framed = list(self.tokenizer(probe)["input_ids"])
        bare = list(self.tokenizer(probe, add_special_tokens=False)["input_ids"])
        for start in range(len(framed) - len(bare) + 1):
            if framed[start : start + len(bare)] == bare:
                return framed[:start], framed[start + len(bare) :]
        raise ValueError(f"cannot locate the text inside the special tokens of {self.name}'s tokenizer")

    def _bare_ids(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        # verbose=False: long prefixes are tokenized whole on purpose (cut below), no length warning
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]

    def input_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids (special tokens included, no padding) that :meth:`encode` feeds the model.

        Condition texts (see :func:`split_condition_text`): the question's ids (cut to the budget
        only if the question alone exceeds it, keeping its start), then the *last* ids of the
        prefix that fit in ``max_length``. Plain texts: cut on ``truncation_side``.
        """
        texts = list(texts)
        parts = [split_condition_text(t) for t in texts]
        heads = self._bare_ids([t if p is None else p[0] for t, p in zip(texts, parts)])
        prefix_index = [i for i, p in enumerate(parts) if p is not None and p[1]]
        prefixes = dict(zip(prefix_index, self._bare_ids([parts[i][1] for i in prefix_index])))
        budget = self.content_budget
        out = []
        for i, (ids, part) in enumerate(zip(heads, parts)):
            if part is None:  # plain text
                if len(ids) > budget:
                    ids = ids[len(ids) - budget :] if self.truncation_side == "left" else ids[:budget]
            else:
                ids = ids[:budget]
                room = budget - len(ids)
                prefix_ids = prefixes.get(i, [])
                if room > 0 and prefix_ids:
                    ids = ids + prefix_ids[-room:]
            out.append(self._special_head + ids + self._special_tail)
        return out

    @torch.no_grad()
    def encode(self, texts: Sequence[str], *, show_progress: bool = False) -> torch.Tensor:
        """Embeddings [len(texts), embed_dim] (float32, on ``self.device``), in input order.

        Texts are cut as :meth:`input_ids` says (condition texts keep their question)."""
        if isinstance(texts, str):
            raise TypeError("encode() takes a sequence of strings, not a single string")
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] is {type(text).__name__}, expected str")
        if not texts:
            return torch.empty(0, self.embed_dim, dtype=torch.float32, device=self.device)
        starts = range(0, len(texts), self.micro_batch_size)
        if show_progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=f"encode ({Path(self.name).name})", unit="batch")
        outputs = []
        for start in starts:
            ids = self.input_ids(texts[start : start + self.micro_batch_size])
            width = max(len(row) for row in ids)
            pad = self.tokenizer.pad_token_id
            input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in ids], device=self.device)
            attention_mask = torch.tensor(
                [[1] * len(row) + [0] * (width - len(row)) for row in ids], device=self.device
            )
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            outputs.append(mean_pool(hidden, attention_mask))
        return torch.cat(outputs, dim=0)


def build_tiny_encoder_dir(
    out_dir: str | Path, *, hidden_size: int = 32, seed: int = 0, architecture: str = "bert"
) -> Path:
    """Write a tiny random encoder + a locally trained WordPiece tokenizer (offline tests/demo).

    architecture: "bert" or "deberta-v2" (the default encoder's family, relative positions).
    Not a meaningful encoder: a deterministic random map from text to ``hidden_size`` floats,
    enough to exercise batching, padding, truncation and the CVAE pipeline without a download.
    """
    if architecture not in ("bert", "deberta-v2"):
        raise ValueError(f"architecture must be 'bert' or 'deberta-v2', got {architecture!r}")
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    corpus = [
        "Tom has 3 apples and buys 5 more. How many apples does he have? 3 + 5 = 8.",
        "First compute the total. Then subtract the cost. So the answer is 12.",
        "Let x be the number of pencils. Then 2x + 4 = 10, so x = 3.",
        "The area of a square with side 4 is 16. The perimeter is 16 as well.",
    ] + [f"{a} + {a * 3 % 17} = {a + a * 3 % 17}" for a in range(50)]
    # An explicit vocabulary (every word of the corpus, every character, every "##" + character),
    # in sorted order: the WordPieceTrainer breaks ties between equally frequent pieces in hash
    # order, which differs between processes, so the same seed gave different token ids.
    words = sorted({w for text in corpus for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))})
    chars = sorted({c for w in words for c in w})
    pieces = [*specials, *chars, *(f"##{c}" for c in chars), *(w for w in words if len(w) > 1)]
    tokenizer = Tokenizer(models.WordPiece(vocab={p: i for i, p in enumerate(pieces)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    hf_tokenizer.save_pretrained(str(out))
    sizes = dict(
        vocab_size=len(hf_tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=512,
        pad_token_id=hf_tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    if architecture == "bert":
        model = BertModel(BertConfig(**sizes))
    else:
        from transformers import DebertaV2Config, DebertaV2Model

        # relative attention as in deberta-v2-xlarge; no absolute position embeddings
        config = DebertaV2Config(**sizes, relative_attention=True, position_biased_input=False,
                                 pos_att_type=["p2c", "c2p"], max_relative_positions=-1, position_buckets=16)
        model = DebertaV2Model(config)
    model.save_pretrained(str(out), safe_serialization=True)
    return out
