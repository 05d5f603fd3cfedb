"""`megaswift rlhf` trains what TRL trains, and every reference source and row layout trains the same.

Runs start from a tiny transformers Llama converted with hf2mcore (fp32, one process). One step is one
epoch of the 8 pairs, so every layout of rows trains the same pairs at every step.
    model   --rlhf.reference model (frozen copy), one pair per row, sigmoid + rpo_alpha: each of 4 steps'
            loss and gradient norm equal a plain transformers + torch AdamW loop whose loss is TRL's
            DPOTrainer._compute_loss (loss types [sigmoid, sft], weights [1, alpha]) on the same pairs,
            with TRL's reference log-probs (DPOTrainer.compute_ref_log_probs of the starting model);
            at step 1 (policy = reference) the DPO part of the loss is ln 2.
    packed  --rlhf.reference precomputed, --data.packing (several pairs per row, another micro-batch
            size), stopped after 2 steps and resumed: the same losses (the table is written to the run's
            folder once and read back on resume).
    sigterm the `model` run's settings, SIGTERM after its first logged step: it finishes the step, saves it,
            exits 0; the same command resumes, and every step equals the uninterrupted `model` run bit for bit.
Several 2-process layouts (TP+SP, PP, PP x VPP, EP, LoRA) run in one torchrun launch (layouts_worker.py).
"""
import json
import math
import signal
import subprocess
import sys

import pytest
import torch

trl = pytest.importorskip("trl")
from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

from tests.objectives.test_preference_losses import trl_self  # noqa: E402
from tests.rlhf.conftest import PACKED_SEQ  # noqa: E402
from tests.rlhf.trl_pairs import trl_examples  # noqa: E402
from tests.torchrun import child_env  # noqa: E402
from tests.train.hf_reference import AdamWSettings, adamw_for  # noqa: E402
from tests.train.runner import run_pt  # noqa: E402
from tests.train.runner import steps_logged, wait_for  # noqa: E402

STEPS, PAIRS, ALPHA, BETA = 4, 8, 0.5, 0.1
ADAMW = AdamWSettings(lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, clip_grad=1.0)
RLHF = ("-m", "megaswift", "rlhf")


def flags(mcore_dir, prefs, tokenizer, out, **settings) -> list[str]:
    values = {"rlhf.type": "dpo", "rlhf.loss": "sigmoid", "rlhf.beta": BETA, "rlhf.rpo_alpha": ALPHA,
              "checkpoint.load": mcore_dir, "checkpoint.finetune": "true", "data.datasets": prefs,
              "data.tokenizer": tokenizer, "data.loss_on": "last_round", "train.train_iters": STEPS,
              "train.precision": "fp32", **ADAMW.flags(), "logging.output_dir": out,
              "logging.progress_bar": "false", "logging.tensorboard": "false", **settings}
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


def records(out) -> dict[int, dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}


