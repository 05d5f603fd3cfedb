"""lm-eval-harness tasks in `megaswift eval` on a local model (lm-eval's HF model class on the loaded model)."""
import json
import sys

from peft import PeftModel
from transformers import AutoModelForCausalLM

from megaswift.cli.main import main
from megaswift.serve.loading import load_tokenizer
from megaswift.serve.rendering import ChatRenderer, prompt_from_openai
from tests.serve.harness_tasks import EXPECTED, GEN_REFERENCES, MC_ROWS, write_tiny_tasks
from tests.serve.reference import hf_greedy


def test_lm_eval_tasks_beside_custom_sets_and_with_an_adapter(tiny_chat_model, tiny_adapters, tmp_path, capsys):
    mc_yaml, gen_yaml = write_tiny_tasks(tmp_path / "tasks")  # run from elsewhere: data_files found next to them
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"query": "Say hello.", "response": "Hello there, friend!"}) + "\n")
    out = tmp_path / "base.json"
    assert main(["eval", "--model", str(tiny_chat_model), "--tasks", f"{qa},{mc_yaml},{gen_yaml}",
                 "--apply-chat-template", "--output", str(out), "--max-new-tokens", "12"]) == 0
    tasks = json.loads(out.read_text())["tasks"]
    assert tasks["qa.jsonl"]["rougeL_f1"] == 100.0  # megaswift's own set, merged with lm-eval's
    assert (tasks["tiny_mc"]["n"], tasks["tiny_mc"]["acc"]) == (len(MC_ROWS), EXPECTED["tiny_mc"]["acc"])
    assert tasks["tiny_gen"]["exact_match"] == EXPECTED["tiny_gen"]["exact_match"]
    table = capsys.readouterr().out
    assert "tiny_mc" in table and "acc 0.75" in table and "exact_match 0.5" in table

    # an adapter answers through lm-eval as PeftModel alone answers (the base model's answer scored 0.5)
    tokenizer = load_tokenizer(tiny_chat_model)
    ids = ChatRenderer(tokenizer).prompt_ids(prompt_from_openai([{"role": "user", "content": "Say hello."}], None))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_chat_model),
                                           tiny_adapters["alpha"])
    answer = hf_greedy(peft_model, tokenizer, ids, 16)
    out = tmp_path / "alpha.json"
    assert main(["eval", "--model", str(tiny_chat_model), "--adapters", *(f"{k}={v}" for k, v in tiny_adapters.items()),
                 "--adapter", "alpha", "--tasks", str(gen_yaml), "--apply-chat-template", "--output", str(out)]) == 0
    expected = sum(answer == reference for reference in GEN_REFERENCES) / len(GEN_REFERENCES)
    assert json.loads(out.read_text())["tasks"]["tiny_gen"]["exact_match"] == expected != 0.5


def test_missing_lm_eval_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` fails as if it were not installed
    assert main(["eval", "--model", str(tmp_path / "never_loaded"), "--tasks", "hellaswag"]) == 1
    err = capsys.readouterr().err
    assert "hellaswag" in err and "pip install 'megaswift[eval]'" in err


def test_unknown_task_yaml_is_a_clear_error(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "never_loaded"), "--tasks", str(tmp_path / "nope.yaml")]) == 1
    assert "no such lm-eval task YAML" in capsys.readouterr().err
