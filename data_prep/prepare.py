"""Convert a math dataset to verl's RL parquet format.

    python -m data_prep.prepare --dataset math --source PATH_OR_HUB_ID --out DIR [options]
    python -m data_prep.prepare --dataset demo --out DIR --num-problems 512 --val-size 64

Writes ``DIR/{dataset}_{split}.parquet`` (split: train [+ val] for training sets, test for eval
sets) with verl's columns::

    data_source   e.g. "lighteval/MATH", "math_dapo", "aime2024" (see layouts.DATASETS)
    prompt        [{"role": "user", "content": template with the problem}]
    ability       "math"
    reward_model  {"style": "rule", "ground_truth": answer}
    extra_info    {index, split, dataset, original_id, question, answer, solution, level, type,
                   source_file}

``extra_info.index`` is the row's position in the source (bad and dropped rows included), so
it is the same in every run on the same source whatever the filters. Every output file gets a
``.summary.json`` next to it (rows in, rows out, and why each dropped row was dropped); the same
summary is printed as one line. All files share one schema, so verl can concatenate them
(e.g. MATH + DAPO training files).

Order of the filters: conversion (bad rows, out-of-scope rows) -> deduplication ->
decontamination -> prompt length -> pass rate -> train/val split.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from data_prep.filters import (
    Deduplicator,
    build_contamination_index,
    load_chat_tokenizer,
    load_pass_rates,
    prompt_token_count,
)
from data_prep.layouts import (
    DATASET_ALIASES,
    DATASETS,
    DEFAULT_OLYMPIAD_ANSWER_TYPES,
    BadRowError,
    DatasetSpec,
    OutOfScopeError,
    Problem,
    UnknownLayoutError,
    detect_layout,
    get_spec,
)
from data_prep.prompt_template import DEFAULT_PROMPT_TEMPLATE, build_chat_prompt, validate_template
from data_prep.sources import SourceError, looks_like_local_path, open_hub_source, open_local_source

ABILITY = "math"
MAX_LISTED_BAD_ROWS = 20  # in the error message; the summary JSON keeps up to 200
# e.g. data/test-00000-of-00001.parquet of a hub snapshot holding both splits
TEST_FILE_NAME = re.compile(r"(^|[/_.-])test([/_.-]|$)", re.IGNORECASE)


class DataPrepError(RuntimeError):
    """A run that must stop, with a message saying why and what to do."""


def verl_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("data_source", pa.string()),
            ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
            ("ability", pa.string()),
            ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
            (
                "extra_info",
                pa.struct(
                    [
                        ("index", pa.int64()),
                        ("split", pa.string()),
                        ("dataset", pa.string()),
                        ("original_id", pa.string()),
                        ("question", pa.string()),
                        ("answer", pa.string()),
                        ("solution", pa.string()),
                        ("level", pa.int64()),
                        ("type", pa.string()),
                        ("source_file", pa.string()),
                    ]
                ),
            ),
        ]
    )


@dataclass
class Record:
    index: int
    problem: Problem
    original_id: str
    source_file: str


def to_verl_row(record: Record, spec: DatasetSpec, split: str, template: str) -> dict:
    problem = record.problem
    return {
        "data_source": spec.data_source,
        "prompt": build_chat_prompt(problem.question, template),
        "ability": ABILITY,
        "reward_model": {"style": "rule", "ground_truth": problem.answer},
        "extra_info": {
            "index": record.index,
            "split": split,
            "dataset": spec.name,
            "original_id": record.original_id,
            "question": problem.question,
            "answer": problem.answer,
            "solution": problem.solution,
            "level": problem.level,
            "type": problem.type,
            "source_file": record.source_file,
        },
    }


def _progress(iterable=None, **kwargs):
    from tqdm import tqdm

    # disable=None: a bar only on a terminal, nothing in logs or tests
    return tqdm(iterable, mininterval=1.0, disable=None, file=sys.stderr, **kwargs)


# --------------------------------------------------------------------------- pipeline stages


@dataclass
class Counts:
    rows_in: int = 0
    bad_rows: int = 0
    out_of_scope: int = 0
    duplicates: int = 0
    duplicates_with_other_answer: int = 0
    contaminated_exact: int = 0
    contaminated_ngram: int = 0
    too_long: int = 0
    pass_rate_all_wrong: int = 0
    pass_rate_all_correct: int = 0
    pass_rate_missing_kept: int = 0
    pass_rate_unmatched_entries: int = 0


def _read_records(
    spec: DatasetSpec, args, split_label: str, counts: Counts, bad_rows: list, out_of_scope: Counter
) -> tuple[list[Record], list[str]]:
    """Convert and deduplicate every source row; bad and out-of-scope rows are recorded, not kept."""
    dedup = Deduplicator()
    records: list[Record] = []

    def keep(problem: Problem, index: int, default_id: str, source_file: str) -> None:
        if dedup.is_duplicate(problem.question, problem.answer, index):
            return
        records.append(Record(index, problem, problem.original_id or default_id, source_file))

    if spec.name == "demo":
        from data_prep.demo import make_demo_problems

        bound = "" if args.max_value is None else f", max_value={args.max_value}"
        where = f"data_prep.demo(n={args.num_problems}, seed={args.seed}{bound})"
        for item in make_demo_problems(args.num_problems, args.seed, args.max_value):
            index = counts.rows_in
            counts.rows_in += 1
            keep(
                Problem(
                    question=item["question"], answer=item["answer"], original_id=item["id"], type=item["template"],
                    solution=item["solution"],
                ),
                index,
                item["id"],
                where,
            )
        counts.duplicates, counts.duplicates_with_other_answer = dedup.duplicates, dedup.duplicates_with_other_answer
        return records, [where]

    source = args.source or spec.hub_id
    if source is None:
        raise DataPrepError(f"--source is required for dataset {spec.name!r}")
    if looks_like_local_path(source):
        files = open_local_source(source)
    else:
        configs = tuple(args.hub_config) if args.hub_config else spec.hub_configs
        files = open_hub_source(source, configs, args.hub_split or spec.hub_split, args.hub_timeout)

    known_sizes = [f.num_rows for f in files if f.num_rows is not None]
    bar = _progress(total=sum(known_sizes) if len(known_sizes) == len(files) else None, desc=f"reading {spec.name}")
    last_layout = None
    for source_file in files:
        try:
            layout = detect_layout(spec, source_file.columns, source_file.path)
        except UnknownLayoutError as exc:
            raise DataPrepError(str(exc)) from exc
        if layout is not last_layout:  # once, not per file of a 12,500-file MATH tree
            print(f"[data_prep] {source_file.path}: layout {layout.name!r}", file=sys.stderr)
            last_layout = layout
        if split_label == "train" and TEST_FILE_NAME.search(source_file.rel_path):
            print(
                f"[data_prep] warning: {source_file.path} looks like a test split but is being prepared as "
                f"training data; point --source at the training file if that is not intended",
                file=sys.stderr,
            )
        for row in source_file.rows:
            bar.update(1)
            index = counts.rows_in
            counts.rows_in += 1
            if row.data is None:
                bad_rows.append((row.location, row.error))
                continue
            try:
                problem = layout.convert(row.data)
            except BadRowError as exc:
                bad_rows.append((row.location, str(exc)))
                continue
            except OutOfScopeError as exc:
                out_of_scope[str(exc)] += 1
                continue
            keep(problem, index, row.default_id, source_file.path)
    bar.close()
    counts.bad_rows = len(bad_rows)
    counts.out_of_scope = sum(out_of_scope.values())
    counts.duplicates, counts.duplicates_with_other_answer = dedup.duplicates, dedup.duplicates_with_other_answer
    return records, [f.path for f in files]


def _bad_rows_message(spec: DatasetSpec, bad_rows: list) -> str:
    listed = "\n".join(f"  {location}: {reason}" for location, reason in bad_rows[:MAX_LISTED_BAD_ROWS])
    more = f"\n  ... and {len(bad_rows) - MAX_LISTED_BAD_ROWS} more" if len(bad_rows) > MAX_LISTED_BAD_ROWS else ""
    return (
        f"dataset {spec.name!r}: {len(bad_rows)} bad row(s) without a usable problem or answer:\n{listed}{more}\n"
        f"Fix the source, or pass --skip-bad-rows to drop them (they are then counted in the summary)."
    )


def _decontaminate(records: list[Record], args, counts: Counts, by_file: Counter) -> list[Record]:
    index = build_contamination_index(args.decontaminate_against, args.ngram_size)
    kept = []
    for record in _progress(records, desc="decontaminating"):
        hit = index.match(record.problem.question)
        if hit is None:
            kept.append(record)
            continue
        kind, label = hit
        if kind == "exact":
            counts.contaminated_exact += 1
        else:
            counts.contaminated_ngram += 1
        by_file[label] += 1
    return kept


def _filter_length(records: list[Record], args, template: str, counts: Counts) -> list[Record]:
    tokenizer = load_chat_tokenizer(args.tokenizer)
    kept = []
    for record in _progress(records, desc="measuring prompts"):
        if prompt_token_count(tokenizer, build_chat_prompt(record.problem.question, template)) > args.max_prompt_tokens:
            counts.too_long += 1
        else:
            kept.append(record)
    return kept


def _filter_pass_rate(records: list[Record], args, counts: Counts) -> list[Record]:
    rates = load_pass_rates(args.pass_rate_file)
    kept = []
    for record in records:
        hit = rates.lookup(record.original_id, record.index, record.problem.question)
        if hit is None:
            counts.pass_rate_missing_kept += 1
            kept.append(record)
            continue
        n, c = hit
        if c == 0:
            counts.pass_rate_all_wrong += 1
        elif c == n:
            counts.pass_rate_all_correct += 1
        else:
            kept.append(record)
    counts.pass_rate_unmatched_entries = rates.num_unmatched
    if counts.pass_rate_missing_kept:
        print(
            f"[data_prep] warning: {counts.pass_rate_missing_kept} prompt(s) have no entry in "
            f"{args.pass_rate_file}; kept",
            file=sys.stderr,
        )
    if counts.pass_rate_unmatched_entries:
        print(
            f"[data_prep] warning: {counts.pass_rate_unmatched_entries} entr(y/ies) of {args.pass_rate_file} "
            f"match no prompt "
            f"(wrong key, or the prompt was dropped earlier)",
            file=sys.stderr,
        )
    return kept


def _val_count(val_size: float, total: int) -> int:
    if val_size <= 0:
        return 0
    if val_size < 1:
        count = round(val_size * total)
    else:
        if not float(val_size).is_integer():
            raise DataPrepError(f"--val-size {val_size}: use a fraction in (0, 1) or a whole number of rows")
        count = int(val_size)
    if count >= total:
        raise DataPrepError(f"--val-size {val_size} asks for {count} validation rows but only {total} rows remain")
    return count


def _split(records: list[Record], val_size: float, seed: int) -> dict[str, list[Record]]:
    n_val = _val_count(val_size, len(records))
    if n_val == 0:
        return {"train": records}
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    val_positions = set(order[:n_val])
    # both files keep source order; membership is random under the seed
    return {
        "train": [r for i, r in enumerate(records) if i not in val_positions],
        "val": [r for i, r in enumerate(records) if i in val_positions],
    }


def format_summary_line(summary: dict) -> str:
    d, det = summary["dropped"], summary["details"]
    moved = ", ".join(f"to {k} {v}" for k, v in summary["moved_to_other_split"].items())
    return (
        f"{Path(summary['output']).name}: rows in {summary['rows_in']}, rows out {summary['rows_out']}; dropped: "
        f"duplicates {d['duplicates']}, contaminated {d['contaminated']} (exact {det['contaminated_exact']}, "
        f"{summary['options']['ngram_size']}-gram {det['contaminated_ngram']}), too long {d['too_long']}, "
        f"pass-rate {d['pass_rate_all_wrong'] + d['pass_rate_all_correct']} "
        f"(0/n {d['pass_rate_all_wrong']}, n/n {d['pass_rate_all_correct']}), bad rows {d['bad_rows']}, "
        f"out of scope {d['out_of_scope']}" + (f"; {moved}" if moved else "")
    )


def run(args: argparse.Namespace) -> list[dict]:
    """Run the conversion described by parsed CLI ``args``; returns one summary per output file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    answer_types = None if args.olympiad_answer_types == ["any"] else tuple(args.olympiad_answer_types)
    spec = get_spec(args.dataset, answer_types)
    template = args.prompt_template
    if args.prompt_template_file:
        template = Path(args.prompt_template_file).read_text(encoding="utf-8").rstrip("\n")
    validate_template(template)

    split_label = args.split or ("train" if spec.kind == "train" else "test")
    if split_label == "test":
        for flag, value in (
            ("--val-size", args.val_size),
            ("--decontaminate-against", args.decontaminate_against),
            ("--pass-rate-file", args.pass_rate_file),
        ):
            if value:
                raise DataPrepError(
                    f"{flag} applies to training sets only; {spec.name!r} is being prepared as split 'test'"
                )
    if (args.max_prompt_tokens is None) != (args.tokenizer is None):
        raise DataPrepError("--max-prompt-tokens and --tokenizer must be given together")
    if args.ngram_size < 0:
        raise DataPrepError("--ngram-size must be >= 0 (0: exact matches only)")

    counts = Counts()
    bad_rows: list[tuple[str, str]] = []
    out_of_scope: Counter = Counter()
    contaminated_by_file: Counter = Counter()

    records, sources = _read_records(spec, args, split_label, counts, bad_rows, out_of_scope)
    if bad_rows and not args.skip_bad_rows:
        raise DataPrepError(_bad_rows_message(spec, bad_rows))
    if bad_rows:
        print(
            f"[data_prep] warning: skipped {len(bad_rows)} bad row(s); first: {bad_rows[0][0]}: {bad_rows[0][1]}",
            file=sys.stderr,
        )
    if args.decontaminate_against:
        records = _decontaminate(records, args, counts, contaminated_by_file)
    if args.max_prompt_tokens is not None:
        records = _filter_length(records, args, template, counts)
    if args.pass_rate_file:
        records = _filter_pass_rate(records, args, counts)
    if not records:
        raise DataPrepError(f"dataset {spec.name!r}: no rows left after filtering ({counts})")
    splits = _split(records, args.val_size, args.seed) if split_label == "train" else {"test": records}

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    dropped = {
        "bad_rows": counts.bad_rows,
        "out_of_scope": counts.out_of_scope,
        "duplicates": counts.duplicates,
        "contaminated": counts.contaminated_exact + counts.contaminated_ngram,
        "too_long": counts.too_long,
        "pass_rate_all_wrong": counts.pass_rate_all_wrong,
        "pass_rate_all_correct": counts.pass_rate_all_correct,
    }
    details = {
        "duplicates_with_other_answer": counts.duplicates_with_other_answer,
        "contaminated_exact": counts.contaminated_exact,
        "contaminated_ngram": counts.contaminated_ngram,
        "contaminated_by_eval_file": dict(contaminated_by_file),
        "out_of_scope_reasons": dict(out_of_scope),
        "pass_rate_missing_kept": counts.pass_rate_missing_kept,
        "pass_rate_unmatched_entries": counts.pass_rate_unmatched_entries,
        "bad_row_examples": [{"where": w, "reason": r} for w, r in bad_rows[:200]],
    }
    options = {
        "source": args.source if spec.name != "demo" else None,
        "prompt_template": template,
        "skip_bad_rows": args.skip_bad_rows,
        "decontaminate_against": args.decontaminate_against,
        "ngram_size": args.ngram_size,
        "max_prompt_tokens": args.max_prompt_tokens,
        "tokenizer": args.tokenizer,
        "pass_rate_file": args.pass_rate_file,
        "val_size": args.val_size,
        "seed": args.seed,
    }
    summaries = []
    for split, split_records in splits.items():
        path = out_dir / f"{spec.name}_{split}.parquet"
        rows = [to_verl_row(r, spec, split, template) for r in split_records]
        pq.write_table(pa.Table.from_pylist(rows, schema=verl_schema()), path)
        summary = {
            "output": str(path),
            "dataset": spec.name,
            "data_source": spec.data_source,
            "split": split,
            "sources": sources,
            "rows_in": counts.rows_in,
            "rows_out": len(split_records),
            "dropped": dropped,
            "moved_to_other_split": {s: len(r) for s, r in splits.items() if s != split},
            "details": details,
            "options": options,
        }
        path.with_name(path.name[: -len(".parquet")] + ".summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(format_summary_line(summary))
        summaries.append(summary)
    return summaries


def build_parser() -> argparse.ArgumentParser:
    names = sorted(DATASETS) + sorted(DATASET_ALIASES)
    p = argparse.ArgumentParser(prog="python -m data_prep.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--dataset", required=True, choices=names, help="which dataset layout to read (demo: generated offline)"
    )
    p.add_argument(
        "--source",
        help="local parquet/jsonl/json file or directory in the dataset's hub layout, or a hub id "
        "(used only if the hub is reachable); default: the dataset's usual hub id",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--split", choices=["train", "test"], help="default: train for training sets, test for eval sets")
    p.add_argument(
        "--prompt-template",
        default=DEFAULT_PROMPT_TEMPLATE,
        help="user-turn template with the field {question}; default: the paper code's "
        "'{question}\\nPlease reason step by step, and put your final answer within \\boxed{}.'",
    )
    p.add_argument("--prompt-template-file", help="read the template from this file instead")
    p.add_argument(
        "--skip-bad-rows",
        action="store_true",
        help="drop (and count) rows without a problem or answer instead of failing",
    )
    p.add_argument(
        "--decontaminate-against",
        nargs="+",
        metavar="DIR_OR_FILE",
        help="eval sets (this tool's parquet, or raw files) whose problems must not appear in the training set",
    )
    p.add_argument(
        "--ngram-size", type=int, default=13, help="word n-gram length for decontamination (default 13; 0: exact only)"
    )
    p.add_argument(
        "--max-prompt-tokens",
        type=int,
        help="drop prompts longer than this under --tokenizer's chat template (paper: 2048)",
    )
    p.add_argument("--tokenizer", help="local tokenizer directory for --max-prompt-tokens")
    p.add_argument(
        "--pass-rate-file",
        help="jsonl of base-model pass counts (id/original_id, index or question; n, c): "
        "drops prompts solved 0/n or n/n",
    )
    p.add_argument(
        "--val-size",
        type=float,
        default=0.0,
        help="validation rows split off a training set: a fraction in (0,1) or a count (default 0)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split and of the demo generator")
    p.add_argument("--num-problems", type=int, default=1024, help="demo only: problems to generate (default 1024)")
    p.add_argument("--max-value", type=int, default=None,
                   help="demo only: bound on every number a solution writes (default: none, the full ranges)")
    p.add_argument(
        "--hub-config", action="append", help="hub only: dataset config(s) (default: the dataset's usual ones)"
    )
    p.add_argument("--hub-split", help="hub only: split to load (default: the dataset's usual one)")
    p.add_argument(
        "--hub-timeout", type=float, default=15.0, help="hub only: seconds to wait for the hub to answer (default 15)"
    )
    p.add_argument(
        "--olympiad-answer-types",
        nargs="+",
        default=list(DEFAULT_OLYMPIAD_ANSWER_TYPES),
        help="OlympiadBench answer_type values to keep (default Numerical; 'any' keeps all single-answer problems)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (DataPrepError, SourceError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
