"""lm-eval-harness tasks inside `megaswift eval`.

lm-eval does the work: its task configs (a name from its registry or from `--lm-eval-include` folders, or a
path to a task YAML; its local-file format, `dataset_path: json` + `dataset_kwargs.data_files`, runs offline),
its model classes and its metrics. megaswift only chooses the model class and hands it what training used:
- a local model: lm-eval's HFLM on the already loaded model and tokenizer (the tokenizer class training saved,
  see loading.load_tokenizer; LoRA adapters by activating one, or none, on the loaded PeftModel);
- a URL: lm-eval's `local-completions` (log-likelihoods through /v1/completions `echo` + `logprobs`, tokens
  through vLLM's /tokenize endpoints, which `megaswift deploy` serves too) or `local-chat-completions`
  (generation only: servers without prompt log-probabilities).
lm-eval is an optional dependency (the `eval` extra): imported here only, when a task needs it.
"""
from __future__ import annotations

import numbers
from contextlib import contextmanager
from pathlib import Path

CUSTOM_SUFFIXES = (".csv", ".jsonl")  # megaswift's own sets (eval_tasks.py); everything else is lm-eval's
YAML_SUFFIXES = (".yaml", ".yml")
INSTALL_HINT = "pip install 'megaswift[eval]' (or: pip install lm-eval==0.4.13 tenacity)"


class HarnessError(ValueError):
    """An lm-eval task that cannot run: says which, what was expected and what to do."""


def is_custom_task(entry: str) -> bool:
    return Path(entry).suffix in CUSTOM_SUFFIXES


def require_lm_eval(entries: list[str]) -> None:
    try:
        import lm_eval  # noqa: F401
        import tenacity  # noqa: F401 - lm-eval's API models need it (its `api` extra)
    except ImportError as err:
        raise HarnessError(f"--tasks {','.join(entries)}: these are lm-eval-harness tasks (not .csv or .jsonl "
                           f"files), which need the lm-eval package ({err.name} is not installed); install it "
                           f"with {INSTALL_HINT}") from None


def _local_data_files(config: dict, folder: Path) -> dict:
    """data_files relative to the task YAML's folder, where they exist there (lm-eval would read them relative
    to the working directory, so a task folder would only work when run from inside it)."""
    kwargs = config.get("dataset_kwargs") or {}
    files = kwargs.get("data_files")

    def resolve(path):
        if isinstance(path, str) and not Path(path).is_absolute() and (folder / path).exists():
            return str(folder / path)
        return path

    if isinstance(files, dict):
        files = {split: [resolve(p) for p in v] if isinstance(v, list) else resolve(v) for split, v in files.items()}
    elif isinstance(files, list):
        files = [resolve(p) for p in files]
    elif files is not None:
        files = resolve(files)
    if files is not None:
        config["dataset_kwargs"] = {**kwargs, "data_files": files}
    return config


def resolve_tasks(entries: list[str], include: list[str] | None = None):
    """(task specs for simple_evaluate, the TaskManager): YAML paths are read (with their `include:`s and
    `!function`s); names are looked up in `include` folders first, then in lm-eval's own registry (indexing all
    of lm-eval's tasks takes ~10 s, so only when a name needs it)."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    include = [str(Path(folder)) for folder in include or []]
    for folder in include:
        if not Path(folder).is_dir():
            raise HarnessError(f"--lm-eval-include {folder}: expected a folder of lm-eval task YAMLs, found "
                               f"{'a file' if Path(folder).exists() else 'no such folder'}")
    specs, names = [], []
    for entry in entries:
        path = Path(entry)
        if path.suffix in YAML_SUFFIXES:
            if not path.is_file():
                raise FileNotFoundError(f"--tasks {entry}: no such lm-eval task YAML")
            try:
                specs.append(_local_data_files(load_yaml(str(path.resolve()), resolve_func=True), path.parent))
            except Exception as err:  # noqa: BLE001 - yaml or !function errors, whatever lm-eval raises
                raise HarnessError(f"--tasks {entry}: expected an lm-eval task YAML, could not read it: "
                                   f"{type(err).__name__}: {err}") from None
        else:
            names.append(entry)
    manager = TaskManager(include_path=include or None, include_defaults=False)
    missing = [name for name in names if not manager.match_tasks([name])]
    if missing:
        manager = TaskManager(include_path=include or None)
        missing = [name for name in names if not manager.match_tasks([name])]
    if missing:
        raise HarnessError(f"--tasks {','.join(missing)}: expected .csv (multiple choice) or .jsonl (QA) files, "
                           f"lm-eval task YAML files, or task names of lm-eval's registry or of --lm-eval-include "
                           f"folders; found none of these (`lm-eval ls tasks` lists the registry)")
    return specs + names, manager


def local_harness_model(loaded, batch_size: int):
    """lm-eval's HuggingFace model class on the loaded model and the training tokenizer."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size,
                max_length=loaded.context_length)


