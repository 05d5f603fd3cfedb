"""Fixtures for the SFT data tests: the tiny offline tokenizer, loaded back the way users load one."""
import pytest
from transformers import AutoTokenizer



@pytest.fixture(scope="session")
def tokenizer_dir(tiny_tokenizer_dir):
    return tiny_tokenizer_dir


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))
