"""Pair encodings against TRL 1.16's own tokenization and forward; length limits; whole-pair packing.

TRL's DPOTrainer._prepare_dataset (its tokenize_fn: prompt with generation prompt, prompt + chosen,
prompt + rejected, split where they diverge) runs unbound on a namespace with the attributes it reads.
"""
import contextlib
from types import SimpleNamespace

import datasets
import pytest
import torch

trl = pytest.importorskip("trl")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

from megaswift.data.rlhf import PairRowsDataset, PairTemplate, collate_pairs, normalise_pair  # noqa: E402
from megaswift.data.rlhf.preprocess import OUTPUT_FEATURES  # noqa: E402
from megaswift.data.sft.loss_scale import load_loss_scale  # noqa: E402
from megaswift.data.sft.template import IGNORE_INDEX, SFTTemplate  # noqa: E402
from megaswift.objectives import sequence_logps, token_logps  # noqa: E402

TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
CALL = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}


def assistant(text):
    return [{"role": "assistant", "content": text}]


TRL_ROWS = [
    {"prompt": [{"role": "user", "content": "What is 2+2?"}], "chosen": assistant("4."),
     "rejected": assistant("5, I think.")},
    {"prompt": [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello!"},
                {"role": "assistant", "content": "Bonjour !"}, {"role": "user", "content": "How are you?"}],
     "chosen": assistant("Très bien, merci."), "rejected": assistant("Fine, thanks.")},
    {"prompt": [{"role": "user", "content": "Add 2 and 2 with the tool."}], "tools": TOOLS,
     "chosen": [{"role": "assistant", "content": "", "tool_calls": [CALL]}],
     "rejected": assistant("I cannot use tools.")},
    {"prompt": [{"role": "user", "content": "Name a colour of the sky."}], "chosen": assistant("Blue."),
     "rejected": assistant("Green with some purple stripes on Tuesdays.")},
]


@pytest.fixture(scope="module")
def trl_tokenized(tokenizer):
    """TRL's prompt_ids / chosen_ids / rejected_ids of TRL_ROWS."""
    rows = datasets.Dataset.from_list([{**r, "tools": r.get("tools")} for r in TRL_ROWS])
    owner = SimpleNamespace(_tokenizer=tokenizer)
    args = SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    return DPOTrainer._prepare_dataset(owner, rows, tokenizer, args, "test")


@pytest.fixture(scope="module")
def encoded(tokenizer):
    template = PairTemplate(SFTTemplate(tokenizer, max_length=512))
    pairs = [template.encode(normalise_pair(row, "trl", f"rows:{i + 1}")) for i, row in enumerate(TRL_ROWS)]
    assert not any(p.drop_reason for p in pairs)
    return pairs


def trained(sample):
    return [i for i, label in enumerate(sample.labels) if label != IGNORE_INDEX]


def test_token_ids_equal_trl_tokenization(trl_tokenized, encoded):
    for theirs, ours in zip(trl_tokenized, encoded):
        prompt = theirs["prompt_ids"]
        assert ours.prompt_tokens >= len(prompt)
        for side in ("chosen", "rejected"):
            full = prompt + theirs[f"{side}_ids"]
            sample = getattr(ours, side)
            assert sample.input_ids == full[:-1]  # sft's shift: input_ids = t[:-1], labels = t[1:]


def test_trained_tokens_are_trl_completion_up_to_the_end_of_turn(tokenizer, trl_tokenized, encoded):
    """TRL trains the whole completion; sft (and so we) stop at its end-of-turn token (<|im_end|>), leaving
    out the template's newline after it: the one, documented difference."""
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for theirs, ours in zip(trl_tokenized, encoded):
        for side in ("chosen", "rejected"):
            completion = theirs[f"{side}_ids"]
            start = len(theirs["prompt_ids"]) - 1  # label position of the first completion token
            last_end = max(i for i, t in enumerate(completion) if t == end_of_turn)
            assert trained(getattr(ours, side)) == list(range(start, start + last_end + 1))
            assert tokenizer.decode(completion[last_end + 1:]) == "\n"


def test_loss_scale_rules_apply_to_the_completion_as_in_sft(tokenizer):
    pair = normalise_pair(TRL_ROWS[2], "trl", "rows:3")
    agent = SFTTemplate(tokenizer, max_length=256, loss_scale=load_loss_scale("agent"))
    chosen = PairTemplate(agent).encode(pair).chosen
    same = agent.encode({"messages": pair["prompt"] + pair["chosen"], "tools": pair["tools"]})
    assert chosen == same and max(chosen.loss_scale) == 3.0  # the tool call's name / arguments weigh 3


