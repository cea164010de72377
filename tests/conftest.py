"""Shared fixtures. tests/ is not a package (verl's wheel owns a top-level `tests`), so shared
test helpers live in package modules (e.g. recipe.iib_lpo.demo.tiny_models) and fixtures live here."""

import os

# Offline everywhere: the hub is unreachable on dev and CI machines, and a test that tries it
# would hang on network timeouts instead of failing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory):
    """A tiny random Qwen2 checkpoint + tokenizer on disk (built once per test session)."""
    from recipe.iib_lpo.demo.tiny_models import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny_qwen2"), family="qwen2", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory):
    """A tiny random Qwen3 checkpoint + tokenizer on disk (built once per test session)."""
    from recipe.iib_lpo.demo.tiny_models import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny_qwen3"), family="qwen3", seed=0)


@pytest.fixture(scope="session", params=["qwen2", "qwen3"])
def tiny_model_dir(request, tiny_qwen2_dir, tiny_qwen3_dir):
    """Both tiny model families, for tests that must hold for Qwen2 and Qwen3."""
    return tiny_qwen2_dir if request.param == "qwen2" else tiny_qwen3_dir
