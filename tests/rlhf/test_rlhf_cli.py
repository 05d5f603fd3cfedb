"""`megaswift rlhf`'s settings: YAML equals flags, and bad preference rows stop it naming file and line
(skipped and counted only with --data.skip_bad_rows). In-process: nothing here trains."""
import json

import pytest

from megaswift.cli.main import main, parse_command_line

ROW = {"prompt": "What comes after alpha?", "chosen": "After alpha comes beta.", "rejected": "It is pi."}
BAD = {  # kind -> (row, what the message says was expected)
    "no rejected answer": ({"prompt": "Hi?", "chosen": "Hello."}, "a rejected answer is required"),
    "chosen == rejected": ({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Hello."},
                           "a rejected answer that differs from the chosen one"),
    "empty response": ({"prompt": "Hi?", "chosen": " ", "rejected": "No."}, "a non-empty chosen response"),
}


def _flags(data, tokenizer, out, *extra) -> list[str]:
    return ["rlhf", "--data.datasets", str(data), "--data.tokenizer", str(tokenizer), "--data.seq_length", "128",
            "--logging.output_dir", str(out), *extra]


@pytest.mark.parametrize("kind", list(BAD))
def test_a_bad_row_stops_the_run_naming_file_and_line_unless_skipped(kind, tiny_tokenizer_dir, tmp_path, capsys):
    from megaswift.cli import rlhf
    row, expected = BAD[kind]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [ROW, ROW, row, ROW]))
    assert main(_flags(data, tiny_tokenizer_dir, tmp_path / "out")) == 2
    error = capsys.readouterr().err
    assert "megaswift rlhf: error:" in error and "prefs.jsonl:3: expected " in error and expected in error, error
    _, trainer = rlhf.prepare(parse_command_line(_flags(data, tiny_tokenizer_dir, tmp_path / "out",
                                                        "--data.skip_bad_rows")))
    source = trainer.prepare_data()
    train, _ = source.split_rows()
    assert len(train.lengths) == 3 and source.stats["dropped"]["bad_row"] == 1
    assert "3/4 pairs kept (dropped: bad_row 1" in capsys.readouterr().err


def test_yaml_equals_flags(tiny_tokenizer_dir, tmp_path):
    from megaswift.cli import rlhf
    from megaswift.config import config_to_dict
    data = tmp_path / "prefs.jsonl"
    data.write_text(json.dumps(ROW) + "\n")
    settings = {"rlhf": {"type": "dpo", "loss": "ipo", "beta": 0.3, "rpo_alpha": 0.2, "reference": "precomputed"},
                "data": {"datasets": [str(data)], "tokenizer": str(tiny_tokenizer_dir), "packing": True,
                         "seq_length": 128}, "train": {"micro_batch_size": 1, "global_batch_size": 4},
                "logging": {"output_dir": str(tmp_path / "out")}}
    import yaml
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(settings))
    from_yaml, _ = rlhf.prepare(parse_command_line(["rlhf", "--config", str(tmp_path / "run.yaml")]))
    flags = []
    for section, values in settings.items():
        for key, value in values.items():
            flags += [f"--{section}.{key}", *(map(str, value) if isinstance(value, list) else [str(value).lower()
                                                                                          if isinstance(value, bool)
                                                                                          else str(value)])]
    from_flags, _ = rlhf.prepare(parse_command_line(["rlhf", *flags]))
    assert config_to_dict(from_yaml) == config_to_dict(from_flags)
    assert from_flags.rlhf.loss == "ipo" and from_flags.rlhf.reference == "precomputed"


def test_an_unknown_loss_type_is_refused_before_training(tiny_tokenizer_dir, tmp_path, capsys):
    data = tmp_path / "prefs.jsonl"
    data.write_text(json.dumps(ROW) + "\n")
    assert main(_flags(data, tiny_tokenizer_dir, tmp_path / "out", "--rlhf.loss", "kto")) == 2
    assert "rlhf.loss: expected one of ['sigmoid', 'cdpo', 'robust', 'hinge', 'ipo'] with rlhf.type dpo, found 'kto'" \
        in capsys.readouterr().err


def test_token_ids_beyond_the_model_vocabulary_are_refused(tiny_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    from megaswift.config import ConfigError, SFTDataConfig
    from megaswift.data.rlhf.training_source import PairData
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [ROW, {**ROW, "chosen": "Zebra quokka xylophone."}]))
    config = SFTDataConfig(datasets=[str(data)], tokenizer=str(tiny_tokenizer_dir), seq_length=128)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    source = lambda vocab: PairData(config, tokenizer, 0, 1, model_vocab_size=vocab)  # seed 0, micro-batch 1
    pairs = source(None).split_rows()[0].dataset
    largest = max(max(row[f"{side}_input_ids"]) for row in pairs for side in ("chosen", "rejected"))
    with pytest.raises(ConfigError, match=rf"rlhf data: the tokenizer .* gives token id {largest} \(in {data}\), but "
                                          rf"the model's vocabulary has {largest} ids"):
        source(largest).split_rows()
    source(largest + 1).split_rows()
