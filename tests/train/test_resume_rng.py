"""RNG state travels per rank in checkpoints (megaswift/checkpointing/rng.py)."""
from tests.torchrun import REPO, run_torchrun


def test_rng_state_restores_per_rank_and_reseeds_at_another_layout(tmp_path):
    (tmp_path / "ckpt").mkdir()
    proc = run_torchrun([REPO / "tests" / "train" / "resume_rng_worker.py", tmp_path / "ckpt"], nproc=2, timeout=180)
    assert "rank 0 ok" in proc.stdout and "rank 1 ok" in proc.stdout
    assert "random generators reseeded from train.seed + iteration (5 + 1)" in proc.stderr