@contextmanager
def active_adapter(loaded, adapter: str | None):
    """The LoRA adapter HFLM's plain forward calls use (they pass no adapter_names): `adapter`, or none."""
    if not loaded.adapters:
        yield
        return
    model = loaded.model
    if adapter is None:
        with model.disable_adapter():
            yield
        return
    previous = model.active_adapter
    model.set_adapter(adapter)
    try:
        yield
    finally:
        model.set_adapter(previous)


def remote_harness_model(url: str, model: str, api_key: str | None, api: str, batch_size: int):
    """lm-eval's OpenAI-compatible model classes on `url` (the /v1 base)."""
    from lm_eval.models.openai_completions import LocalChatCompletion, LocalCompletionsAPI

    base = url.rstrip("/")
    auth = {"header": {"Authorization": f"Bearer {api_key}"}, "auth_token": api_key} if api_key else {}
    if api == "chat-completions":
        return LocalChatCompletion(base_url=f"{base}/chat/completions", model=model, **auth)

    class Completions(LocalCompletionsAPI):
        """lm-eval 0.4.13 hands a chat (a list of messages) on to tokenization when the tokenizer is the server's
        (`remote`), which fails. Rendered here instead, by transformers' own renderer (as apply_chat_template
        renders: undefined `tools` allowed, special tokens as variables) with the chat template the server
        reports in /tokenizer_info."""

        def apply_chat_template(self, chat_history, add_generation_prompt=True):
            if not (self.tokenizer_backend == "remote" and self.tokenized_requests):
                return super().apply_chat_template(chat_history, add_generation_prompt)
            from transformers.utils.chat_template_utils import render_jinja_template

            info = self.tokenizer.tokenizer_info
            if not info.get("chat_template"):
                raise HarnessError(f"--apply-chat-template: the server at {base} reports no chat template")
            specials = {k: info[k] for k in ("bos_token", "eos_token", "pad_token") if info.get(k) is not None}
            (text,), _ = render_jinja_template([chat_history], chat_template=info["chat_template"],
                                               add_generation_prompt=add_generation_prompt,
                                               continue_final_message=not add_generation_prompt, **specials)
            return text

    # tokenizer "auto": the server's own (/tokenizer_info and /tokenize, vLLM's endpoints), else the HF tokenizer
    # named by `model`
    return Completions(base_url=f"{base}/completions", model=model, batch_size=batch_size, tokenizer_backend="auto",
                       **auth)


def run_harness(lm, specs, manager, limit: int | None, num_fewshot: int | None, apply_chat_template: bool) -> dict:
    """{task name: {"kind": "lm-eval", "n": items, metric: value, ...}} as lm-eval computes them."""
    from lm_eval import simple_evaluate

    try:
        out = simple_evaluate(model=lm, tasks=specs, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                              apply_chat_template=apply_chat_template, log_samples=False)
    except NotImplementedError as err:  # e.g. log-likelihoods asked of a chat-completions server
        raise HarnessError(f"lm-eval: {err}") from None
    return harness_results(out)


def harness_results(out: dict) -> dict:
    """lm-eval's results ("acc,none": 0.5, "acc_stderr,none": ...) as plain numbers keyed by metric; a filter
    other than `none` stays in the name (`exact_match[strict-match]`)."""
    counts = out.get("n-samples", {})
    results = {}
    for name, metrics in out["results"].items():
        entry = {"kind": "lm-eval", "n": metrics.get("sample_len", counts.get(name, {}).get("effective"))}
        for key, value in metrics.items():
            if key in ("name", "alias", "sample_len") or "," not in key:
                continue
            metric, _, filtered = key.partition(",")
            label = metric if filtered == "none" else f"{metric}[{filtered}]"
            entry[label] = float(value) if isinstance(value, numbers.Number) else value
        results[name] = entry
    return results


def format_metrics(result: dict) -> str:
    """`acc 0.6667 (±0.3333)  acc_norm 0.5` for the table."""
    parts = []
    for key, value in result.items():
        if key in ("kind", "n") or "_stderr" in key:
            continue
        text = f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
        metric, _, filtered = key.partition("[")
        stderr = result.get(f"{metric}_stderr" + (f"[{filtered}" if filtered else ""))
        if isinstance(stderr, float):
            text += f" (±{stderr:.2g})"
        parts.append(text)
    return "  ".join(parts)
