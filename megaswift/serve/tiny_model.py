"""A tiny chat model and LoRA adapters, built offline in seconds, for tests, demos and benchmarks.

The model is a 2-layer Qwen2 built by transformers from a config, with the tiny tokenizer
(megaswift/data/tiny_tokenizer.py), taught a few conversations by a plain torch loop on the rows
`megaswift sft` would train on (SFTTemplate labels), so that greedy decoding reproduces them: a model
that answers a weather question with a Hermes `<tool_call>` exercises the whole tool-calling path.
"""
from __future__ import annotations

from pathlib import Path

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TAUGHT_CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "What is the weather in Paris?"},
                  {"role": "assistant", "content": "", "tool_calls": [
                      {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}],
     "tools": [WEATHER_TOOL]},
    {"messages": [{"role": "user", "content": "Say hello."},
                  {"role": "assistant", "content": "Hello there, friend!"}]},
]


def build_tiny_chat_model(out_dir: str | Path, conversations: list[dict] = TAUGHT_CONVERSATIONS, steps: int = 120,
                          hidden: int = 64, layers: int = 2, context: int = 512, seed: int = 0) -> Path:
    """Save a tiny Qwen2 chat model (weights, config, tokenizer) taught `conversations` to `out_dir`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from megaswift.data.sft.template import IGNORE_INDEX, SFTTemplate
    from megaswift.data.tiny_tokenizer import build_tiny_tokenizer

    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains fastest on one thread (no OpenMP spinning on a busy CPU)
    tokenizer = build_tiny_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=context, tie_word_embeddings=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None)
    model = Qwen2ForCausalLM(config)
    rows = [SFTTemplate(tokenizer, loss_on="all_assistant").encode(c) for c in conversations]
    width = max(len(r.input_ids) for r in rows)
    ids = torch.tensor([r.input_ids + [tokenizer.pad_token_id] * (width - len(r.input_ids)) for r in rows])
    labels = torch.tensor([r.labels + [IGNORE_INDEX] * (width - len(r.labels)) for r in rows])
    mask = torch.tensor([[1] * len(r.input_ids) + [0] * (width - len(r.input_ids)) for r in rows])
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=mask).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.set_num_threads(threads)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_tiny_lora_adapter(model_dir: str | Path, out_dir: str | Path, seed: int, rank: int = 8,
                            alpha: int = 64) -> Path:
    """A PEFT LoRA adapter on every attention projection, A and B random (B non-zero, unlike a fresh adapter),
    strong enough to change the model's greedy output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
    get_peft_model(model, config).save_pretrained(out_dir)
    return Path(out_dir)
