"""Fixtures for the preference data tests: the tiny offline tokenizer, loaded as users load one."""
import pytest
from transformers import AutoTokenizer


@pytest.fixture(scope="session")
def tokenizer(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
