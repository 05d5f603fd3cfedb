"""Benchmark `megaswift convert` on a ~2 GB bf16 Llama-shaped checkpoint against copying the same files.

Generates a random HF checkpoint (hidden 2048, 16 layers, GQA 32/8 heads, ffn 7168, vocab 32000, two
safetensors shards + index) in a temporary folder, then times, each in its own process: `cp -r` of the
HF folder (the baseline), the same copy through user space (read + write in Python, what any
converter has to do), a bare `import torch` (the floor of any converter written on torch), a
start-up with the converter's imports (torch, megatron-core), `convert hf2mcore` and `convert
mcore2hf`. The steps alternate over --rounds rounds (outputs deleted between rounds) and the fastest
round of each counts. Peak RSS is each child's own (/usr/bin/time); the start-up's is subtracted to
show what the conversion itself holds. `sync` runs (untimed) before each step. Checks the round trip
is bit-exact every round, deletes everything, writes benchmarks/results/convert_speed.json. Goals:
each direction <= 2x the copy time; peak RSS <= 2x the largest tensor + 1 GiB.

With --procs 1,2 (the default) hf2mcore also runs in 2 processes (`megaswift launch --nproc-per-node 2`,
each its share of the tensors, one checkpoint: checked equal to the 1-process one every round), against the
user-space copy in 2 processes (each every other file): `hf2mcore_by_processes` gives each count's
throughput, its ratio to the copy's in as many processes (the goal: >= 0.8 at >= 13 GiB) and the speed-up
over one process; `spread` per step, how far the slowest round is from the fastest. Each step's
`seconds_until_durable` adds the `sync` after it: a buffered writer (the copies) returns with gigabytes
still in the page cache, the converters (direct I/O) with none; the `_until_durable` ratio compares that.

With --baseline DIR (another checkout of this project, e.g. `git archive` of an older commit), hf2mcore also
runs from DIR's code in the same alternating rounds (`hf2mcore_baseline`, `hf2mcore_baseline_<n>proc`),
its checkpoint checked equal to this checkout's every round: a before/after under the same load.

    .venv/bin/python benchmarks/convert_speed.py
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SHAPE = {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
         "intermediate_size": 7168, "vocab_size": 32000}


# Copies the folder's files through user space; with PROCS > 1, that many forked processes each copy every
# PROCS-th file (largest first): the baseline for a conversion in as many processes.
USER_SPACE_COPY = """
import os, sys
src, dst, procs = sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 1
os.mkdir(dst)
names = sorted(os.listdir(src), key=lambda n: -os.path.getsize(os.path.join(src, n)))
def copy(part):
    for name in names[part::procs]:
        with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
            while chunk := f.read(64 << 20):
                g.write(chunk)
children = []
for part in range(1, procs):
    pid = os.fork()
    if pid == 0:
        copy(part)
        os._exit(0)
    children.append(pid)
