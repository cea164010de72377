"""Small hand-written rows in each supported source layout, and helpers that write them as files.

For tests and smoke runs without the hub. The problems are made up (not copied from the
datasets); only the column layouts follow the real hub datasets. `EXPECTED` holds, per
dataset, the (question, answer) pairs a correct conversion must produce, in order.
"""

from __future__ import annotations

import json
from pathlib import Path

DAPO_INSTRUCTION = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_REMINDER = '\n\nRemember to put your answer on its own line after "Answer:".'


def dapo_row(problem: str, answer: str, uid: str) -> dict:
    return {
        "data_source": "math_dapo",
        "prompt": [{"content": DAPO_INSTRUCTION + problem + DAPO_REMINDER, "role": "user"}],
        "ability": "MATH",
        "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
        "extra_info": {"index": uid},
    }


def olympiad_row(uid: int, question: str, final_answer: list, answer_type="Numerical", multiple=False, **extra) -> dict:
    row = {
        "id": uid,
        "question": question,
        "solution": ["We compute directly."],
        "final_answer": final_answer,
        "context": None,
        "image_1": None,
        "image_2": None,
        "modality": "Text-only",
        "difficulty": "Competition",
        "is_multiple_answer": multiple,
        "unit": None,
        "answer_type": answer_type,
        "error": None,
        "question_type": "Open-ended",
        "subfield": "Algebra",
        "subject": "Math",
        "language": "English",
    }
    row.update(extra)
    return row


FIXTURE_ROWS: dict[str, list[dict]] = {
    # lighteval / hendrycks MATH
    "math": [
        {
            "problem": "What is the value of $3 + 4 \\cdot 2$?",
            "level": "Level 1",
            "type": "Prealgebra",
            "solution": "Multiplication first: $4 \\cdot 2 = 8$, so the value is $3 + 8 = \\boxed{11}$.",
        },
        {
            "problem": "Simplify $\\frac{6}{8}$.",
            "level": "Level 2",
            "type": "Prealgebra",
            "solution": "Divide by 2: $\\frac{6}{8} = \\boxed{\\frac{3}{4}}$.",
        },
        {
            "problem": "Find $x$ if $2x + 1 = 9$ and give $x^2$.",
            "level": "Level 3",
            "type": "Algebra",
            "solution": "Then $x = 4$ (not $\\boxed{5}$), so $x^2 = \\boxed{16}$.",
        },
    ],
    # BytedTsinghua-SIA/DAPO-Math-17k (the hub file repeats each problem; the fixture does too)
    "dapo_math": [
        dapo_row("Compute $7 \\times 6$.", "42", "a1b2-0001"),
        dapo_row("How many positive divisors does $12$ have?", "6", "a1b2-0002"),
        dapo_row("Compute $7 \\times 6$.", "42", "a1b2-0001"),
    ],
    # openai/gsm8k
    "gsm8k": [
        {
            "question": "Lena buys 3 packs of 12 eggs and uses 5. How many eggs are left?",
            "answer": "3*12=<<3*12=36>>36\n36-5=<<36-5=31>>31\n#### 31",
        },
        {
            "question": "A car travels 1,200 meters per minute for 2 minutes. How far does it go?",
            "answer": "1200*2=2400\n#### 2,400",
        },
    ],
    # HuggingFaceH4/MATH-500
    "math500": [
        {
            "problem": "What is $5^2 - 3^2$?",
            "solution": "$25 - 9 = \\boxed{16}$.",
            "answer": "16",
            "subject": "Algebra",
            "level": 1,
            "unique_id": "test/algebra/1.json",
        },
        {
            "problem": "Evaluate $\\sqrt{49}$.",
            "solution": "$\\boxed{7}$",
            "answer": "7",
            "subject": "Prealgebra",
            "level": 2,
            "unique_id": "test/prealgebra/2.json",
        },
    ],
    # Maxwell-Jia/AIME_2024
    "aime2024": [
        {
            "ID": "2024-I-1",
            "Problem": "Find the remainder when $2^{10}$ is divided by $1000$.",
            "Solution": "$1024$.",
            "Answer": 24,
        },
        {
            "ID": "2024-I-2",
            "Problem": "Find the number of ordered pairs of positive integers summing to $10$.",
            "Solution": "9.",
            "Answer": 9,
        },
    ],
    # opencompass/AIME2025
    "aime2025": [
        {"question": "Find the sum of the first $20$ positive integers.", "answer": "210"},
        {"question": "Find the smallest prime greater than $100$.", "answer": "101"},
    ],
    # math-ai/amc23 (answers stored as float64 in some copies)
    "amc23": [
        {"id": 0, "question": "What is $1 + 2 + \\cdots + 6$?", "answer": 21.0, "url": "https://example.invalid/amc/0"},
        {"id": 1, "question": "What is half of $0.5$?", "answer": 0.25, "url": "https://example.invalid/amc/1"},
    ],
    # Hothan/OlympiadBench, config OE_TO_maths_en_COMP
    "olympiadbench": [
        olympiad_row(1600, "Compute the number of subsets of a $4$-element set.", ["$16$"]),
        olympiad_row(1601, "Find all real $x$ with $x^2 = 4$.", ["$2$", "$-2$"], multiple=True),
        olympiad_row(1602, "Find the minimum of $x^2 - 2x$ over the reals.", ["$-1$"]),
        olympiad_row(
            1603,
            "Express the sum $1 + x + x^2$ factored over the complex numbers.",
            ["$(x-\\omega)(x-\\bar\\omega)$"],
            answer_type="Expression",
        ),
    ],
}

