"""Pre-training data: megatron-core's blended GPT datasets over indexed (.bin/.idx) files, cut into
micro-batches per data-parallel rank (see micro_batches.py for the sample order, which makes resumes and
layout changes reproducible). The files, split sizes and token ids are checked when the data source is
made, before any model is built (indexed_checks.py)."""
from dataclasses import dataclass
from pathlib import Path

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from megaswift.config import ConfigError, DataConfig
from megaswift.data.indexed_checks import check_split_sizes, check_token_ids
from megaswift.data.micro_batches import SplitIterators


@dataclass(frozen=True)
class TokenIds:
    """The token facts megatron-core's GPT dataset needs (it reads .eod, .pad and .vocab_size), and the
    model's true vocabulary size, which every token id of the data must stay below."""
    eod: int
    pad: int
    vocab_size: int
    model_vocab_size: int | None = None  # not part of the cache key: it does not change the samples

    @property
    def unique_identifiers(self) -> dict:  # part of megatron-core's dataset cache key
        return {"class": "TokenIds", "eod": self.eod, "pad": self.pad, "vocab_size": self.vocab_size}


def token_ids_from_tokenizer(tokenizer_dir: str | None, model_vocab_size: int) -> TokenIds:
    if tokenizer_dir is None:
        return TokenIds(eod=0, pad=-1, vocab_size=model_vocab_size, model_vocab_size=model_vocab_size)
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if len(tokenizer) > model_vocab_size:
        raise ConfigError(f"data.tokenizer {tokenizer_dir} has {len(tokenizer)} tokens, more than the model's "
                          f"vocab_size={model_vocab_size}")
    eod = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return TokenIds(eod=eod, pad=-1, vocab_size=len(tokenizer), model_vocab_size=model_vocab_size)


def parse_blend(paths: list[str]) -> tuple[list[str], list[float] | None]:
    """`a b` -> equal weights; `0.7 a 0.3 b` -> weighted. Checks each prefix has its .bin and .idx."""
    if not paths:
        raise ConfigError("data.paths is empty: give one or more indexed dataset prefixes "
                          "(made by `megaswift preprocess`)")
    weighted = len(paths) % 2 == 0 and all(_is_number(p) for p in paths[0::2])
    prefixes = paths[1::2] if weighted else paths
    weights = [float(w) for w in paths[0::2]] if weighted else None
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            if not Path(prefix + suffix).is_file():
                raise ConfigError(f"data.paths: {prefix + suffix} does not exist (expected an indexed dataset "
                                  f"prefix with .bin and .idx files, e.g. from `megaswift preprocess`)")
    return prefixes, weights


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def build_gpt_datasets(data: DataConfig, tokens: TokenIds, seed: int, num_samples: tuple[int, int, int]):
    """Returns (train, valid, test) datasets; valid/test may be None when their split is 0."""
    prefixes, weights = parse_blend(data.paths)
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=data.seq_length, blend=(prefixes, weights), split=data.split,
        path_to_cache=data.cache_dir, tokenizer=tokens, reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, create_attention_mask=False, mid_level_dataset_surplus=0.005)
    # Every rank builds (and reads) the index files; megatron-core caches them on first build.
    return BlendedMegatronDatasetBuilder(GPTDataset, list(num_samples), lambda: True, config).build()


class PretrainData(SplitIterators):
    """The `DataSource` of `megaswift pt`: indexed datasets, built once on first use."""

    def __init__(self, data: DataConfig, tokens: TokenIds, seed: int, micro_batch_size: int,
                 train_samples: int, valid_samples: int):
        self.data, self.tokens, self.seed, self.micro = data, tokens, seed, micro_batch_size
        self.sizes = (train_samples, valid_samples, 0)
        self._datasets = None
        prefixes, _ = parse_blend(data.paths)
        check_split_sizes(prefixes, data.split, data.seq_length, valid_used=valid_samples > 0)
        if tokens.model_vocab_size is not None:
            cache = Path(data.cache_dir) / "max_token_id" if data.cache_dir else None
            check_token_ids(prefixes, tokens.model_vocab_size, cache)

    def _splits(self):
        if self._datasets is None:
            self._datasets = build_gpt_datasets(self.data, self.tokens, self.seed, self.sizes)
        return self._datasets