def trl_loop(hf_dir, pairs_batch, steps: int = STEPS) -> list[tuple[float, float]]:
    """(loss, grad norm) of each step of a plain loop: transformers model, TRL's loss, torch AdamW."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="eager")
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    batch = DataCollatorForPreference(pad_token_id=0)(trl_examples(pairs_batch))
    with torch.no_grad():
        model.eval()
        ref_chosen, ref_rejected = DPOTrainer.compute_ref_log_probs(trl_self(model), model, batch)
    model.train()
    optimizer = adamw_for(model, ADAMW)
    owner = trl_self(model, loss_types=["sigmoid", "sft"], loss_weights=[1.0, ALPHA], beta=BETA)
    results = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = DPOTrainer._compute_loss(owner, model, {**batch, "ref_chosen_logps": ref_chosen,
                                                       "ref_rejected_logps": ref_rejected}, return_outputs=False)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], ADAMW.clip_grad)
        optimizer.step()
        results.append((float(loss), float(norm)))
    return results


@pytest.fixture(scope="module")
def model_run(rlhf_models, prefs, tiny_tokenizer_dir, tmp_path_factory):
    _, mcore_dir = rlhf_models("llama")
    out = tmp_path_factory.mktemp("rlhf_model")
    run_pt(flags(mcore_dir, prefs, tiny_tokenizer_dir, out, **{
        "data.seq_length": 128, "train.micro_batch_size": 2, "train.global_batch_size": PAIRS}), command=RLHF)
    return records(out)


def test_rlhf_equals_trl_loss_in_a_plain_loop(model_run, rlhf_models, pairs_batch):
    hf_dir, _ = rlhf_models("llama")
    assert sorted(model_run) == list(range(1, STEPS + 1))
    expected = trl_loop(hf_dir, pairs_batch)
    for step, (loss, norm) in enumerate(expected, 1):
        assert model_run[step]["loss"] == pytest.approx(loss, rel=1e-5), (step, model_run[step]["loss"], loss)
        assert model_run[step]["grad_norm"] == pytest.approx(norm, rel=1e-4), step
    first = model_run[1]
    assert first["loss"] - ALPHA * first["nll"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/margins"] == 0.0 and first["rewards/accuracies"] == 0.0
    later = model_run[STEPS]
    assert later["rewards/margins"] > 0 and later["rewards/chosen"] - later["rewards/rejected"] == \
        pytest.approx(later["rewards/margins"])
    for name in ("logps/chosen", "logps/rejected", "nll", "rewards/accuracies", "rewards/rejected"):
        assert math.isfinite(later[name]), name


def test_packed_rows_with_precomputed_reference_train_the_same(model_run, rlhf_models, prefs, tiny_tokenizer_dir,
                                                               tmp_path):
    _, mcore_dir = rlhf_models("llama")
    run = flags(mcore_dir, prefs, tiny_tokenizer_dir, tmp_path / "logs", **{
        "rlhf.reference": "precomputed", "data.packing": "true", "data.seq_length": PACKED_SEQ,
        "train.micro_batch_size": 1, "train.global_batch_size": packed_rows(prefs, tiny_tokenizer_dir),
        "checkpoint.save": tmp_path / "ckpt"})
    # Stopped after 2 steps and resumed by the same command: the resumed run reads the table back (its
    # policy is no longer the starting model, so recomputing it would give other losses).
    run_pt([*run, "--train.exit_after_iters", "2"], command=RLHF)
    table = tmp_path / "ckpt" / "reference_logps.pt"
    written = table.stat().st_mtime_ns
    run_pt(run, command=RLHF)
    assert table.stat().st_mtime_ns == written
    packed = records(tmp_path / "logs")
    for step in range(1, STEPS + 1):
        for name in ("loss", "grad_norm", "nll", "logps/chosen", "rewards/margins"):
            assert packed[step][name] == pytest.approx(model_run[step][name], rel=1e-5, abs=1e-7), (step, name)


def test_sigterm_finishes_the_step_saves_and_resumes_bit_exact(model_run, rlhf_models, prefs, tiny_tokenizer_dir,
                                                               tmp_path):
    """SIGTERM mid-run: the step in flight finishes, a checkpoint of exactly that step is saved, the exit
    status is 0; the same command then resumes from it (the frozen copy reloaded from checkpoint.load) and
    every step, before and after the signal, equals the uninterrupted run's bit for bit."""
    from megaswift.checkpointing.layout import read_latest
    _, mcore_dir = rlhf_models("llama")
    ckpt = tmp_path / "ckpt"
    run = lambda out, steps: flags(mcore_dir, prefs, tiny_tokenizer_dir, out, **{  # model_run's settings
        "data.seq_length": 128, "train.micro_batch_size": 2, "train.global_batch_size": PAIRS,
        "train.train_iters": steps, "checkpoint.save": ckpt})
    # The thread count of run_pt (model_run's), so the float reductions are the same ones.
    proc = subprocess.Popen([sys.executable, *RLHF, *run(tmp_path / "signalled", 10_000)],
                            env=child_env(OMP_NUM_THREADS="2"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    wait_for(lambda: steps_logged(tmp_path / "signalled") >= 1, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()[-4000:]
    signalled = records(tmp_path / "signalled")
    last = max(signalled)
    assert sorted(signalled) == list(range(1, last + 1)) and read_latest(ckpt) == last
    assert last < STEPS, f"the run reached step {last} before the SIGTERM landed; nothing is left to resume"
    run_pt(run(tmp_path / "resumed", STEPS), command=RLHF)
    resumed = records(tmp_path / "resumed")
    assert sorted(resumed) == list(range(last + 1, STEPS + 1))
    for step, record in {**signalled, **resumed}.items():
        for name in ("loss", "grad_norm", "nll", "rewards/margins", "logps/rejected"):
            assert record[name] == model_run[step][name], (step, name, record[name], model_run[step][name])


def packed_rows(prefs, tokenizer_dir) -> int:
    from transformers import AutoTokenizer

    from megaswift.config import SFTDataConfig
    from megaswift.data.rlhf.training_source import PairData
    data = SFTDataConfig(datasets=[str(prefs)], tokenizer=str(tokenizer_dir), seq_length=PACKED_SEQ, packing=True,
                         loss_on="last_round")
    rows, _ = PairData(data, AutoTokenizer.from_pretrained(str(tokenizer_dir)), 0, 1, "mask").split_rows()
    return len(rows)


LAYOUT_STEPS = 2
LAYOUTS = {  # name -> (model, flags); one torchrun launch runs them all
    "tp2_sp_packed": ("llama", {"parallel.tensor": 2, "parallel.sequence_parallel": "true", "data.packing": "true",
                                "data.seq_length": PACKED_SEQ, "train.micro_batch_size": 1}),
    "pp2": ("llama", {"parallel.pipeline": 2, "data.seq_length": 128, "train.micro_batch_size": 2}),
    # interleaved 1F1B: each rank holds two model chunks (layers 0 and 2, or 1 and 3), the tied embedding's
    # two copies sit in rank 0's first chunk and rank 1's last; the frozen copy is built the same way
    "pp2_vpp2": ("llama", {"parallel.pipeline": 2, "parallel.virtual_pipeline": 2, "data.seq_length": 128,
                           "train.micro_batch_size": 2}),
    # EP=2 over DP=2, with the optimizer state sharded over the two data-parallel ranks
    "ep2_precomputed": ("moe", {"parallel.expert": 2, "rlhf.reference": "precomputed", "data.seq_length": 128,
                                "train.micro_batch_size": 2, "parallel.distributed_optimizer": "true"}),
    # LoRA (DP=2): the adapter-disabled policy as reference against the frozen copy of the base
    **{f"lora_{reference}": ("llama", {"tuner.type": "lora", "model.layer_spec": "local", "rlhf.reference": reference,
                                       "data.seq_length": 128, "train.micro_batch_size": 2})
       for reference in ("adapters", "model")},
}


def test_tp2_pp2_ep2_equal_one_process(model_run, rlhf_models, prefs, tiny_tokenizer_dir, pairs_batch, tmp_path):
    """TP=2 with SP (packed), PP=2 and PP=2 x VPP=2 (frozen-copy reference) equal the one-process run; EP=2 (Qwen2-MoE, DP=2 with the distributed optimizer,
    precomputed reference) equals the plain TRL loop on the same transformers MoE model; a LoRA run with the
    adapter-disabled reference equals one with the frozen copy."""
    from tests.torchrun import run_torchrun
    runs = []
    for name, (model, settings) in LAYOUTS.items():
        global_batch = packed_rows(prefs, tiny_tokenizer_dir) if "data.packing" in settings else PAIRS
        runs.append(flags(rlhf_models(model)[1], prefs, tiny_tokenizer_dir, tmp_path / name, **{
            **settings, "train.train_iters": LAYOUT_STEPS, "train.global_batch_size": global_batch}))
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    worker = str(__import__("pathlib").Path(__file__).with_name("layouts_worker.py"))
    run_torchrun([worker, tmp_path / "runs.json"], nproc=2, timeout=600)
    moe = trl_loop(rlhf_models("moe")[0], pairs_batch, steps=LAYOUT_STEPS)
    for name, (model, _) in LAYOUTS.items():
        got = records(tmp_path / name)
        if name.startswith("lora"):
            continue
        assert sorted(got) == list(range(1, LAYOUT_STEPS + 1)), name
        for step in got:
            expected = (moe[step - 1][0], moe[step - 1][1]) if model == "moe" else \
                (model_run[step]["loss"], model_run[step]["grad_norm"])
            assert got[step]["loss"] == pytest.approx(expected[0], rel=1e-5), (name, step, got[step], expected)
            assert got[step]["grad_norm"] == pytest.approx(expected[1], rel=1e-4), (name, step)
    adapters, frozen = records(tmp_path / "lora_adapters"), records(tmp_path / "lora_model")
    assert sorted(adapters) == list(range(1, LAYOUT_STEPS + 1))
    for step in adapters:
        for name in ("loss", "grad_norm", "rewards/margins"):
            assert adapters[step][name] == pytest.approx(frozen[step][name], rel=1e-6, abs=1e-9), (step, name)
    assert adapters[LAYOUT_STEPS]["rewards/margins"] != 0.0  # the adapters trained, the reference stayed