# (question, gold answer) pairs the conversion must produce, in output order
EXPECTED: dict[str, list[tuple[str, str]]] = {
    "math": [
        ("What is the value of $3 + 4 \\cdot 2$?", "11"),
        ("Simplify $\\frac{6}{8}$.", "\\frac{3}{4}"),
        ("Find $x$ if $2x + 1 = 9$ and give $x^2$.", "16"),
    ],
    "dapo_math": [("Compute $7 \\times 6$.", "42"), ("How many positive divisors does $12$ have?", "6")],
    "gsm8k": [
        ("Lena buys 3 packs of 12 eggs and uses 5. How many eggs are left?", "31"),
        ("A car travels 1,200 meters per minute for 2 minutes. How far does it go?", "2400"),
    ],
    "math500": [("What is $5^2 - 3^2$?", "16"), ("Evaluate $\\sqrt{49}$.", "7")],
    "aime2024": [
        ("Find the remainder when $2^{10}$ is divided by $1000$.", "24"),
        ("Find the number of ordered pairs of positive integers summing to $10$.", "9"),
    ],
    "aime2025": [
        ("Find the sum of the first $20$ positive integers.", "210"),
        ("Find the smallest prime greater than $100$.", "101"),
    ],
    "amc23": [("What is $1 + 2 + \\cdots + 6$?", "21"), ("What is half of $0.5$?", "0.25")],
    "olympiadbench": [
        ("Compute the number of subsets of a $4$-element set.", "16"),
        ("Find the minimum of $x^2 - 2x$ over the reals.", "-1"),
    ],
}

# the file format each dataset's fixture is written in by default (covering all three)
DEFAULT_FORMAT = {
    "math": "jsonl",
    "dapo_math": "parquet",
    "gsm8k": "parquet",
    "math500": "jsonl",
    "aime2024": "parquet",
    "aime2025": "jsonl",
    "amc23": "json",
    "olympiadbench": "parquet",
}


def write_rows(rows: list[dict], path: str | Path, fmt: str | None = None) -> Path:
    """Write ``rows`` as parquet, jsonl or json (a list of objects), chosen by ``fmt`` or the suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = fmt or path.suffix.lstrip(".")
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif fmt == "json":
        path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    else:
        raise ValueError(f"unknown fixture format {fmt!r}")
    return path


def write_fixture(dataset: str, directory: str | Path, fmt: str | None = None) -> Path:
    """Write ``dataset``'s fixture rows to ``directory/{dataset}.{fmt}`` and return the path."""
    fmt = fmt or DEFAULT_FORMAT[dataset]
    return write_rows(FIXTURE_ROWS[dataset], Path(directory) / f"{dataset}.{fmt}", fmt)


def write_hendrycks_tree(directory: str | Path) -> Path:
    """The original hendrycks MATH layout: one JSON object per file under train/<type>/<n>.json."""
    root = Path(directory) / "MATH"
    for i, row in enumerate(FIXTURE_ROWS["math"]):
        path = root / "train" / row["type"].lower() / f"{i}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(row), encoding="utf-8")
    return root


# --------------------------------------------------------------------------- tokenizer


def build_test_tokenizer_dir(out_dir: str | Path) -> Path:
    """A local tokenizer directory with the project's tiny Qwen-style (ChatML) chat template.

    Only the tokenizer of ``recipe.iib_lpo.demo.tiny_models`` is written (``build_tiny_tokenizer``,
    the one ``build_tiny_model_dir`` saves next to its weights): building the random model too
    would cost seconds that the data tests do not need.
    """
    from recipe.iib_lpo.demo.tiny_models import build_tiny_tokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    build_tiny_tokenizer(out_dir)
    return out_dir
