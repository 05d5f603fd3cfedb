"""Preference losses against TRL 1.16 itself: the same tiny transformers model (fp32), the same pairs.

Per-pair log-probs are compared with DPOTrainer.compute_ref_log_probs (TRL's fused-LM-head forward
over its concatenated [chosen; rejected] batch); every loss type with the function TRL trains it with:
DPOTrainer._compute_loss (sigmoid, robust, hinge, ipo, sigmoid + sft = RPO), CPOTrainer.cpo_loss
(simpo, and cDPO as its label-smoothed sigmoid on the log-ratios), ORPOTrainer.odds_ratio_loss (orpo).
TRL's methods are called unbound on a namespace holding the few attributes they read.
"""
import contextlib
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

trl = pytest.importorskip("trl")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402
from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

from megaswift.objectives import (  # noqa: E402
    LOSS_TYPES,
    PreferenceLossConfig,
    SequenceLogps,
    preference_loss,
    sequence_logps,
    token_logps,
)

VOCAB, PAIRS, TOL = 96, 4, 1e-5


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).float().eval()
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    return model


@pytest.fixture(scope="module")
def batch():
    """TRL's collator over pairs of different prompt / completion lengths: [chosen rows; rejected rows]."""
    g = torch.Generator().manual_seed(1)

    def ids(n):
        return torch.randint(1, VOCAB, (n,), generator=g).tolist()

    examples = [{"prompt_ids": ids(3 + i), "chosen_ids": ids(2 + 2 * i), "rejected_ids": ids(5 - i)}
                for i in range(PAIRS)]
    return DataCollatorForPreference(pad_token_id=0)(examples)


def trl_self(model, **fields):
    """The attributes DPOTrainer._compute_loss / compute_ref_log_probs read."""
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x,
                                  autocast=contextlib.nullcontext)
    defaults = dict(model=model, ref_model=model, accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
                    precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=["sigmoid"],
                    loss_weights=[1.0], beta=0.1, label_smoothing=0.0, use_weighting=False,
                    _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0,
                    _tp_size=1, args=SimpleNamespace(gradient_checkpointing_kwargs=None))
    defaults.update(fields)
    return SimpleNamespace(**defaults)


