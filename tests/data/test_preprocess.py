"""`megaswift preprocess` writes what the tokenizer says, in megatron-core's own indexed format."""
import json

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset
from transformers import AutoTokenizer

from megaswift.config import ConfigError
from megaswift.data.preprocess import preprocess


@pytest.fixture(scope="module")
def tokenizer_dir(demo_data):
    return str(demo_data[0])


def test_documents_round_trip_through_indexed_dataset(tmp_path, tokenizer_dir):
    texts = ["def f(x):\n    return x + 1", "The quick brown fox.", "while True: pass"]
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"content": t}) + "\n" for t in texts))
    stats = preprocess([source], tokenizer_dir, str(tmp_path / "out"), text_key="content", workers=2,
                       progress=False)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    expected = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    dataset = IndexedDataset(str(tmp_path / "out"))
    assert [dataset[i].tolist() for i in range(len(dataset))] == expected
    assert stats.documents == 3 and stats.tokens == sum(map(len, expected))


def test_txt_and_parquet_inputs(tmp_path, tokenizer_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "a.txt").write_text("first paragraph\n\nsecond paragraph\n")
    pq.write_table(pa.table({"text": ["third", "fourth"]}), tmp_path / "b.parquet")
    stats = preprocess([tmp_path / "a.txt", tmp_path / "b.parquet"], tokenizer_dir, str(tmp_path / "o"),
                       progress=False)
    assert stats.documents == 4
    assert len(IndexedDataset(str(tmp_path / "o"))) == 4


def test_bad_line_names_file_and_line_and_writes_nothing(tmp_path, tokenizer_dir):
    source = tmp_path / "bad.jsonl"
    source.write_text('{"text": "ok"}\n{"txt": "wrong key"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: expected a JSON object with a string field 'text'; "
                                          r"found \['txt'\]"):
        preprocess([source], tokenizer_dir, str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out.bin").exists() and not (tmp_path / "out.idx").exists()


def test_unsupported_extension(tmp_path, tokenizer_dir):
    (tmp_path / "x.csv").write_text("text\nhello\n")
    with pytest.raises(ConfigError, match=r"unsupported extension '.csv'"):
        preprocess([tmp_path / "x.csv"], tokenizer_dir, str(tmp_path / "out"), progress=False)
