"""Fault injection for the data paths (issue 11 items 2, 10, 11, 12; issue 10 section 5): each test plants
one fault in tiny data, on real files, and requires a clear error (file, line, numbers, what to set) or the
documented skip/drop, instead of a hang, a crash at step 1 or a bare codec error. Single process, fast."""
import json
import time
import tracemalloc

import numpy
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from transformers import AutoTokenizer

from megaswift.cli.main import main
from megaswift.config import ConfigError, PretrainConfig, SFTConfig, SFTDataConfig
from megaswift.data.data_paths import check_data_paths
from megaswift.data.preprocess import BadRows, read_documents
from megaswift.data.sft import SFTDataSettings, SFTTemplate, SampleFormatError, preprocess_sft
from megaswift.data.sft.training_source import SFTData
from megaswift.models import preset_hf_config

PRESET = "tiny-llama"


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))


def write_indexed(prefix, lengths, high=100, dtype=numpy.uint16):
    """An indexed dataset written with megatron-core's own builder: one document per length, token ids
    in [0, high) with id high - 1 in the last document."""
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for i, n in enumerate(lengths):
        ids = torch.arange(n) % high
        if i == len(lengths) - 1:
            ids[-1] = high - 1
        builder.add_item(ids)
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def run_pt(capsys, prefix, *flags):
    """`megaswift pt` on the prefixes (space-separated) in this process: returns (exit code, stderr).
    Every case here must stop before the model is built, so it takes about a second."""
    started = time.perf_counter()
    prefixes = prefix.split()
    code = main(["pt", "--model.preset", PRESET, "--data.paths", *prefixes, "--data.seq_length", "32",
                 "--train.train_iters", "2", "--train.micro_batch_size", "1", "--train.global_batch_size", "1",
                 "--logging.output_dir", f"{prefixes[0]}-logs", "--data.cache_dir", f"{prefixes[0]}-cache",
                 "--logging.progress_bar", "false", "--logging.tensorboard", "false",
                 *flags])
    assert time.perf_counter() - started < 60
    return code, capsys.readouterr().err


def chat(user, assistant):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


GOOD = [chat(f"question {i}", f"answer number {i}") for i in range(4)]


def write_jsonl(path, rows: list, bad: dict[int, bytes] = {}):
    """rows as JSON lines; bad[k] (raw bytes) becomes line k (1-based)."""
    lines = [json.dumps(r).encode() for r in rows]
    for number in sorted(bad):
        lines.insert(number - 1, bad[number])
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def settings(path, **kw):
    return SFTDataSettings(datasets=[path], shuffle=False, **kw)


# ---- 11.2: a split part without data hangs megatron-core -------------------------------------------------

def test_a_forty_document_dataset_with_the_default_split_is_refused_with_the_numbers(tmp_path, capsys):
    # 40 documents at 98,1,1: train gets 39, valid 1 and test 0, and megatron-core spins forever in
    # GPTDataset._get_num_epochs on the empty test part (issue 11 item 2).
    prefix = write_indexed(tmp_path / "forty", [50] * 40)
    code, err = run_pt(capsys, prefix)
    assert code == 2
    assert "data.split 98,1,1: too little data in test of" in err
    assert "train 39 documents / 1950 tokens, valid 1 document / 50 tokens, test 0 documents / 0 tokens" in err
    assert "Set --data.split 100,0,0" in err
    # With evaluation on, the suggestion is a split whose validation part holds a sample.
    code, err = run_pt(capsys, prefix, "--train.eval_interval", "1")
    assert code == 2 and "Set e.g. --data.split 98,2,0" in err


def test_a_part_shorter_than_one_sample_is_refused_in_a_blend(tmp_path, capsys):
    # Two unweighted datasets whose valid part (one 10-token document) holds less than seq_length + 1
    # tokens: megatron-core fails with a bare AssertionError in BlendedDataset.
    a = write_indexed(tmp_path / "a", [100] * 9 + [10])
    b = write_indexed(tmp_path / "b", [100] * 9 + [10])
    code, err = run_pt(capsys, f"{a} {b}", "--data.split", "90,10,0", "--train.eval_interval", "1")
    assert code == 2
    assert f"too little data in valid of {a}, valid of {b}" in err
    assert f"{a}: train 9 documents / 900 tokens, valid 1 document / 10 tokens, test not used (0)" in err


