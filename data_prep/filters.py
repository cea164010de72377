"""Row filters: deduplication, decontamination against eval sets, prompt length, pass rate.

Matching text is normalised first (`normalize_text`) so that copies differing only in case,
spacing, ``$`` delimiters or LaTeX spacing commands count as the same problem. Decontamination
flags a training problem whose normalised text equals an eval problem's, or that shares any
run of ``ngram_size`` consecutive words with one (13 words by default, the GPT-3 paper's
contamination window; the words are alphanumeric runs, so LaTeX markup does not count).
"""

from __future__ import annotations

import json
import re
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.sources import SourceError, open_local_source

QUESTION_COLUMNS = ("problem", "question", "Problem", "Question")
TRAINING_SPLITS = ("train", "val")

_LATEX_SPACING = re.compile(r"\\[,;:! ]|\\(?:left|right)\b|~|\$")
_WHITESPACE = re.compile(r"\s+")
_SPACE_AROUND_SYMBOL = re.compile(r"\s+(?=[^\w\s])|(?<=[^\w\s])\s+")
_WORD = re.compile(r"[^\W_]+")


def normalize_text(text: str) -> str:
    """Lower-cased NFKC text without $ delimiters, LaTeX spacing or \\left/\\right; spaces are
    kept only between two word characters ("x = ( 2 ) ?" and "x=(2)?" normalise alike)."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = _LATEX_SPACING.sub(" ", text)
    text = _SPACE_AROUND_SYMBOL.sub("", text)
    return _WHITESPACE.sub(" ", text).strip()


def word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """The set of ``n``-word windows of ``text`` (normalised first); empty if it has fewer words."""
    words = _WORD.findall(normalize_text(text))
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)} if n > 0 else set()


@dataclass
class Deduplicator:
    """Keeps the first occurrence of each normalised question."""

    first_seen: dict[str, tuple[int, str]] = field(default_factory=dict)  # key -> (index, answer)
    duplicates: int = 0
    duplicates_with_other_answer: int = 0  # same problem, different gold answer: worth a look
    # raw text -> key: the DAPO hub file repeats each problem ~100 times verbatim
    _keys: dict[str, str] = field(default_factory=dict, repr=False)

    def is_duplicate(self, question: str, answer: str, index: int) -> bool:
        key = self._keys.get(question)
        if key is None:
            key = self._keys[question] = normalize_text(question)
        seen = self.first_seen.get(key)
        if seen is None:
            self.first_seen[key] = (index, answer)
            return False
        self.duplicates += 1
        if seen[1] != answer and normalize_text(seen[1]) != normalize_text(answer):
            self.duplicates_with_other_answer += 1
        return True


@dataclass
class ContaminationIndex:
    """Normalised texts and word n-grams of every eval question, each labelled with its file."""

    ngram_size: int
    exact: dict[str, str] = field(default_factory=dict)
    ngrams: dict[tuple[str, ...], str] = field(default_factory=dict)
    num_eval_questions: int = 0

    def add(self, question: str, label: str) -> None:
        self.num_eval_questions += 1
        self.exact.setdefault(normalize_text(question), label)
        for gram in word_ngrams(question, self.ngram_size):
            self.ngrams.setdefault(gram, label)

    def match(self, question: str) -> tuple[str, str] | None:
        """('exact' | 'ngram', eval label) for a contaminated question, else None."""
        label = self.exact.get(normalize_text(question))
        if label is not None:
            return "exact", label
        for gram in word_ngrams(question, self.ngram_size):
            label = self.ngrams.get(gram)
            if label is not None:
                return "ngram", label
        return None


def eval_question_of(row: dict) -> str | None:
    """The raw problem text of an eval row: this tool's parquet (extra_info.question) or a hub layout."""
    extra = row.get("extra_info")
    if isinstance(extra, dict) and isinstance(extra.get("question"), str):
        return extra["question"]
    for key in QUESTION_COLUMNS:
        if isinstance(row.get(key), str):
            return row[key]
    return None


def build_contamination_index(paths: list[str], ngram_size: int) -> ContaminationIndex:
    """Index the eval questions in ``paths`` (files or directories; parquet / jsonl / json)."""
    index = ContaminationIndex(ngram_size=ngram_size)
    for path in paths:
        for source in open_local_source(path):
            usable = ("extra_info" in source.columns) or any(k in source.columns for k in QUESTION_COLUMNS)
            if not usable:
                raise SourceError(
                    f"{source.path}: cannot find eval questions for decontamination. Columns found: "
                    f"{sorted(source.columns)}; expected 'extra_info.question' (this tool's output) or one of "
                    f"{list(QUESTION_COLUMNS)}"
                )
            label = Path(source.path).name
            skipped_training_rows = 0
            for row in source.rows:
                extra = row.data.get("extra_info") if row.data is not None else None
                if isinstance(extra, dict) and extra.get("split") in TRAINING_SPLITS:
                    # this tool's own train/val output sitting in the same directory as the eval sets
                    skipped_training_rows += 1
                    continue
                question = eval_question_of(row.data) if row.data is not None else None
                if question is None or not question.strip():
                    raise SourceError(f"{row.location}: eval row without a question ({row.error or 'empty'})")
                index.add(question, label)
            if skipped_training_rows:
                print(
                    f"[data_prep] decontamination: ignored {skipped_training_rows} train/val row(s) of {source.path}",
                    file=sys.stderr,
                )
    if index.num_eval_questions == 0:
        raise SourceError(f"no eval questions found in {paths}")
    return index


