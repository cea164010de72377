"""Source layouts of the supported datasets and their conversion to one canonical problem record.

Each dataset accepts the column layouts its Hugging Face hub copies actually use (confirmed from
the datasets' cards and public loaders; see the `LAYOUTS` comments). A file's layout is detected
from its column names; a file matching none of them is an error that lists the columns found
and the layouts expected. A row of a known layout that lacks its problem or answer raises
`BadRowError`; a valid row outside the dataset's scope (e.g. an OlympiadBench problem with
several answers) raises `OutOfScopeError`. The caller counts both; nothing is dropped silently.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from recipe.iib_lpo.reward.extraction import extract_answer_detailed


class BadRowError(ValueError):
    """A row of a known layout without a usable problem or answer."""


class OutOfScopeError(ValueError):
    """A valid row that the dataset's definition excludes (counted, never silently dropped)."""


class UnknownLayoutError(ValueError):
    """A source file whose columns match none of the dataset's known layouts."""


@dataclass
class Problem:
    """One problem in canonical form, before the prompt template is applied."""

    question: str
    answer: str
    original_id: str | None = None
    solution: str | None = None
    level: int | None = None
    type: str | None = None


@dataclass(frozen=True)
class Layout:
    name: str  # where this layout comes from, shown in error messages
    required: tuple[str, ...]  # columns that identify the layout (all must be present)
    convert: Callable[[dict], Problem]


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    kind: str  # "train" (training set: val split, decontamination, pass-rate allowed) or "eval"
    data_source: str  # verl's data_source column; hub ids where verl's own scorers know them
    layouts: tuple[Layout, ...]
    hub_id: str | None = None
    hub_configs: tuple[str | None, ...] = (None,)
    hub_split: str = "train"
    options: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- value helpers


def require_text(row: dict, key: str, what: str) -> str:
    value = row.get(key)
    if value is None:
        raise BadRowError(f"no {what}: column {key!r} is missing or null")
    if not isinstance(value, str):
        raise BadRowError(f"no {what}: column {key!r} holds {type(value).__name__} {value!r}, expected text")
    value = value.strip()
    if not value:
        raise BadRowError(f"no {what}: column {key!r} is empty")
    return value


def answer_to_text(value, key: str) -> str:
    """A gold answer as text: strings stripped, integral floats without '.0' (27.0 -> '27')."""
    if value is None:
        raise BadRowError(f"no answer: column {key!r} is missing or null")
    if isinstance(value, bool):
        raise BadRowError(f"no answer: column {key!r} holds a boolean {value!r}")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise BadRowError(f"no answer: column {key!r} holds {value!r}")
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        value = value.strip()
        if not value:
            raise BadRowError(f"no answer: column {key!r} is empty")
        return value
    raise BadRowError(f"no answer: column {key!r} holds {type(value).__name__} {value!r}, expected text or a number")


def optional_id(row: dict, *keys: str) -> str | None:
    for key in keys:
        value = row.get(key)
        if value is not None and str(value).strip():
            return str(value).strip()
    return None


