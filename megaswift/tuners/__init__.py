"""Low-rank adapters (LoRA, DoRA) on megatron-core's linear layers: a frozen base, trainable adapters, and
exact exchange with PEFT adapter files (see apply.py, lora_layer.py, state.py, targets.py)."""
from megaswift.tuners.apply import (adapters_disabled, apply_tuner, check_tuner_config, check_tuner_settings,
                                    init_dora_magnitudes, is_adapter_param, modules_to_save_params)
from megaswift.tuners.state import (adapter_state, adapter_to_peft, load_adapter_state, peft_adapter_config,
                                    peft_to_adapter)
from megaswift.tuners.targets import select_targets, valid_target_names

__all__ = ["adapter_state", "adapter_to_peft", "adapters_disabled", "apply_tuner", "check_tuner_config",
           "check_tuner_settings", "init_dora_magnitudes", "is_adapter_param", "load_adapter_state",
           "modules_to_save_params", "peft_adapter_config", "peft_to_adapter", "select_targets", "valid_target_names"]
