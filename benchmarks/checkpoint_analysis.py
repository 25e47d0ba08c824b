"""Wall time and peak memory of analysing LLM-sized checkpoint directories: ``tempbalance analyze DIR``
against WeightWatcher 0.7.7 ``WeightWatcher(model=DIR).analyze()``, side by side, same threads.

The checkpoints are written here, once, into an ignored folder (``.cache/checkpoint_bench``): random
bf16 weights (the eigen work does not depend on the values) of real shapes under the real Hugging
Face key names, as sharded safetensors with ``model.safetensors.index.json`` and ``config.json``.
Each is written tensor by tensor straight into the safetensors layout, so writing never holds more
than one tensor.

Configurations (``--configs``):

- ``gpt2``: GPT-2 small (124M; 12 blocks, 768 wide, vocab 50257, tied LM head);
- ``tinyllama-2`` / ``tinyllama``: TinyLlama-1.1B shapes with 2 / 22 blocks (hidden 2048,
  intermediate 5632, 32 heads, 4 KV heads, vocab 32000): 4.9x the bytes, same tensor shapes, so
  the peak memory should be the same;
- ``llama7b-1`` / ``llama7b``: Llama-2-7B shapes with 1 / 32 blocks (4096 / 11008, vocab 32000;
  13.5 GB); the time per block is ``(T(32 blocks) - T(1 block)) / 31`` (start-up, embeddings and
  LM head cancel), the number to extrapolate from (70B: 80 blocks of 8192 / 28672).

Tools (``--tools``): ``tb-median`` and ``tb-ks`` (``tempbalance analyze DIR --fit median|ks``),
``ww`` (WeightWatcher; by default only on ``gpt2`` and ``tinyllama*``, as its 7B run takes hours:
``--ww-on-7b`` to force it). Every measurement is a fresh child process with the same thread count
(``OMP/MKL/OPENBLAS_NUM_THREADS`` and ``torch.set_num_threads``); wall time around the child, peak
RSS from its ``wait4`` rusage (includes the Python + torch start-up, shown as the ``import only`` row).
``--cold`` drops the page cache before each measurement (Linux, as root), so the time includes reading
the files from disk, as after a download; ``--baseline-src DIR`` also runs every ``tb-*`` tool with
another checkout's ``src/`` (e.g. the last release's), in the same run, labelled ``tb-median @ DIR``.

Usage (repository root):
    python benchmarks/checkpoint_analysis.py --tiny                      # shapes / 16: proves the script, ~2 min
    python benchmarks/checkpoint_analysis.py --threads 2 --out .agents/bench_checkpoints.md
    python benchmarks/checkpoint_analysis.py --configs llama7b-1 llama7b --tools tb-median --device cuda
    python benchmarks/checkpoint_analysis.py --configs llama7b-1 llama7b --tools tb-median --cold --baseline-src ../old/src
    python benchmarks/checkpoint_analysis.py --clean                     # delete the written checkpoints
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "checkpoint_bench"
CONFIGS = ("gpt2", "tinyllama-2", "tinyllama", "llama7b-1", "llama7b")
TOOLS = ("tb-median", "tb-ks", "ww")


@dataclass(frozen=True)
class Shape:
    """A model's architecture numbers (what the tensor shapes follow)."""

    family: str  # "gpt2" or "llama"
    blocks: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    positions: int = 0

    def scaled(self, factor: int) -> "Shape":
        """Every width divided by ``factor`` (``--tiny``); block count kept."""
        return Shape(self.family, self.blocks, self.hidden // factor, self.intermediate // factor,
                     self.vocab // factor, max(1, self.heads // factor), max(1, self.kv_heads // factor),
                     self.positions // factor)


SHAPES = {
    "gpt2": Shape("gpt2", 12, 768, 3072, 50257, 12, 12, positions=1024),
    "tinyllama-2": Shape("llama", 2, 2048, 5632, 32000, 32, 4),
    "tinyllama": Shape("llama", 22, 2048, 5632, 32000, 32, 4),
    "llama7b-1": Shape("llama", 1, 4096, 11008, 32000, 32, 32),
    "llama7b": Shape("llama", 32, 4096, 11008, 32000, 32, 32),
}


LLAMA_70B = Shape("llama", 1, 8192, 28672, 32000, 64, 8)


def block_cost(shape: Shape) -> float:
    """Eigen cost of one block: sum of m * n * min(m, n) over its matrices (the planner's model)."""
    return sum(s[0] * s[1] * min(s) for k, s in tensor_shapes(shape).items() if ".layers.0." in k and len(s) == 2)


def tensor_shapes(shape: Shape) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` as ``save_pretrained`` names them (GPT2LMHeadModel / LlamaForCausalLM)."""
    h, i = shape.hidden, shape.intermediate
    out: dict[str, tuple[int, ...]] = {}
    if shape.family == "gpt2":
        out["transformer.wte.weight"] = (shape.vocab, h)
        out["transformer.wpe.weight"] = (shape.positions, h)
        for b in range(shape.blocks):
            p = f"transformer.h.{b}."
            out.update({
                p + "ln_1.weight": (h,), p + "ln_1.bias": (h,),
                p + "attn.c_attn.weight": (h, 3 * h), p + "attn.c_attn.bias": (3 * h,),
                p + "attn.c_proj.weight": (h, h), p + "attn.c_proj.bias": (h,),
                p + "ln_2.weight": (h,), p + "ln_2.bias": (h,),
                p + "mlp.c_fc.weight": (h, i), p + "mlp.c_fc.bias": (i,),
                p + "mlp.c_proj.weight": (i, h), p + "mlp.c_proj.bias": (h,),
            })
        out["transformer.ln_f.weight"] = (h,)
        out["transformer.ln_f.bias"] = (h,)
        return out
    kv = h // shape.heads * shape.kv_heads
    out["model.embed_tokens.weight"] = (shape.vocab, h)
    for b in range(shape.blocks):
        p = f"model.layers.{b}."
        out.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
        })
    out["model.norm.weight"] = (h,)
    out["lm_head.weight"] = (shape.vocab, h)
    return out


def hf_config(shape: Shape) -> dict:
    if shape.family == "gpt2":
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": shape.blocks,
                "n_embd": shape.hidden, "n_head": shape.heads, "vocab_size": shape.vocab,
                "n_positions": shape.positions, "tie_word_embeddings": True, "torch_dtype": "bfloat16"}
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": shape.blocks,
            "hidden_size": shape.hidden, "intermediate_size": shape.intermediate, "num_attention_heads": shape.heads,
            "num_key_value_heads": shape.kv_heads, "vocab_size": shape.vocab, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16"}


def _write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], generator: torch.Generator) -> None:
    """One safetensors file (header, then each tensor's bytes in key order), one tensor in memory."""
    keys = sorted(shapes)
    header, offset = {}, 0
    for key in keys:
        size = math.prod(shapes[key]) * 2
        header[key] = {"dtype": "BF16", "shape": list(shapes[key]), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text)
        for key in keys:
            shape = shapes[key]
            if len(shape) == 1:
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                t = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
            handle.write(t.view(torch.int16).numpy().tobytes())
            del t
    os.replace(tmp, path)


def build_checkpoint(name: str, shape: Shape, shard_bytes: int) -> Path:
    """Write ``name`` into the cache (once: a ``done.json`` marks a complete directory)."""
    directory = CACHE / name
    marker = directory / "done.json"
    wanted = {"shape": vars(shape), "shard_bytes": shard_bytes}
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return directory
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    shapes = tensor_shapes(shape)
    shards: list[dict[str, tuple[int, ...]]] = [{}]
    size = 0
    for key, s in shapes.items():  # module order, cut into shards of about shard_bytes
        nbytes = math.prod(s) * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = s
        size += nbytes
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    started = time.perf_counter()
    for n, part in enumerate(shards):
        file = "model.safetensors" if len(shards) == 1 else f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(directory / file, part, generator)
        weight_map.update(dict.fromkeys(part, file))
    if len(shards) > 1:
        total = sum(math.prod(s) * 2 for s in shapes.values())
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=1))
    (directory / "config.json").write_text(json.dumps(hf_config(shape), indent=1))
    marker.write_text(json.dumps(wanted))
    print(f"wrote {directory} ({disk_gb(directory):.2f} GB, {len(shards)} shard(s)) in "
          f"{time.perf_counter() - started:.0f} s", file=sys.stderr)
    return directory


def disk_gb(directory: Path) -> float:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors")) / 1e9


# ----------------------------------------------------------------------------- measuring children

WW_CHILD = """
import json, sys, torch
torch.set_num_threads(int(sys.argv[2]))
import weightwatcher as ww
details = ww.WeightWatcher(model=sys.argv[1]).analyze()
alphas = details["alpha"][details["alpha"] > 0]
print("RESULT " + json.dumps({"layers": int(len(details)), "mean_alpha": float(alphas.mean())}))
"""

IMPORT_CHILD = "import torch, tempbalance, safetensors; print('RESULT {}')"


def thread_env(threads: int, src: Path = REPO / "src") -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env["PYTHONPATH"] = str(src) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def drop_page_cache() -> None:
    """Write back dirty pages and drop the clean page cache (Linux, root), so files come from disk."""
    os.sync()
    DROP_CACHES.write_text("1\n")


def measure(command: list[str], env: dict[str, str], timeout: float) -> tuple[float, float, str]:
    """Run a child; return (wall seconds, peak RSS in MB, its stdout)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=REPO)
        deadline = started + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                raise TimeoutError(f"{' '.join(command[:4])} ... ran past {timeout:.0f} s")
            time.sleep(0.05)
        wall = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(command[:5])} ... exit {code}: {stderr.strip().splitlines()[-3:]}")
    return wall, usage.ru_maxrss / 1024, stdout


def run_tool(tool: str, directory: Path, args: argparse.Namespace, src: Path = REPO / "src") -> dict:
    env = thread_env(args.threads, src)
    if args.cold and tool != "import":
        drop_page_cache()
    if tool == "ww":
        command = [sys.executable, "-c", WW_CHILD, str(directory), str(args.threads)]
    elif tool == "import":
        command = [sys.executable, "-c", IMPORT_CHILD]
    else:
        report = Path(tempfile.mkdtemp()) / "report.json"
        command = [sys.executable, "-m", "tempbalance.cli", "analyze", str(directory), "--fit", tool.split("-")[1],
                   "--threads", str(args.threads), "--device", args.device, "--no-progress", "--json", str(report)]
    wall, rss, stdout = measure(command, env, args.timeout)
    result = {"wall": wall, "rss": rss}
    if tool == "ww":
        result.update(json.loads(stdout.split("RESULT ", 1)[1].splitlines()[0]))
    elif tool.startswith("tb"):
        layers = json.loads(report.read_text())["layers"]
        shutil.rmtree(report.parent)
        alphas = [r["alpha"] for r in layers if r["alpha"] is not None]
        result.update(layers=len(layers), mean_alpha=statistics.fmean(alphas) if alphas else float("nan"))
    return result


# ----------------------------------------------------------------------------- the table


def summarize(runs: list[dict]) -> dict:
    """Median wall time (and min), max peak RSS over repeats."""
    walls = [r["wall"] for r in runs]
    return {**runs[0], "wall": statistics.median(walls), "wall_min": min(walls), "rss": max(r["rss"] for r in runs),
            "repeats": len(runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS))
    parser.add_argument("--threads", type=int, default=1, help="threads of every child (default 1)")
    parser.add_argument("--device", default="cpu", help="tempbalance's --device (default cpu; e.g. cuda)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per tool and configuration (median reported)")
    parser.add_argument("--tiny", action="store_true", help="every width / 16: proves the script in minutes")
    parser.add_argument("--ww-on-7b", action="store_true", help="also run WeightWatcher on the Llama-2-7B shapes")
    parser.add_argument("--shard-gb", type=float, default=5.0, help="safetensors shard size (default 5 GB)")
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per child (default 4 h)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards (default: delete)")
    parser.add_argument("--clean", action="store_true", help="only delete the written checkpoints")
    parser.add_argument("--out", help="also write the Markdown table to this file")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each measurement (root)")
    parser.add_argument("--baseline-src", type=Path, help="also run the tb tools with this checkout's src/ folder")
    args = parser.parse_args()
    if args.clean:
        shutil.rmtree(CACHE, ignore_errors=True)
        return
    if args.cold and not os.access(DROP_CACHES, os.W_OK):
        parser.error(f"--cold needs write access to {DROP_CACHES} (Linux, as root)")
    if args.baseline_src is not None and not (args.baseline_src / "tempbalance" / "__init__.py").is_file():
        parser.error(f"--baseline-src {args.baseline_src}: no tempbalance package there (give a checkout's src/ folder)")

    rows = []
    baseline = summarize([run_tool("import", REPO, args) for _ in range(args.repeats)])
    rows.append(("import only (python, torch, tempbalance)", "-", baseline, None))
    timings: dict[tuple[str, str], dict] = {}
    for config in args.configs:
        shape = SHAPES[config].scaled(16) if args.tiny else SHAPES[config]
        name = f"{config}-tiny" if args.tiny else config
        directory = build_checkpoint(name, shape, int(args.shard_gb * 1e9 / (256 if args.tiny else 1)))
        label = f"{name} ({disk_gb(directory):.2f} GB bf16, {len(list(directory.glob('*.safetensors')))} shard(s))"
        for tool in args.tools:
            if tool == "ww" and config.startswith("llama7b") and not args.ww_on_7b:
                continue
            variants = [(tool, REPO / "src")]
            if args.baseline_src is not None and tool.startswith("tb"):
                variants.insert(0, (f"{tool} @ {args.baseline_src}", args.baseline_src.resolve()))
            for variant, src in variants:
                print(f"[{datetime.datetime.now():%H:%M:%S}] {name}: {variant}", file=sys.stderr)
                result = summarize([run_tool(tool, directory, args, src) for _ in range(args.repeats)])
                timings[(config, variant)] = result
                rows.append((label, variant, result, None))
        for tool in ("tb-median", "tb-ks"):
            if (config, tool) in timings and (config, "ww") in timings:
                ww = timings[(config, "ww")]
                ours = timings[(config, tool)]
                ours["vs_ww"] = (ww["wall"] / ours["wall"], ours["rss"] / ww["rss"])
    if not args.keep:
        shutil.rmtree(CACHE, ignore_errors=True)

    lines = [
        f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; CPU: {cpu_model()} "
        f"({os.cpu_count()} logical cores); {args.threads} thread(s); device {args.device}; torch {torch.__version__}"
        + ("; TINY shapes (widths / 16)" if args.tiny else "") + ("; page cache dropped before each run" if args.cold else ""),
        f"command: python benchmarks/checkpoint_analysis.py {' '.join(sys.argv[1:])}",
        "",
        "| checkpoint | tool | wall s (median) | min s | peak RSS MB | above start-up MB | layers | mean alpha "
        "| vs WeightWatcher |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, tool, r, _ in rows:
        vs = ""
        if "vs_ww" in r:
            speed, memory = r["vs_ww"]
            vs = f"**{speed:.1f}x** faster, {memory:.2f}x the RSS"
        mean = r.get("mean_alpha")
        lines.append(f"| {label} | {tool} | {r['wall']:.2f} | {r['wall_min']:.2f} | {r['rss']:.0f} "
                     f"| {r['rss'] - baseline['rss']:.0f} | {r.get('layers', '')} "
                     f"| {'' if mean is None else f'{mean:.3f}'} | {vs} |")
    for tool in sorted({variant for _, variant in timings if variant.startswith("tb")}):
        if ("llama7b", tool) in timings and ("llama7b-1", tool) in timings:
            per_block = (timings[("llama7b", tool)]["wall"] - timings[("llama7b-1", tool)]["wall"]) / 31
            ratio = block_cost(LLAMA_70B) / block_cost(SHAPES["llama7b"])
            lines.append(f"\n{tool}: Llama-2-7B time per block (T(32 blocks) - T(1 block)) / 31 = {per_block:.2f} s"
                         + ("" if args.tiny else f"; a Llama-2-70B block costs {ratio:.1f}x as much (sum of m n min(m, n)), "
                            f"so its 80 blocks ~ {80 * ratio * per_block / 60:.0f} min"))
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
