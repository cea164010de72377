"""Reading source rows: local parquet / jsonl / json files (a file or a directory tree of them)
in the hub datasets' own formats, or the Hugging Face hub when the source is not a local path.

Every row keeps where it came from (file and 0-based row number; the line number for jsonl),
so a bad row can be reported precisely.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SUPPORTED_SUFFIXES = (".parquet", ".jsonl", ".json")
# files this tool writes next to its parquet outputs; never read back as data
SUMMARY_SUFFIX = ".summary.json"


class SourceError(RuntimeError):
    """A source that cannot be read (missing path, unreachable hub, malformed file)."""


@dataclass
class SourceRow:
    data: dict | None  # None when the raw row itself could not be parsed (see `error`)
    source_file: str
    row_in_file: int  # 0-based
    location: str  # human-readable place, e.g. "row 3 (line 4) of /x/train.jsonl"
    default_id: str  # an id for datasets without one: file path relative to the source root + row
    error: str | None = None


@dataclass
class SourceFile:
    path: str
    columns: list[str]
    num_rows: int | None
    rows: Iterator[SourceRow]
    rel_path: str = ""  # path below the source root (a directory), or the file name; hub: config/split


def looks_like_local_path(source: str) -> bool:
    """Whether ``source`` names a local path rather than a hub id like 'owner/name'."""
    return (
        os.path.exists(source)
        or source.startswith(("/", "./", "../", "~"))
        or source.endswith(SUPPORTED_SUFFIXES)
        or source.count("/") > 1  # hub ids are "name" or "owner/name"
    )


def list_source_files(path: str | os.PathLike) -> list[Path]:
    """``path`` itself if it is a file, else the supported files under it (recursive, sorted)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise SourceError(f"source path {str(root)!r} does not exist")
    if root.is_file():
        if not root.name.endswith(SUPPORTED_SUFFIXES):
            raise SourceError(f"source file {str(root)!r} is not one of {list(SUPPORTED_SUFFIXES)}")
        return [root]
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.name.endswith(SUPPORTED_SUFFIXES) and not p.name.endswith(SUMMARY_SUFFIX)
    )
    if not files:
        raise SourceError(f"source directory {str(root)!r} holds no {'/'.join(SUPPORTED_SUFFIXES)} files")
    return files


def _rel_id(file: Path, root: Path) -> str:
    rel = file.relative_to(root) if root.is_dir() else Path(file.name)
    return str(rel.with_suffix("")).replace(os.sep, "/")


def _parquet_file(file: Path, root: Path) -> SourceFile:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise SourceError(f"cannot read parquet file {str(file)!r}: {exc}") from exc
    rel = _rel_id(file, root)

    def rows() -> Iterator[SourceRow]:
        i = 0
        # batches keep memory flat on the 1.8M-row DAPO-Math-17k file
        for batch in parquet.iter_batches(batch_size=8192):
            for data in batch.to_pylist():
                yield SourceRow(data, str(file), i, f"row {i} of {file}", f"{rel}#{i}")
                i += 1

    return SourceFile(str(file), list(parquet.schema_arrow.names), parquet.metadata.num_rows, rows())


def _jsonl_file(file: Path, root: Path) -> SourceFile:
    rel = _rel_id(file, root)
    parsed: list[SourceRow] = []
    columns: dict[str, None] = {}
    with open(file, encoding="utf-8") as handle:
        i = 0
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            location = f"row {i} (line {line_no}) of {file}"
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                parsed.append(SourceRow(None, str(file), i, location, f"{rel}#{i}", f"invalid JSON: {exc}"))
            else:
                if isinstance(data, dict):
                    columns.update(dict.fromkeys(data))
                    parsed.append(SourceRow(data, str(file), i, location, f"{rel}#{i}"))
                else:
                    parsed.append(
                        SourceRow(
                            None, str(file), i, location, f"{rel}#{i}", f"a JSON {type(data).__name__}, not an object"
                        )
                    )
            i += 1
    return SourceFile(str(file), list(columns), len(parsed), iter(parsed))


