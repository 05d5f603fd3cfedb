"""`--eval.tasks` during `megaswift sft`: the checkpoints saved at eval.interval are scored in the background
and their scores land in metrics.jsonl; the scores equal `megaswift eval` run on those checkpoints afterwards,
training's losses equal those of a run without evaluations, and a broken task file is one clear message."""
import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from megaswift.checkpointing.layout import iteration_dir
from megaswift.cli.main import main
from megaswift.config import ConfigError, SFTConfig
from megaswift.train.checkpoint_eval import CheckpointEvaluator, check_eval_settings, snapshot_checkpoint
from tests.torchrun import child_env
from tests.train.runner import losses

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()


def _write_tasks(root):
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps({"query": f"Say {w}.", "response": f"{w} {w}"}) + "\n" for w in WORDS))
    mcq = root / "mcq.csv"
    with mcq.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "question", "A", "B", "C", "D", "answer"])
        # the right option moves through A-D, so a model that favours one letter gets some, not all, right
        writer.writerows([f"q{i}", f"Which word is {w}?", *WORDS[i:i + 4], "ABCD"[i % 4]]
                         for i, w in enumerate(WORDS[:6]))
    qa = root / "qa.jsonl"
    qa.write_text("".join(json.dumps({"query": f"Say {w}.", "response": f"{w} {w}"}) + "\n" for w in WORDS[:3]))
    broken = root / "broken.csv"
    broken.write_text("id,question,A,B,C,D,answer\nq1,Which?,a,b,c,d,E\n")  # E is no option
    return train, mcq, qa, broken


def _sft(root, train, tokenizer, name, extra=()):
    out, save = root / name / "logs", root / name / "ckpt"
    flags = ["--model.preset", "tiny-llama", "--data.datasets", str(train), "--data.tokenizer", str(tokenizer),
             "--data.seq_length", "32", "--data.cache_dir", str(root / "cache"), "--train.micro_batch_size", "1",
             "--train.global_batch_size", "2", "--train.train_iters", "4", "--train.lr", "1e-2",
             "--train.lr_warmup_iters", "0", "--train.precision", "fp32", "--checkpoint.save", str(save),
             "--checkpoint.save_interval", "2", "--logging.output_dir", str(out), "--logging.progress_bar",
             "false", "--logging.tensorboard", "false", *extra]
    proc = subprocess.run([sys.executable, "-m", "megaswift", "sft", *flags], capture_output=True, text=True,
                          timeout=300, env=child_env(OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return out, save, proc


def test_checkpoint_scores_during_sft(tiny_tokenizer_dir, tmp_path):
    train, mcq, qa, broken = _write_tasks(tmp_path)
    plain_out, _, _ = _sft(tmp_path, train, tiny_tokenizer_dir, "plain")
    out, save, proc = _sft(tmp_path, train, tiny_tokenizer_dir, "evaluated",
                           ["--eval.tasks", f"{mcq},{broken}", str(qa), "--eval.interval", "2",
                            "--eval.max_new_tokens", "6"])
    # the broken file: one message naming the file and line, and the run went on
    assert proc.stderr.count(f"{broken}:2") == 1, proc.stderr[-4000:]
    assert losses(out) == losses(plain_out)  # exactly: evaluating never touches training

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scored = {r["step"]: r for r in records if any(key.startswith("eval/") for key in r)}
    assert sorted(scored) == [2, 4]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the evaluations ran (OMP_NUM_THREADS=1), so the sums add up alike
    try:
        for step, record in scored.items():
            after = tmp_path / f"after_{step}.json"
            assert main(["eval", "--model", str(iteration_dir(save, step)), "--tasks", f"{mcq},{qa}", "--output",
                         str(after), "--max-new-tokens", "6", "--export-cache", str(tmp_path / "export"),
                         "--device", "cpu"]) == 0
            tasks = json.loads(after.read_text())["tasks"]
            expected = {f"eval/{task}/{metric}": value for task, metrics in tasks.items()
                        for metric, value in metrics.items() if metric not in ("kind", "n")}
            assert expected.keys() == {"eval/mcq.csv/correct", "eval/mcq.csv/accuracy", "eval/qa.jsonl/rougeL_f1",
                                       "eval/qa.jsonl/bleu"}
            assert {k: v for k, v in record.items() if k.startswith("eval/")} == expected
            # and it was that step's checkpoint the run evaluated
            during = json.loads((out / "checkpoint_eval" / f"iter_{step:07d}.json").read_text())
            assert during["model"] == str(iteration_dir(save, step)) and during["tasks"] == tasks
    finally:
        torch.set_num_threads(threads)
    # what was exported for the evaluations is gone; their results stay beside the metrics
    assert sorted(p.name for p in (out / "checkpoint_eval").iterdir()) == \
        ["iter_0000002.json", "iter_0000002.log", "iter_0000004.json", "iter_0000004.log"]


def _config(**sections):
    config = SFTConfig()
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(config, section), key, value)
    return config


@pytest.mark.parametrize("settings, expected", [
    ({"eval": {"tasks": ["a.csv"], "interval": 3}, "checkpoint": {"save": "c", "save_interval": 2}},
     "eval.interval is 3 but checkpoint.save_interval is 2"),
    ({"eval": {"tasks": ["a.csv"], "interval": 2}, "checkpoint": {"save": "c", "save_interval": 0}},
     "must be a multiple of checkpoint.save_interval"),
    ({"eval": {"tasks": ["a.csv"]}}, "checkpoint.save is not set"),
    ({"eval": {"interval": 2}, "checkpoint": {"save": "c", "save_interval": 2}}, "eval.tasks is empty"),
])
def test_settings_checked_before_the_run(settings, expected):
    with pytest.raises(ConfigError, match=expected):
        check_eval_settings(_config(**settings))


def test_failed_or_unfinished_evaluations_never_stop_the_run(tmp_path, capsys):
    """A checkpoint that cannot be evaluated: the failure is reported and the run's hooks return normally;
    an evaluation still running at the end (eval.wait_s 0) is stopped, its whole process group gone."""
    mcq = tmp_path / "mcq.csv"
    mcq.write_text("id,question,A,B,C,D,answer\nq1,Which?,a,b,c,d,A\n")
    logged = []
    config = _config(eval={"tasks": [str(mcq)], "interval": 1, "wait_s": 60.0},
                     checkpoint={"save": str(tmp_path), "save_interval": 1},
                     logging={"output_dir": str(tmp_path / "logs")})
    evaluator = CheckpointEvaluator(config, True, logged.append)
    evaluator.checkpoint_saved(1, tmp_path / "no_such_checkpoint", last=False, stopping=False)
    evaluator.close()  # waits for it: it fails fast
    err = capsys.readouterr().err
    assert "the evaluation of step 1 failed (exit status 1)" in err and "no_such_checkpoint" in err
    assert logged == []

    config.eval.wait_s = 0.0
    evaluator = CheckpointEvaluator(config, True, logged.append)
    evaluator.checkpoint_saved(2, tmp_path / "no_such_checkpoint", last=True, stopping=False)
    process = evaluator.running.process
    evaluator.close()
    assert process.returncode is not None and "step(s) 2 did not finish" in capsys.readouterr().err
    with pytest.raises(ProcessLookupError):
        os.killpg(process.pid, 0)

    # a run stopping on SIGTERM saves its step but starts no evaluation in its grace period
    evaluator = CheckpointEvaluator(config, True, logged.append)
    evaluator.checkpoint_saved(3, tmp_path / "no_such_checkpoint", last=False, stopping=True)
    assert evaluator.running is None and evaluator.queue == []


def test_snapshot_outlives_retention(tmp_path):
    """With checkpoint.keep_last the evaluation reads a hard-linked copy: deleting the checkpoint (as
    retention does) leaves the copy whole, and no data was copied."""
    ckpt = tmp_path / "ckpt" / "iter_0000002"
    (ckpt / "hf_assets").mkdir(parents=True)
    (ckpt / "__0_0.distcp").write_bytes(b"weights" * 100)
    (ckpt / "hf_assets" / "tokenizer.json").write_text("{}")
    copy = snapshot_checkpoint(ckpt, tmp_path / "logs" / "snapshot-iter_0000002")
    assert (copy / "__0_0.distcp").stat().st_ino == (ckpt / "__0_0.distcp").stat().st_ino
    shutil.rmtree(ckpt)
    assert (copy / "__0_0.distcp").read_bytes() == b"weights" * 100
    assert (copy / "hf_assets" / "tokenizer.json").read_text() == "{}"