# ---- 11.10: token ids past the model's vocabulary ----------------------------------------------------------

def test_token_ids_beyond_the_model_vocabulary_are_refused_before_training(tmp_path, capsys):
    vocab = preset_hf_config(PRESET)["vocab_size"]
    prefix = write_indexed(tmp_path / "wide", [200] * 50, high=4096)  # a 4096-token tokenizer's data
    code, err = run_pt(capsys, prefix, "--data.split", "100,0,0")
    assert code == 2
    assert f"{prefix}.bin holds token id 4095, but the model's vocabulary has {vocab} ids (0..{vocab - 1})" in err
    assert "IndexError" not in err
    # data within the vocabulary passes; the largest id is remembered per file until the file changes
    from megaswift.data.indexed_checks import check_token_ids, max_token_id
    narrow = write_indexed(tmp_path / "narrow", [200] * 5, high=vocab)
    assert max_token_id(narrow) == vocab - 1 == int(numpy.fromfile(f"{narrow}.bin", dtype=numpy.uint16).max())
    check_token_ids([narrow], vocab, tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1
    write_indexed(tmp_path / "narrow", [200] * 5, high=vocab + 1)  # rewritten: same size, one id too large
    with pytest.raises(ConfigError, match=rf"narrow.bin holds token id {vocab}, but"):
        check_token_ids([narrow], vocab, tmp_path / "cache")


def test_sft_token_ids_beyond_the_model_vocabulary_are_refused(tmp_path, tokenizer, tiny_tokenizer_dir):
    data = write_jsonl(tmp_path / "chat.jsonl", GOOD)
    config = SFTDataConfig(datasets=[data], tokenizer=str(tiny_tokenizer_dir), seq_length=64,
                           cache_dir=str(tmp_path / "cache"))
    encoded = preprocess_sft(settings(data, max_length=64), tokenizer, report=False).dataset
    largest = max(max(row) for column in ("input_ids", "labels") for row in encoded[column])
    assert largest > 300
    with pytest.raises(ConfigError, match=rf"gives token id {largest} \(in {data}\), but the model's vocabulary "
                                          rf"has 300 ids \(0..299\)"):
        SFTData(config, tokenizer, seed=1, micro_batch_size=1, model_vocab_size=300)._splits()
    SFTData(config, tokenizer, seed=1, micro_batch_size=1, model_vocab_size=largest + 1)._splits()


# ---- 11.11: bytes that are not UTF-8, rows a template cannot render, unusual role orders -------------------

LATIN1_ROW = json.dumps(chat("caf\u00e9", "ok")).encode().replace(b"\\u00e9", b"\xff")  # 0xff at column 47


def test_a_byte_that_is_not_utf8_names_file_line_and_column_or_is_skipped(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "latin1.jsonl", GOOD, bad={3: LATIN1_ROW})
    with pytest.raises(SampleFormatError, match=rf"latin1.jsonl:3: expected UTF-8 text, found the byte 0xff at "
                                                rf"column 47, which is not UTF-8; re-encode"):
        preprocess_sft(settings(path), tokenizer, report=False)
    result = preprocess_sft(settings(path, skip_bad_rows=True), tokenizer, report=False)
    assert result.stats["dropped"]["bad_row"] == 1 and result.stats["rows_kept"] == len(GOOD)
    assert "latin1.jsonl:3: expected UTF-8 text" in result.stats["bad_row_examples"][0]


@pytest.mark.parametrize("kind", ["json", "csv"])
def test_a_byte_that_is_not_utf8_in_json_and_csv_files(tmp_path, tokenizer, kind):
    path = tmp_path / f"rows.{kind}"
    if kind == "json":
        path.write_bytes(b"[\n" + b",\n".join([json.dumps(GOOD[0]).encode(), LATIN1_ROW,
                                               json.dumps(GOOD[1]).encode()]) + b"\n]\n")
        message = r"rows.json:3: expected UTF-8 text, found the byte 0xff at column 47"
    else:
        path.write_bytes(b"query,response\nfirst,one\ncaf\xff,two\nthird,three\n")
        message = r"rows.csv:3: expected UTF-8 text, found the byte 0xff in column 'query'"
    with pytest.raises(SampleFormatError, match=message):
        preprocess_sft(settings(str(path)), tokenizer, report=False)
    result = preprocess_sft(settings(str(path), skip_bad_rows=True), tokenizer, report=False)
    assert result.stats["dropped"]["bad_row"] == 1 and result.stats["rows_kept"] == 2


def test_pretrain_preprocess_names_the_line_of_a_byte_that_is_not_utf8(tmp_path, tiny_tokenizer_dir, capsys):
    source = tmp_path / "docs.jsonl"
    source.write_bytes(b'{"text": "fine"}\n{"text": "caf\xff"}\n{"text": "also fine"}\n')
    out = tmp_path / "out"
    args = ["preprocess", "--input", str(source), "--tokenizer", str(tiny_tokenizer_dir), "--output-prefix", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{source}:2 column 14: expected UTF-8 text, found the byte 0xff, which is not UTF-8" in err
    assert "Traceback" not in err and "--skip-bad-rows" in err
    assert not (tmp_path / "out.bin").exists()
    assert main([*args, "--skip-bad-rows"]) == 0
    assert "skipped 1 bad rows" in capsys.readouterr().err
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    assert len(IndexedDataset(str(out))) == 2
    text = tmp_path / "docs.txt"
    text.write_bytes(b"first block\n\nsecond\nblock \xfe here\n\nthird\n")
    with pytest.raises(ConfigError, match=r"docs.txt:4: expected UTF-8 text, found the byte 0xfe"):
        list(read_documents(text, "text"))
    bad = BadRows(skip=True)
    assert list(read_documents(text, "text", bad=bad)) == ["first block", "third\n"] and bad.count == 1


def test_a_conversation_starting_with_the_assistant_names_its_line_or_is_skipped(tmp_path, tokenizer):
    first = {"messages": [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "how can I help?"}]}
    path = write_jsonl(tmp_path / "order.jsonl", GOOD, bad={2: json.dumps(first).encode()})
    with pytest.raises(SampleFormatError, match=r"order.jsonl:2: expected a user \(or system\) message before "
                                                r"the first assistant message"):
        preprocess_sft(settings(path), tokenizer, report=False)
    result = preprocess_sft(settings(path, skip_bad_rows=True), tokenizer, report=False)
    assert result.stats["dropped"]["bad_row"] == 1 and result.stats["rows_kept"] == len(GOOD)


# A template that, like Llama-2's and Mistral's, refuses roles that do not alternate.
ALTERNATING_TEMPLATE = (
    "{% for m in messages %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_row_the_chat_template_refuses_names_its_line_or_is_skipped(tmp_path, tiny_tokenizer_dir):
    strict = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    strict.chat_template = ALTERNATING_TEMPLATE
    double = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                           {"role": "assistant", "content": "c"}]}
    path = write_jsonl(tmp_path / "tpl.jsonl", GOOD, bad={3: json.dumps(double).encode()})
    with pytest.raises(SampleFormatError, match=r"tpl.jsonl:3: expected a conversation the tokenizer's chat "
                                                r"template can render, found TemplateError: Conversation roles must "
                                                r"alternate"):
        preprocess_sft(settings(path), strict, report=False)
    result = preprocess_sft(settings(path, skip_bad_rows=True), strict, report=False)
    assert result.stats["dropped"]["bad_row"] == 1 and result.stats["rows_kept"] == len(GOOD)


