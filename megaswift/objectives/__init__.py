"""Training objectives: what a micro-batch carries, its loss and reduction, and its metrics (base.py, the
protocol the one training loop runs; pretrain.py, sft.py, dpo.py for `megaswift rlhf` with its reference
log-probs in reference.py), and the preference losses' math (preference_losses.py)."""
from megaswift.objectives.preference_losses import (
    LOSS_TYPES,
    PreferenceLoss,
    PreferenceLossConfig,
    SequenceLogps,
    preference_loss,
    sequence_logps,
    token_logps,
)

__all__ = ["LOSS_TYPES", "PreferenceLoss", "PreferenceLossConfig", "SequenceLogps", "preference_loss",
           "sequence_logps", "token_logps"]
