"""`megaswift deploy` in a subprocess, spoken to with the official `openai` client."""
import json
import signal
import threading
import urllib.error
import urllib.request

import openai
import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM

from megaswift.serve.loading import load_tokenizer
from megaswift.serve.rendering import ChatRenderer, prompt_from_openai
from megaswift.serve.tiny_model import WEATHER_TOOL
from tests.serve.reference import hf_greedy
from tests.serve.server_process import start_server

KEY = "test-key"
HELLO = [{"role": "user", "content": "Say hello."}]
WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tiny_chat_model, tiny_adapters, tmp_path_factory):
    log = tmp_path_factory.mktemp("deploy") / "server.log"
    process, url = start_server(tiny_chat_model, tiny_adapters, KEY, log)
    yield url, process, log
    if process.poll() is None:
        process.kill()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0, timeout=120)


def _chat(client, model="model", messages=HELLO, max_tokens=24, temperature=0, **kwargs):
    return client.chat.completions.create(model=model, messages=messages, temperature=temperature,
                                          max_tokens=max_tokens, **kwargs)


def test_models_lists_base_and_adapters(client):
    assert [m.id for m in client.models.list().data] == ["model", "alpha", "beta"]


def test_chat_and_streaming(client):
    reply = _chat(client)
    assert reply.choices[0].message.content == "Hello there, friend!"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens > 0 and reply.usage.total_tokens == \
           reply.usage.prompt_tokens + reply.usage.completion_tokens
    chunks = list(_chat(client, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello there, friend!"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 2  # really streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_tool_calls(client):
    for stream in (False, True):
        if stream:
            chunks = list(_chat(client, messages=WEATHER, tools=[WEATHER_TOOL], max_tokens=40, stream=True))
            calls = [call for c in chunks for call in (c.choices[0].delta.tool_calls or [])]
            finish = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
            content = "".join(c.choices[0].delta.content or "" for c in chunks)
        else:
            choice = _chat(client, messages=WEATHER, tools=[WEATHER_TOOL], max_tokens=40).choices[0]
            calls, finish, content = choice.message.tool_calls, [choice.finish_reason], choice.message.content or ""
        assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == \
               [("get_weather", {"city": "Paris"})]
        assert finish == ["tool_calls"] and content == ""
    # the call and its result sent back (arguments as JSON text, as clients send them) render like training
    follow_up = [*WEATHER, {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in calls]},
                 {"role": "tool", "tool_call_id": calls[0].id, "content": '{"sky": "sunny"}'}]
    answer = _chat(client, messages=follow_up, tools=[WEATHER_TOOL], max_tokens=4).choices[0]
    assert answer.finish_reason in ("stop", "length")


def test_adapters_by_name_match_peft_in_one_batch(client, tiny_chat_model, tiny_adapters):
    """alpha, beta and the base model, asked at the same moment (so batched together), each answer as
    PeftModel with that adapter alone answers."""
    tokenizer = load_tokenizer(tiny_chat_model)
    ids = ChatRenderer(tokenizer).prompt_ids(prompt_from_openai(HELLO, None))
    expected = {"model": hf_greedy(AutoModelForCausalLM.from_pretrained(tiny_chat_model), tokenizer, ids, 24)}
    for name, folder in tiny_adapters.items():
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_chat_model), folder)
        expected[name] = hf_greedy(peft_model, tokenizer, ids, 24)
    assert len(set(expected.values())) == 3  # the adapters really change the answer
    answers, barrier = {}, threading.Barrier(len(expected))

    def ask(name):
        barrier.wait()
        answers[name] = _chat(client, model=name).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(name,)) for name in expected]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == expected


def test_completions(client, tiny_chat_model):
    tokenizer = load_tokenizer(tiny_chat_model)
    prompt = "The list type"
    reply = client.completions.create(model="model", prompt=prompt, max_tokens=12, temperature=0)
    ids = tokenizer(prompt)["input_ids"]
    expected = hf_greedy(AutoModelForCausalLM.from_pretrained(tiny_chat_model), tokenizer, ids, 12)
    assert reply.choices[0].text == expected
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="model", prompt=prompt, max_tokens=12, temperature=0, stream=True))
    assert streamed == expected


