"""A tiny, deterministic, offline HF tokenizer with a ChatML chat template that supports tools.

Used by tests, demos and benchmarks, where no hub download is possible. It is a byte-level BPE
trained on Python's own `pydoc_data.topics` text (nothing to install), wrapped as a
`PreTrainedTokenizerFast`, with the special tokens and the tool-calling layout of Qwen2.5-style
ChatML models. Building it takes well under a second.

For experiments on one kind of data (e.g. examples/agent), `extra_text` adds that data's rendered
text to the training text and `merge_across_words=True` lets merges span word and punctuation
boundaries: repeated boilerplate such as tool schemas then becomes a few tokens instead of hundreds,
which keeps samples short enough to train on a CPU. The defaults build the general tokenizer.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Markup tokens of tool calling: atomic in the vocabulary but not "special" (decode keeps them).
TOOL_MARKUP_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]

# Our own ChatML template. Tool schemas go into the system turn, tool calls are JSON objects inside
# <tool_call> tags, consecutive tool results share one user turn. HF renders with trim_blocks, which
# eats a newline right after a block tag, so such newlines are written as {{ '\\n' }}.
CHATML_TOOLS_TEMPLATE = (
    "{% set ns = namespace(system='') %}"
    "{% if messages and messages[0].role == 'system' %}{% set ns.system = messages[0].content %}{% endif %}"
    "{% if tools %}"
    "<|im_start|>system\n"
    "{% if ns.system %}{{ ns.system }}\n\n{% endif %}"
    "# Tools\n\nThese functions are available. Their signatures, as JSON schemas:\n<tools>\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools>\n\n"
    "To call one, answer with a JSON object holding its name and arguments inside tags:\n"
    "<tool_call>\n{\"name\": <function-name>, \"arguments\": <arguments-object>}\n</tool_call><|im_end|>\n"
    "{% elif ns.system %}"
    "<|im_start|>system\n{{ ns.system }}<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'system' %}"
    "{% if not loop.first %}{{ raise_exception('a system message may only come first') }}{% endif %}"
    "{% elif message.role == 'user' %}"
    "<|im_start|>user\n{{ message.content }}<|im_end|>\n"
    "{% elif message.role == 'assistant' %}"
    "<|im_start|>assistant\n{{ message.content or '' }}"
    "{% for call in (message.tool_calls or []) %}"
    "{% set fn = call.function if call.function is defined else call %}"
    "{% if message.content or not loop.first %}{{ '\\n' }}{% endif %}"
    "<tool_call>\n{\"name\": \"{{ fn.name }}\", \"arguments\": {{ fn.arguments | tojson }}}\n</tool_call>"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% elif message.role == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1].role != 'tool' %}<|im_start|>user{% endif %}"
    "{{ '\\n' }}<tool_response>\n{{ message.content }}\n</tool_response>"
    "{% if loop.last or messages[loop.index0 + 1].role != 'tool' %}<|im_end|>\n{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _training_text() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]  # sorted: the same order on every run


def build_tiny_tokenizer(out_dir: str | Path | None = None, vocab_size: int = 1024,
                         extra_text: Iterable[str] = (), merge_across_words: bool = False) -> PreTrainedTokenizerFast:
    """Train the tiny tokenizer; save it to `out_dir` (tokenizer.json etc.) when given, and return it.

    extra_text: more training text, after the pydoc text (its order matters for reproducibility).
    merge_across_words: no regex word split before BPE, so one token may cover several words.
    """
    reserved = len(SPECIAL_TOKENS) + len(TOOL_MARKUP_TOKENS)
    if vocab_size < 256 + reserved:
        raise ValueError(f"vocab_size must be >= {256 + reserved} (256 bytes + {reserved} reserved tokens), "
                         f"found {vocab_size}")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not merge_across_words)
    core.decoder = decoders.ByteLevel()
    # trim_offsets=False: offsets must cover every character, leading spaces included, so character
    # spans (loss masks, loss scales) map onto tokens exactly.
    core.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + TOOL_MARKUP_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_training_text() + list(extra_text), trainer=trainer)
    # The trainer registers every reserved token as special; unflag the tool markup (same ids), so that
    # decode(skip_special_tokens=True) keeps <tool_call> tags, as Qwen2.5-style tokenizers do.
    core.add_tokens([AddedToken(token, special=False, normalized=False) for token in TOOL_MARKUP_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML_TOOLS_TEMPLATE
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer
