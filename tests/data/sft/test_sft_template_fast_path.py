"""The fast encoding (SFTTemplate.encode_batch) gives exactly the rows of the exact path (encode_exact: every
string from apply_chat_template, one tokenizer call per row) on generated conversations with system prompts,
several rounds, tools, tool calls, tool results, agent-style text, multi-byte characters and text that looks
like special tokens; for every loss_on, the default and the agent loss scale, and over-length handling.

Templates: the tiny tokenizer's ChatML one, and real chat templates shipped inside installed packages read
from their files (TRL's Qwen2.5 and Llama-3.2 templates, megatron-core's Llama-3.1 one), on the tiny
tokenizer with the special tokens those templates write.
"""
import ast
import importlib.util
import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from megaswift.data.sft.loss_scale import load_loss_scale
from megaswift.data.sft.template import SFTTemplate, TemplateError

LLAMA_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
                "<|python_tag|>"]
WORDS = ("the lattice holds, a value returns; while loops run until done. café naïve 日本語 ü ✓ 🙂 "
         "def f(x):\n    return x  \t tabs\tand   spaces\n\n").split(" ")
AGENT_TEXT = ('Thought: I should look it up.\nAction: lookup\nAction Input: {"word": "%s"}\n'
              "Observation: %s\nThought: done.\nFinal Answer: %s")