def our_logps(model, batch) -> SequenceLogps:
    """Our definition on a plain HF forward: token log-probs of the completions, summed per sequence."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["input_ids"][:, 1:].masked_fill(batch["completion_mask"][:, 1:] == 0, -100)
    per_token = token_logps(logits[:, :-1], labels)
    rows = per_token.shape[0]
    pair = torch.arange(rows) % (rows // 2)
    sequence_ids = (2 * pair + (torch.arange(rows) >= rows // 2)).unsqueeze(1).expand_as(per_token)
    return sequence_logps(per_token, batch["completion_mask"][:, 1:].float(), sequence_ids, rows // 2)


@pytest.fixture(scope="module")
def logps(model, batch):
    return our_logps(model, batch)


@pytest.fixture(scope="module")
def reference(logps):
    g = torch.Generator().manual_seed(2)
    shift = torch.randn(2, PAIRS, generator=g)
    return SequenceLogps(logps.chosen + shift[0], logps.rejected + shift[1], logps.chosen_tokens, logps.rejected_tokens)


def test_sequence_logps_equal_trl_forward(model, batch, logps):
    with torch.no_grad():
        trl_chosen, trl_rejected = DPOTrainer.compute_ref_log_probs(trl_self(model), model, batch)
    torch.testing.assert_close(logps.chosen, trl_chosen, atol=TOL, rtol=0)
    torch.testing.assert_close(logps.rejected, trl_rejected, atol=TOL, rtol=0)
    mask = batch["completion_mask"][:, 1:].sum(1).float()
    torch.testing.assert_close(torch.cat([logps.chosen_tokens, logps.rejected_tokens]), mask)


def trl_dpo_loss(model, batch, reference, loss_types, loss_weights, **fields):
    inputs = {**batch, "ref_chosen_logps": reference.chosen, "ref_rejected_logps": reference.rejected}
    owner = trl_self(model, loss_types=loss_types, loss_weights=loss_weights, **fields)
    with torch.no_grad():
        loss = DPOTrainer._compute_loss(owner, model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in owner._metrics["eval"].items()}  # the model is in eval mode


@pytest.mark.parametrize("loss_type,beta,label_smoothing", [
    ("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.0), ("robust", 0.1, 0.2), ("hinge", 0.3, 0.0), ("ipo", 0.1, 0.0),
])
def test_dpo_loss_types_equal_trl(model, batch, logps, reference, loss_type, beta, label_smoothing):
    config = PreferenceLossConfig(loss_type, beta=beta, label_smoothing=label_smoothing)
    ours = preference_loss(config, logps, reference)
    theirs, metrics = trl_dpo_loss(model, batch, reference, [loss_type], [1.0], beta=beta,
                                   label_smoothing=label_smoothing)
    assert abs(ours.loss.item() - theirs.item()) < TOL
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                 "logps/rejected"):
        assert abs(ours.metrics[name].mean().item() - metrics[name]) < TOL, name


def test_rpo_alpha_equals_trl_sigmoid_plus_sft(model, batch, logps, reference):
    """TRL 1.16 spells RPO as loss_type [sigmoid, sft] with weights [1, alpha] (token-mean NLL of chosen)."""
    ours = preference_loss(PreferenceLossConfig("sigmoid", beta=0.1, rpo_alpha=0.7), logps, reference)
    theirs, _ = trl_dpo_loss(model, batch, reference, ["sigmoid", "sft"], [1.0, 0.7], beta=0.1)
    assert abs(ours.loss.item() - theirs.item()) < TOL
    nll = -logps.chosen.sum() / logps.chosen_tokens.sum()
    assert abs(ours.metrics["nll"][0].item() - nll.item()) < TOL and nll > 0


def cpo_self(**fields):
    return SimpleNamespace(accelerator=SimpleNamespace(device=torch.device("cpu")), alpha=0.0, **fields)


def test_cdpo_equals_trl_label_smoothed_sigmoid(logps, reference):
    """cDPO: TRL's label-smoothed sigmoid (CPOTrainer.cpo_loss) on the policy / reference log-ratios."""
    config = PreferenceLossConfig("cdpo", beta=0.2, label_smoothing=0.15)
    ours = preference_loss(config, logps, reference)
    theirs, _, _ = CPOTrainer.cpo_loss(cpo_self(loss_type="sigmoid", beta=0.2, label_smoothing=0.15, simpo_gamma=0),
                                       logps.chosen - reference.chosen, logps.rejected - reference.rejected)
    assert abs(ours.loss.item() - theirs.mean().item()) < TOL
    same = preference_loss(PreferenceLossConfig("sigmoid", beta=0.2, label_smoothing=0.15), logps, reference)
    assert same.loss.item() == ours.loss.item()


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_equals_trl_cpo(logps, label_smoothing):
    config = PreferenceLossConfig("simpo", beta=2.0, simpo_gamma=0.8, label_smoothing=label_smoothing)
    ours = preference_loss(config, logps)
    average = SequenceLogps(logps.chosen / logps.chosen_tokens, logps.rejected / logps.rejected_tokens, None, None)
    theirs, chosen_rewards, _ = CPOTrainer.cpo_loss(
        cpo_self(loss_type="simpo", beta=2.0, label_smoothing=label_smoothing, simpo_gamma=0.8),
        average.chosen, average.rejected)
    assert abs(ours.loss.item() - theirs.mean().item()) < TOL
    torch.testing.assert_close(ours.metrics["rewards/chosen"], chosen_rewards, atol=TOL, rtol=0)


def test_orpo_equals_trl(logps):
    config = PreferenceLossConfig("orpo", beta=0.25)
    ours = preference_loss(config, logps)
    owner = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device=torch.device("cpu")))
    ratio_losses, chosen_rewards, rejected_rewards, _, _ = ORPOTrainer.odds_ratio_loss(
        owner, logps.chosen / logps.chosen_tokens, logps.rejected / logps.rejected_tokens)
    nll = -logps.chosen.sum() / logps.chosen_tokens.sum()  # ORPO's token-mean cross entropy of the chosen
    assert abs(ours.loss.item() - (nll - ratio_losses.mean()).item()) < TOL
    torch.testing.assert_close(ours.metrics["rewards/rejected"], rejected_rewards, atol=TOL, rtol=0)