def test_two_user_turns_in_a_row_are_kept_with_a_counted_warning(tmp_path, tokenizer, capsys):
    double = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                           {"role": "assistant", "content": "c"}]}
    tool_first = {"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "42"},
                               {"role": "assistant", "content": "c"}]}
    path = write_jsonl(tmp_path / "roles.jsonl", [*GOOD, double, double, tool_first])
    result = preprocess_sft(settings(path), tokenizer, report=True)
    assert result.stats["rows_kept"] == len(GOOD) + 3
    assert result.stats["role_order"] == {"two user turns in a row": 2, "a tool result after a user turn": 1}
    assert result.stats["role_order_examples"][0] == f"{path}:5: two user turns in a row"
    err = capsys.readouterr().err
    assert "sft data: warning: rows with an unusual role order were kept (two user turns in a row: 2" in err


# ---- 10 section 5: invalid JSON lines, the column, missing files, the over-length advice -------------------

@pytest.mark.parametrize("line, where", [
    (b'{"messages": [{"role": "user", "content": "hi"}', r"at the end of the line, column 48: is the row cut short"),
    (b'{"messages": [{"role": "user",, "content": "hi"}]}', r"at column 31, near"),
])
def test_an_invalid_json_line_points_at_the_error_and_is_skipped_with_skip_bad_rows(tmp_path, tokenizer, line, where):
    path = write_jsonl(tmp_path / "broken.jsonl", GOOD, bad={2: line})
    with pytest.raises(SampleFormatError, match=rf"broken.jsonl:2: expected one JSON object per line, found "
                                                rf"invalid JSON \(.*{where}"):
        preprocess_sft(settings(path), tokenizer, report=False)
    result = preprocess_sft(settings(path, skip_bad_rows=True), tokenizer, report=False)
    assert result.stats["dropped"]["bad_row"] == 1 and result.stats["rows_kept"] == len(GOOD)


