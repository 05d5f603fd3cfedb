"""The embedded default data: Python's own documentation text (pydoc_data, shipped with CPython),
a tiny BPE tokenizer trained on it, and the indexed dataset `megaswift pt` reads. Nothing to download."""
import json
from pathlib import Path

from megaswift.data.preprocess import preprocess
from megaswift.data.tiny_tokenizer import build_tiny_tokenizer


def write_demo_corpus(path: Path) -> int:
    from pydoc_data.topics import topics
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for name in sorted(topics):
            f.write(json.dumps({"text": topics[name]}) + "\n")
    return len(topics)


def prepare_demo_data(out_dir: str | Path, progress: bool = False) -> tuple[Path, Path]:
    """Returns (tokenizer folder, indexed dataset prefix); reuses what an earlier call wrote."""
    out = Path(out_dir)
    tokenizer_dir, corpus, prefix = out / "tokenizer", out / "corpus.jsonl", out / "pydoc_text_document"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        build_tiny_tokenizer(tokenizer_dir)
    if not Path(f"{prefix}.idx").is_file():
        write_demo_corpus(corpus)
        preprocess([corpus], str(tokenizer_dir), str(prefix), progress=progress)
    return tokenizer_dir, prefix


if __name__ == "__main__":
    import sys
    tokenizer, prefix = prepare_demo_data(sys.argv[1] if len(sys.argv) > 1 else "runs/quickstart/data", progress=True)
    print(f"tokenizer: {tokenizer}\ndata: {prefix}.bin/.idx")