def last_boxed_content(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\boxed x`` / ``\\fbox{...}`` in ``text``, else None.

    The reward's extractor (one definition for model output and reference solutions), limited
    to boxes: its ``####`` / ``Answer:`` fallbacks suit model output, not MATH solutions.
    """
    found = extract_answer_detailed(text)
    return found.answer if found.source == "boxed" else None


def parse_level(value) -> int | None:
    """MATH difficulty: 'Level 3' or 3 -> 3; 'Level ?' (a few MATH rows) -> None."""
    if value is None:
        return None
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):  # int, numpy ints (parquet columns)
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    match = re.fullmatch(r"\s*(?:level\s*)?(\d+)\s*", str(value), flags=re.IGNORECASE)
    return int(match.group(1)) if match else None


def strip_math_delimiters(text: str) -> str:
    """'$\\frac{1}{2}$' -> '\\frac{1}{2}' (OlympiadBench wraps final answers in $...$)."""
    text = text.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if text.startswith(left) and text.endswith(right) and len(text) > len(left) + len(right):
            return text[len(left) : -len(right)].strip()
    return text


# --------------------------------------------------------------------------- MATH (training)


def _math_from_solution(row: dict) -> Problem:
    question = require_text(row, "problem", "problem")
    solution = require_text(row, "solution", "solution (the answer is its last \\boxed{})")
    answer = last_boxed_content(solution)
    if answer is None:
        raise BadRowError("no answer: 'solution' has no \\boxed{...}")
    return Problem(
        question=question,
        answer=answer,
        original_id=optional_id(row, "unique_id", "id"),
        solution=solution,
        level=parse_level(row.get("level")),
        type=row.get("type") or row.get("subject"),
    )


def _math_with_answer(answer_key: str) -> Callable[[dict], Problem]:
    def convert(row: dict) -> Problem:
        solution = row.get("solution")
        return Problem(
            question=require_text(row, "problem", "problem"),
            answer=answer_to_text(row.get(answer_key), answer_key),
            original_id=optional_id(row, "unique_id", "id"),
            solution=solution.strip() if isinstance(solution, str) else None,
            level=parse_level(row.get("level")),
            type=row.get("type") or row.get("subject"),
        )

    return convert


# --------------------------------------------------------------------------- DAPO-Math-17k

# BytedTsinghua-SIA/DAPO-Math-17k wraps every problem in this fixed instruction (user turn):
#   "Solve the following math problem step by step. The last line of your response should be of
#    the form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
#   + problem + "\n\nRemember to put your answer on its own line after \"Answer:\"."
# Matched with flexible whitespace so re-serialised copies still parse.
DAPO_PREFIX_RE = re.compile(
    r"^\s*Solve the following math problem step by step\.\s+The last line of your response should be of the "
    r"form Answer:\s*\$Answer \(without quotes\) where \$Answer is the answer to the problem\.\s*"
)
DAPO_SUFFIX_RE = re.compile(r"\s*Remember to put your answer on its own line after \"Answer:\"\.?\s*$")


def extract_dapo_problem(text: str) -> str:
    """The raw problem inside DAPO-Math-17k's instruction; BadRowError if the wrapper is not there."""
    prefix = DAPO_PREFIX_RE.search(text)
    if prefix is None:
        raise BadRowError("DAPO prompt does not start with the DAPO-Math-17k instruction; cannot extract the problem")
    suffix = DAPO_SUFFIX_RE.search(text, prefix.end())
    if suffix is None:
        raise BadRowError("DAPO prompt does not end with the DAPO-Math-17k 'Remember to put your answer...' line")
    problem = text[prefix.end() : suffix.start()].strip()
    if not problem:
        raise BadRowError("no problem: the DAPO instruction wraps an empty problem")
    return problem


def _dapo_user_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list | tuple):
        users = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        if len(users) == 1 and isinstance(users[0], str):
            return users[0]
        raise BadRowError(f"no problem: 'prompt' has {len(users)} user messages with text, expected 1")
    raise BadRowError(f"no problem: 'prompt' holds {type(prompt).__name__}, expected chat messages or text")


def _dapo_verl(row: dict) -> Problem:
    question = extract_dapo_problem(_dapo_user_text(row.get("prompt")))
    reward_model = row.get("reward_model")
    if not isinstance(reward_model, dict):
        raise BadRowError("no answer: 'reward_model' is missing or not a struct")
    extra = row.get("extra_info") if isinstance(row.get("extra_info"), dict) else {}
    return Problem(
        question=question,
        answer=answer_to_text(reward_model.get("ground_truth"), "reward_model.ground_truth"),
        original_id=optional_id(extra, "index", "id"),
    )


def _dapo_processed(row: dict) -> Problem:
    # open-r1/DAPO-Math-17k-Processed: 'prompt' is the instructed user text, 'solution' the answer
    text = require_text(row, "prompt", "problem")
    question = extract_dapo_problem(text) if DAPO_PREFIX_RE.search(text) else text
    extra = row.get("extra_info") if isinstance(row.get("extra_info"), dict) else {}
    return Problem(
        question=question,
        answer=answer_to_text(row.get("solution"), "solution"),
        original_id=optional_id(extra, "index", "id"),
    )


# --------------------------------------------------------------------------- GSM8K


