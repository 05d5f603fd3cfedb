"""Training objectives: what a micro-batch carries, its loss and reduction, and its metrics (base.py, the
protocol the one training loop runs; pretrain.py, sft.py), and the preference losses' math
(preference_losses.py, not yet wired into a `megaswift rlhf`)."""
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
