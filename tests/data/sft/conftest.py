"""Fixtures for the SFT data tests: the tiny offline tokenizer, loaded back the way users load one."""
import pytest
from transformers import AutoTokenizer

from megaswift.data.tiny_tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    build_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))