def gsm8k_final_answer(answer_text: str) -> str:
    """'... #### 1,234' -> '1234' (GSM8K's final answer; thousands separators removed)."""
    if "####" not in answer_text:
        raise BadRowError("no answer: 'answer' has no '#### <number>' line")
    final = answer_text.rsplit("####", 1)[1].strip().replace(",", "")
    if not final:
        raise BadRowError("no answer: nothing after '####' in 'answer'")
    return final


def _gsm8k(row: dict) -> Problem:
    answer_text = require_text(row, "answer", "answer")
    return Problem(
        question=require_text(row, "question", "question"),
        answer=gsm8k_final_answer(answer_text),
        original_id=optional_id(row, "id", "idx"),
        solution=answer_text.rsplit("####", 1)[0].strip() or None,
    )


# --------------------------------------------------------------------------- generic question/answer


def _qa(question_key: str, answer_key: str, *id_keys: str) -> Callable[[dict], Problem]:
    def convert(row: dict) -> Problem:
        solution = row.get("solution", row.get("Solution"))
        return Problem(
            question=require_text(row, question_key, "problem"),
            answer=answer_to_text(row.get(answer_key), answer_key),
            original_id=optional_id(row, *id_keys),
            solution=solution.strip() if isinstance(solution, str) and solution.strip() else None,
        )

    return convert


def _qa_boxed_solution(question_key: str, *id_keys: str) -> Callable[[dict], Problem]:
    """Copies without an answer column whose 'solution' is (or ends in) a \\boxed{} answer."""

    def convert(row: dict) -> Problem:
        solution = require_text(row, "solution", "solution (the answer is its last \\boxed{})")
        answer = last_boxed_content(solution)
        if answer is None:
            raise BadRowError("no answer: 'solution' has no \\boxed{...}")
        return Problem(
            question=require_text(row, question_key, "problem"),
            answer=answer,
            original_id=optional_id(row, *id_keys),
            solution=solution,
        )

    return convert


ID_KEYS = ("id", "ID", "unique_id", "problem_idx", "idx")

# --------------------------------------------------------------------------- OlympiadBench


def _olympiad(allowed_answer_types: tuple[str, ...] | None) -> Callable[[dict], Problem]:
    """Hothan/OlympiadBench (config OE_TO_maths_en_COMP): keep English, text-only maths problems
    with exactly one final answer whose answer_type is allowed (default: Numerical)."""

    def convert(row: dict) -> Problem:
        question = require_text(row, "question", "question")
        language = row.get("language")
        if language is not None and str(language).strip().lower() not in ("english", "en"):
            raise OutOfScopeError(f"language {language!r} is not English")
        subject = row.get("subject")
        if subject is not None and str(subject).strip().lower() not in ("math", "maths", "mathematics"):
            raise OutOfScopeError(f"subject {subject!r} is not maths")
        modality = row.get("modality")
        has_image = any(row.get(f"image_{k}") for k in range(1, 10))
        if has_image or (modality is not None and "multi" in str(modality).lower()):
            raise OutOfScopeError("the problem needs an image")
        if bool(row.get("is_multiple_answer")):
            raise OutOfScopeError("is_multiple_answer is true")
        final = row.get("final_answer")
        if isinstance(final, str):
            final = [final]
        if final is None or not isinstance(final, list | tuple):
            raise BadRowError("no answer: 'final_answer' is missing or not a list")
        final = [a for a in final if a is not None and str(a).strip()]
        if not final:
            raise BadRowError("no answer: 'final_answer' is empty")
        if len(final) > 1:
            raise OutOfScopeError(f"final_answer has {len(final)} entries")
        answer_type = row.get("answer_type")
        if allowed_answer_types is not None:
            types = [t.strip() for t in str(answer_type or "").split(",") if t.strip()]
            if not types or any(t not in allowed_answer_types for t in types):
                raise OutOfScopeError(f"answer_type {answer_type!r} not in {list(allowed_answer_types)}")
        answer = strip_math_delimiters(str(final[0]))
        if not answer:
            raise BadRowError("no answer: 'final_answer' holds only math delimiters")
        solution = row.get("solution")
        if isinstance(solution, list | tuple):
            solution = "\n\n".join(str(s) for s in solution if s)
        return Problem(
            question=question,
            answer=answer,
            original_id=optional_id(row, "id"),
            solution=solution.strip() if isinstance(solution, str) and solution.strip() else None,
            type=row.get("subfield"),
        )

    return convert


