"""Inference prompts are the training rendering, token for token, up to the generation prompt."""
import json

import pytest
from transformers import AutoTokenizer

from megaswift.data.sft.formats import normalise_row
from megaswift.data.sft.template import IGNORE_INDEX, SFTTemplate
from megaswift.serve.rendering import ChatRenderer, prompt_from_openai, prompt_from_row
from megaswift.serve.tiny_model import WEATHER_TOOL
from megaswift.serve.tool_calls import parse_tool_calls

CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
CONVERSATIONS = {
    "plain": {"messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}]},
    "system_multi_round": {"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "One?"},
        {"role": "assistant", "content": "1"}, {"role": "user", "content": "Two?"},
        {"role": "assistant", "content": "2"}]},
    "tools": {"tools": [WEATHER_TOOL], "messages": [
        {"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "content": '{"sky": "snow"}'},
        {"role": "assistant", "content": "Snow in Oslo."}]},
}


def _as_openai_client_sends(messages):
    """The same conversation as an OpenAI client sends it: tool-call arguments as JSON text, with ids."""
    sent = []
    for message in messages:
        message = dict(message)
        if "tool_calls" in message:
            message["tool_calls"] = [{"id": f"call_{i}", "type": "function", "function": {
                "name": c["function"]["name"], "arguments": json.dumps(c["function"]["arguments"])}}
                for i, c in enumerate(message["tool_calls"])]
            message["content"] = None
        sent.append(message)
    return sent


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_prompt_tokens_are_the_training_tokens_up_to_each_answer(tokenizer, name):
    row = CONVERSATIONS[name]
    trained = SFTTemplate(tokenizer, loss_on="all_assistant").encode(normalise_row(row, "messages", name))
    renderer = ChatRenderer(tokenizer)
    answers = [i for i, m in enumerate(row["messages"]) if m["role"] == "assistant"]
    starts = [i + 1 for i in range(len(trained.labels))
              if trained.labels[i] != IGNORE_INDEX and (i == 0 or trained.labels[i - 1] == IGNORE_INDEX)]
    assert len(starts) == len(answers)  # one trained span per assistant turn
    for index, start in zip(answers, starts):
        history = _as_openai_client_sends(row["messages"][:index])
        prompt_ids = renderer.prompt_ids(prompt_from_openai(history, row.get("tools")))
        # the prompt is the training row's tokens, and its last token is the first input whose target is trained
        assert prompt_ids == trained.input_ids[:len(prompt_ids)]
        assert len(prompt_ids) == start
        # what training teaches after that prompt, decoded as the server decodes, parses back into the turn
        end = next((i for i in range(start - 1, len(trained.labels)) if trained.labels[i] == IGNORE_INDEX),
                   len(trained.labels))
        reply = parse_tool_calls(tokenizer.decode(trained.labels[start - 1:end], skip_special_tokens=True))
        expected = row["messages"][index]
        assert reply.content == expected["content"]
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in reply.tool_calls] == \
               [(c["function"]["name"], c["function"]["arguments"]) for c in expected.get("tool_calls", [])]


def test_prompt_rows_of_every_sft_format(tokenizer):
    renderer = ChatRenderer(tokenizer)
    ask = [{"role": "user", "content": "Why?"}]
    expected = renderer.render(prompt_from_openai(ask, None))
    assert expected.endswith("<|im_start|>assistant\n")
    rows = [{"messages": ask}, {"query": "Why?"}, {"instruction": "Why?"},
            {"conversations": [{"from": "human", "value": "Why?"}]}]
    assert [renderer.render(prompt_from_row(r, "x.jsonl:1")) for r in rows] == [expected] * 4
    with_answer = prompt_from_row({"query": "Why?", "response": "Because."}, "x.jsonl:2")
    assert (renderer.render(with_answer), with_answer.reference) == (expected, "Because.")


def test_bad_prompt_row_names_the_line(tokenizer):
    with pytest.raises(ValueError, match=r"p\.jsonl:7.*role"):
        prompt_from_row({"messages": [{"role": "robot", "content": "x"}]}, "p.jsonl:7")


def test_exported_folder_tokenizes_as_training(tiny_chat_model, tiny_tokenizer_dir):
    """An exported folder's config.json (model_type qwen2) would make AutoTokenizer pick Qwen2Tokenizer, whose
    pre-tokenizer splits differently from the tiny tokenizer's; load_tokenizer keeps training's tokens."""
    from megaswift.serve.loading import load_tokenizer
    training = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)  # as `megaswift sft` loads hf_assets/
    text = SFTTemplate(training).render(CONVERSATIONS["tools"]["messages"], [WEATHER_TOOL])
    expected = training(text, add_special_tokens=False)["input_ids"]
    assert load_tokenizer(tiny_chat_model)(text, add_special_tokens=False)["input_ids"] == expected
    assert AutoTokenizer.from_pretrained(tiny_chat_model)(text, add_special_tokens=False)["input_ids"] != expected
