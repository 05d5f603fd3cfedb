"""Training objectives' math, independent of the training loop (which wires them in)."""
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
