"""Preference rows of every accepted format become the same standard pair; bad pairs name file and line."""
import json

import pytest

from megaswift.data.rlhf import detect_pair_format, normalise_pair, preprocess_pairs
from megaswift.data.sft import SFTDataSettings
from megaswift.data.sft.formats import SampleFormatError

SYSTEM, QUESTION, GOOD, BAD = "Be brief.", "What is 2+2?", "4.", "5, I think."
EXPECTED = {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}],
            "chosen": [{"role": "assistant", "content": GOOD}],
            "rejected": [{"role": "assistant", "content": BAD}], "tools": None}
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": GOOD}]
ROWS = {
    "swift": {"system": SYSTEM, "query": QUESTION, "response": GOOD, "rejected_response": BAD},
    "messages": {"messages": MESSAGES, "rejected_response": BAD},
    "rejected_messages": {"messages": MESSAGES,
                          "rejected_messages": MESSAGES[:2] + [{"role": "assistant", "content": BAD}]},
    "trl": {"prompt": MESSAGES[:2], "chosen": MESSAGES[2:], "rejected": [{"role": "assistant", "content": BAD}]},
}


@pytest.mark.parametrize("fmt", list(ROWS))
def test_each_format_gives_the_standard_pair(fmt):
    row = ROWS[fmt]
    assert detect_pair_format(row, "x.jsonl:1") == fmt
    assert normalise_pair(row, fmt, "x.jsonl:1") == EXPECTED


def test_trl_implicit_prompt_is_what_both_conversations_share():
    row = {"chosen": MESSAGES, "rejected": MESSAGES[:2] + [{"role": "assistant", "content": BAD}]}
    assert normalise_pair(row, detect_pair_format(row, "x:1"), "x:1") == EXPECTED


def test_trl_plain_text_becomes_one_user_and_one_assistant_turn():
    pair = normalise_pair({"prompt": QUESTION, "chosen": GOOD, "rejected": BAD}, "trl", "x:1")
    assert pair == {**EXPECTED, "prompt": EXPECTED["prompt"][1:]}


def test_multi_turn_with_tools_keeps_the_history_in_the_prompt():
    call = {"type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 2}'}}
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    prompt = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
              {"role": "user", "content": QUESTION}]
    row = {"prompt": prompt, "tools": tools,
           "chosen": [{"role": "assistant", "content": "", "tool_calls": [call]}, {"role": "tool", "content": "4"},
                      {"role": "assistant", "content": GOOD}],
           "rejected": [{"role": "assistant", "content": BAD}]}
    pair = normalise_pair(row, "trl", "x:1")
    assert pair["prompt"] == prompt and len(pair["chosen"]) == 3 and pair["rejected"] == EXPECTED["rejected"]
    assert pair["chosen"][0]["tool_calls"][0]["function"]["arguments"] == {"a": 2, "b": 2}  # sft's normalising
    assert pair["tools"][0]["function"]["name"] == "add"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


BAD_ROWS = {
    "no rejected answer": ({"query": QUESTION, "response": GOOD}, "a rejected answer"),
    "chosen == rejected": ({"query": QUESTION, "response": GOOD, "rejected_response": GOOD},
                           "a rejected answer that differs from the chosen one"),
    "empty response": ({"query": QUESTION, "response": "  ", "rejected_response": BAD}, "a non-empty chosen response"),
    "empty rejected": ({"query": QUESTION, "response": GOOD, "rejected_response": " "},
                       "a non-empty rejected response"),
}


@pytest.mark.parametrize("kind", list(BAD_ROWS))
def test_bad_pairs_are_errors_naming_file_and_line_or_skipped_and_counted(tmp_path, kind, tokenizer):
    bad, expected = BAD_ROWS[kind]
    good = ROWS["swift"]
    path = write_jsonl(tmp_path / "prefs.jsonl", [good, good, bad, good])
    settings = dict(datasets=[path], max_length=128, shuffle=False)
    with pytest.raises(SampleFormatError, match=rf"prefs\.jsonl:3: expected {expected}"):
        preprocess_pairs(SFTDataSettings(**settings), tokenizer)
    result = preprocess_pairs(SFTDataSettings(**settings, skip_bad_rows=True), tokenizer)
    assert result.stats["rows_in"] == 4 and result.stats["rows_kept"] == 3
    assert result.stats["dropped"]["bad_row"] == 1 and "prefs.jsonl:3" in result.stats["bad_row_examples"][0]


def test_a_trl_dataset_row_without_rejected_is_an_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "trl.jsonl", [ROWS["trl"], {"prompt": QUESTION, "chosen": GOOD}])
    with pytest.raises(SampleFormatError, match=r"trl\.jsonl:2: expected a trl-format row .*a rejected answer"):
        preprocess_pairs(SFTDataSettings(datasets=[path], shuffle=False), tokenizer)


def test_an_unknown_row_shape_is_an_error():
    with pytest.raises(SampleFormatError, match=r"x\.jsonl:1: expected a preference row with keys chosen\+rejected"):
        detect_pair_format({"text": "hello"}, "x.jsonl:1")


@pytest.mark.parametrize("over_length", ["drop", "truncate"])
def test_over_long_pairs_are_dropped_or_truncated_and_counted(tmp_path, tokenizer, over_length):
    long = {"query": QUESTION, "response": GOOD, "rejected_response": " ".join(["no"] * 200)}
    path = write_jsonl(tmp_path / "prefs.jsonl", [ROWS["swift"], long, ROWS["swift"]])
    result = preprocess_pairs(SFTDataSettings(datasets=[path], max_length=96, over_length=over_length,
                                              shuffle=False), tokenizer)
    stats, lengths = result.stats, result.dataset["length"]
    assert max(lengths) <= 96
    if over_length == "drop":
        assert stats["rows_kept"] == 2 and stats["dropped"]["too_long"] == 1 and stats["truncated"] == 0
    else:
        assert stats["rows_kept"] == 3 and stats["dropped"]["too_long"] == 0 and stats["truncated"] == 1
        assert lengths[1] == 96
        row = result.dataset[1]
        assert len(row["chosen_input_ids"]) + len(row["rejected_input_ids"]) == 96
        assert row["chosen_input_ids"][:row["prompt_tokens"]] == row["rejected_input_ids"][:row["prompt_tokens"]]


def test_an_unreadable_line_is_skipped_and_counted_only_with_skip_bad_rows(tmp_path, tokenizer):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(ROWS["trl"]) + "\n{not json\n" + json.dumps(ROWS["trl"]) + "\n")
    with pytest.raises(SampleFormatError, match=r"prefs\.jsonl:2: expected one JSON object per line"):
        preprocess_pairs(SFTDataSettings(datasets=[str(path)]), tokenizer)
    result = preprocess_pairs(SFTDataSettings(datasets=[str(path)], skip_bad_rows=True), tokenizer)
    assert result.stats["rows_kept"] == 2 and result.stats["dropped"]["bad_row"] == 1