# --------------------------------------------------------------------------- pass rates

_ID_KEYS = ("original_id", "id")
_N_KEYS = ("n", "num_samples", "total")
_C_KEYS = ("c", "num_correct", "correct", "pass_count")


def _first(record: dict, keys: tuple[str, ...]):
    for key in keys:
        if key in record and record[key] is not None:
            return record[key]
    return None


@dataclass
class PassRates:
    """Base-model pass counts per prompt, keyed by original id, index or question text.

    File format (jsonl, one prompt per line): a key -- ``id``/``original_id`` (matches
    extra_info.original_id), or ``index`` (matches extra_info.index, which this tool derives from
    the row's position in the source, so it is the same across runs on the same source), or
    ``question`` (matches the normalised raw problem) -- plus ``n`` samples and ``c`` correct.
    The eval runner's per-problem jsonl (``problem_id`` = str(index), ``n``, ``num_correct``)
    is accepted as is: run the base model on this tool's unfiltered output, then pass its records.
    """

    by_id: dict[str, tuple[int, int]] = field(default_factory=dict)
    by_index: dict[int, tuple[int, int]] = field(default_factory=dict)
    by_question: dict[str, tuple[int, int]] = field(default_factory=dict)
    used: set = field(default_factory=set)

    @property
    def num_entries(self) -> int:
        return len(self.by_id) + len(self.by_index) + len(self.by_question)

    def lookup(self, original_id: str, index: int, question: str) -> tuple[int, int] | None:
        for table, key in (
            (self.by_id, original_id),
            (self.by_index, index),
            (self.by_question, normalize_text(question)),
        ):
            if key in table:
                self.used.add((id(table), key))
                return table[key]
        return None

    @property
    def num_unmatched(self) -> int:
        return self.num_entries - len(self.used)


def load_pass_rates(path: str) -> PassRates:
    rates = PassRates()
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"line {line_no} of pass-rate file {path}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SourceError(f"{where}: invalid JSON: {exc}") from exc
            if not isinstance(record, dict):
                raise SourceError(f"{where}: expected a JSON object")
            n, c = _first(record, _N_KEYS), _first(record, _C_KEYS)
            if not isinstance(n, int) or isinstance(n, bool) or not isinstance(c, int) or isinstance(c, bool):
                raise SourceError(
                    f"{where}: needs integer sample count n {list(_N_KEYS)} and correct count c {list(_C_KEYS)}"
                )
            if n <= 0 or not 0 <= c <= n:
                raise SourceError(f"{where}: needs n > 0 and 0 <= c <= n, got n={n}, c={c}")
            original_id = _first(record, _ID_KEYS)
            problem_id = record.get("problem_id")
            if original_id is not None:
                rates.by_id[str(original_id)] = (n, c)
            elif isinstance(record.get("index"), int):
                rates.by_index[record["index"]] = (n, c)
            elif isinstance(problem_id, str) and problem_id.lstrip("-").isdigit():
                # the eval runner's per-problem records (recipe/iib_lpo/eval): problem_id = str(extra_info.index)
                rates.by_index[int(problem_id)] = (n, c)
            elif isinstance(record.get("question"), str):
                rates.by_question[normalize_text(record["question"])] = (n, c)
            else:
                raise SourceError(
                    f"{where}: needs a key: 'id'/'original_id', an integer 'index' (or 'problem_id'), or 'question'"
                )
    if rates.num_entries == 0:
        raise SourceError(f"pass-rate file {path} holds no entries")
    return rates


# --------------------------------------------------------------------------- prompt length


def load_chat_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise SourceError(f"cannot load a tokenizer from {path!r}: {exc}") from exc
    if not getattr(tokenizer, "chat_template", None):
        raise SourceError(f"tokenizer at {path!r} has no chat template; prompt lengths would not match training")
    return tokenizer


def prompt_token_count(tokenizer, messages: list[dict]) -> int:
    """Tokens of the chat-formatted prompt, counted exactly as verl's RLHFDataset length filter does."""
    from verl.utils.tokenizer import normalize_token_ids

    return len(normalize_token_ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)))
