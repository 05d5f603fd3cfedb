"""torchrun worker: load converted checkpoints at a TP/PP/VPP/EP layout with megatron-core's own loader,
run the forward pass, compare the gathered logits with transformers' (precomputed by the test), and
optionally re-save the checkpoint at this layout (as training would) for the mcore2hf test.

    torchrun ... layout_worker.py CASES_JSON RESULTS_DIR --tp 2 --pp 1 --ep 1 [--vpp 2]
CASES_JSON: [{"name", "ckpt", "expected_logits" (.pt), "tokens" (.pt), "save_to" (optional)}]
"""
import argparse
import json
import os
from pathlib import Path

import torch


def forward_logits(chunks, tokens: torch.Tensor):
    """Logits on the last pipeline stage (gathered over TP), None elsewhere."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    captured = {}
    position_ids = torch.arange(tokens.shape[1]).unsqueeze(0)

    def forward_step(data_iterator, model):
        output = model(next(data_iterator), position_ids, None)

        def loss_func(out):
            captured["logits"] = gather_from_tensor_model_parallel_region(out)
            return out.sum(), {}
        return output, loss_func

    for chunk in chunks:
        chunk.eval()
    with torch.no_grad():
        # The interleaved schedule wants one iterator per chunk, and at least as many micro-batches
        # as pipeline stages: the same tokens go through `microbatches` times.
        microbatches = parallel_state.get_pipeline_model_parallel_world_size() if len(chunks) > 1 else 1
        iterators = [iter([tokens] * microbatches) for _ in chunks]
        get_forward_backward_func()(forward_step_func=forward_step,
                                    data_iterator=iterators if len(chunks) > 1 else iterators[0], model=chunks,
                                    num_microbatches=microbatches, seq_length=tokens.shape[1], micro_batch_size=1,
                                    forward_only=True)
    return captured.get("logits") if parallel_state.is_pipeline_last_stage() else None


def run_case(case: dict, tp: int, pp: int, ep: int, vpp: int | None) -> dict:
    from megatron.core import dist_checkpointing, parallel_state

    from megaswift.checkpointing.integrity import FILES_KEY, record_files
    from megaswift.checkpointing.layout import read_meta, write_latest, write_meta
    from megaswift.checkpointing.state import model_state_keys
    from megaswift.config import ParallelConfig
    from megaswift.models import hf_to_transformer_config
    from megaswift.models.builder import build_model_chunks

    ckpt = Path(case["ckpt"]) / "iter_0000000"
    hf = read_meta(ckpt)["hf_config"]
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                             expert_model_parallel_size=ep,
                                             virtual_pipeline_model_parallel_size=vpp)
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    model_parallel_cuda_manual_seed(1234)
    config = hf_to_transformer_config(hf, ParallelConfig(tensor=tp, pipeline=pp, expert=ep, virtual_pipeline=vpp))
    config.perform_initialization = False
    chunks = build_model_chunks(hf, config)
    names = model_state_keys(chunks)  # as training saves them: model, or model0, model1, ... (interleaved)
    loaded = dist_checkpointing.load({n: c.sharded_state_dict() for n, c in zip(names, chunks)}, str(ckpt))
    for name, chunk in zip(names, chunks):
        chunk.load_state_dict(loaded[name], strict=True)
    logits = forward_logits(chunks, torch.load(case["tokens"]))
    result = {}
    if logits is not None:
        expected = torch.load(case["expected_logits"])
        result["max_abs_diff"] = (logits[..., : hf["vocab_size"]] - expected).abs().max().item()
    if case.get("save_to"):
        save_dir = Path(case["save_to"]) / "iter_0000000"
        if torch.distributed.get_rank() == 0:
            save_dir.mkdir(parents=True)
        torch.distributed.barrier()
        dist_checkpointing.save({n: c.sharded_state_dict() for n, c in zip(names, chunks)}, str(save_dir))
        # The converted checkpoint's recorded file sums describe its own files: record this save's (collective).
        files = record_files(save_dir)
        if torch.distributed.get_rank() == 0:
            write_meta(save_dir, {**read_meta(ckpt), "iteration": 0, FILES_KEY: files})
            write_latest(save_dir.parent, 0)
        torch.distributed.barrier()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("cases")
    parser.add_argument("results")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per rank")
    args = parser.parse_args()
    from megaswift.platform.cpu import apply_cpu_patches
    apply_cpu_patches()
    rank = int(os.environ["RANK"])
    torch.distributed.init_process_group("gloo", rank=rank, world_size=int(os.environ["WORLD_SIZE"]))
    cases = json.loads(Path(args.cases).read_text())
    results = {case["name"]: run_case(case, args.tp, args.pp, args.ep, args.vpp) for case in cases}
    Path(args.results, f"rank{rank}.json").write_text(json.dumps(results))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":  # dist_checkpointing.save spawns a process that re-imports __main__
    main()
