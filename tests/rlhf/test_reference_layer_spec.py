"""rlhf.reference=model builds its frozen copy with the layer spec the trainer resolved (RunPlan.layer_spec), not
by resolving model.layer_spec's `auto` a second time: no second Transformer Engine import attempt, and the
reference runs the same attention as the policy even where `auto` would now resolve to another spec."""
from types import SimpleNamespace

import torch

from megaswift.config.sections import RLHFRunConfig
from megaswift.objectives.base import RunPlan


def test_frozen_copy_uses_the_resolved_layer_spec(monkeypatch):
    from converters.process_group import single_process_model_parallel
    from megaswift.config import ParallelConfig
    from megaswift.models import builder, hf_to_transformer_config
    from megaswift.models.families import preset_hf_config
    from megaswift.models.torch_attention import TorchDotProductAttention
    from megaswift.objectives.reference import FrozenCopy

    hf = {**preset_hf_config("tiny-llama"), "num_hidden_layers": 2}
    config = RLHFRunConfig()
    assert config.model.layer_spec == "auto"  # on this CPU machine, `auto` resolves to local
    probes = []
    monkeypatch.setattr(builder, "transformer_engine_available", lambda: probes.append(1) or False)
    with single_process_model_parallel():
        tconfig = hf_to_transformer_config(hf, ParallelConfig(), params_dtype=torch.float32)
        (policy,) = builder.build_model_chunks(hf, tconfig, "torch")  # as a trainer that resolved `torch` builds it
        objective = SimpleNamespace(plan=RunPlan(config, hf, 1, None, 8, layer_spec="torch"))
        reference = FrozenCopy(objective, SimpleNamespace(model=[policy], step=1))
    (chunk,) = reference.chunks
    assert probes == []
    assert all(isinstance(layer.self_attention.core_attention, TorchDotProductAttention)
               for layer in chunk.decoder.layers)
    expected = policy.state_dict()
    assert all(torch.equal(t, expected[k]) for k, t in chunk.state_dict().items() if isinstance(t, torch.Tensor))
    assert not any(p.requires_grad for p in chunk.parameters())
