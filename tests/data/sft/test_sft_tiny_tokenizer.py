"""The tiny tokenizer: deterministic, lossless, and its chat template renders tools and tool calls."""
import json

from megaswift.data.tiny_tokenizer import build_tiny_tokenizer


def test_building_twice_gives_identical_files(tmp_path):
    build_tiny_tokenizer(tmp_path / "a")
    build_tiny_tokenizer(tmp_path / "b")
    assert (tmp_path / "a/tokenizer.json").read_bytes() == (tmp_path / "b/tokenizer.json").read_bytes()


def test_vocab_size_and_special_tokens_are_atomic(tokenizer):
    assert len(tokenizer) == 1024
    for token in ("<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_response>"):
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids[0]) == token
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"


def test_encoding_round_trips_text(tokenizer):
    text = "Héllo, wörld! def f(x):\n    return {'a': 1}  # ünïcode ✓"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_chat_template_renders_tools_and_tool_calls(tokenizer):
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    messages = [{"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
                {"role": "tool", "content": "cold"}]
    text = tokenizer.apply_chat_template(messages, tools=[tool], tokenize=False, add_generation_prompt=True)
    assert json.dumps(tool) in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>' in text
    assert "<tool_response>\ncold\n</tool_response><|im_end|>" in text
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")


def test_decode_skipping_special_tokens_keeps_tool_markup(tokenizer):
    text = "<tool_call>\n{}\n</tool_call><|im_end|>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<tool_call>\n{}\n</tool_call>"


def test_extra_text_merged_across_words_makes_that_text_short(tokenizer):
    boilerplate = '{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}\n'
    tuned = build_tiny_tokenizer(extra_text=[boilerplate] * 200, merge_across_words=True)
    assert len(tuned) == len(tokenizer) and tuned.chat_template == tokenizer.chat_template
    assert len(tuned(boilerplate)["input_ids"]) * 4 < len(tokenizer(boilerplate)["input_ids"])
    assert tuned.decode(tuned(boilerplate)["input_ids"]) == boilerplate
