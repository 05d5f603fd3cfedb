"""Multi-process conversion: the plan that shares the tensors out is balanced for a DeepSeek-V3-sized layout
(671B, built on the meta device: no tensor exists), and 2 ranks under torchrun write one torch_dist checkpoint
equal to the one-process conversion, tensor by tensor, read back by torch.distributed.checkpoint's own loader;
a failure on one rank ends both with its error and leaves no output; mcore2hf in 2 ranks writes the same files
as in one."""
import collections
import json
import random

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

from converters import mcore2hf
from converters.conversion_plan import plan_shares, tensor_bytes
from converters.mcore_layout import mcore_layout
from megaswift.models import preset_hf_config
from tests.converters.parallel_convert_worker import INJECTED
from tests.torchrun import REPO, run_torchrun

EXPERT = ".mlp.experts.local_experts."
SHARD_SIZE = "200KB"  # the tiny model's ~2 MB in about 10 safetensors files, shared out between the ranks


@pytest.fixture(scope="module")
def deepseek_v3_sizes():
    """Bytes of every megatron tensor of DeepSeek-V3 (671B) as hf2mcore writes it: its FP8 weights dequantized to
    bf16, the config's dtype. From the family's preset through megaswift's layout code, on the meta device."""
    layout = mcore_layout(preset_hf_config("deepseek-v3"))
    return tensor_bytes(layout, collections.defaultdict(lambda: torch.bfloat16))


@pytest.mark.parametrize("ranks", [2, 8, 64])
def test_plan_balances_deepseek_v3(deepseek_v3_sizes, ranks):
    sizes = deepseek_v3_sizes
    total = sum(sizes.values())
    assert len(sizes) > 30_000 and total > 1.2 * 2**40  # the real model: ~1.25 TiB in bf16, not a tiny stand-in
    shares = plan_shares(sizes, ranks)
    assigned = collections.Counter(name for share in shares for name in share)
    assert assigned.keys() == sizes.keys() and set(assigned.values()) == {1}  # every tensor exactly once
    loads = [sum(sizes[name] for name in share) for share in shares]
    assert max(loads) <= 1.02 * total / ranks and min(loads) >= 0.98 * total / ranks, loads
    experts = [sum(EXPERT in name for name in share) for share in shares]
    assert max(experts) - min(experts) <= 0.1 * sum(experts) / ranks, experts  # experts spread, not bunched
    shuffled = dict(random.Random(0).sample(list(sizes.items()), len(sizes)))
    assert plan_shares(shuffled, ranks) == shares  # every rank computes the same plan, whatever the order


def read_checkpoint(folder):
    """Every tensor and object of a torch_dist checkpoint, and its metadata, read by torch itself."""
    metadata = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    layout = {k: (tuple(md.size), sorted((tuple(c.offsets), tuple(c.sizes)) for c in md.chunks))
              for k, md in metadata.items() if hasattr(md, "chunks")}
    return _load_state_dict_from_keys(checkpoint_id=str(folder)), layout


def test_two_ranks_write_what_one_rank_writes(tmp_path, hf_model_dirs, converted_dirs):
    """DeepSeek-V3 (MLA, shared and routed experts, a dense layer): the 2-rank output verifies (rank 0 loads it
    with megatron-core's dist_checkpointing and compares logits with transformers) and equals the 1-rank output
    bit for bit, each rank having written its own file."""
    hf_dir = hf_model_dirs("deepseek-v3", "fp32")
    one_rank, one_rank_report = converted_dirs("deepseek-v3", "fp32")
    proc = run_torchrun([REPO / "tests" / "converters" / "parallel_convert_worker.py", hf_dir, tmp_path / "failed",
                         tmp_path / "out", tmp_path / "back", SHARD_SIZE], nproc=2, timeout=240)

    # The injected failure on rank 1 reached rank 0 (which holds the output folder) and removed the output.
    assert "rank 1 of 2 failed while writing its share of the checkpoint" in proc.stderr, proc.stderr[-4000:]
    assert proc.stderr.count(INJECTED) >= 2, proc.stderr[-4000:]  # both ranks report it
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("failed")]

    ckpt = tmp_path / "out" / "iter_0000000"
    files = {p.name: p.stat().st_size for p in ckpt.glob("*.distcp")}
    assert files.keys() == {"__0_0.distcp", "__1_0.distcp"} and min(files.values()) > 0.3 * sum(files.values())
    report = json.loads((tmp_path / "out" / "verification.json").read_text())
    assert report["passed"] and report["logits"]["max_abs_diff"] <= 1e-4, report
    assert report["coverage"] == one_rank_report["coverage"]  # every HF tensor consumed once, over both ranks

    (tensors, layout), (expected, expected_layout) = read_checkpoint(ckpt), read_checkpoint(one_rank / "iter_0000000")
    assert layout == expected_layout and tensors.keys() == expected.keys()
    differ = [k for k, v in expected.items() if not (torch.equal(tensors[k], v) and tensors[k].dtype == v.dtype
                                                     if isinstance(v, torch.Tensor) else tensors[k] == v)]
    assert not differ, differ
    assert (ckpt / "metadata.json").read_text() == (one_rank / "iter_0000000" / "metadata.json").read_text()
    meta, expected_meta = (json.loads((d / "megaswift.json").read_text()) for d in (ckpt, one_rank / "iter_0000000"))
    assert meta["hf_config"] == expected_meta["hf_config"]

    # mcore2hf in 2 ranks, each writing its share of the shards: the same files, byte for byte, as in one process.
    mcore2hf(one_rank, tmp_path / "back-1", max_shard_size=SHARD_SIZE, verify=False, progress=False)
    written = {p.name: p.read_bytes() for p in (tmp_path / "back").iterdir() if p.name != "verification.json"}
    expected_files = {p.name: p.read_bytes() for p in (tmp_path / "back-1").iterdir()}
    assert written.keys() == expected_files.keys() and len([n for n in written if n.endswith(".safetensors")]) >= 4
    assert [n for n in written if written[n] != expected_files[n]] == []
    assert json.loads((tmp_path / "back" / "verification.json").read_text())["passed"]
