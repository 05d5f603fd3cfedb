"""What vLLM checks when it loads a model folder and LoRA adapters, checked here first (on any machine).

`megaswift deploy --backend vllm` runs these before handing over, so a folder vLLM would refuse fails at once,
naming the file and the fix, instead of after minutes of GPU start-up. What vLLM does, restated from its
documentation and loaders:
  model folder  config.json names an architecture vLLM serves, a dtype (`dtype` or `torch_dtype`) its
                `--dtype auto` can read, and max_position_embeddings (its default max_model_len); weights are
                safetensors, and with model.safetensors.index.json only the files the index names are read, so
                the index must list every tensor in the file that holds it; every parameter of the model must
                come from the files (vLLM refuses weights left uninitialised and names it does not know), with
                lm_head.weight optional only when tie_word_embeddings is true; each tensor has its parameter's
                shape; the tokenizer and a chat template are in the folder.
  adapter       adapter_config.json: a LoRA (`peft_type` LORA) with r, lora_alpha and target_modules; no DoRA,
                no modules_to_save, bias "none"; r (and every rank_pattern value) at most --max-lora-rank;
                adapter_model.safetensors tensors named `base_model.model.<module>.lora_A|lora_B.weight` on
                modules that are linear layers of the model (not lm_head), shaped (r, in) and (out, r).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from megaswift.serve.vllm_backend import VLLM_LORA_RANKS, adapter_rank


class VLLMLoadError(ValueError):
    """A folder vLLM would refuse to load; the message lists every problem found."""


# The HF architectures of megaswift's families, all in vLLM's model registry. A folder naming another one is
# not something megaswift exported; vLLM may still serve it, but nothing here vouches for that.
VLLM_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                      "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "DeepseekV3ForCausalLM",
                      "Glm4MoeForCausalLM")
VLLM_DTYPES = ("float32", "float16", "bfloat16")
SAFETENSORS_INDEX = "model.safetensors.index.json"
_LORA_TENSOR = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")


def check_for_vllm(model_dir: str | Path, adapters: dict[str, str] | None = None) -> None:
    """VLLMLoadError listing what vLLM would refuse in the model folder and in each adapter."""
    problems = model_folder_problems(model_dir)
    if not problems:
        for name, folder in (adapters or {}).items():
            problems += [f"adapter {name}: {p}" for p in adapter_problems(folder, model_dir)]
    if problems:
        raise VLLMLoadError("vLLM would refuse to load this:\n  " + "\n  ".join(problems))


def _read_json(file: Path) -> tuple[dict | None, str | None]:
    try:
        return json.loads(file.read_text()), None
    except FileNotFoundError:
        return None, f"{file}: missing"
    except json.JSONDecodeError as err:
        return None, f"{file}: invalid JSON ({err})"


def model_folder_problems(model_dir: str | Path) -> list[str]:
    folder = Path(model_dir)
    config, error = _read_json(folder / "config.json")
    if error:
        return [f"{error}; expected an HF model folder (megaswift convert mcore2hf writes one)"]
    problems = _config_problems(config, folder / "config.json")
    shapes, weight_problems = _safetensors_shapes(folder)
    problems += weight_problems
    if not problems:
        problems += _coverage_problems(folder, config, shapes)
    if not (folder / "tokenizer_config.json").is_file() or not any(
            (folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        problems.append(f"{folder}: no tokenizer (tokenizer_config.json with tokenizer.json or tokenizer.model); "
                        f"vLLM loads the tokenizer from the model folder: save the training tokenizer there")
    tokenizer_config, _ = _read_json(folder / "tokenizer_config.json")
    if not (folder / "chat_template.jinja").is_file() and not (tokenizer_config or {}).get("chat_template"):
        problems.append(f"{folder}: no chat template (chat_template.jinja or tokenizer_config.json's chat_template); "
                        f"vLLM's /v1/chat/completions needs the template training rendered with")
    return problems


def _config_problems(config: dict, file: Path) -> list[str]:
    problems = []
    architectures = config.get("architectures") or []
    if len(architectures) != 1 or architectures[0] not in VLLM_ARCHITECTURES:
        problems.append(f"{file}: architectures={architectures!r}; expected one of {list(VLLM_ARCHITECTURES)} "
                        f"(vLLM picks its model class by this name)")
    dtype = config.get("dtype") or config.get("torch_dtype")
    if dtype not in VLLM_DTYPES:
        problems.append(f"{file}: dtype/torch_dtype={dtype!r}; expected one of {list(VLLM_DTYPES)} (vLLM's --dtype "
                        f"auto reads it)")
    context = config.get("max_position_embeddings")
    if not isinstance(context, int) or context <= 0:
        problems.append(f"{file}: max_position_embeddings={context!r}; expected a positive integer (vLLM's default "
                        f"max_model_len)")
    return problems


def _safetensors_shapes(folder: Path) -> tuple[dict[str, tuple], list[str]]:
    """{tensor name: shape} of the files vLLM reads (those the index names, else every *.safetensors)."""
    from safetensors import safe_open

    index_file = folder / SAFETENSORS_INDEX
    index = None
    if index_file.is_file():
        index, error = _read_json(index_file)
        if error or not isinstance((index or {}).get("weight_map"), dict):
            return {}, [error or f"{index_file}: no weight_map; expected {{\"weight_map\": {{tensor: file}}}}"]
        files = sorted(set(index["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        return {}, [f"{folder}: no *.safetensors weights; vLLM loads safetensors (megaswift convert mcore2hf "
                    f"writes them)"]
    shapes, where, problems = {}, {}, []
    for name in files:
        if not (folder / name).is_file():
            problems.append(f"{index_file}: names {name}, which is missing; re-export the folder")
            continue
        with safe_open(folder / name, framework="pt") as f:
            for key in f.keys():
                if key in where:
                    problems.append(f"{folder}: tensor {key} is in both {where[key]} and {name}")
                shapes[key], where[key] = tuple(f.get_slice(key).get_shape()), name
    if index is not None:
        mapped = index["weight_map"]
        wrong = sorted(k for k in where if mapped.get(k) != where[k])
        ghosts = sorted(k for k in mapped if k not in where and (folder / mapped[k]).is_file())
        if wrong:
            problems.append(f"{index_file}: {len(wrong)} tensor(s) not listed under the file holding them, e.g. "
                            f"{wrong[0]} (in {where[wrong[0]]}, listed as {mapped.get(wrong[0])}); vLLM reads only "
                            f"what the index lists: rewrite the index or re-export")
        if ghosts:
            problems.append(f"{index_file}: {len(ghosts)} listed tensor(s) not in their file, e.g. {ghosts[0]} "
                            f"(listed in {mapped[ghosts[0]]})")
    return shapes, problems


def _meta_model(folder: Path):
    """The transformers model of `folder`'s config with no memory behind it: its parameter names and shapes."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))