def _json_file(file: Path, root: Path) -> SourceFile:
    rel = _rel_id(file, root)
    try:
        with open(file, encoding="utf-8") as handle:
            content = json.load(handle)
    except json.JSONDecodeError as exc:
        raise SourceError(f"{file} is not valid JSON: {exc}") from exc
    if isinstance(content, dict):
        lists = [v for v in content.values() if isinstance(v, list)]
        if len(content) == 1 and len(lists) == 1:
            content = lists[0]  # {"data": [...]} / {"train": [...]}
        else:
            # one problem per file, as in the original hendrycks MATH tree (train/algebra/1.json)
            return SourceFile(
                str(file), list(content), 1, iter([SourceRow(content, str(file), 0, f"the object in {file}", rel)])
            )
    if not isinstance(content, list):
        raise SourceError(f"{file}: expected a JSON list of objects or one object, got {type(content).__name__}")
    columns: dict[str, None] = {}
    parsed = []
    for i, data in enumerate(content):
        location = f"row {i} of {file}"
        if isinstance(data, dict):
            columns.update(dict.fromkeys(data))
            parsed.append(SourceRow(data, str(file), i, location, f"{rel}#{i}"))
        else:
            parsed.append(
                SourceRow(None, str(file), i, location, f"{rel}#{i}", f"a JSON {type(data).__name__}, not an object")
            )
    return SourceFile(str(file), list(columns), len(parsed), iter(parsed))


def open_local_source(path: str | os.PathLike) -> list[SourceFile]:
    """Every supported file under ``path``, each with its columns and a row iterator."""
    root = Path(path).expanduser()
    opened = []
    for file in list_source_files(root):
        if file.name.endswith(".parquet"):
            source = _parquet_file(file, root)
        elif file.name.endswith(".jsonl"):
            source = _jsonl_file(file, root)
        else:
            source = _json_file(file, root)
        source.rel_path = str(file.relative_to(root)) if root.is_dir() else file.name
        opened.append(source)
    return opened


def hub_unreachable_message(hub_id: str, reason: str) -> str:
    return (
        f"could not load {hub_id!r} from the Hugging Face hub ({reason}). "
        f"Download the dataset's files where the hub is reachable and pass a local file or directory "
        f"with --source (parquet, jsonl or json, in the hub dataset's own column layout)."
    )


def open_hub_source(hub_id: str, configs: tuple[str | None, ...], split: str, timeout_s: float) -> list[SourceFile]:
    """Rows of ``hub_id`` (one SourceFile per config) via ``datasets.load_dataset``.

    When the hub is not in offline mode, a metadata request with ``timeout_s`` first checks
    that the hub answers, so an unreachable hub fails in seconds instead of after retries.
    In offline mode (HF_HUB_OFFLINE=1) only the local datasets cache is tried.
    """
    import datasets

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    if not offline:
        outcome: dict = {}

        def probe():
            try:
                from huggingface_hub import HfApi

                HfApi().dataset_info(hub_id, timeout=timeout_s)
            except Exception as exc:  # network errors come in many types
                outcome["error"] = exc

        thread = threading.Thread(target=probe, daemon=True)
        thread.start()
        thread.join(timeout_s + 1)
        if thread.is_alive():
            raise SourceError(hub_unreachable_message(hub_id, f"no answer within {timeout_s:g} s"))
        if "error" in outcome:
            raise SourceError(hub_unreachable_message(hub_id, f"{type(outcome['error']).__name__}: {outcome['error']}"))

    opened = []
    for config in configs:
        try:
            dataset = datasets.load_dataset(hub_id, name=config, split=split)
        except Exception as exc:
            raise SourceError(hub_unreachable_message(hub_id, f"{type(exc).__name__}: {exc}")) from exc
        where = f"hf://datasets/{hub_id}" + (f"/{config}" if config else "") + f"[{split}]"

        def rows(dataset=dataset, where=where, config=config) -> Iterator[SourceRow]:
            for i, data in enumerate(dataset):
                yield SourceRow(data, where, i, f"row {i} of {where}", f"{config or split}#{i}")

        opened.append(SourceFile(where, list(dataset.column_names), len(dataset), rows(), f"{config or ''}/{split}"))
    return opened
