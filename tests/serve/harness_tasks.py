"""Two lm-eval-harness tasks in its local-file format (YAML + a jsonl next to it) on what the tiny chat model was
taught ("Say hello." -> "Hello there, friend!"): one scored by log-likelihood, one by generation."""
import json
from pathlib import Path

TAUGHT, OTHERS = "Hello there, friend!", ["Goodbye now.", "Snow in Oslo.", "The list type."]
# the taught answer is the label in three rows and a wrong choice in the fourth: accuracy 0.75
MC_ROWS = [{"question": "Say hello.", "choices": OTHERS[:i] + [TAUGHT] + OTHERS[i:], "label": i} for i in range(3)]
MC_ROWS.append({"question": "Say hello.", "choices": [TAUGHT, *OTHERS], "label": 2})
GEN_REFERENCES = [TAUGHT, "Goodbye now."]  # exact match 0.5 for the base model
EXPECTED = {"tiny_mc": {"acc": 0.75}, "tiny_gen": {"exact_match": 0.5}}

MC_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - metric: acc
"""
GEN_YAML = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: gen.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{query}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["<|im_end|>"]
  max_gen_toks: 16
  do_sample: false
metric_list:
  - metric: exact_match
"""


def write_tiny_tasks(folder: Path) -> tuple[Path, Path]:
    """(multiple-choice YAML, generation YAML); their data_files are relative to the YAML's folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mc.jsonl").write_text("".join(json.dumps(row) + "\n" for row in MC_ROWS))
    (folder / "gen.jsonl").write_text("".join(json.dumps({"query": "Say hello.", "answer": ref}) + "\n"
                                              for ref in GEN_REFERENCES))
    (folder / "tiny_mc.yaml").write_text(MC_YAML)
    (folder / "tiny_gen.yaml").write_text(GEN_YAML)
    return folder / "tiny_mc.yaml", folder / "tiny_gen.yaml"