TOOLS = [{"type": "function", "function": {
    "name": "lookup", "description": "Look a word up.",
    "parameters": {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]}}},
    {"type": "function", "function": {"name": "add", "description": "Add two numbers.", "parameters": {
        "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}}]


def _package_file(package: str, *parts: str) -> Path | None:
    """A file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    return path if path.is_file() else None


def _megatron_llama31_template() -> str | None:
    path = _package_file("megatron.core", "tokenizers", "vision", "libraries", "multimodal_tokenizer.py")
    if path is None:
        return None
    for node in ast.parse(path.read_text()).body:  # a module-level string constant; no import of megatron
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "llama3p1_chat_template":
            return ast.literal_eval(node.value)
    return None


def _templates() -> dict[str, str | None]:
    """name -> chat template text (None: the tiny tokenizer's own)."""
    found = {"tiny_chatml": None}
    for name in ("qwen2_5", "llama3_2"):
        path = _package_file("trl", "chat_templates", f"{name}.jinja")
        if path is not None:
            found[f"trl_{name}"] = path.read_text()
    megatron = _megatron_llama31_template()
    if megatron is not None:
        found["megatron_llama3_1"] = megatron
    return found


TEMPLATES = _templates()


def test_real_templates_were_found():
    # megatron-core is a dependency, so at least one real template is always compared
    assert "megatron_llama3_1" in TEMPLATES


@pytest.fixture(scope="module", params=sorted(TEMPLATES))
def chat_tokenizer(request, tiny_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    text = TEMPLATES[request.param]
    if text is not None:
        tokenizer.add_special_tokens({"additional_special_tokens": LLAMA_TOKENS}, replace_extra_special_tokens=False)
        tokenizer.bos_token = "<|begin_of_text|>"
        tokenizer.chat_template = text
    return tokenizer


def _text(rng: random.Random, low: int = 1, high: int = 12) -> str:
    words = rng.choices(WORDS, k=rng.randint(low, high))
    if rng.random() < 0.05:
        words.insert(rng.randrange(len(words) + 1), rng.choice(["<|im_end|>", "<|eot_id|>", "<tool_call>"]))
    return " ".join(words)


def _call(rng: random.Random) -> dict:
    if rng.random() < 0.5:
        return {"type": "function", "function": {"name": "lookup", "arguments": {"word": _text(rng, 1, 2)}}}
    return {"type": "function", "function": {"name": "add", "arguments": {"a": rng.randint(0, 9), "b": 2.5}}}


def generated_conversations(count: int, seed: int) -> list[dict]:
    """Chats of every shape the encoder meets, in a fixed random mix."""
    rng = random.Random(seed)
    samples = []
    for _ in range(count):
        messages = [{"role": "system", "content": _text(rng)}] if rng.random() < 0.4 else []
        with_tools = rng.random() < 0.5
        for _ in range(rng.choice([1, 1, 2, 3, 4])):
            messages.append({"role": "user", "content": _text(rng)})
            if with_tools and rng.random() < 0.6:
                calls = [_call(rng) for _ in range(1 if rng.random() < 0.8 else 2)]
                content = _text(rng, 1, 4) if rng.random() < 0.3 else ""
                messages.append({"role": "assistant", "content": content, "tool_calls": calls})
                messages.extend({"role": "tool", "content": '{"result": "%s"}' % _text(rng, 1, 3)} for _ in calls)
            if rng.random() < 0.3:
                answer = AGENT_TEXT % (_text(rng, 1, 2), _text(rng, 1, 5), _text(rng, 1, 4))
            else:
                answer = _text(rng, 1, 30)
            messages.append({"role": "assistant", "content": answer})
            if rng.random() < 0.1:  # two assistant turns in a row
                messages.append({"role": "assistant", "content": _text(rng)})
        if rng.random() < 0.08:  # ends on a user turn: nothing to train for last_round
            messages.append({"role": "user", "content": _text(rng)})
        samples.append({"messages": messages, "tools": TOOLS if with_tools else None})
    return samples


SAMPLES = generated_conversations(48, seed=7)


def assert_same_as_exact(template: SFTTemplate, samples: list[dict]) -> None:
    fast = template.encode_batch(samples)
    for index, (sample, got) in enumerate(zip(samples, fast)):
        try:
            expected = template.encode_exact(sample)
        except Exception as err:  # noqa: BLE001 - the fast path must hand back the same error
            assert type(got) is type(err) and str(got) == str(err), f"row {index}: {got!r} != {err!r}"
            continue
        assert got == expected, f"row {index} differs: {sample}"


@pytest.mark.parametrize("loss_scale", ["default", "agent"])
@pytest.mark.parametrize("loss_on", ["last_round", "all_assistant", "all"])
def test_fast_rows_equal_exact_rows(chat_tokenizer, loss_on, loss_scale):
    template = SFTTemplate(chat_tokenizer, loss_on, max_length=4096, loss_scale=load_loss_scale(loss_scale))
    assert template.fast_path()  # every template here renders earlier turns the same way
    exact_calls = []
    exact = template.encode_exact
    template.encode_exact = lambda sample: exact_calls.append(1) or exact(sample)
    encoded = template.encode_batch(SAMPLES)
    template.encode_exact = exact
    # the fast path did the work: only rows the template refuses (e.g. two calls for Llama) went the exact way
    assert len(exact_calls) == sum(isinstance(row, Exception) for row in encoded)
    assert sum(not isinstance(row, Exception) and not row.drop_reason for row in encoded) >= len(SAMPLES) // 2
    assert_same_as_exact(template, SAMPLES)


@pytest.mark.parametrize("over_length", ["drop", "truncate"])
def test_fast_rows_equal_exact_rows_when_cut_to_max_length(chat_tokenizer, over_length):
    template = SFTTemplate(chat_tokenizer, "all_assistant", max_length=128, over_length=over_length,
                           loss_scale=load_loss_scale("agent"))
    encoded = template.encode_batch(SAMPLES)
    reasons = {row.drop_reason for row in encoded if not isinstance(row, Exception)}
    assert "too_long" in reasons if over_length == "drop" else any(
        not isinstance(row, Exception) and row.truncated for row in encoded)
    assert_same_as_exact(template, SAMPLES)


def test_encode_is_the_fast_path_row_by_row(tokenizer):
    template = SFTTemplate(tokenizer, "all_assistant", loss_scale=load_loss_scale("agent"))
    batch = template.encode_batch(SAMPLES[:12])
    assert [template.encode(sample) if not isinstance(row, Exception) else row
            for sample, row in zip(SAMPLES[:12], batch)] == batch


# the end-of-turn token only when another message follows: prefixes are not prefixes of the full text
INCONSISTENT = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
                "{% if not loop.last %}<|im_end|>\n{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_template_without_consistent_prefixes_stays_on_the_exact_path(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.chat_template = INCONSISTENT
    template = SFTTemplate(tokenizer, "all_assistant")
    assert not template.fast_path()
    samples = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                             {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}]
    (result,) = template.encode_batch(samples)
    assert isinstance(result, TemplateError) and "renders message 1 differently" in str(result)


def test_the_path_is_chosen_again_when_the_template_changes(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    template = SFTTemplate(tokenizer, "last_round")
    assert template.fast_path()
    tokenizer.chat_template = INCONSISTENT
    assert not template.fast_path()
