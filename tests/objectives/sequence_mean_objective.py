"""An objective that is neither pt's nor sft's, trained by the one loop: `megaswift pt`'s data and model,
but the loss is the mean over SEQUENCES of each sequence's mean token cross entropy, reduced over
sequences (not tokens), with extra metrics. Run it like `python -m megaswift pt`: the flags are the same.

With every label token trained and all sequences seq_length long (pre-training data), it is exactly pt's
token-mean loss, gradients included, so its losses must equal pt's step for step."""
import sys

import torch

from megaswift.objectives.base import micro_batch_shape, totals_record
from megaswift.objectives.pretrain import PretrainObjective
from megaswift.train.forward_step import batch_to_device


class SequenceMeanObjective:
    name = "sequence-mean"
    totals = ("loss_sum", "sequences", "tokens")

    def data_source(self, plan):
        return PretrainObjective().data_source(plan)

    def micro_batch_shape(self, plan):
        return micro_batch_shape(plan)

    def forward_step(self, plan):
        def loss_func(batch, output):
            mask = batch["loss_mask"].float()
            tokens = mask.sum(-1)
            per_sequence = (output.float() * mask).sum(-1) / tokens.clamp(min=1)
            sequences = torch.tensor(per_sequence.numel(), dtype=torch.int)
            # megatron-core divides the gradients by the step's total count: here, its sequences
            return per_sequence.sum(), sequences, totals_record(self, loss_sum=per_sequence.sum(),
                                                                sequences=sequences, tokens=tokens.sum())

        def forward_step(data_iterator, model):
            batch = batch_to_device(next(data_iterator))
            output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"])
            return output, lambda output: loss_func(batch, output)
        return forward_step

    def step_metrics(self, totals):
        return {"loss": totals["loss_sum"] / max(totals["sequences"], 1.0), "sequences": totals["sequences"],
                "tokens_per_sequence": totals["tokens"] / max(totals["sequences"], 1.0)}


def main(argv: list[str]) -> int:
    from megaswift.cli.main import parse_command_line
    from megaswift.cli.run_config import build_run_config
    from megaswift.config import PretrainConfig
    from megaswift.train.trainer import Trainer
    config = build_run_config(PretrainConfig, parse_command_line(["pt", *argv]))
    Trainer(config, SequenceMeanObjective()).run()
    # A library caller of Trainer gets its process back unpatched (the test reads this exit code).
    from megaswift.platform.cpu import applied_patches
    return 3 if applied_patches() else 0


if __name__ == "__main__":  # dist_checkpointing's writer process re-imports __main__
    sys.exit(main(sys.argv[1:]))
