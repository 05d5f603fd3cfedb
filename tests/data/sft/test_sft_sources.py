"""Loading jsonl/json/csv/parquet/save_to_disk folders, line numbers, path#N sampling, mixing, hub errors."""
import collections
import csv
import json

import datasets
import pytest

from megaswift.data.sft.formats import SampleFormatError
from megaswift.data.sft.sources import DatasetSpec, load_source, mix_sources, read_rows

ROWS = [{"instruction": f"task {i}", "input": "", "output": f"answer {i}"} for i in range(12)]


def _write(tmp_path, kind):
    path = tmp_path / f"rows.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif kind == "json":
        path.write_text(json.dumps(ROWS, indent=2))
    elif kind == "csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(ROWS[0]))
            writer.writeheader()
            writer.writerows(ROWS)
    elif kind == "parquet":
        datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    else:
        path = tmp_path / "saved"
        datasets.Dataset.from_list(ROWS).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet", "saved"])
def test_every_local_kind_loads_the_same_rows(tmp_path, kind):
    ds = read_rows(str(_write(tmp_path, kind)))
    got = [json.loads(r) for r in ds["raw"]]
    # CSV leaves empty cells out (it cannot tell empty from absent)
    expected = [{k: v for k, v in r.items() if v != "" or kind != "csv"} for r in ROWS]
    assert got == expected


def test_line_numbers_point_at_the_row_in_the_file(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert read_rows(str(jsonl))["line"][:] == [1, 3]
    arr = tmp_path / "a.json"
    arr.write_text('[\n  {"a": 1},\n  {"a":\n   2}, {"a": 3}\n]')
    assert read_rows(str(arr))["line"][:] == [2, 3, 4]
    table = tmp_path / "a.csv"
    table.write_text('query,response\n"multi\nline",x\nq,r\n')
    assert read_rows(str(table))["line"][:] == [2, 4]


def test_invalid_json_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n{"a": 2,,}\n')
    with pytest.raises(SampleFormatError, match=r"bad.jsonl:2: expected one JSON object per line, found invalid JSON"):
        read_rows(str(path))


def test_spec_parsing():
    assert DatasetSpec.parse("data/x.jsonl#500") == DatasetSpec("data/x.jsonl", 500)
    assert DatasetSpec.parse("org/name") == DatasetSpec("org/name", None)
    assert DatasetSpec.parse("x.jsonl#tag") == DatasetSpec("x.jsonl#tag", None)


def test_sampling_fewer_rows_is_a_seeded_subset(tmp_path):
    path = _write(tmp_path, "jsonl")
    a = list(load_source(f"{path}#5", seed=1)["raw"])
    assert len(a) == 5 and len(set(a)) == 5 and set(a) <= set(read_rows(str(path))["raw"])
    assert list(load_source(f"{path}#5", seed=1)["raw"]) == a


def test_sampling_more_rows_repeats_the_dataset(tmp_path):
    path = _write(tmp_path, "jsonl")
    counts = collections.Counter(load_source(f"{path}#30", seed=0)["raw"])
    assert sum(counts.values()) == 30 and len(counts) == len(ROWS)
    assert sorted(set(counts.values())) == [2, 3]  # 30 = 2 full copies + 6 more


def test_mixing_keeps_every_row_and_is_deterministic(tmp_path):
    (tmp_path / "b").mkdir()
    a, b = read_rows(str(_write(tmp_path, "jsonl"))), read_rows(str(_write(tmp_path / "b", "json")))
    mixed = mix_sources([a, b], seed=3)
    appended = list(a["origin"]) + list(b["origin"])
    assert sorted(mixed["origin"]) == sorted(appended)
    assert list(mixed["raw"]) == list(mix_sources([a, b], seed=3)["raw"])
    assert list(mixed["origin"]) != appended  # shuffled together, not appended


def test_missing_local_file_and_unreachable_hub_give_clear_errors(monkeypatch):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_source("./nope.jsonl")
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=r"'some-org/some-set'.*hub is not reachable \(HF_HUB_OFFLINE"):
        load_source("some-org/some-set")
