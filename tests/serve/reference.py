"""What the served answers are compared with: transformers' own generate, one prompt at a time."""


def hf_greedy(model, tokenizer, prompt_ids: list[int], max_new_tokens: int) -> str:
    """The reference: transformers' own greedy generate on one unpadded prompt, decoded up to end of turn."""
    import torch
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, len(prompt_ids):], skip_special_tokens=True)
