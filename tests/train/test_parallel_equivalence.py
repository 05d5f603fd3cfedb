"""Every parallel layout trains the same model to the same losses as one process (torchrun, gloo, fp32).

All runs start from one initial checkpoint saved by a single process, so only the layout differs.
"""
import pytest

from tests.train.runner import losses, pt_flags, run_pt

STEPS = 3
LAYOUTS = {
    "tp2": {"parallel.tensor": 2},
    "tp2_sp": {"parallel.tensor": 2, "parallel.sequence_parallel": "true"},
    "pp2_1f1b": {"parallel.pipeline": 2},
    "pp2_vpp2": {"parallel.pipeline": 2, "parallel.virtual_pipeline": 2},
    "dp2_distributed_optimizer": {"parallel.distributed_optimizer": "true"},
    # megaswift's fused vocab-parallel loss kernel in place of megatron-core's cross entropy.
    "tp2_fused_loss": {"parallel.tensor": 2, "train.fused_loss": "true"},
}
MOE_LAYOUTS = {
    "ep2_alltoall": {"parallel.expert": 2, "model.moe_token_dispatcher": "alltoall"},
    "ep2_allgather": {"parallel.expert": 2, "model.moe_token_dispatcher": "allgather"},
}


def _reference(demo_data, tmp_path_factory, preset):
    root = tmp_path_factory.mktemp(f"reference_{preset}")
    init = root / "init"
    run_pt(pt_flags(demo_data, root / "init_logs", model__preset=preset, train__train_iters=0,
                    checkpoint__save=init, checkpoint__save_initial="true"))
    out = root / "single"
    run_pt(pt_flags(demo_data, out, model__preset=preset, train__train_iters=STEPS, checkpoint__load=init,
                    checkpoint__finetune="true"))
    return init, losses(out)


@pytest.fixture(scope="module")
def dense_reference(demo_data, tmp_path_factory):
    return _reference(demo_data, tmp_path_factory, "tiny-llama")


@pytest.fixture(scope="module")
def moe_reference(demo_data, tmp_path_factory):
    return _reference(demo_data, tmp_path_factory, "tiny-mixtral")


def _assert_same_losses(parallel: dict, single: dict):
    assert sorted(parallel) == list(range(1, STEPS + 1))
    for step, loss in single.items():
        assert parallel[step] == pytest.approx(loss, rel=1e-5), f"step {step}: {parallel} vs single {single}"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_dense_layout_matches_single_process(layout, dense_reference, demo_data, tmp_path):
    init, single = dense_reference
    settings = {k.replace(".", "__"): v for k, v in LAYOUTS[layout].items()}
    run_pt(pt_flags(demo_data, tmp_path, train__train_iters=STEPS, checkpoint__load=init,
                    checkpoint__finetune="true", **settings), nproc=2)
    _assert_same_losses(losses(tmp_path), single)


@pytest.mark.parametrize("layout", list(MOE_LAYOUTS))
def test_moe_layout_matches_single_process(layout, moe_reference, demo_data, tmp_path):
    init, single = moe_reference
    settings = {k.replace(".", "__"): v for k, v in MOE_LAYOUTS[layout].items()}
    run_pt(pt_flags(demo_data, tmp_path, model__preset="tiny-mixtral", train__train_iters=STEPS,
                    checkpoint__load=init, checkpoint__finetune="true", **settings), nproc=2)
    _assert_same_losses(losses(tmp_path), single)