def test_missing_data_files_are_one_line_errors_before_the_model_is_built(tmp_path, capsys):
    config = PretrainConfig()
    config.data.paths = [str(tmp_path / "nowhere")]
    with pytest.raises(ConfigError, match=r"data.paths: .*nowhere.bin does not exist"):
        check_data_paths(config)
    code, err = run_pt(capsys, str(tmp_path / "nowhere"))
    assert code == 2 and err.strip().count("\n") == 0 and "nowhere.bin does not exist" in err
    sft = SFTConfig()
    sft.data.datasets = [str(tmp_path / "chat.jsonl#100")]
    with pytest.raises(ConfigError, match=r"data.datasets: .*chat.jsonl does not exist"):
        check_data_paths(sft)
    sft.data.datasets, sft.data.loss_scale = [write_jsonl(tmp_path / "chat.jsonl", GOOD)], str(tmp_path / "w.json")
    with pytest.raises(ConfigError, match=r"data.loss_scale: loss scale .*w.json"):
        check_data_paths(sft)


def test_all_rows_too_long_names_the_flags_to_change(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "long.jsonl", [chat("q " * 50, "a " * 50)] * 2)
    with pytest.raises(ValueError, match=r"raise --data.seq_length or pass --data.over_length truncate"):
        preprocess_sft(settings(path, max_length=8), tokenizer, report=False)


# ---- 11.12: a huge row is dropped (or cut) before it is rendered and tokenized -----------------------------

def test_a_huge_row_is_dropped_without_rendering_or_tokenizing_it(tmp_path, tokenizer):
    huge = chat("x" * 5_000_000, "short answer")
    template = SFTTemplate(tokenizer, "last_round", max_length=32, over_length="drop")
    tracemalloc.start()
    encoded = template.encode(huge)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # rendering alone would copy the 5 MB text; tokenizing it would take seconds and far more memory
    assert encoded.drop_reason == "too_long" and peak < 1_000_000
    # the pipeline counts it with the other too-long rows
    path = write_jsonl(tmp_path / "huge.jsonl", [*GOOD, huge])
    result = preprocess_sft(settings(path, max_length=32), tokenizer, report=False)
    assert result.stats["dropped"]["too_long"] == 1 and result.stats["rows_kept"] == len(GOOD)


@pytest.mark.parametrize("loss_on", ["last_round", "all_assistant", "all"])
def test_truncating_a_long_row_before_tokenizing_gives_the_full_encodings_first_tokens(tokenizer, loss_on):
    long = {"messages": [{"role": "user", "content": "word " * 500}, {"role": "assistant", "content": "reply " * 500},
                         {"role": "user", "content": "more"}, {"role": "assistant", "content": "done " * 300}]}
    cheap = SFTTemplate(tokenizer, loss_on, max_length=32, over_length="truncate")
    assert sum(len(m["content"]) for m in long["messages"]) > cheap.char_limit  # the cut really happens
    full = SFTTemplate(tokenizer, loss_on, max_length=32, over_length="truncate")
    full.char_limit = None  # render and tokenize everything, then cut the tokens
    assert cheap.encode(long) == full.encode(long)