@pytest.mark.parametrize("over_length", ["drop", "truncate"])
def test_a_pair_longer_than_max_length_is_dropped_or_truncated_as_a_whole(tokenizer, encoded, over_length):
    full = encoded[3]  # chosen is short, rejected long
    max_length = full.length - 4
    got = PairTemplate(SFTTemplate(tokenizer, max_length=max_length, over_length=over_length)).encode(
        normalise_pair(TRL_ROWS[3], "trl", "rows:4"))
    if over_length == "drop":
        assert got.drop_reason == "too_long"
        return
    assert got.truncated and not got.drop_reason and got.length == max_length
    assert got.chosen.input_ids == full.chosen.input_ids  # the short side keeps all of it
    assert got.rejected.input_ids == full.rejected.input_ids[:len(got.rejected.input_ids)]


def as_dataset(pairs):
    rows = [{**{f"{side}_{name}": getattr(getattr(p, side), name) for side in ("chosen", "rejected")
                for name in ("input_ids", "labels", "loss_scale")},
             "prompt_tokens": p.prompt_tokens, "length": p.length, "truncated": False, "status": ""} for p in pairs]
    return datasets.Dataset.from_list(rows, features=OUTPUT_FEATURES)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).float().eval()


def our_pair_logps(model, batch):
    mask = batch["attention_mask"]  # bool, True = masked -> additive float mask for transformers
    additive = torch.zeros(mask.shape).masked_fill(mask, torch.finfo(torch.float32).min)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=additive, position_ids=batch["position_ids"]).logits
    return sequence_logps(token_logps(logits, batch["labels"]), batch["loss_scale"], batch["sequence_ids"],
                          batch["num_pairs"])


@pytest.mark.parametrize("packing", [True, False])
def test_packed_and_unpacked_pair_logps_equal_trl_forward(tokenizer, model, trl_tokenized, encoded, packing):
    """Pairs in rows of whole pairs (attention per sequence) vs TRL's padded [chosen; rejected] batch with
    the same trained tokens: the same per-pair log-probs."""
    rows = PairRowsDataset(as_dataset(encoded), seq_length=420, pad_token_id=0, packing=packing)
    assert [p.length for p in encoded] == [53, 151, 415, 78]
    assert len(rows) == (2 if packing else 4)
    batch = collate_pairs([rows[i] for i in range(len(rows))], with_attention_mask=True)
    # the pair of each row's k-th sequences, in dataset order (first-fit-decreasing reorders them)
    order = [i for members in rows.bins for i in members]
    ours = our_pair_logps(model, batch)
    for row, members in enumerate(rows.bins):  # a pair is never split: both its sides in its row
        ids = batch["sequence_ids"][row]
        assert set(ids[ids >= 0].div(2, rounding_mode="floor").unique().tolist()) == \
            {order.index(i) for i in members}

    examples = [{"prompt_ids": t["prompt_ids"], "chosen_ids": t["chosen_ids"], "rejected_ids": t["rejected_ids"]}
                for t in trl_tokenized]
    trl_batch = DataCollatorForPreference(pad_token_id=0)(examples)
    # our trained tokens as TRL's completion mask (labels at position i -> mask at i + 1)
    mask = torch.zeros_like(trl_batch["completion_mask"])
    for j, pair in enumerate(encoded):
        for k, side in enumerate((pair.chosen, pair.rejected)):
            mask[j + k * len(encoded), [i + 1 for i in trained(side)]] = 1
    trl_batch["completion_mask"] = mask
    trl_model = LlamaForCausalLM(model.config).float().eval()
    trl_model.load_state_dict(model.state_dict())
    add_fused_lm_head(trl_model)
    owner = SimpleNamespace(model=trl_model, ref_model=trl_model, ld_alpha=None,
                            accelerator=SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext),
                            args=SimpleNamespace(gradient_checkpointing_kwargs=None))
    with torch.no_grad():
        chosen, rejected = DPOTrainer.compute_ref_log_probs(owner, trl_model, trl_batch)
    # 1e-5, plus the fp32 rounding of sums near 240 (one ulp there is 1.5e-5)
    torch.testing.assert_close(ours.chosen, chosen[order], atol=1e-5, rtol=1e-7)
    torch.testing.assert_close(ours.rejected, rejected[order], atol=1e-5, rtol=1e-7)
