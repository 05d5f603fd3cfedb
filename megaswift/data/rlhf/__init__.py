"""Preference (RLHF) data: raw preference rows -> rows of whole chosen / rejected pairs.

Pipeline (one module per stage; sources, conversation normalising, chat template, loss_on and loss
scale are sft's, see megaswift/data/sft/):
    formats.py     detect_pair_format(row, where); normalise_pair(row, format, where) -> the standard
                   {"prompt": [...], "chosen": [...], "rejected": [...], "tools"} (TRL prompt/chosen/rejected,
                   messages + rejected_messages, sft formats + rejected_response)
    template.py    PairTemplate(SFTTemplate(...)).encode(pair) -> EncodedPair (chosen, rejected: sft samples
                   sharing the prompt tokens; a pair longer than max_length dropped or truncated)
    preprocess.py  preprocess_pairs(SFTDataSettings(...), tokenizer) -> dataset + stats
    packing.py     PairRowsDataset(dataset, seq_length, pad_id, packing) + collate_pairs: a pair is never
                   split; every sequence is its own attention segment; sequence_ids for the objective
"""
from megaswift.data.rlhf.formats import detect_pair_format, normalise_pair
from megaswift.data.rlhf.packing import PairRowsDataset, collate_pairs
from megaswift.data.rlhf.preprocess import PreprocessedPairs, preprocess_pairs
from megaswift.data.rlhf.template import EncodedPair, PairTemplate

__all__ = ["EncodedPair", "PairRowsDataset", "PairTemplate", "PreprocessedPairs", "collate_pairs",
           "detect_pair_format", "normalise_pair", "preprocess_pairs"]
