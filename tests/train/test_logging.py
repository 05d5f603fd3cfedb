"""What a user watches: metrics.jsonl records, evaluation, TensorBoard events, the recorded config."""
import json
import math

from megaswift.checkpointing.layout import read_meta, resolve_checkpoint
from tests.train.runner import pt_flags, run_pt


def test_metrics_eval_tensorboard_and_recorded_config(demo_data, tmp_path):
    proc = run_pt(pt_flags(demo_data, tmp_path, train__train_iters=2, data__split="90,10,0",
                           train__eval_interval=2, train__eval_iters=2, logging__tensorboard="true",
                           checkpoint__save=tmp_path / "ckpt"))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for record in steps:
        assert {"loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_s"} <= set(record)
        assert record["tokens_per_s"] > 0 and math.isfinite(record["grad_norm"])
    # One warmup step (megatron-core's schedule starts at lr 0), then the peak.
    assert steps[0]["lr"] == 0.0 and steps[1]["lr"] == 1e-3
    assert [e["step"] for e in evals] == [2] and math.isfinite(evals[0]["eval_loss"])
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert "step 2 | loss" in proc.stdout + proc.stderr
    meta = read_meta(resolve_checkpoint(tmp_path / "ckpt"))
    assert meta["config"]["train"]["train_iters"] == 2 and meta["hf_config"]["architectures"] == ["LlamaForCausalLM"]
    assert (resolve_checkpoint(tmp_path / "ckpt") / "hf_assets" / "tokenizer.json").is_file()


def _tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Steps per tag as TensorBoard shows them (its reader applies the purge a restarted writer records)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_a_run_restarted_at_an_earlier_step_keeps_each_step_once(tmp_path):
    """A run that logged steps 1-5 but whose last checkpoint is step 3 resumes at 4: metrics.jsonl and
    TensorBoard then hold steps 1-5 once each, the later run's values for 4 and 5."""
    from megaswift.train.metrics import MetricsLogger

    def log_steps(start, steps, value):
        logger = MetricsLogger(str(tmp_path), True, 5, start, tensorboard=True, progress_bar=False)
        for step in steps:
            logger.log({"step": step, "loss": value + step})
        logger.close()

    log_steps(0, range(1, 6), 10.0)
    with open(tmp_path / "metrics.jsonl", "a") as file:
        file.write('{"step": 6, "lo')  # a line cut short by a crash
    log_steps(3, range(4, 6), 20.0)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(1, 11.0), (2, 12.0), (3, 13.0), (4, 24.0), (5, 25.0)]
    assert _tensorboard_scalars(tmp_path / "tensorboard") == {"train/loss": [(s, r["loss"]) for s, r in
                                                                             zip(range(1, 6), records)]}


def test_metrics_jsonl_is_strict_json_with_null_for_nan_and_inf(tmp_path):
    from megaswift.train.metrics import MetricsLogger
    logger = MetricsLogger(str(tmp_path), True, 2, 0, tensorboard=False, progress_bar=False)
    logger.log({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "lr": 1e-3})
    logger.close()
    line = (tmp_path / "metrics.jsonl").read_text().strip()

    def refuse(constant):
        raise AssertionError(f"not strict JSON: {constant} in {line}")
    assert json.loads(line, parse_constant=refuse) == {"step": 1, "loss": None, "grad_norm": None, "lr": 1e-3}


def test_output_dir_defaults_inside_the_run_and_config_yaml_is_written(demo_data, tmp_path, monkeypatch):
    """No logging.output_dir: metrics go beside the run's checkpoints, and config.yaml holds the resolved
    settings; without checkpoint.save, each run gets a new runs/<date-time> folder."""
    import yaml
    from megaswift.train.metrics import default_output_dir
    ckpt = tmp_path / "ckpt"
    flags = pt_flags(demo_data, tmp_path / "unused", train__train_iters=1, checkpoint__save=ckpt)
    at = flags.index("--logging.output_dir")
    run_pt(flags[:at] + flags[at + 2:])
    assert [json.loads(line)["step"] for line in (ckpt / "logs" / "metrics.jsonl").read_text().splitlines()] == [1]
    recorded = yaml.safe_load((ckpt / "logs" / "config.yaml").read_text())
    assert recorded["logging"]["output_dir"] == str(ckpt / "logs") and recorded["train"]["train_iters"] == 1
    assert not (tmp_path / "unused").exists()

    monkeypatch.chdir(tmp_path)
    first = default_output_dir(None)
    (tmp_path / first).mkdir(parents=True)
    second = default_output_dir(None)
    assert first.startswith("runs/") and second != first and not (tmp_path / second).exists()
