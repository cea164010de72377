"""Converted files load in verl 0.9.1's RLHFDataset, and verl's rollout tokenization yields ids.

In verl 0.9.1 `RLHFDataset.__getitem__` returns the chat messages (`raw_prompt`); the agent
loop turns them into prompt token ids with the Continuous Token builder. The test runs both,
so it covers exactly what a training run does with these files before generation.
"""

import pyarrow.parquet as pq
import pytest

from data_prep.prepare import main
from data_prep.prompt_template import format_prompt
from data_prep.testing_fixtures import EXPECTED, build_test_tokenizer_dir, write_fixture

EVAL_SETS = {"math500", "aime2024", "aime2025", "amc23", "olympiadbench"}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("verl_data")
    paths = {}
    for dataset in sorted(EXPECTED):
        source = write_fixture(dataset, root / "src")
        assert main(["--dataset", dataset, "--source", str(source), "--out", str(root / "out")]) == 0
        paths[dataset] = root / "out" / f"{dataset}_{'test' if dataset in EVAL_SETS else 'train'}.parquet"
    assert main(["--dataset", "demo", "--num-problems", "12", "--out", str(root / "out")]) == 0
    paths["demo"] = root / "out" / "demo_train.parquet"
    return paths


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(build_test_tokenizer_dir(tmp_path_factory.mktemp("tok")))


def make_dataset(files, tokenizer, cache_dir):
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset

    config = OmegaConf.create(
        {
            "prompt_key": "prompt",
            "max_prompt_length": 512,
            "filter_overlong_prompts": True,  # runs the tokenizer over every prompt
            "filter_overlong_prompts_workers": 1,
            "truncation": "error",
            "cache_dir": str(cache_dir),
        }
    )
    return RLHFDataset([str(f) for f in files], tokenizer, config)


def test_rlhf_dataset_loads_each_file_and_yields_prompt_ids(converted, tokenizer, tmp_path, monkeypatch):
    import datasets
    from verl.utils.dataset.rl_dataset import collate_fn
    from verl.utils.tokenizer.continuous_token_wiring import create_continuous_token_builder

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    builder = create_continuous_token_builder(tokenizer, hf_model_type="qwen2")
    for dataset, path in converted.items():
        rows = pq.read_table(path).to_pylist()
        ds = make_dataset([path], tokenizer, tmp_path / "cache")
        assert len(ds) == len(rows), dataset  # nothing filtered as overlong or malformed
        for i, row in enumerate(rows):
            item = ds[i]
            question = row["extra_info"]["question"]
            assert item["raw_prompt"] == [{"role": "user", "content": format_prompt(question)}]
            assert item["index"] == row["extra_info"]["index"]
            assert item["reward_model"]["ground_truth"] == row["reward_model"]["ground_truth"]
            prompt_ids = builder.build_initial_tokens(item["raw_prompt"])
            assert prompt_ids and all(isinstance(t, int) for t in prompt_ids)
            text = tokenizer.decode(prompt_ids)
            assert format_prompt(question) in text and text.endswith("<|im_start|>assistant\n")
        batch = collate_fn([ds[i] for i in range(len(ds))])
        assert len(batch["raw_prompt"]) == len(rows)


def test_training_files_concatenate_in_one_dataset(converted, tokenizer, tmp_path, monkeypatch):
    # the paper trains on MATH + DAPO together; verl concatenates train files, which needs one schema
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    files = [converted["math"], converted["dapo_math"], converted["gsm8k"], converted["demo"]]
    ds = make_dataset(files, tokenizer, tmp_path / "cache")
    assert len(ds) == sum(pq.read_metadata(f).num_rows for f in files)
    assert {ds[i]["data_source"] for i in range(len(ds))} == {
        "lighteval/MATH",
        "math_dapo",
        "openai/gsm8k",
        "demo_arith",
    }
