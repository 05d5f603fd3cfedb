"""The rlhf objective's forward step against TRL 1.16 on the same weights and pairs (one process, fp32).

megatron-core runs the model converted from a tiny transformers Llama; TRL runs the transformers model.
The pairs are megaswift's own training rows (packed: several pairs per row, each sequence its own
segment), cut back into TRL's prompt / chosen / rejected token lists. Checked: the per-pair log-probs
(megatron-core's vocab-parallel cross entropy and the fused kernel), and the loss the trainer would train
(the loss function's sum / count, and step_metrics' loss) for every loss type, each with the function
TRL trains that type with.
"""
import math

import pytest
import torch

trl = pytest.importorskip("trl")
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402
from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

from megaswift.config import ConfigError  # noqa: E402
from megaswift.config.sections import RLHFConfig  # noqa: E402
from megaswift.objectives.base import TOTALS  # noqa: E402
from megaswift.objectives.dpo import PreferenceObjective, batch_logps  # noqa: E402
from megaswift.train.forward_step import model_forward  # noqa: E402
from megaswift.objectives.preference_losses import SequenceLogps  # noqa: E402
from tests.objectives.test_preference_losses import cpo_self, trl_dpo_loss, trl_self  # noqa: E402
from tests.rlhf.trl_pairs import trl_examples  # noqa: E402

TOL = 1e-5


@pytest.fixture(scope="module")
def megatron_outputs(rlhf_models, pairs_batch):
    """(per-token CE output, logits output) of megatron-core on the packed micro-batch."""
    from megatron.core import dist_checkpointing

    from converters.process_group import single_process_model_parallel
    from megaswift.config import ParallelConfig
    from megaswift.models import hf_to_transformer_config
    from megaswift.models.builder import build_model_chunks
    from megaswift.models.families import preset_hf_config
    from tests.rlhf.conftest import MODELS
    preset, overrides = MODELS["llama"]
    hf = {**preset_hf_config(preset), **overrides}
    _, mcore_dir = rlhf_models("llama")
    with single_process_model_parallel():
        config = hf_to_transformer_config(hf, ParallelConfig(), params_dtype=torch.float32)
        config.perform_initialization = False
        (model,) = build_model_chunks(hf, config, "local")
        iteration = next(mcore_dir.glob("iter_*"))
        model.load_state_dict(dist_checkpointing.load({"model": model.sharded_state_dict()}, str(iteration))["model"])
        model.eval()
        with torch.no_grad():
            ce = model_forward(model, pairs_batch, use_fused_loss=False)
            logits = model_forward(model, pairs_batch, use_fused_loss=True)
            fused = batch_logps(pairs_batch, logits, True, hf["vocab_size"])
    return hf, ce, fused


@pytest.fixture(scope="module")
def hf_side(rlhf_models, pairs_batch):
    from transformers import AutoModelForCausalLM
    hf_dir, _ = rlhf_models("llama")
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="eager").eval()
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    trl_batch = DataCollatorForPreference(pad_token_id=0)(trl_examples(pairs_batch))
    with torch.no_grad():
        chosen, rejected = DPOTrainer.compute_ref_log_probs(trl_self(model), model, trl_batch)
    tokens = trl_batch["completion_mask"][:, 1:].sum(1).float()
    pairs = len(chosen)
    return model, trl_batch, SequenceLogps(chosen, rejected, tokens[:pairs], tokens[pairs:])


def our_loss(hf, ce, batch, reference, **settings):
    """The loss the trainer trains from this micro-batch (loss sum / count) and the one it reports."""
    objective = PreferenceObjective(RLHFConfig(**settings))
    original = dict(batch)
    original["reference_logps"] = torch.stack([reference.chosen, reference.rejected])
    chosen_tokens = sum(int(t) for t in batch_logps(batch, ce, False, None).chosen_tokens)
    original["nll_scale"] = int(batch["num_pairs"]) / chosen_tokens  # prepare_step's, for a one-micro-batch step
    loss, count, record = objective._loss_func(original, batch, False, hf["vocab_size"], ce)
    reported = objective.step_metrics(dict(zip(objective.totals, record[TOTALS].tolist())))
    return float(loss / count), reported


def test_per_pair_logps_equal_trl(pairs_batch, megatron_outputs, hf_side):
    hf, ce, fused = megatron_outputs
    ours = batch_logps(pairs_batch, ce, False, hf["vocab_size"])
    theirs = hf_side[2]
    for name in ("chosen", "rejected", "chosen_tokens", "rejected_tokens"):
        # sums of ~40 fp32 log-probs around -2.5: 1e-5 absolute or 1e-6 relative, whichever is larger
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), atol=TOL, rtol=1e-6)
        torch.testing.assert_close(getattr(fused, name), getattr(theirs, name), atol=TOL, rtol=1e-6)


