"""Progress reporting on rank 0: a console line, metrics.jsonl, TensorBoard events and a progress bar.

A run that starts at step S (a resume, or a new run in a folder that holds an older one) keeps what earlier
runs logged up to S and drops the rest, in metrics.jsonl and in TensorBoard (`purge_step`), so each step is
there once. metrics.jsonl is strict JSON, one object per line: a NaN or infinite value is written as null.
"""
import datetime
import json
import math
import sys
from pathlib import Path

from tqdm import tqdm

# Dense bf16 peak FLOP/s per device, for MFU; devices not listed get no MFU figure.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def device_peak_flops() -> float | None:
    import torch
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def flops_per_token(hf: dict, seq_length: int) -> float:
    """Training FLOPs per token: 6 x (weights of the matmuls one token passes through) + causal attention.

    6 = 2 FLOPs per multiply-add x (forward + backward's two matmuls). Attention scores: a token's query meets
    seq/2 keys on average under the causal mask, over QK^T (qk head dim) and PV (v head dim): forward
    2 x seq/2 x heads x (qk_dim + v_dim) per layer, x3 with backward. Only the experts a token is routed
    to count (plus shared experts and the router), and each layer counts as what it is (dense or MoE)."""
    from megaswift.models import hf_view  # here: the CLI imports this module for its paths, before torch
    model = hf_view(hf)
    weights = sum(_attention_weights(model) + _mlp_weights(model, layer) for layer in range(model.num_layers))
    weights += model.hidden_size * model.vocab_size  # output layer (logits); the input embedding is a lookup
    qk_dim, v_dim = _attention_head_dims(model)
    scores = 3 * model.num_layers * seq_length * model.num_attention_heads * (qk_dim + v_dim)
    return 6 * weights + scores


def _attention_head_dims(model) -> tuple[int, int]:
    """(q/k head dim, v head dim): MLA's q/k heads are no-rope + rope dims, its v heads `v_head_dim`."""
    if model.mla:
        return model.mla.qk_nope_head_dim + model.mla.qk_rope_head_dim, model.mla.v_head_dim
    return model.head_dim, model.head_dim


def _attention_weights(model) -> int:
    h, heads = model.hidden_size, model.num_attention_heads
    qk_dim, v_dim = _attention_head_dims(model)
    if not model.mla:
        return h * qk_dim * heads + 2 * h * qk_dim * model.num_kv_heads + heads * v_dim * h  # q, k + v, out
    mla = model.mla
    # q straight from the hidden states, or down to q_lora_rank and up to every head
    q = h * heads * qk_dim if mla.q_lora_rank is None else mla.q_lora_rank * (h + heads * qk_dim)
    kv_down = h * (mla.kv_lora_rank + mla.qk_rope_head_dim)  # the shared latent + the shared rope key
    kv_up = mla.kv_lora_rank * heads * (mla.qk_nope_head_dim + v_dim)  # each head's no-rope key and value
    return q + kv_down + kv_up + heads * v_dim * h


def _mlp_weights(model, layer: int) -> int:
    """Gated MLPs (three matrices) in every family here."""
    h = model.hidden_size
    if not model.is_moe_layer(layer):
        return 3 * h * model.ffn_hidden_size
    moe = model.moe
    routed = 3 * h * moe.ffn_hidden_size * moe.experts_per_token
    shared = 3 * h * moe.shared_expert_ffn_hidden_size + (h if moe.shared_expert_gate else 0)
    return routed + shared + h * moe.num_experts  # + the router's scores for every expert


def default_output_dir(checkpoint_save: str | None) -> str:
    """The run's own folder: beside its checkpoints (so a resumed run continues its own logs), else a new
    runs/<date-time> folder (never one an earlier run wrote)."""
    if checkpoint_save:
        return str(Path(checkpoint_save) / "logs")
    base = Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    folder, suffix = base, 1
    while folder.exists():
        folder, suffix = base.with_name(f"{base.name}-{suffix}"), suffix + 1
    return str(folder)


def strict_json_values(record: dict) -> dict:
    """JSON has no NaN or Infinity: such values become null."""
    return {key: None if isinstance(value, float) and not math.isfinite(value) else value
            for key, value in record.items()}


def keep_records_up_to(path: Path, last_step: int) -> int:
    """Rewrites metrics.jsonl without records past `last_step` (and without a line a crash cut short);
    returns how many were dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= last_step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        tmp.replace(path)
    return dropped


class MetricsLogger:
    def __init__(self, output_dir: str, enabled: bool, total_steps: int, start_step: int, tensorboard: bool,
                 progress_bar: bool):
        self.enabled = enabled
        self.jsonl = None
        self.writer = None
        self.bar = None
        if not enabled:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        keep_records_up_to(out / "metrics.jsonl", start_step)
        self.jsonl = open(out / "metrics.jsonl", "a", buffering=1)  # continued across resumes
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            # Events of steps after start_step (from a run that went further before it stopped) are purged.
            self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1)
        if progress_bar:
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            file=sys.stderr, disable=None)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(strict_json_values(record), allow_nan=False) + "\n")
        step = record["step"]
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"train/{key}" if not key.startswith("eval") else key, value, step)
        line = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items())
        (self.bar.write if self.bar is not None and not self.bar.disable else print)(line)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()


def write_run_config(output_dir: str, values: dict) -> Path:
    """config.yaml: the run's resolved settings (defaults, checkpoint, YAML and flags applied)."""
    import yaml
    path = Path(output_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path
