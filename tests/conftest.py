"""Shared fixtures: the tiny offline tokenizer and pre-training data (built once per test session)."""
import pytest


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """(tokenizer folder, indexed dataset prefix) of the embedded default data."""
    from megaswift.data.demo import prepare_demo_data
    return prepare_demo_data(tmp_path_factory.mktemp("demo_data"))


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """The tiny offline BPE tokenizer with a ChatML (tools) chat template, saved as an HF folder."""
    from megaswift.data.tiny_tokenizer import build_tiny_tokenizer
    folder = tmp_path_factory.mktemp("tiny_tokenizer")
    build_tiny_tokenizer(folder)
    return folder
