"""`check_data_paths(config)`: the data files a run names exist, checked before the model is built, so
that a mistyped path is one line of error instead of a traceback after minutes of model loading.

Pre-training (`data.paths`): every prefix has its .bin and .idx. Fine-tuning (`data.datasets`): every
dataset that is meant as a local path (starts with . / ~ or ends in .jsonl/.json/.csv/.parquet) exists,
and a custom loss-scale config file exists; hub names are left to the loader.
"""
from __future__ import annotations

import os
from pathlib import Path

from megaswift.config import ConfigError


def check_data_paths(config) -> None:
    """ConfigError naming the first missing data file of a pt or sft run config."""
    data = config.data
    if hasattr(data, "datasets"):
        check_sft_paths(data.datasets, data.loss_scale)
    else:
        from megaswift.data.pretrain import parse_blend
        parse_blend(data.paths)


def check_sft_paths(specs: list[str], loss_scale: str = "default") -> None:
    from megaswift.data.sft.loss_scale import loss_scale_path
    from megaswift.data.sft.sources import DatasetSpec, looks_local
    if not specs:
        raise ConfigError("data.datasets is empty: give one or more chat datasets (jsonl, json, csv, parquet)")
    for text in specs:
        where = DatasetSpec.parse(text).location
        if not Path(os.path.expanduser(where)).exists() and looks_local(where):
            raise ConfigError(f"data.datasets: {where} does not exist (expected a jsonl/json/csv/parquet file or "
                              f"a folder saved with datasets' save_to_disk)")
    try:
        loss_scale_path(loss_scale)
    except ValueError as err:
        raise ConfigError(f"data.loss_scale: {err}") from None
