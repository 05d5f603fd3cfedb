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

import numpy as np
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


# Exercises every sandbox shortcut of chat_render and the cases it must hand back to the sandbox: dict
# items, dict methods, missing keys, underscore names, loop attributes (plain data and methods), namespace
# attributes (plain data, a sandbox-wrapped str.format, a missing and an underscore name).
SANDBOX_PROBE = (
    "{% set ns = namespace(n=0, fmt='{}!'.format) %}"
    "{% for message in messages %}"
    "{{ loop.index0 }}{{ loop.first }}{{ loop.last }}{{ loop.length }}{{ loop._length }}{{ loop.cycle('a', 'b') }}"
    "{{ loop.previtem.role if loop.previtem else '-' }}{{ loop.nextitem.role if loop.nextitem else '-' }}"
    "[{{ message.role }}|{{ message.get('role') }}|{{ message.missing is defined }}|{{ message.missing }}"
    "|{{ message.items() | list | length }}|{{ message.__class__ }}|{{ message._x }}|{{ message['role'] }}]"
    "{% set ns.n = ns.n + 1 %}{{ ns.n }}{{ ns.fmt(ns.n) }}{{ ns.absent is defined }}{{ ns._hidden }}"
    "<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize("name", sorted(TEMPLATES) + ["sandbox_probe"])
def test_prefix_renders_equal_apply_chat_template(name, tiny_tokenizer_dir):
    from megaswift.data.sft.chat_render import ChatRenderer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    tokenizer.add_special_tokens({"additional_special_tokens": LLAMA_TOKENS}, replace_extra_special_tokens=False)
    tokenizer.chat_template = SANDBOX_PROBE if name == "sandbox_probe" else (TEMPLATES[name] or tokenizer.chat_template)
    renderer, compared = ChatRenderer(tokenizer), 0
    for sample in SAMPLES[:16]:
        messages, tools = sample["messages"], sample["tools"]
        prepared = renderer.prepare(messages, tools)
        for length in range(1, len(messages) + 1):
            for generation_prompt in (False, True):
                try:
                    expected = tokenizer.apply_chat_template(messages[:length], tools=tools, tokenize=False,
                                                             add_generation_prompt=generation_prompt)
                except Exception:  # noqa: BLE001 - a refused shape (Llama: two tool calls); the fast path falls back
                    continue
                assert prepared.render(length, generation_prompt) == expected, (name, length, generation_prompt)
                compared += 1
    assert compared > 50
    # the shortcuts were in place: the renders above went through them
    environment = prepared.template.environment
    assert type(environment).__name__ == "_ShortcutSandbox"
    assert {"LoopContext", "Namespace"} <= {kind.__name__ for kind in environment.plain_attribute_types}


def test_batched_end_of_turn_cut_equals_the_row_by_row_cut(tokenizer):
    """The batch search gives the per-row result when the token starts are sorted, and falls back to the
    per-row loop when they are not (a tokenizer whose offsets go backwards)."""
    template = SFTTemplate(tokenizer, "all_assistant")
    rng = np.random.default_rng(3)
    special = int(template.special_ids[0])
    for unsorted in (False, True):
        lengths = rng.integers(5, 40, size=6)
        text_lengths = [int(n) * 2 + 3 for n in lengths]
        text_start = np.cumsum([0, *(n + 1 for n in text_lengths)])
        bounds = np.cumsum([0, *lengths])
        ids = np.where(rng.random(bounds[-1]) < 0.15, special, 7).astype(np.int64)
        offsets, spans = [], []
        for n, text_length in zip(lengths, text_lengths):
            starts = np.sort(rng.integers(0, text_length, size=n))
            if unsorted:
                starts = rng.permutation(starts)
            offsets.append(np.stack([starts, np.minimum(starts + 2, text_length)], axis=1))
            cut = np.sort(rng.choice(np.arange(1, text_length), size=4, replace=False)).tolist()
            spans.append([(cut[0], cut[1]), (cut[2], cut[3])])
        offsets = np.concatenate(offsets)
        token_w = rng.random(bounds[-1]).astype(np.float32)
        expected = token_w.copy()
        for row, row_spans in enumerate(spans):
            lo, hi = bounds[row], bounds[row + 1]
            template._stop_after_end_of_turn(expected[lo:hi], ids[lo:hi], offsets[lo:hi], row_spans)
        batch_starts = offsets[:, 0] + np.repeat(text_start[:-1], lengths)
        template._stop_after_end_of_turn_batch(token_w, ids, offsets, batch_starts, bounds, text_start, spans)
        np.testing.assert_array_equal(token_w, expected)
        assert np.any(token_w == 0)


def test_sandbox_shortcuts_return_what_the_sandbox_returns(tokenizer):
    """Attribute reads the templates above cannot reach: a raw str.format method held by a namespace (the
    sandbox wraps it), an underscore name that holds plain data."""
    from jinja2.runtime import LoopContext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from megaswift.data.sft.chat_render import _compile

    environment = _compile(tokenizer.chat_template).environment
    namespace = environment.globals["namespace"](text="a", fmt="{}!".format)
    object.__getattribute__(namespace, "_Namespace__attrs")["_secret"] = "s"  # set past the name check
    loop = LoopContext(iter([{"role": "user"}, {"role": "assistant"}]), environment.undefined)
    next(loop)
    for obj, attribute in [(namespace, "text"), (namespace, "fmt"), (namespace, "_secret"), (namespace, "gone"),
                           (loop, "first"), (loop, "nextitem"), (loop, "_after"), (loop, "cycle"),
                           ({"role": "user", "items": 1}, "role"), ({"role": "user", "items": 1}, "items"),
                           ({"role": "user"}, "missing"), ({"role": "user"}, "__class__")]:
        got = environment.getattr(obj, attribute)
        expected = ImmutableSandboxedEnvironment.getattr(environment, obj, attribute)
        assert type(got) is type(expected), (attribute, got, expected)
        if attribute == "fmt":  # the sandbox's wrapper around str.format, not the raw method
            assert got(1) == expected(1) == "1!" and not hasattr(got, "__self__")
        elif not callable(got):
            assert str(got) == str(expected) and bool(got) == bool(expected), (attribute, got, expected)


@pytest.mark.parametrize("over_length", ["drop", "truncate"])
def test_batched_shift_and_fit_equals_the_row_by_row_one(tokenizer, over_length):
    """Random rows (weights 0/1 or any, rows trained only at their first token, empty rows) through the batch
    list building and through `_shift_and_fit`, the exact path's."""
    rng = np.random.default_rng(5)
    for case in range(12):
        template = SFTTemplate(tokenizer, "all_assistant", max_length=int(rng.integers(3, 30)), over_length=over_length)
        lengths = rng.integers(0, 40, size=8)
        bounds = np.cumsum([0, *lengths])
        ids = rng.integers(0, 50, size=bounds[-1]).astype(np.int64)
        weights = (rng.random(bounds[-1]) < 0.5).astype(np.float32)
        if case % 2:
            weights *= rng.choice([0.5, 1.0, 3.0], size=bounds[-1]).astype(np.float32)
        if case % 3 == 0:  # rows whose only trained token is the first (never a target)
            weights[bounds[:-1][lengths > 0]] = 1.0
            weights[(bounds[:-1] + 1)[lengths > 1]] = 0.0
        id_lists = [ids[lo:hi].tolist() for lo, hi in zip(bounds[:-1], bounds[1:])]
        got = template._shift_and_fit_batch(id_lists, weights, bounds)
        expected = [template._shift_and_fit(ids[lo:hi], weights[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]
        assert got == expected, case
