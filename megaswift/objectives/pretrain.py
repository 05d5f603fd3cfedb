"""`megaswift pt`'s objective: the token loss over Megatron indexed datasets (megaswift/data/pretrain.py)."""
from megaswift.objectives.base import RunPlan
from megaswift.objectives.token_loss import TokenLossObjective


class PretrainObjective(TokenLossObjective):
    name = "pt"

    def data_source(self, plan: RunPlan):
        from megaswift.data.pretrain import PretrainData, token_ids_from_tokenizer
        data, t = plan.config.data, plan.config.train
        # evaluation reads eval_iters micro-batches per data-parallel rank, always from the split's start
        valid_samples = t.eval_iters * t.micro_batch_size * plan.dp_size if t.eval_interval else 0
        return PretrainData(data, token_ids_from_tokenizer(data.tokenizer, plan.hf["vocab_size"]), t.seed,
                            t.micro_batch_size, plan.train_samples, valid_samples)
