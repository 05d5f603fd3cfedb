"""Where an adapter checkpoint keeps each adapter tensor, read off a meta GPTModel with the tuner applied.

As mcore_layout.py does for the base: the model is built at TP=PP=EP=1 on the meta device, the tuner
(megaswift/tuners) wraps its linear layers, and the model's own `sharded_state_dict()` says each trained
tensor's on-disk key, global shape and offset. Reading and writing exactly these keeps adapter
checkpoints written by the converters and by training interchangeable, at any TP/PP of either.
"""
from converters.errors import ConversionError
from converters.mcore_layout import McoreLayout, McoreObject, _describe, build_meta_model
from converters.process_group import single_process_model_parallel


def tuner_config_of(tuner: dict):
    """A TunerConfig from its recorded dict (megaswift.json "adapter"."tuner")."""
    from megaswift.config import TunerConfig
    return TunerConfig(**tuner)


def adapter_layout(hf: dict, tuner: dict, where: str) -> McoreLayout:
    """The trained tensors (adapters and modules_to_save) of `hf` with the tuner settings `tuner`; a tuner
    setting this model cannot take is a ConversionError naming `where`."""
    import torch
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories

    from megaswift.config import ConfigError
    from megaswift.tuners import apply_tuner

    with single_process_model_parallel():
        model = build_meta_model(hf)
        try:
            apply_tuner([model], tuner_config_of(tuner), hf)
        except ConfigError as e:
            raise ConversionError(f"{where}: {e}") from None
        trained = {name for name, param in model.named_parameters() if param.requires_grad}
        shapes = {name: tuple(t.shape) for name, t in model.state_dict().items() if isinstance(t, torch.Tensor)}
        sharded = model.sharded_state_dict()
        apply_factories(sharded)
    tensors = {}
    for name in sorted(trained):
        items = sharded[name] if isinstance(sharded[name], list) else [sharded[name]]
        if not all(isinstance(v, ShardedTensor) for v in items):
            raise AssertionError(f"{name}: unexpected sharded state dict entry {items}")
        tensors[name] = _describe(name, items, shapes[name])
    common = McoreObject(ShardedObject("common_state", None, (1,), (0,)).unique_key, {})
    return McoreLayout(tensors, [common])
