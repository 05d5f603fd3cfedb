"""`megaswift sft`'s objective: the token loss (loss_mask x loss_scale weights) over preprocessed chat rows,
packed or padded (megaswift/data/sft/training_source.py)."""
from megaswift.objectives.base import RunPlan
from megaswift.objectives.token_loss import TokenLossObjective


class SFTObjective(TokenLossObjective):
    name = "sft"

    def data_source(self, plan: RunPlan):
        from transformers import AutoTokenizer

        from megaswift.data.sft.training_source import SFTData
        data, t = plan.config.data, plan.config.train
        # data.tokenizer is resolved by then (cli/sft.py: the flag, else the checkpoint's hf_assets/)
        return SFTData(data, AutoTokenizer.from_pretrained(data.tokenizer), t.seed, t.micro_batch_size,
                       plan.packed_attention or "mask", model_vocab_size=plan.hf["vocab_size"])
