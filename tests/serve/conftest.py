"""Tiny chat model + two LoRA adapters, built once per test session (a few seconds on CPU)."""
import pytest


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory):
    from megaswift.serve.tiny_model import build_tiny_chat_model
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny_chat") / "model")


@pytest.fixture(scope="session")
def tiny_adapters(tiny_chat_model, tmp_path_factory):
    """{name: adapter folder}: two different random LoRA adapters (B non-zero)."""
    from megaswift.serve.tiny_model import build_tiny_lora_adapter
    root = tmp_path_factory.mktemp("tiny_adapters")
    return {name: str(build_tiny_lora_adapter(tiny_chat_model, root / name, seed=seed))
            for name, seed in (("alpha", 1), ("beta", 2))}

