"""Every input format normalises to the standard conversation; bad rows are named by file and line."""
import json

import pytest

from megaswift.data.sft.formats import SampleFormatError, detect_format, normalise_row

WEATHER = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def _norm(row):
    return normalise_row(row, detect_format(row, "t.jsonl:1"), "t.jsonl:1")


def test_openai_messages_with_tools_and_tool_calls():
    row = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather "}, {"type": "text", "text": "in Rome?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 25}'},
        {"role": "assistant", "content": "25 C."}],
        "tools": [WEATHER]}
    assert detect_format(row, "x") == "messages"
    assert _norm(row) == {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Rome?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
            {"role": "tool", "content": '{"temp": 25}'},
            {"role": "assistant", "content": "25 C."}],
        "tools": [{"type": "function", "function": WEATHER}],
        "rejected_response": None}


def test_swift_tool_call_and_tool_response_roles_join_the_assistant_turn():
    row = {"messages": [
        {"role": "user", "content": "Weather in Rome?"},
        {"role": "assistant", "content": "Let me look."},
        {"role": "tool_call", "content": '{"name": "get_weather", "arguments": {"city": "Rome"}}'},
        {"role": "tool_response", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."}], "tools": json.dumps([WEATHER])}
    out = _norm(row)
    assert [m["role"] for m in out["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert out["messages"][1] == {"role": "assistant", "content": "Let me look.", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]}
    assert out["tools"] == [{"type": "function", "function": WEATHER}]


def test_swift_query_response_history():
    row = {"system": "sys", "query": "q2", "response": "r2", "history": [["q1", "r1"]],
           "rejected_response": "bad", "tools": None}
    assert detect_format(row, "x") == "swift"
    assert _norm(row) == {"messages": [
        {"role": "system", "content": "sys"}, {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "r1"}, {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "r2"}], "tools": None, "rejected_response": "bad"}


def test_swift_history_as_json_text_as_in_csv_cells():
    row = {"query": "q2", "response": "r2", "history": '[["q1", "r1"]]'}
    assert [m["content"] for m in _norm(row)["messages"]] == ["q1", "r1", "q2", "r2"]


@pytest.mark.parametrize("extra, prompt", [("", "Translate."), ("Bonjour", "Translate.\n\nBonjour")])
def test_alpaca(extra, prompt):
    row = {"instruction": "Translate.", "input": extra, "output": "Hello"}
    assert detect_format(row, "x") == "alpaca"
    assert _norm(row) == {"messages": [{"role": "user", "content": prompt},
                                       {"role": "assistant", "content": "Hello"}],
                          "tools": None, "rejected_response": None}


def test_sharegpt_with_function_call_and_observation():
    row = {"conversations": [
        {"from": "human", "value": "Weather?"},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}'},
        {"from": "observation", "value": "cold"},
        {"from": "gpt", "value": "Cold."}], "system": "sys"}
    assert detect_format(row, "x") == "sharegpt"
    assert _norm(row)["messages"] == [
        {"role": "system", "content": "sys"}, {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": "cold"}, {"role": "assistant", "content": "Cold."}]


@pytest.mark.parametrize("row, expected, found", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "at least one assistant message", "roles ['user']"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "'robot'"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]},
     "`messages[0].content` to be a string", "5"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"function": {"name": "f", "arguments": "{not json"}}]}]}, "arguments` to be JSON", "invalid JSON"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "a"}]}, "system message only as the first", "position 1"),
])
def test_malformed_rows_say_where_what_was_expected_and_found(row, expected, found):
    with pytest.raises(SampleFormatError) as err:
        normalise_row(row, "messages", "data/x.jsonl:7")
    message = str(err.value)
    assert message.startswith("data/x.jsonl:7: expected") and expected in message and found in message


def test_a_row_of_another_format_than_its_dataset_is_refused():
    with pytest.raises(SampleFormatError, match=r"d.jsonl:3: expected a messages-format row .* found keys"):
        normalise_row({"instruction": "a", "output": "b"}, "messages", "d.jsonl:3")


def test_unknown_row_shape_is_refused_with_the_keys_found():
    with pytest.raises(SampleFormatError, match=r"d.csv:2: expected a row with keys messages or .* found keys \['text'\]"):
        detect_format({"text": "plain"}, "d.csv:2")