CASES = [  # (rlhf settings, how TRL trains it)
    ({"loss": "sigmoid", "beta": 0.1}, ("dpo", ["sigmoid"], [1.0])),
    ({"loss": "robust", "beta": 0.2, "label_smoothing": 0.15}, ("dpo", ["robust"], [1.0])),
    ({"loss": "hinge", "beta": 0.3}, ("dpo", ["hinge"], [1.0])),
    ({"loss": "ipo", "beta": 0.1}, ("dpo", ["ipo"], [1.0])),
    ({"loss": "sigmoid", "beta": 0.1, "rpo_alpha": 0.7}, ("dpo", ["sigmoid", "sft"], [1.0, 0.7])),
    ({"loss": "cdpo", "beta": 0.2, "label_smoothing": 0.1}, ("cpo", "sigmoid")),
    ({"type": "simpo", "beta": 2.0, "simpo_gamma": 0.8}, ("cpo", "simpo")),
    ({"type": "orpo", "beta": 0.25}, ("orpo",)),
]


def trl_loss(hf_side, reference, settings: dict, how) -> float:
    model, trl_batch, logps = hf_side
    beta, eps = settings["beta"], settings.get("label_smoothing", 0.0)
    if how[0] == "dpo":
        return float(trl_dpo_loss(model, trl_batch, reference, how[1], how[2], beta=beta, label_smoothing=eps)[0])
    chosen_avg, rejected_avg = logps.chosen / logps.chosen_tokens, logps.rejected / logps.rejected_tokens
    if how[0] == "cpo" and how[1] == "simpo":
        owner = cpo_self(loss_type="simpo", beta=beta, label_smoothing=eps, simpo_gamma=settings["simpo_gamma"])
        return float(CPOTrainer.cpo_loss(owner, chosen_avg, rejected_avg)[0].mean())
    if how[0] == "cpo":  # cDPO: the label-smoothed sigmoid on the policy / reference log-ratios
        owner = cpo_self(loss_type="sigmoid", beta=beta, label_smoothing=eps, simpo_gamma=0)
        return float(CPOTrainer.cpo_loss(owner, logps.chosen - reference.chosen,
                                         logps.rejected - reference.rejected)[0].mean())
    owner = type("Owner", (), {"beta": beta, "accelerator": type("A", (), {"device": torch.device("cpu")})})()
    ratio = ORPOTrainer.odds_ratio_loss(owner, chosen_avg, rejected_avg)[0]
    nll = -logps.chosen.sum() / logps.chosen_tokens.sum()
    return float(nll - ratio.mean())


@pytest.mark.parametrize("settings,how", CASES, ids=[str(c[0]) for c in CASES])
def test_every_loss_type_trains_trls_loss(pairs_batch, megatron_outputs, hf_side, settings, how):
    hf, ce, _ = megatron_outputs
    logps = hf_side[2]
    g = torch.Generator().manual_seed(5)
    shift = torch.randn(2, len(logps.chosen), generator=g)
    reference = SequenceLogps(logps.chosen + shift[0], logps.rejected + shift[1], logps.chosen_tokens,
                              logps.rejected_tokens)
    trained, reported = our_loss(hf, ce, pairs_batch, reference, **settings)
    expected = trl_loss(hf_side, reference, settings, how)
    assert trained == pytest.approx(expected, abs=TOL), (settings, trained, expected)
    assert reported["loss"] == pytest.approx(expected, abs=TOL)


def test_policy_equal_to_reference_gives_ln2(pairs_batch, megatron_outputs):
    hf, ce, _ = megatron_outputs
    same = batch_logps(pairs_batch, ce, False, None)
    trained, reported = our_loss(hf, ce, pairs_batch, same, loss="sigmoid", beta=0.1)
    assert trained == pytest.approx(math.log(2), abs=1e-7) and reported["rewards/margins"] == 0.0


@pytest.mark.parametrize("settings,message", [
    ({"type": "kto"}, "rlhf.type: expected one of ['dpo', 'simpo', 'orpo'], found 'kto'"),
    ({"loss": "nca_pair"}, "expected one of ['sigmoid', 'cdpo', 'robust', 'hinge', 'ipo']"),
    ({"loss": "orpo"}, "use --rlhf.type orpo"),
    ({"reference": "ema"}, "rlhf.reference: expected one of ['model', 'precomputed', 'adapters']"),
    ({"beta": 0.0}, "beta: expected > 0"),
])
def test_unknown_settings_are_errors_listing_the_valid_ones(settings, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        PreferenceObjective(RLHFConfig(**settings))