# --------------------------------------------------------------------------- registry


def _spec_olympiad(allowed_answer_types: tuple[str, ...] | None) -> DatasetSpec:
    return DatasetSpec(
        name="olympiadbench",
        kind="eval",
        data_source="olympiadbench",
        layouts=(
            Layout(
                "Hothan/OlympiadBench (question, final_answer list, is_multiple_answer, answer_type, ...)",
                ("question", "final_answer"),
                _olympiad(allowed_answer_types),
            ),
        ),
        hub_id="Hothan/OlympiadBench",
        hub_configs=("OE_TO_maths_en_COMP",),
        hub_split="train",
    )


DEFAULT_OLYMPIAD_ANSWER_TYPES = ("Numerical",)

DATASETS: dict[str, DatasetSpec] = {
    # lighteval/MATH, hendrycks/competition_math, DigitalLearningGmbH/MATH-lighteval:
    # problem, level ("Level 3"), type, solution (answer = last \boxed{}). Some copies add an
    # explicit answer column (zwhe99/MATH: expected_answer; MATH-500-like: answer, subject).
    "math": DatasetSpec(
        name="math",
        kind="train",
        data_source="lighteval/MATH",
        layouts=(
            Layout(
                "MATH with an 'answer' column (problem, answer)", ("problem", "answer"), _math_with_answer("answer")
            ),
            Layout(
                "MATH with 'expected_answer' (problem, expected_answer)",
                ("problem", "expected_answer"),
                _math_with_answer("expected_answer"),
            ),
            Layout(
                "lighteval/hendrycks MATH (problem, level, type, solution with \\boxed{})",
                ("problem", "solution"),
                _math_from_solution,
            ),
        ),
        hub_id="DigitalLearningGmbH/MATH-lighteval",
        hub_configs=("default",),
        hub_split="train",
    ),
    # BytedTsinghua-SIA/DAPO-Math-17k: data_source, prompt (chat messages, problem inside a fixed
    # instruction), ability, reward_model {ground_truth, style}, extra_info {index}. Each
    # problem appears ~100 times in the hub file; deduplication keeps one.
    # open-r1/DAPO-Math-17k-Processed: prompt (instructed text), solution (the answer), ...
    "dapo_math": DatasetSpec(
        name="dapo_math",
        kind="train",
        data_source="math_dapo",
        layouts=(
            Layout(
                "BytedTsinghua-SIA/DAPO-Math-17k (prompt messages, reward_model.ground_truth)",
                ("prompt", "reward_model"),
                _dapo_verl,
            ),
            Layout("open-r1/DAPO-Math-17k-Processed (prompt text, solution)", ("prompt", "solution"), _dapo_processed),
        ),
        hub_id="BytedTsinghua-SIA/DAPO-Math-17k",
        hub_split="train",
    ),
    # openai/gsm8k (config main): question, answer ("...reasoning...\n#### 72")
    "gsm8k": DatasetSpec(
        name="gsm8k",
        kind="train",
        data_source="openai/gsm8k",
        layouts=(Layout("openai/gsm8k (question, answer with '#### N')", ("question", "answer"), _gsm8k),),
        hub_id="openai/gsm8k",
        hub_configs=("main",),
        hub_split="train",
    ),
    # HuggingFaceH4/MATH-500: problem, solution, answer, subject, level (int), unique_id
    "math500": DatasetSpec(
        name="math500",
        kind="eval",
        data_source="HuggingFaceH4/MATH-500",
        layouts=(
            Layout(
                "HuggingFaceH4/MATH-500 (problem, solution, answer, subject, level, unique_id)",
                ("problem", "answer"),
                _math_with_answer("answer"),
            ),
        ),
        hub_id="HuggingFaceH4/MATH-500",
        hub_split="test",
    ),
    # Maxwell-Jia/AIME_2024: ID, Problem, Solution, Answer. HuggingFaceH4/aime_2024 and
    # AI-MO copies: id, problem, solution, answer, url(, year). math-ai/aime24: id, problem,
    # solution (\boxed{} answer), url.
    "aime2024": DatasetSpec(
        name="aime2024",
        kind="eval",
        data_source="aime2024",
        layouts=(
            Layout(
                "Maxwell-Jia/AIME_2024 (ID, Problem, Solution, Answer)",
                ("Problem", "Answer"),
                _qa("Problem", "Answer", *ID_KEYS),
            ),
            Layout(
                "HuggingFaceH4/aime_2024 (id, problem, solution, answer)",
                ("problem", "answer"),
                _qa("problem", "answer", *ID_KEYS),
            ),
            Layout(
                "math-ai/aime24 (id, problem, solution with \\boxed{})",
                ("problem", "solution"),
                _qa_boxed_solution("problem", *ID_KEYS),
            ),
        ),
        hub_id="Maxwell-Jia/AIME_2024",
        hub_split="train",
    ),
    # opencompass/AIME2025 (configs AIME2025-I, AIME2025-II, split test): question, answer.
    # yentinglin/aime_2025, math-ai/aime25: (id,) problem, answer(, solution, url, year).
    "aime2025": DatasetSpec(
        name="aime2025",
        kind="eval",
        data_source="aime2025",
        layouts=(
            Layout(
                "opencompass/AIME2025 (question, answer)", ("question", "answer"), _qa("question", "answer", *ID_KEYS)
            ),
            Layout(
                "yentinglin/aime_2025, math-ai/aime25 (id, problem, answer)",
                ("problem", "answer"),
                _qa("problem", "answer", *ID_KEYS),
            ),
        ),
        hub_id="opencompass/AIME2025",
        hub_configs=("AIME2025-I", "AIME2025-II"),
        hub_split="test",
    ),
    # math-ai/amc23 (split test): id, question, answer, url. Other copies: id, problem, answer
    # (float64, e.g. 27.0), url.
    "amc23": DatasetSpec(
        name="amc23",
        kind="eval",
        data_source="amc23",
        layouts=(
            Layout("math-ai/amc23 (id, question, answer)", ("question", "answer"), _qa("question", "answer", *ID_KEYS)),
            Layout(
                "amc23 copies with 'problem' (id, problem, answer)",
                ("problem", "answer"),
                _qa("problem", "answer", *ID_KEYS),
            ),
        ),
        hub_id="math-ai/amc23",
        hub_split="test",
    ),
    "olympiadbench": _spec_olympiad(DEFAULT_OLYMPIAD_ANSWER_TYPES),
    # generated offline by data_prep.demo (no source files)
    "demo": DatasetSpec(name="demo", kind="train", data_source="demo_arith", layouts=()),
}

