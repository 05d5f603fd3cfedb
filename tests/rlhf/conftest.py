"""Shared fixtures of the `megaswift rlhf` tests: a preference set, tiny HF models and their conversions."""
import json

import pytest

from megaswift.config import SFTDataConfig

from tests.converters.tiny_models import lazily_converted

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()
# Llama: four layers, so PP=2 x VPP=2 holds one per virtual stage and every layout compares with the same
# one-process run; the MoE model two (PP is not run on it). Vocabularies are not multiples of 128 x TP.
PACKED_SEQ = 256  # two or three of the pairs below per packed row
MODELS = {
    "llama": ("tiny-llama3", {"num_hidden_layers": 4, "vocab_size": 1037}),
    "moe": ("tiny-qwen2-moe", {"num_hidden_layers": 2, "vocab_size": 1100}),
}


def preference_rows(count: int, offset: int = 0) -> list[dict]:
    """TRL-format pairs whose chosen answer follows a checkable rule (it repeats the asked word, then names the
    next one); the rejected answer names another word. Lengths vary so packing mixes pairs."""
    rows = []
    for i in range(offset, offset + count):
        word, after = WORDS[i % len(WORDS)], WORDS[(i + 1) % len(WORDS)]
        wrong = WORDS[(i + 5 + i % 3) % len(WORDS)]
        extra = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(i % 4))
        rows.append({"prompt": [{"role": "user", "content": f"What comes after {word}? {extra}".strip()}],
                     "chosen": [{"role": "assistant", "content": f"After {word} comes {after}."}],
                     "rejected": [{"role": "assistant", "content": f"It is {wrong}" + " really" * (i % 3)}]})
    return rows


@pytest.fixture(scope="session")
def prefs(tmp_path_factory):
    path = tmp_path_factory.mktemp("prefs") / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in preference_rows(8)))
    return path


@pytest.fixture(scope="session")
def rlhf_models(tmp_path_factory, tiny_tokenizer_dir):
    """name -> (HF folder made with transformers, its hf2mcore conversion); built once, on first use."""
    return lazily_converted(tmp_path_factory, tiny_tokenizer_dir, MODELS, "rlhf")


@pytest.fixture(scope="session")
def pairs_batch(prefs, tiny_tokenizer_dir):
    """All pairs of the data set in one packed micro-batch, as the rlhf data source makes it."""
    from transformers import AutoTokenizer

    from megaswift.data.rlhf.training_source import PairData, collate_pair_rows
    data = SFTDataConfig(datasets=[str(prefs)], tokenizer=str(tiny_tokenizer_dir), seq_length=PACKED_SEQ,
                         packing=True,
                         loss_on="last_round")
    source = PairData(data, AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir)), 0, 1, "mask")
    rows, _ = source.split_rows()
    assert len(rows) < len(rows.lengths), "packing should put several pairs in a row"
    return collate_pair_rows([rows[i] for i in range(len(rows))], "mask")
