"""Labels cover exactly the assistant text (+ end-of-turn token) of the right turns; shift and length rules."""
import json

import numpy as np
import pytest

from megaswift.data.sft.template import IGNORE_INDEX, SFTTemplate, TemplateError

CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
CONVERSATION = {"messages": [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Hi there!"},
    {"role": "assistant", "content": "Hello, how can I help?"},
    {"role": "user", "content": "What is the weather in Oslo?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "content": '{"temp": -3}'},
    {"role": "assistant", "content": "It is -3 degrees in Oslo."},
], "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]}


def trained_runs(tokenizer, encoded):
    """Decoded text of each maximal run of trained targets."""
    runs, current = [], []
    for label in encoded.labels + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs


def check_tool_call_run(text):
    assert text.startswith("<tool_call>") and text.endswith("</tool_call><|im_end|>")
    call = json.loads(text[len("<tool_call>"):-len("</tool_call><|im_end|>")])
    assert call == {"name": CALL["function"]["name"], "arguments": CALL["function"]["arguments"]}


def test_last_round_trains_the_turns_after_the_last_user_message(tokenizer):
    runs = trained_runs(tokenizer, SFTTemplate(tokenizer, "last_round").encode(CONVERSATION))
    assert len(runs) == 2
    check_tool_call_run(runs[0])
    assert runs[1] == "It is -3 degrees in Oslo.<|im_end|>"


def test_all_assistant_trains_every_assistant_turn(tokenizer):
    runs = trained_runs(tokenizer, SFTTemplate(tokenizer, "all_assistant").encode(CONVERSATION))
    assert len(runs) == 3
    assert runs[0] == "Hello, how can I help?<|im_end|>"
    check_tool_call_run(runs[1])
    assert runs[2] == "It is -3 degrees in Oslo.<|im_end|>"


def test_all_trains_every_token_after_the_first(tokenizer):
    encoded = SFTTemplate(tokenizer, "all").encode(CONVERSATION)
    text = tokenizer.apply_chat_template(CONVERSATION["messages"], tools=CONVERSATION["tools"], tokenize=False)
    assert IGNORE_INDEX not in encoded.labels
    assert tokenizer.decode(encoded.input_ids[:1] + encoded.labels) == text


@pytest.mark.parametrize("loss_on", ["last_round", "all_assistant", "all"])
def test_labels_are_the_next_input_token_and_weights_follow_labels(tokenizer, loss_on):
    encoded = SFTTemplate(tokenizer, loss_on).encode(CONVERSATION)
    full = tokenizer.apply_chat_template(CONVERSATION["messages"], tools=CONVERSATION["tools"])["input_ids"]
    assert encoded.input_ids == full[:-1]
    assert len(encoded.labels) == len(encoded.loss_scale) == len(encoded.input_ids)
    for i, (label, weight) in enumerate(zip(encoded.labels, encoded.loss_scale)):
        assert label in (IGNORE_INDEX, full[i + 1])
        assert weight == (0.0 if label == IGNORE_INDEX else 1.0)


def test_over_length_is_dropped_or_truncated(tokenizer):
    full = SFTTemplate(tokenizer, "all_assistant").encode(CONVERSATION)
    limit = len(full.input_ids) - 5
    dropped = SFTTemplate(tokenizer, "all_assistant", max_length=limit, over_length="drop").encode(CONVERSATION)
    assert dropped.drop_reason == "too_long" and dropped.input_ids == []
    cut = SFTTemplate(tokenizer, "all_assistant", max_length=limit, over_length="truncate").encode(CONVERSATION)
    assert cut.truncated and len(cut.input_ids) == limit
    assert (cut.input_ids, cut.labels) == (full.input_ids[:limit], full.labels[:limit])


def test_nothing_left_to_train_after_truncation_is_dropped(tokenizer):
    encoded = SFTTemplate(tokenizer, "last_round", max_length=8, over_length="truncate").encode(CONVERSATION)
    assert encoded.drop_reason == "no_trained_tokens"


def test_a_template_that_renders_a_turn_differently_later_is_refused(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    # writes the end-of-turn token only when another message follows: prefixes do not line up
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
                         "{% if not loop.last %}<|im_end|>\n{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    with pytest.raises(TemplateError, match="renders message 1 differently"):
        SFTTemplate(tok, "all_assistant").encode({"messages": messages})


def test_invalid_settings_are_refused(tokenizer):
    with pytest.raises(ValueError, match="loss_on: expected one of"):
        SFTTemplate(tokenizer, "assistant_only")
    with pytest.raises(ValueError, match="over_length: expected one of"):
        SFTTemplate(tokenizer, over_length="wrap")


def test_token_weight_is_the_max_over_the_characters_each_token_covers():
    from megaswift.data.sft.template import _token_max

    rng = np.random.default_rng(0)
    text_length = 200
    char_w = rng.choice([0.0, 1.0, 2.0, 3.0], size=text_length).astype(np.float32)
    starts = np.sort(rng.integers(0, text_length, size=120))
    widths = rng.integers(0, 6, size=120)  # 0: a special token covering no characters
    ends = np.minimum(starts + widths, text_length)
    offsets = np.stack([starts, ends], axis=1)  # overlapping spans, as byte-level BPE gives
    expected = [char_w[s:e].max() if e > s else char_w[s] for s, e in offsets]
    np.testing.assert_array_equal(_token_max(char_w, offsets), np.array(expected, dtype=np.float32))
    assert _token_max(char_w, np.zeros((0, 2), dtype=np.int64)).shape == (0,)


def test_token_any_equals_token_max_for_weights_of_zero_and_one():
    from megaswift.data.sft.template import _token_any, _token_max

    rng = np.random.default_rng(1)
    text_length = 300
    char_w = (rng.random(text_length) < 0.3).astype(np.float32)
    starts = np.sort(rng.integers(0, text_length + 1, size=200))  # text_length: a token at the very end
    ends = np.minimum(starts + rng.integers(0, 8, size=200), text_length)
    offsets = np.stack([starts, ends], axis=1)
    expected = [char_w[s:e].max() if e > s else (char_w[s] if s < text_length else 0.0) for s, e in offsets]
    np.testing.assert_array_equal(_token_any(char_w, offsets), np.array(expected, dtype=np.float32))
    np.testing.assert_array_equal(_token_any(char_w, offsets), _token_max(char_w, offsets))
    assert _token_any(char_w, np.zeros((0, 2), dtype=np.int64)).shape == (0,)