def _coverage_problems(folder: Path, config: dict, shapes: dict[str, tuple]) -> list[str]:
    """Every parameter from the files, no unknown tensor, every shape right. Skipped where the file's tensor
    names are not the plain model's: MoE models (transformers 5 fuses their experts on load; the converters'
    own verifier checks those exports) and quantized folders (`quantization_config`: packed weights with
    their scales and quant states, as `megaswift export --quant` writes them)."""
    if "quantization_config" in config or any(".experts." in k for k in shapes):
        return []
    model = _meta_model(folder)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = bool(config.get("tie_word_embeddings", False))
    optional = {"lm_head.weight"} if tied else set()
    missing = sorted(set(expected) - set(shapes) - optional)
    unknown = sorted(set(shapes) - set(expected))
    wrong = sorted(k for k in set(shapes) & set(expected) if shapes[k] != expected[k])
    problems = []
    if missing:
        hint = (" (tie_word_embeddings is false, so lm_head.weight must be saved: set it true if lm_head is the "
                "embedding)" if "lm_head.weight" in missing else "")
        problems.append(f"{folder}: {len(missing)} parameter(s) of {config['architectures'][0]} missing from the "
                        f"safetensors files, e.g. {missing[0]}{hint}; vLLM refuses weights left uninitialised")
    if unknown:
        problems.append(f"{folder}: {len(unknown)} tensor(s) the model does not have, e.g. {unknown[0]}; vLLM "
                        f"refuses names it does not know")
    if wrong:
        problems.append(f"{folder}: {wrong[0]} has shape {list(shapes[wrong[0]])}, the config gives "
                        f"{list(expected[wrong[0]])} ({len(wrong)} such)")
    return problems