def test_completions_echo_logprobs_are_transformers_log_softmax(client, tiny_chat_model):
    """OpenAI's `echo` + `logprobs` (what lm-eval's local-completions scores choices with), for token-id prompts
    sent together: every token's log-probability equals transformers' own forward on prompt + generated token."""
    import torch
    tokenizer, model = load_tokenizer(tiny_chat_model), AutoModelForCausalLM.from_pretrained(tiny_chat_model)
    prompts = [tokenizer(text)["input_ids"] for text in ("The list type", "Say hello. Hello there")]
    reply = client.completions.create(model="model", prompt=prompts, max_tokens=1, temperature=0, echo=True,
                                      logprobs=3)
    assert [c.index for c in reply.choices] == [0, 1]
    for choice, ids in zip(reply.choices, prompts):
        with torch.no_grad():
            next_token = int(model(torch.tensor([ids])).logits[0, -1].argmax())  # greedy; may be end of turn
            full = ids + [next_token]
            expected = model(torch.tensor([full])).logits[0, :-1].log_softmax(-1)
        scored = choice.logprobs
        assert scored.token_logprobs[0] is None and scored.top_logprobs[0] is None
        assert scored.token_logprobs[1:] == pytest.approx(expected.gather(1, torch.tensor(full[1:])[:, None])[:, 0]
                                                          .tolist(), abs=1e-4)
        assert [max(top.values()) for top in scored.top_logprobs[1:]] == \
               pytest.approx(expected.max(-1).values.tolist(), abs=1e-4)
        assert all(len(top) <= 4 for top in scored.top_logprobs[1:])  # 3 likeliest + the chosen token
        assert scored.tokens[:len(ids)] == [tokenizer.decode([t]) for t in ids]
        assert choice.text.startswith(tokenizer.decode(ids))
    plain = client.completions.create(model="model", prompt="The list type", max_tokens=4, temperature=0, logprobs=0)
    scored = plain.choices[0].logprobs  # without echo: the generated tokens only, offsets after the prompt
    assert "".join(scored.tokens).startswith(plain.choices[0].text) and scored.text_offset[0] == len("The list type")


def test_lm_eval_tasks_against_the_server(server, tmp_path):
    """lm-eval's local-completions (log-likelihoods from echo + logprobs, tokens from /tokenize, the chat template
    from /tokenizer_info) scores the tasks as the local model does (tests/serve/test_harness.py)."""
    from megaswift.cli.main import main
    from tests.serve.harness_tasks import EXPECTED, write_tiny_tasks
    mc_yaml, gen_yaml = write_tiny_tasks(tmp_path / "tasks")
    out = tmp_path / "results.json"
    assert main(["eval", "--url", f"{server[0]}/v1", "--api-key", KEY, "--served-model", "model",
                 "--tasks", f"{mc_yaml},{gen_yaml}", "--apply-chat-template", "--output", str(out)]) == 0
    tasks = json.loads(out.read_text())["tasks"]
    assert {name: {k: tasks[name][k] for k in metrics} for name, metrics in EXPECTED.items()} == EXPECTED


def test_bad_requests_get_openai_errors(client, server):
    with pytest.raises(openai.NotFoundError) as err:
        _chat(client, model="gamma")
    assert err.value.code == "model_not_found" and "gamma" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        _chat(client, messages=[{"role": "user", "content": "word " * 2000}])
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as err:
        _chat(client, temperature=7)
    assert err.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as err:
        _chat(client, messages=[{"role": "robot", "content": "hi"}])
    assert "role" in err.value.message
    request = urllib.request.Request(f"{server[0]}/v1/chat/completions", data=b"{not json",
                                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request)
    body = json.loads(err.value.read())
    assert err.value.code == 400 and body["error"]["type"] == "invalid_request_error"


def test_unauthorised(server):
    for key in ("wrong", ""):
        stranger = openai.OpenAI(base_url=f"{server[0]}/v1", api_key=key or "-", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as err:
            stranger.models.list()
        assert err.value.code == "invalid_api_key"


def test_sigterm_finishes_the_open_stream_then_exits(tiny_chat_model, tmp_path):
    """Its own server (the module's one may still be in use by tests running after this one)."""
    log = tmp_path / "server.log"
    process, url = start_server(tiny_chat_model, log=log)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=120)
        stream = client.chat.completions.create(model="model", messages=HELLO, temperature=0, max_tokens=40,
                                                stream=True, extra_body={"ignore_eos": True})
        first = next(stream)  # the stream is open
        process.send_signal(signal.SIGTERM)
        chunks = [first, *stream]
        finish = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
        assert finish == ["length"]  # all 40 tokens were generated and sent after SIGTERM
        assert process.wait(timeout=60) == 0, log.read_text()
        assert "stopped" in log.read_text()
    finally:
        if process.poll() is None:
            process.kill()


def test_eval_against_the_server(server, tmp_path):
    from megaswift.cli.main import main
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"query": "Say hello.", "response": "Hello there, friend!"}) + "\n" +
                  json.dumps({"query": "Say hello.", "response": "Goodbye now."}) + "\n")
    out = tmp_path / "results.json"
    assert main(["eval", "--url", f"{server[0]}/v1", "--api-key", KEY, "--served-model", "model",
                 "--tasks", str(qa), "--output", str(out), "--max-new-tokens", "12"]) == 0
    result = json.loads(out.read_text())
    assert (result["model"], result["tasks"]["qa.jsonl"]["rougeL_f1"]) == ("model", 50.0)