DATASET_ALIASES = {
    "dapo": "dapo_math",
    "math-500": "math500",
    "aime24": "aime2024",
    "aime25": "aime2025",
    "amc": "amc23",
}


def get_spec(name: str, olympiad_answer_types: tuple[str, ...] | None = DEFAULT_OLYMPIAD_ANSWER_TYPES) -> DatasetSpec:
    """The dataset spec for ``name`` (aliases accepted); OlympiadBench's answer-type filter is
    configurable (None keeps every answer type)."""
    key = DATASET_ALIASES.get(name, name)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(DATASETS)} (aliases: {sorted(DATASET_ALIASES)})")
    if key == "olympiadbench":
        return _spec_olympiad(olympiad_answer_types)
    return DATASETS[key]


def detect_layout(spec: DatasetSpec, columns, where: str) -> Layout:
    """The first of ``spec``'s layouts whose required columns are all in ``columns``."""
    present = set(columns)
    for layout in spec.layouts:
        if set(layout.required) <= present:
            return layout
    expected = "; ".join(f"{layout.name}: needs {list(layout.required)}" for layout in spec.layouts)
    raise UnknownLayoutError(
        f"{where}: unknown layout for dataset {spec.name!r}. Columns found: {sorted(present)}. "
        f"Expected one of: {expected}"
    )