def adapter_problems(adapter_dir: str | Path, model_dir: str | Path,
                     max_rank: int = VLLM_LORA_RANKS[-1]) -> list[str]:
    from safetensors import safe_open

    folder = Path(adapter_dir)
    file = folder / "adapter_config.json"
    config, error = _read_json(file)
    if error:
        return [f"{error}; expected a PEFT adapter folder (megaswift convert mcore2hf of a LoRA run writes one)"]
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"{file}: peft_type={config.get('peft_type')!r}; vLLM serves LoRA adapters only")
    missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in config]
    if missing:
        problems.append(f"{file}: missing {missing}; vLLM requires r, lora_alpha and target_modules")
    if config.get("use_dora"):
        problems.append(f"{file}: use_dora=true; vLLM serves no DoRA adapters: serve the model merged "
                        f"(megaswift convert mcore2hf --merge) or train with --tuner.type lora")
    if config.get("modules_to_save"):
        problems.append(f"{file}: modules_to_save={config['modules_to_save']!r}; vLLM serves adapters without "
                        f"weights trained in full: serve the model merged (mcore2hf --merge)")
    if config.get("bias", "none") != "none":
        problems.append(f"{file}: bias={config['bias']!r}; vLLM serves adapters with bias \"none\" only")
    if "r" in config and adapter_rank(folder) > max_rank:
        problems.append(f"{file}: rank {adapter_rank(folder)} is above --max-lora-rank {max_rank}")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        return problems + [f"{weights}: missing; vLLM reads the adapter's tensors from it"]
    modules = {name: module for name, module in _meta_model(Path(model_dir)).named_modules()}
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items()
                     if type(m).__name__ == "Linear" and n.rsplit(".", 1)[-1] != "lm_head"})
    factors: dict[str, set] = {}
    with safe_open(weights, framework="pt") as f:
        for key in f.keys():
            problem = _lora_tensor_problem(key, tuple(f.get_slice(key).get_shape()), config, modules, linear)
            if problem:
                problems.append(f"{weights}: {problem}")
            elif found := _LORA_TENSOR.match(key):
                factors.setdefault(found["module"], set()).add(found["factor"])
    unpaired = sorted(m for m, f in factors.items() if f != {"A", "B"})
    if unpaired:
        problems.append(f"{weights}: {len(unpaired)} module(s) with lora_A or lora_B alone, e.g. {unpaired[0]}; "
                        f"each targeted module needs both")
    if not factors and not problems:
        problems.append(f"{weights}: no LoRA tensors")
    return problems


def _lora_tensor_problem(key: str, shape: tuple, config: dict, modules: dict, linear: list[str]) -> str | None:
    found = _LORA_TENSOR.match(key)
    if not found:
        return (f"tensor {key}: expected base_model.model.<module>.lora_A.weight or .lora_B.weight; vLLM loads no "
                f"other adapter tensors")
    path, factor = found["module"], found["factor"]
    if path.rsplit(".", 1)[-1] not in linear or path not in modules:
        return f"tensor {key}: targets {path}, not one of the model's LoRA-able linear layers {linear}"
    module = modules[path]
    # PEFT matches a rank_pattern key against the end of the module's name
    ranks = [r for k, r in (config.get("rank_pattern") or {}).items() if path == k or path.endswith("." + k)]
    rank = int(ranks[0] if ranks else config.get("r", 0))
    want = (rank, module.in_features) if factor == "A" else (module.out_features, rank)
    if shape != want:
        return f"tensor {key}: shape {list(shape)}, expected {list(want)} (rank {rank}, {path} is " \
               f"{module.in_features} -> {module.out_features})"
    return None
