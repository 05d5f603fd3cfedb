"""The whole pipeline: mixed sources -> rows, counts of dropped/bad rows, multi-process map, the cache."""
import json
import os

import pytest

from megaswift.data.sft.formats import SampleFormatError
from megaswift.data.sft.preprocess import SFTDataSettings, fingerprint, preprocess_sft
from megaswift.data.sft.template import IGNORE_INDEX

CHAT = [{"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}!"}]}
        for i in range(20)]
ALPACA = [{"instruction": f"Count to {i}.", "input": "", "output": " ".join(map(str, range(1, i + 2)))}
          for i in range(10)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "chat.jsonl", CHAT), write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)


def test_mixed_formats_become_rows_whose_labels_are_the_answers(tokenizer, data):
    result = preprocess_sft(SFTDataSettings(datasets=data, max_length=256), tokenizer, report=False)
    assert result.stats["rows_in"] == result.stats["rows_kept"] == len(result.dataset) == 30
    answers = sorted(tokenizer.decode([t for t in row if t != IGNORE_INDEX]) for row in result.dataset["labels"])
    expected = sorted([r["messages"][1]["content"] + "<|im_end|>" for r in CHAT] +
                      [r["output"] + "<|im_end|>" for r in ALPACA])
    assert answers == expected
    assert result.stats["tokens"] == sum(result.dataset["length"])
    assert result.stats["samples_per_s"] > 0 and result.stats["tokens_per_s"] > 0


def test_too_long_rows_are_dropped_and_counted(tokenizer, data):
    lengths = preprocess_sft(SFTDataSettings(datasets=data[:1], max_length=256), tokenizer,
                             report=False).dataset["length"]
    limit = max(lengths) - 1
    result = preprocess_sft(SFTDataSettings(datasets=data[:1], max_length=limit), tokenizer, report=False)
    assert result.stats["dropped"]["too_long"] == sum(n > limit for n in lengths) > 0
    assert max(result.dataset["length"]) <= limit


def test_a_bad_row_names_its_file_and_line_or_is_skipped_and_counted(tokenizer, tmp_path):
    lines = [json.dumps(r) for r in CHAT[:3]]
    lines.insert(2, json.dumps({"messages": [{"role": "user", "content": "no answer"}]}))
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    for num_proc in (1, 2):  # the error must survive the trip back from a worker process
        with pytest.raises(SampleFormatError, match=rf"{path}:3: expected at least one assistant message"):
            preprocess_sft(SFTDataSettings(datasets=[str(path)], shuffle=False), tokenizer,
                           num_proc=num_proc, report=False)
    result = preprocess_sft(SFTDataSettings(datasets=[str(path)], skip_bad_rows=True), tokenizer, report=False)
    assert result.stats["dropped"]["bad_row"] == 1 and result.stats["rows_kept"] == 3
    assert f"{path}:3" in result.stats["bad_row_examples"][0]


def test_two_processes_give_the_same_rows_as_one(tokenizer, data):
    settings = SFTDataSettings(datasets=data, max_length=256)
    one = preprocess_sft(settings, tokenizer, num_proc=1, report=False).dataset
    two = preprocess_sft(settings, tokenizer, num_proc=2, report=False).dataset
    assert one.to_dict() == two.to_dict()


def test_cache_is_reused_and_invalidated_by_data_settings_and_tokenizer(tokenizer, data, tmp_path):
    settings = SFTDataSettings(datasets=data, max_length=256)
    first = preprocess_sft(settings, tokenizer, cache_dir=tmp_path / "cache", report=False)
    again = preprocess_sft(settings, tokenizer, cache_dir=tmp_path / "cache", report=False)
    assert not first.stats["cache_hit"] and again.stats["cache_hit"]
    assert again.dataset.to_dict() == first.dataset.to_dict()

    key = fingerprint(settings, tokenizer)
    assert fingerprint(SFTDataSettings(datasets=data, max_length=255), tokenizer) != key
    assert fingerprint(SFTDataSettings(datasets=data, max_length=256, loss_scale="agent"), tokenizer) != key
    os.utime(data[0], ns=(0, 0))  # a touched (possibly edited) file
    assert fingerprint(settings, tokenizer) != key
    tokenizer_copy = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tokenizer_copy.chat_template = tokenizer.chat_template.replace("<|im_start|>user", "<|im_start|>human")
    assert fingerprint(settings, tokenizer_copy) != fingerprint(settings, tokenizer)


def test_nothing_usable_is_an_error(tokenizer, data):
    with pytest.raises(ValueError, match="expected at least one usable row, found none"):
        preprocess_sft(SFTDataSettings(datasets=data[:1], max_length=3), tokenizer, report=False)
