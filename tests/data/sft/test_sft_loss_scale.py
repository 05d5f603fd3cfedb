"""Loss-scale configs: the agent config's weights land on the right tokens; custom configs; config errors."""
import json

import pytest

from megaswift.data.sft.loss_scale import builtin_loss_scales, load_loss_scale
from megaswift.data.sft.template import IGNORE_INDEX, SFTTemplate

REACT = ('Thought: I need the weather.\nAction: get_weather\nAction Input: {"city": "Lima"}\n'
         'Observation: {"temp": 19, "sky": "clear"}\nThought: I know it now.\nFinal Answer: 19 degrees, clear.')
CALL = {"type": "function", "function": {"name": "convert_currency",
                                         "arguments": {"amount": 20, "from": "EUR", "to": "JPY"}}}
SAMPLE = {"messages": [
    {"role": "user", "content": "Weather in Lima, and 20 EUR in JPY?"},
    {"role": "assistant", "content": REACT},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "content": "3200"},
    {"role": "assistant", "content": "20 EUR is 3200 JPY."}]}


def weights_by_token(tokenizer, encoded):
    """(char start, char end, weight, trained) of every target token, located in the rendered text."""
    text = tokenizer.apply_chat_template(SAMPLE["messages"], tokenize=False)
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return text, [(s, e, encoded.loss_scale[k - 1], encoded.labels[k - 1] != IGNORE_INDEX)
                  for k, (s, e) in enumerate(offsets) if k > 0]


def weights_inside(tokens, start, end):
    """Weights of the tokens lying entirely inside text[start:end]."""
    found = [(w, trained) for s, e, w, trained in tokens if start <= s and e <= end]
    assert found, "no token lies inside the span"
    return found


@pytest.fixture(scope="module")
def agent_tokens(tokenizer):
    encoded = SFTTemplate(tokenizer, "all_assistant", loss_scale=load_loss_scale("agent")).encode(SAMPLE)
    return weights_by_token(tokenizer, encoded)


def span(text, part, after=0):
    start = text.index(part, after)
    return start, start + len(part)


def test_builtin_configs_exist():
    assert {"default", "agent"} <= set(builtin_loss_scales())


def test_react_action_and_arguments_weigh_three(agent_tokens):
    text, tokens = agent_tokens
    for part in ("Action: get_weather", 'Action Input: {"city": "Lima"}'):
        assert {w for w, _ in weights_inside(tokens, *span(text, part))} == {3.0}


def test_observation_keyword_weighs_two_and_its_content_is_never_trained(agent_tokens):
    text, tokens = agent_tokens
    assert {w for w, _ in weights_inside(tokens, *span(text, "Observation:"))} == {2.0}
    content = weights_inside(tokens, *span(text, ' {"temp": 19, "sky": "clear"}'))
    assert all(w == 0.0 and not trained for w, trained in content)


def test_plain_reasoning_and_answers_weigh_one(agent_tokens):
    text, tokens = agent_tokens
    for part in ("Thought: I need the weather.", "Final Answer: 19 degrees, clear.", "20 EUR is 3200 JPY."):
        assert {w for w, _ in weights_inside(tokens, *span(text, part))} == {1.0}


def test_structured_tool_call_name_and_arguments_weigh_three(agent_tokens):
    text, tokens = agent_tokens
    call_start = text.index("<tool_call>")
    for part in ('"convert_currency"', '"EUR"', '"JPY"', "20"):
        assert {w for w, _ in weights_inside(tokens, *span(text, part, after=call_start))} == {3.0}


def test_user_text_stays_untrained(agent_tokens):
    text, tokens = agent_tokens
    assert all(w == 0.0 and not t for w, t in weights_inside(tokens, *span(text, "Weather in Lima")))


def test_a_custom_config_file(tokenizer, tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"rules": [{"pattern": r"\bJPY\b", "weights": [0.0]},
                                          {"pattern": r"(20) (EUR)", "weights": [5.0, 0.5]}]}))
    encoded = SFTTemplate(tokenizer, "last_round", loss_scale=load_loss_scale(str(path))).encode(SAMPLE)
    text, tokens = weights_by_token(tokenizer, encoded)
    answer = text.rindex("20 EUR is 3200 JPY.")
    assert {w for w, _ in weights_inside(tokens, *span(text, "20", answer))} == {5.0}
    assert {w for w, _ in weights_inside(tokens, *span(text, "EUR", answer))} == {0.5}
    assert all(not t for _, t in weights_inside(tokens, *span(text, "JPY", answer)))


@pytest.mark.parametrize("rules, message", [
    ([{"pattern": "(a", "weights": [1]}], r"rules\[0\]: expected a valid Python regex"),
    ([{"pattern": "(a)", "weights": [1, 2]}], r"rules\[0\]: expected at most 1 weights"),
    ([{"pattern": "a", "weights": [-1]}], r"rules\[0\]: expected 'weights' to be a non-empty list of numbers >= 0"),
])
def test_bad_configs_name_the_file_and_rule(tmp_path, rules, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"rules": rules}))
    with pytest.raises(ValueError, match=message) as err:
        load_loss_scale(str(path))
    assert str(path) in str(err.value)


def test_unknown_builtin_name_lists_the_choices():
    with pytest.raises(ValueError, match=r"expected a built-in name \['agent', 'default'"):
        load_loss_scale("agnet")