def test_every_loss_type_is_covered_and_differs():
    """Each loss type listed is tested above against TRL, and each trains a different loss."""
    tested = {"sigmoid", "robust", "hinge", "ipo", "cdpo", "simpo", "orpo"}
    assert set(LOSS_TYPES) == tested
    g = torch.Generator().manual_seed(3)
    policy = SequenceLogps(-torch.rand(3, generator=g) * 5, -torch.rand(3, generator=g) * 5,
                           torch.tensor([3.0, 4, 5]), torch.tensor([2.0, 6, 4]))
    ref = SequenceLogps(policy.chosen - 1, policy.rejected + 0.5, policy.chosen_tokens, policy.rejected_tokens)
    losses = {t: preference_loss(PreferenceLossConfig(t, beta=0.3, label_smoothing=0.1), policy, ref).loss.item()
              for t in LOSS_TYPES if t != "sigmoid"}
    assert len(set(round(v, 6) for v in losses.values())) == len(losses)


def test_policy_equal_to_reference_gives_ln2(model, batch, logps):
    ours = preference_loss(PreferenceLossConfig("sigmoid", beta=0.1), logps, logps)
    assert abs(ours.loss.item() - math.log(2)) < 1e-7
    theirs, _ = trl_dpo_loss(model, batch, logps, ["sigmoid"], [1.0], beta=0.1)
    assert abs(theirs.item() - math.log(2)) < TOL


def test_loss_scale_weights_each_token_log_prob():
    """sum w_i * logp_i and #(w_i > 0) per sequence, against a plain loop; padding (-1) and w = 0 ignored,
    also where an untrained token's log-prob is -inf."""
    g = torch.Generator().manual_seed(4)
    per_token = -torch.rand(2, 7, generator=g) * 3
    per_token[1, 6] = -math.inf
    weights = torch.tensor([[0, 1, 1, 3, 0, 2, 0], [1, 1, 0.5, 0, 1, 2, 0]], dtype=torch.float32)
    ids = torch.tensor([[0, 0, 0, 1, 1, 1, -1], [2, 2, 3, 3, 3, 3, -1]])
    got = sequence_logps(per_token, weights, ids, num_pairs=2)
    sums, counts = [0.0] * 4, [0] * 4
    for row in range(2):
        for i in range(7):
            if ids[row, i] >= 0 and weights[row, i] > 0:
                sums[ids[row, i]] += float(weights[row, i] * per_token[row, i])
                counts[ids[row, i]] += 1
    torch.testing.assert_close(torch.stack([got.chosen, got.rejected], 1).reshape(-1), torch.tensor(sums))
    assert torch.stack([got.chosen_tokens, got.rejected_tokens], 1).reshape(-1).tolist() == counts


def test_gradients_flow_to_the_policy_only():
    policy_logps = torch.tensor([-3.0, -2.0, -4.0, -1.0], requires_grad=True)
    per_token = policy_logps.unsqueeze(0)
    logps = sequence_logps(per_token, torch.ones(1, 4), torch.tensor([[0, 1, 2, 3]]), num_pairs=2)
    ref = SequenceLogps(torch.tensor([-3.0, -4.0]), torch.tensor([-2.0, -1.0]), logps.chosen_tokens,
                        logps.rejected_tokens)
    preference_loss(PreferenceLossConfig("sigmoid"), logps, ref).loss.backward()
    grad = policy_logps.grad
    assert grad[0] < 0 and grad[2] < 0 and grad[1] > 0 and grad[3] > 0  # raise chosen, lower rejected


@pytest.mark.parametrize("bad,match", [
    (dict(loss_type="kto"), r"expected one of \['sigmoid', 'cdpo', 'robust', 'hinge', 'ipo', 'simpo', 'orpo'\]"),
    (dict(beta=0.0), "beta: expected > 0"),
    (dict(label_smoothing=0.5), r"label_smoothing: expected in \[0, 0.5\)"),
    (dict(rpo_alpha=-1.0), "rpo_alpha: expected >= 0"),
])
def test_bad_settings_are_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        PreferenceLossConfig(**bad)


def test_dpo_without_reference_is_an_error(logps):
    with pytest.raises(ValueError, match="needs reference log-probs"):
        preference_loss(PreferenceLossConfig("sigmoid"), logps)


def test_mismatched_shapes_are_an_error():
    with pytest.raises(ValueError, match=r"of one shape, found \(2, 3\), \(2, 4\), \(2, 3\)"):
        sequence_logps(torch.zeros(2, 3), torch.ones(2, 4), torch.zeros(2, 3, dtype=torch.long), num_pairs=1)
