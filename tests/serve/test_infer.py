"""`megaswift infer`: batch answers equal transformers' own greedy generate, one prompt at a time."""
import json

import pytest
from transformers import AutoModelForCausalLM

from megaswift.cli.main import main
from megaswift.serve.engine import GenerationRequest, Generator
from megaswift.serve.loading import load_model, load_tokenizer
from megaswift.serve.offline import chat_in_terminal
from megaswift.serve.rendering import ChatRenderer, prompt_from_row
from megaswift.serve.tiny_model import WEATHER_TOOL
from tests.serve.reference import hf_greedy

PROMPT_ROWS = [
    {"messages": [{"role": "user", "content": "What is the weather in Paris?"}], "tools": [WEATHER_TOOL]},
    {"query": "Say hello.", "response": "Hello there, friend!"},
    {"instruction": "Tell me about lists", "input": "in Python"},
    {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Why is the sky blue?"}]},
]


@pytest.fixture(scope="module")
def reference(tiny_chat_model):
    return AutoModelForCausalLM.from_pretrained(tiny_chat_model), load_tokenizer(tiny_chat_model)


def test_batch_infer_jsonl(tiny_chat_model, reference, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in PROMPT_ROWS))
    out = tmp_path / "answers.jsonl"
    assert main(["infer", "--model", str(tiny_chat_model), "--data.datasets", str(prompts), "--output", str(out),
                 "--max-new-tokens", "40", "--batch-size", "4"]) == 0
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["source"] for a in answers] == [f"{prompts}:{i}" for i in (1, 2, 3, 4)]
    # what the tiny model was taught: a tool call, and a greeting
    calls = answers[0].get("tool_calls", [])
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
           [("get_weather", {"city": "Paris"})]
    assert (answers[1]["response"], answers[1]["reference"], answers[1]["finish_reason"]) == \
           ("Hello there, friend!", "Hello there, friend!", "stop")
    # batched with left padding == transformers' generate on each prompt alone
    model, tokenizer = reference
    renderer = ChatRenderer(tokenizer)
    for i, (row, answer) in enumerate(zip(PROMPT_ROWS, answers)):
        ids = renderer.prompt_ids(prompt_from_row(row, f"row {i}"))
        assert answer["prompt_tokens"] == len(ids)
        assert answer["response"] == hf_greedy(model, tokenizer, ids, 40), f"row {i}"


def test_stop_strings_and_max_new_tokens(tiny_chat_model):
    loaded = load_model(tiny_chat_model)
    generator = Generator(loaded)
    ids = ChatRenderer(loaded.tokenizer).prompt_ids(prompt_from_row({"query": "Say hello."}, "x"))
    stopped, short = generator.generate([GenerationRequest(ids, 20, stop=("there",)),
                                         GenerationRequest(ids, 2)])
    assert (stopped.text, stopped.finish_reason) == ("Hello ", "stop")
    assert (short.completion_tokens, short.finish_reason) == (2, "length")
    pieces = []
    (streamed,) = generator.generate([GenerationRequest(ids, 20, stop=(", friend",), on_text=pieces.append)])
    assert "".join(pieces) == streamed.text == "Hello there"


def test_interactive_chat_streams_the_answer(tiny_chat_model):
    typed, shown = iter(["Say hello.", "/exit"]), []
    from megaswift.serve.engine import Sampling
    chat_in_terminal(load_model(tiny_chat_model), Sampling(), 20, read=lambda _: next(typed), write=shown.append)
    assert "Hello there, friend!" in "".join(shown)
    assert len(shown) > 4  # streamed in pieces, not written at once


def test_bad_model_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["infer", "--model", str(tmp_path / "nowhere"), "--data.datasets", "p.jsonl"]) == 1
    assert "expected an HF model folder" in capsys.readouterr().err


def test_megaswift_checkpoint_is_exported_on_the_fly(tiny_chat_model, tmp_path, capsys):
    from converters import hf2mcore
    checkpoint, cache = tmp_path / "ckpt", tmp_path / "cache"
    hf2mcore(tiny_chat_model, checkpoint, verify=False, progress=False)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"query": "Say hello."}) + "\n")
    for run in range(2):
        out = tmp_path / f"answers{run}.jsonl"
        assert main(["infer", "--model", str(checkpoint), "--export-cache", str(cache), "--data.datasets",
                     str(prompts), "--output", str(out), "--max-new-tokens", "12"]) == 0
        assert json.loads(out.read_text())["response"] == "Hello there, friend!"
        assert ("exporting megaswift checkpoint" in capsys.readouterr().out) == (run == 0)  # then cached
    (exported,) = cache.iterdir()
    assert (exported / "config.json").is_file() and (exported / "tokenizer_config.json").is_file()


def test_seeded_sampling_repeats(tiny_chat_model):
    from megaswift.serve.engine import Sampling
    loaded = load_model(tiny_chat_model)
    generator = Generator(loaded)
    ids = ChatRenderer(loaded.tokenizer).prompt_ids(prompt_from_row({"query": "Tell me about lists"}, "x"))
    hot = Sampling(temperature=1.5, top_p=0.95, top_k=50, seed=3)
    first, again = (generator.generate([GenerationRequest(ids, 12, hot)])[0] for _ in range(2))
    assert first.token_ids == again.token_ids and first.completion_tokens > 0
    flat = [Sampling(temperature=50.0, seed=seed) for seed in range(4, 7)]  # nearly uniform: seeds must matter
    assert len({tuple(generator.generate([GenerationRequest(ids, 12, s)])[0].token_ids) for s in flat}) == 3