copy(0)
sys.exit(any(os.waitpid(pid, 0)[1] for pid in children))
"""


def hf_config(shape: dict) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, "attention_bias": False,
            "max_position_embeddings": 8192, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
            **shape}


def tensor_shapes(shape: dict) -> dict[str, tuple[int, ...]]:
    h, f, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.input_layernorm.weight": (h,), f"{p}.self_attn.q_proj.weight": (h, h),
                       f"{p}.self_attn.k_proj.weight": (kv, h), f"{p}.self_attn.v_proj.weight": (kv, h),
                       f"{p}.self_attn.o_proj.weight": (h, h), f"{p}.post_attention_layernorm.weight": (h,),
                       f"{p}.mlp.gate_proj.weight": (f, h), f"{p}.mlp.up_proj.weight": (f, h),
                       f"{p}.mlp.down_proj.weight": (h, f)})
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    return shapes


def generate_checkpoint(folder: Path, shape: dict, shards: int = 2) -> tuple[int, int]:
    """Writes the HF folder; returns (total bytes, largest tensor bytes)."""
    folder.mkdir(parents=True)
    shapes = tensor_shapes(shape)
    names = list(shapes)
    per_shard = -(-len(names) // shards)
    weight_map, total, largest = {}, 0, 0
    g = torch.Generator().manual_seed(0)
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: torch.randn(shapes[n], generator=g).to(torch.bfloat16)
                for n in names[s * per_shard:(s + 1) * per_shard]}
        save_file(part, folder / file, metadata={"format": "pt"})
        for n, t in part.items():
            weight_map[n] = file
            total += t.nbytes
            largest = max(largest, t.nbytes)
        del part
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(hf_config(shape)))
    return total, largest


def run_child(cmd: list[str], repo: Path = REPO, processes: int = 1) -> dict:
    """Wall time and the child's own peak RSS, measured by /usr/bin/time: os.wait4 from this process
    would also count the RSS of the forked copy of this (large) process before exec. `repo`: whose code runs;
    `processes`: how many share the CPUs, each with its part of them as OpenMP threads (as torchrun gives
    its workers by default: measured, 2 threads in each of 2 processes on 2 cores made hf2mcore 5-20% slower)."""
    threads = os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": threads}
    # Flush what earlier steps left dirty (the generated checkpoint, the copy, the previous output), so
    # each step starts alike: otherwise the kernel throttles a step's writes to disk speed while it
    # writes back the previous step's 2 GB, and only the copy (run first) escapes that.
    os.sync()
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KIB %M", *cmd], cwd=repo, env=env, capture_output=True,
                          text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    # Until its bytes are on the device: a buffered writer (the copies, the --baseline) returns with up to
    # the kernel's dirty limit still in the page cache, a direct-I/O one (converters/direct_io.py) with none.
    os.sync()
    durable = time.perf_counter() - start
    max_rss_kib = int(proc.stderr.strip().splitlines()[-1].split()[-1])
    return {"seconds": round(wall, 3), "seconds_until_durable": round(durable, 3), "peak_rss_bytes": max_rss_kib * 1024}


def round_trip_bit_exact(source: Path, back: Path) -> bool:
    from converters.safetensors_file import SafetensorsFile
    src_map = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    back_map = json.loads((back / "model.safetensors.index.json").read_text())["weight_map"]
    if src_map.keys() != back_map.keys():
        return False
    files = {}

    def file(folder, name):
        return files.setdefault((folder, name), SafetensorsFile(folder / name))
    return all(torch.equal(file(source, src_map[k]).read(k), file(back, back_map[k]).read(k)) for k in src_map)


def same_checkpoint(one: Path, other: Path) -> bool:
    """The torch_dist checkpoints of two hf2mcore runs hold the same bytes for every item (each tensor as torch
    serialized it, whichever rank's file it is in), compared one item at a time: memory stays one tensor."""
    from torch.distributed.checkpoint import FileSystemReader
    folders = [folder / "iter_0000000" for folder in (one, other)]
    a, b = (FileSystemReader(str(folder)).read_metadata().storage_data for folder in folders)

    def item(folder: Path, info) -> bytes:
        with open(folder / info.relative_path, "rb") as f:
            f.seek(info.offset)
            return f.read(info.length)
    return a.keys() == b.keys() and all(item(folders[0], a[k]) == item(folders[1], b[k]) for k in a)


def best_of(runs: list[dict]) -> dict:
    """The fastest round of a step (the machine is shared: the fastest is the least disturbed), with every
    round's time and the largest peak RSS of any round."""
    best = min(runs, key=lambda r: r["seconds"])
    return {**best, "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),
            "seconds_until_durable": min(r["seconds_until_durable"] for r in runs),
            "rounds_seconds": [r["seconds"] for r in runs]}


def ratio_per_round(slower: list[dict], faster: list[dict]) -> dict:
    """slower / faster time within each round, and their min / median / max: the spread of a ratio."""
    ratios = [round(a["seconds"] / b["seconds"], 2) for a, b in zip(slower, faster)]
    return {"rounds": ratios, "min": min(ratios), "median": statistics.median(ratios), "max": max(ratios)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=None, help="where the temporary checkpoints go (default: system temp)")
    p.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"])
    p.add_argument("--out", default=str(RESULTS / "convert_speed.json"), help="the JSON report")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of every step; the fastest counts")
    p.add_argument("--procs", default="1,2",
                   help="process counts of hf2mcore (megaswift launch --nproc-per-node P), each against a "
                        "user-space copy in as many processes (default 1,2)")
    p.add_argument("--baseline", default=None,
                   help="another checkout whose hf2mcore runs too, in the same rounds (a before/after)")
    args = p.parse_args()
    procs = sorted({int(n) for n in args.procs.split(",")} | {1})
    shape = {**SHAPE, "num_hidden_layers": args.layers}
    root = Path(tempfile.mkdtemp(prefix="convert_speed_", dir=args.workdir))
    python = [sys.executable, "-m", "megaswift", "convert"]
    steps = {
        "copy": ["cp", "-r", str(root / "hf"), str(root / "copy")],
        # The same bytes copied through user space (read into memory, written out), as any converter
        # must write them, where `cp` copies inside the kernel (copy_file_range).
        "copy_user_space": [sys.executable, "-c", USER_SPACE_COPY, str(root / "hf"), str(root / "copy_user_space")],
        "import_torch": [sys.executable, "-c", "import torch"],
        # the converter's imports as `megaswift convert` makes them: without the cyclic collector (cli/startup.py)
        "startup": [sys.executable, "-c", "import gc; gc.disable(); import converters.hf2mcore, converters.mcore2hf, "
                    "converters.mcore_layout, megatron.core.models.gpt; gc.freeze()"],
        "hf2mcore": [*python, "hf2mcore", str(root / "hf"), str(root / "mcore"), "--no-verify", "--no-progress"],
        "mcore2hf": [*python, "mcore2hf", str(root / "mcore"), str(root / "back"), "--no-verify", "--no-progress",
                     "--max-shard-size", "1GB"],
    }
    for n in procs[1:]:  # several processes write one checkpoint: compared with as many copying processes
        steps[f"copy_user_space_{n}proc"] = [sys.executable, "-c", USER_SPACE_COPY, str(root / "hf"),
                                             str(root / f"copy_user_space_{n}proc"), str(n)]
        steps[f"hf2mcore_{n}proc"] = [sys.executable, "-m", "megaswift", "launch", "--nproc-per-node", str(n), "--",
                                      "megaswift", "convert", "hf2mcore", str(root / "hf"),
                                      str(root / f"mcore_{n}proc"), "--no-verify", "--no-progress"]
    baseline = {}  # step -> (command, its output): hf2mcore from the --baseline checkout
    if args.baseline:
        for n in procs:
            name, out = ("hf2mcore_baseline", "mcore_baseline") if n == 1 else \
                (f"hf2mcore_baseline_{n}proc", f"mcore_baseline_{n}proc")
            convert = steps["hf2mcore"] if n == 1 else steps[f"hf2mcore_{n}proc"]
            baseline[name] = ([str(root / out) if a == str(root / ("mcore" if n == 1 else f"mcore_{n}proc")) else a
                               for a in convert], out)
            steps[name] = baseline[name][0]
    runs: dict[str, list[dict]] = {name: [] for name in steps}
    step_processes = {name: n for n in procs[1:] for name in (f"copy_user_space_{n}proc", f"hf2mcore_{n}proc",
                                                              f"hf2mcore_baseline_{n}proc")}
    load_at_start = round(os.getloadavg()[0], 2)
    try:
        total, largest = generate_checkpoint(root / "hf", shape, shards=max(2, args.layers // 8))  # ~1 GB each
        # Steps alternate within each round and every output is deleted before the next round, so each
        # step writes into recycled page-cache memory alike (first-touch of fresh memory in this VM
        # costs several times the write itself) and a burst of load from other work hits all steps.
        # Each output is checked (untimed) and deleted as soon as its step ends, so the disk holds at most the
        # source, hf2mcore's checkpoint and one more output (4x the model, where keeping all needed 6x).
        checked_outputs = {"mcore2hf": "back", **{f"hf2mcore_{n}proc": f"mcore_{n}proc" for n in procs[1:]},
                           **{name: out for name, (_, out) in baseline.items()}}
        bit_exact = True
        for round_ in range(args.rounds):
            for name, cmd in steps.items():
                runs[name].append(run_child(cmd, Path(args.baseline).resolve() if name in baseline else REPO,
                                            processes=step_processes.get(name, 1)))
                if name.startswith("copy"):  # free the disk at once: at 15 GB+ every copy counts
                    shutil.rmtree(root / name)
                elif name in checked_outputs:
                    out = root / checked_outputs[name]
                    bit_exact &= (round_trip_bit_exact(root / "hf", out) if name == "mcore2hf"
                                  else same_checkpoint(root / "mcore", out))
                    shutil.rmtree(out)
            shutil.rmtree(root / "mcore")
            if not bit_exact:
                break
            print(f"round {round_ + 1}: " + ", ".join(f"{n} {r[-1]['seconds']:.2f} s" for n, r in runs.items()),
                  flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results = {name: best_of(r) for name, r in runs.items()}
    copy_s, startup_s = results["copy"]["seconds"], results["startup"]["seconds"]
    for r in results.values():  # how much the rounds disagree: the machine is shared
        r["spread"] = round((max(r["rounds_seconds"]) - r["seconds"]) / r["seconds"], 3)
    by_procs = {}
    for n in procs:
        convert, copy = (("hf2mcore", "copy_user_space") if n == 1
                         else (f"hf2mcore_{n}proc", f"copy_user_space_{n}proc"))
        convert_s, copy_user_s = results[convert]["seconds"], results[copy]["seconds"]
        by_procs[str(n)] = {
            "hf2mcore_bytes_per_s": round(total / convert_s), "copy_user_space_bytes_per_s": round(total / copy_user_s),
            "hf2mcore_bytes_per_s_per_process": round(total / convert_s / n),
            # the goal: >= 0.8 at >= 13 GiB, each process converting at 0.8x what a copying process moves
            "throughput_ratio_to_copy_user_space": round(copy_user_s / convert_s, 2),
            "throughput_ratio_to_copy_user_space_excluding_startup": round(copy_user_s / (convert_s - startup_s), 2),
            # both until their bytes are on the device (the copy leaves them in the page cache)
            "throughput_ratio_to_copy_user_space_until_durable": round(
                results[copy]["seconds_until_durable"] / results[convert]["seconds_until_durable"], 2),
            # the same ratio within each round (both steps under the same load), not only of the best times
            "throughput_ratio_to_copy_user_space_per_round": ratio_per_round(runs[copy], runs[convert]),
            "speedup_over_1proc": round(results["hf2mcore"]["seconds"] / convert_s, 2),
            "peak_rss_per_process_bytes": results[convert]["peak_rss_bytes"]}
        before = "hf2mcore_baseline" if n == 1 else f"hf2mcore_baseline_{n}proc"
        if before in results:  # the --baseline checkout's hf2mcore, same rounds
            by_procs[str(n)]["baseline_throughput_ratio_to_copy_user_space"] = round(
                copy_user_s / results[before]["seconds"], 2)
            by_procs[str(n)]["speedup_over_baseline"] = round(results[before]["seconds"] / convert_s, 2)
            by_procs[str(n)]["speedup_over_baseline_per_round"] = ratio_per_round(runs[before], runs[convert])
    rss_budget = 2 * largest + 2**30
    startup_rss = results["startup"]["peak_rss_bytes"]
    for d in ("hf2mcore", "mcore2hf"):
        results[d]["peak_rss_above_startup_bytes"] = results[d]["peak_rss_bytes"] - startup_rss
    report = {
        "model": {**shape, "dtype": "bfloat16", "bytes": total, "largest_tensor_bytes": largest},
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": sys.version.split()[0],
                    # other work on a shared machine slows every step: the 1-minute load at start and end
                    "load_average_1min": [load_at_start, round(os.getloadavg()[0], 2)]},
        "rounds": args.rounds, "results": results, "round_trip_bit_exact": bit_exact,
        "hf2mcore_by_processes": by_procs,
        "peak_rss_budget_bytes": rss_budget,
        "ratios_to_copy": {d: round(results[d]["seconds"] / copy_s, 2) for d in ("hf2mcore", "mcore2hf")},
        "import_torch_ratio_to_copy": round(results["import_torch"]["seconds"] / copy_s, 2),
        "copy_user_space_ratio_to_copy": round(results["copy_user_space"]["seconds"] / copy_s, 2),
        "ratios_to_copy_user_space_excluding_startup": {
            d: round((results[d]["seconds"] - startup_s) / results["copy_user_space"]["seconds"], 2)
            for d in ("hf2mcore", "mcore2hf")},
        "ratios_to_copy_excluding_startup": {d: round((results[d]["seconds"] - startup_s) / copy_s, 2)
                                             for d in ("hf2mcore", "mcore2hf")},
        "goals": {"time_per_direction_le_2x_copy": all(results[d]["seconds"] <= 2 * copy_s
                                                       for d in ("hf2mcore", "mcore2hf")),
                  "peak_rss_le_2x_largest_plus_1GiB": all(results[d]["peak_rss_bytes"] <= rss_budget
                                                          for d in ("hf2mcore", "mcore2hf")),
                  "peak_rss_above_startup_le_2x_largest": all(
                      results[d]["peak_rss_above_startup_bytes"] <= 2 * largest for d in ("hf2mcore", "mcore2hf"))},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    gib = 2**30
    print(f"model {total / gib:.2f} GiB bf16, largest tensor {largest / 2**20:.0f} MiB; copy {copy_s:.2f} s; "
          f"user-space copy {results['copy_user_space']['seconds']:.2f} s; "
          f"import torch {results['import_torch']['seconds']:.2f} s; python+megatron start-up {startup_s:.2f} s "
          f"({results['startup']['peak_rss_bytes'] / gib:.2f} GiB)")
    for d in ("hf2mcore", "mcore2hf"):
        r = results[d]
        print(f"{d}: {r['seconds']:.2f} s = {report['ratios_to_copy'][d]}x copy "
              f"({report['ratios_to_copy_excluding_startup'][d]}x without start-up, "
              f"{report['ratios_to_copy_user_space_excluding_startup'][d]}x the user-space copy), peak RSS "
              f"{r['peak_rss_bytes'] / gib:.2f} GiB (budget {rss_budget / gib:.2f} GiB), "
              f"{r['peak_rss_above_startup_bytes'] / 2**20:.0f} MiB above start-up (2x largest tensor: "
              f"{2 * largest / 2**20:.0f} MiB)")
    for n, r in by_procs.items():
        print(f"hf2mcore in {n} process(es): {r['hf2mcore_bytes_per_s'] / 2**20:.0f} MiB/s = "
              f"{r['throughput_ratio_to_copy_user_space']}x a user-space copy in as many processes "
              f"({r['throughput_ratio_to_copy_user_space_excluding_startup']}x without start-up, "
              f"{r['throughput_ratio_to_copy_user_space_until_durable']}x until the bytes are on the device), "
              f"{r['speedup_over_1proc']}x one process; per round "
              f"{r['throughput_ratio_to_copy_user_space_per_round']['rounds']}; peak RSS per process "
              f"{r['peak_rss_per_process_bytes'] / gib:.2f} GiB"
              + (f"; baseline {r['baseline_throughput_ratio_to_copy_user_space']}x the copy, "
                 f"{r['speedup_over_baseline']}x faster now" if "speedup_over_baseline" in r else ""))
    print(f"round trip bit-exact (and every process count's checkpoint the same): {bit_exact}; "
          f"goals: {report['goals']}")


if __name__ == "__main__":
    main()
