import json

from megaswift.serve.tool_calls import StreamedContent, parse_tool_calls


def _calls(reply):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in reply.tool_calls]


def test_text_without_calls_is_content():
    reply = parse_tool_calls("Just text, no <tool_ call.")
    assert (reply.content, reply.tool_calls) == ("Just text, no <tool_ call.", [])


def test_hermes_calls_become_openai_tool_calls():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>')
    reply = parse_tool_calls(text)
    assert reply.content == "Let me check."
    assert _calls(reply) == [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in reply.tool_calls)
    assert len({c["id"] for c in reply.tool_calls}) == 2


def test_missing_close_tag_and_string_arguments():
    reply = parse_tool_calls('<tool_call>\n{"name": "f", "arguments": "{\\"x\\": 1}"}\n')
    assert (reply.content, _calls(reply)) == ("", [("f", {"x": 1})])


def test_unparseable_call_stays_in_the_content():
    text = 'ok <tool_call>{"name": "f", "arguments": {</tool_call>'
    reply = parse_tool_calls(text)
    assert (reply.content, reply.tool_calls) == (text, [])


def test_streamed_content_holds_back_from_the_tag():
    text = 'Sure: <tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    stream = StreamedContent()
    streamed = "".join(stream.feed(ch) for ch in text)  # one character at a time: tags split anywhere
    rest, calls = stream.finish(text)
    assert streamed == "Sure: " and rest == ""
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [("f", "{}")]


def test_streamed_content_without_call_releases_everything():
    text = "a < b and <tool is not a tag"
    stream = StreamedContent()
    streamed = "".join(stream.feed(ch) for ch in text)
    rest, calls = stream.finish(text)
    assert streamed + rest == text and calls == []
