"""The token cross-entropy objective that pre-training and SFT share: loss = sum(w * ce) / label tokens
over the whole global batch (megaswift/train/forward_step.py); they differ only in their data."""
from megaswift.objectives.base import RunPlan, micro_batch_shape
from megaswift.train.forward_step import TOKEN_TOTALS, make_forward_step


class TokenLossObjective:
    """An `Objective` without its data source (pretrain.py and sft.py add theirs)."""
    name = "token loss"
    totals = TOKEN_TOTALS

    def micro_batch_shape(self, plan: RunPlan) -> tuple[int, int]:
        return micro_batch_shape(plan)

    def forward_step(self, plan: RunPlan):
        return make_forward_step(plan.config.train.fused_loss, plan.hf["vocab_size"])

    def step_metrics(self, totals: dict[str, float]) -> dict[str, float]:
        # max(.., 1): a step whose every token is masked has loss 0, not 0/0 (as megatron-core clamps)
        return {"loss": totals["loss_sum"] / max(totals["tokens"], 1.0)}
