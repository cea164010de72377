"""Demo parquet files for tests and benchmarks (``data_prep.prepare --dataset demo``)."""

from __future__ import annotations

from pathlib import Path


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
