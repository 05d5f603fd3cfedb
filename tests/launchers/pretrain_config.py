"""A tiny CPU `megaswift pt` run (the embedded demo data, the tiny preset) as a YAML file, for launch tests."""
import json
from pathlib import Path

import yaml


def write_pretrain_config(folder: Path, demo_data, train_iters: int, save: bool) -> Path:
    """`demo_data` is what megaswift.data.demo.prepare_demo_data returns: (tokenizer folder, dataset prefix)."""
    tokenizer, prefix = demo_data
    config = {"data": {"paths": [str(prefix)], "tokenizer": str(tokenizer)},
              "train": {"train_iters": train_iters, "global_batch_size": 4, "micro_batch_size": 2},
              "logging": {"output_dir": str(folder / "run"), "progress_bar": False, "tensorboard": False}}
    if save:
        config["checkpoint"] = {"save": str(folder / "ckpt"), "save_interval": 0}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def metrics(folder: Path) -> list[dict]:
    path = folder / "run" / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if '"step"' in line]
