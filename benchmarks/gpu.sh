#!/usr/bin/env bash
# One prepared benchmark for a lent GPU machine (total under 8 minutes); writes Markdown under $OUT.
#
#   1. analysis speed on the GPU: tempbalance.analyze (Gram + eigvalsh) vs the reference algorithm's
#      svdvals path, on the CIFAR ResNet18, VGG16 and WRN28-6 (random init), with alpha agreement;
#   2. one TempBalance rebalance vs one ResNet18 epoch (391 steps of batch 128, bf16, synthetic
#      32x32 data), and what the asynchronous mode leaves on the training path;
#   3. the harness's training throughput (images/s, CAL, TB, and TB under --compile) on CIFAR-10 (or synthetic data);
#   4. CAL vs TB, ResNet18 on CIFAR-10 for the remaining time (only with real data).
#
# Usage (repository root, in an environment with torch):
#   OUT=/some/dir benchmarks/gpu.sh
#   GPU_SH_DRY=1 OUT=/tmp/x benchmarks/gpu.sh          # tiny sizes on CPU: ~1.5 min (synthetic), ~3 min (with a tar)
#   benchmarks/gpu.sh make-tar FILE.tar [TRAIN_PER_CLASS] [TEST_PER_CLASS] [SRC_DIR]
#       builds a class-balanced image-folder subset tar of CIFAR-10 to carry to the machine
#       (defaults 2000 / 1000 per class from ../shared/data/cifar10: ~46 MB, under the 64 MiB carry limit).
# On this project's lent machine: first `benchmarks/gpu.sh make-tar runs/bench/cifar10.tar` here, then
#   run(command="benchmarks/gpu.sh", carry=["runs/bench/cifar10.tar"], timeout_s=540)  ($OUT is set there).
# Settings (environment): OUT (default ./gpu_out), CIFAR_TAR (default runs/bench/cifar10.tar; a tar of
# torchvision's cifar-10-batches-py folder or of an image-folder copy train/<class>/, test/<class>/),
# GPU_SH_BUDGET (seconds for the whole script, default 450), PYTHON (default python3, else python).
# Installs nothing unless `import tempbalance` fails and src/ cannot be put on PYTHONPATH.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
START=$(date +%s)

if [[ "${1:-}" == "make-tar" ]]; then
    TAR="${2:?usage: gpu.sh make-tar FILE.tar [TRAIN_PER_CLASS] [TEST_PER_CLASS] [SRC_DIR]}"
    NTRAIN="${3:-2000}"; NTEST="${4:-1000}"; SRC="${5:-$REPO/../shared/data/cifar10}"
    STAGE="$(mktemp -d)"; trap 'rm -rf "$STAGE"' EXIT
    for split in train test; do
        n=$NTRAIN; [[ $split == test ]] && n=$NTEST
        for cls in "$SRC/$split"/*/; do
            name="$(basename "$cls")"; mkdir -p "$STAGE/cifar10/$split/$name"
            find "$cls" -maxdepth 1 -type f | sort | awk -v n="$n" 'NR <= n' | xargs -r cp -t "$STAGE/cifar10/$split/$name"
        done
    done
    tar -cf "$TAR" -C "$STAGE" cifar10
    echo "wrote $TAR ($(du -h "$TAR" | cut -f1)): $NTRAIN train and $NTEST test images per class"
    exit 0
fi

OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
DRY="${GPU_SH_DRY:-0}"
BUDGET="${GPU_SH_BUDGET:-450}"
CIFAR_TAR="${CIFAR_TAR:-$REPO/runs/bench/cifar10.tar}"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
export TEMPBALANCE_CACHE="$WORK/cache"   # decoded image folders go here, never into the repository
cd "$REPO"

log() { echo "[gpu.sh $(( $(date +%s) - START ))s] $*" | tee -a "$OUT/gpu_log.txt" >&2; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

if ! "$PYTHON" -c "import tempbalance" 2>/dev/null; then
    export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
    if ! "$PYTHON" -c "import tempbalance" 2>/dev/null; then
        log "installing the package: pip install -e . (no dependencies)"
        "$PYTHON" -m pip install --no-deps --no-build-isolation -q -e "$REPO"
    fi
fi
"$PYTHON" -c "import torch, tempbalance; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu_log.txt"

# ------------------------------------------------------------------ the data
DATA_KIND=synthetic
DATA_DIR="$WORK/data"
mkdir -p "$DATA_DIR"
if [[ -f "$CIFAR_TAR" ]]; then
    tar -xf "$CIFAR_TAR" -C "$DATA_DIR"
    found="$(find "$DATA_DIR" -maxdepth 3 -type d \( -name cifar-10-batches-py -o -name train \) -print -quit)"
    if [[ -n "$found" ]]; then
        [[ "$(basename "$found")" == train ]] && found="$(dirname "$found")"
        DATA_DIR="$found"; DATA_KIND="cifar10 ($(basename "$CIFAR_TAR"))"
    else
        log "no CIFAR-10 layout inside $CIFAR_TAR: using synthetic data"
    fi
fi

# ------------------------------------------------------------------ the Python side
cat > "$WORK/bench.py" <<'PYEOF'
"""gpu.sh's measurements: analysis speed, rebalance vs epoch, synthetic CIFAR files, harness runs.

Each subcommand prints a Markdown table (and appends it to the file named by --md).
"""
import argparse
import json
import math
import os
import pickle
import statistics
import sys
import time

import numpy as np
import torch

import tempbalance
from tempbalance.train import TrainConfig, run_training
from tempbalance.train.models import create_model


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev, repeats):
    fn()  # warm-up (kernels, allocator)
    times = []
    for _ in range(repeats):
        sync(dev)
        t = time.perf_counter()
        out = fn()
        sync(dev)
        times.append(time.perf_counter() - t)
    return min(times), out


def reference_alphas(model: torch.nn.Module, names: list) -> dict:
    """The reference algorithm's path (method.md §2): per layer, batched float32 svdvals of the
    per-kernel-position matrices scaled by sqrt(0.5), lambda = sigma^2 pooled and sorted, median Hill."""
    modules = dict(model.named_modules())
    alphas = {}
    for name in names:
        w = modules[name].weight.detach().float()
        mats = w.permute(2, 3, 0, 1).reshape(-1, w.shape[0], w.shape[1]) * math.sqrt(0.5) if w.dim() == 4 else w[None]
        lam = torch.sort((torch.linalg.svdvals(mats) ** 2).reshape(-1)).values
        i = lam.numel() // 2
        n = lam.numel() - i
        alphas[name] = float(1 + n / (torch.log(lam[i:]).sum() - n * torch.log(lam[i])))
    return alphas


def cmd_analysis(args) -> str:
    dev = device()
    rows = ["| model | layers | tempbalance.analyze (ms) | reference svdvals (ms) | speed-up | max rel. alpha diff |",
            "|---|---|---|---|---|---|"]
    for name in args.models:
        torch.manual_seed(0)
        model = create_model(name, 10, 3, args.width).to(dev)
        t_ours, report = timed(lambda: tempbalance.analyze(model, fit="median"), dev, args.repeats)
        names = [r.name for r in report if math.isfinite(r.alpha)]
        t_ref, ref = timed(lambda: reference_alphas(model, names), dev, args.repeats)
        ours = {r.name: r.alpha for r in report}
        diff = max(abs(ours[k] - ref[k]) / abs(ref[k]) for k in names) if names else float("nan")
        rows.append(f"| {name} (width {args.width:g}) | {len(names)} | {1e3 * t_ours:.1f} | {1e3 * t_ref:.1f} "
                    f"| {t_ref / t_ours:.1f}x | {diff:.1e} |")
        del model
    return "\n".join([f"Analysis speed on {describe(dev)} (best of {args.repeats}, after a warm-up; "
                      "float32 weights, median fit, Conv2d + Linear layers):", ""] + rows)


def cmd_rebalance(args) -> str:
    dev = device()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (args.batch,), device=dev)
    if dev.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    amp = torch.autocast(device_type=dev.type, dtype=torch.bfloat16)

    def setup(asynchronous):
        torch.manual_seed(0)
        model = create_model("resnet18", 10, 3, args.width).to(dev)
        if dev.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(tempbalance.param_groups(model, weight_decay=5e-4), lr=0.1, momentum=0.9)
        base = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=200)
        balancer = tempbalance.TempBalance(model, optimizer, base, asynchronous=asynchronous)

        def step():
            with amp:
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return balancer, step

    def steps_time(step, count):
        sync(dev)
        t = time.perf_counter()
        for _ in range(count):
            step()
        sync(dev)
        return time.perf_counter() - t

    balancer, step = setup(False)
    steps_time(step, 3)
    t_step = steps_time(step, args.steps) / args.steps
    steps_per_epoch = math.ceil(50_000 / args.batch)
    t_reb, _ = timed(balancer.rebalance, dev, args.repeats)
    epoch = t_step * steps_per_epoch
    # asynchronous mode: what a due step() costs the training thread (the snapshot copy), how long
    # the worker takes, and how much slower training steps run while it works
    balancer, step = setup(True)
    steps_time(step, 3)
    path, worker, overlap = [], [], []
    for _ in range(args.repeats + 1):
        sync(dev)
        t = time.perf_counter()
        balancer.step()
        sync(dev)
        path.append(time.perf_counter() - t)
        balancer.wait()
        worker.append(time.perf_counter() - t)
        balancer.step()
        overlap.append(steps_time(step, args.steps) / args.steps)
        balancer.wait()
    path, worker, overlap = min(path[1:]), min(worker[1:]), statistics.median(overlap[1:])
    return "\n".join([
        f"One rebalance vs one epoch on {describe(dev)}: ResNet18 (width {args.width:g}), synthetic 32x32 data, "
        f"batch {args.batch}, bf16 autocast, SGD; epoch = {steps_per_epoch} steps x the mean of {args.steps} timed "
        f"steps; rebalance = best of {args.repeats}.", "",
        "| step (ms) | epoch (s) | rebalance (ms) | rebalance / epoch |", "|---|---|---|---|",
        f"| {1e3 * t_step:.2f} | {epoch:.2f} | {1e3 * t_reb:.1f} | {100 * t_reb / epoch:.2f}% |", "",
        f"Asynchronous mode (TempBalance(asynchronous=True); best of {args.repeats}): a due step() on the training "
        f"thread (snapshot copy to host), the measurement until applied with no training meanwhile, and the mean "
        f"training step while the worker measures ({args.steps} steps).", "",
        "| due step() on the training path (ms) | share of an epoch | measurement until applied (ms) | step during the measurement (ms) |",
        "|---|---|---|---|",
        f"| {1e3 * path:.1f} | {100 * path / epoch:.3f}% | {1e3 * worker:.1f} | {1e3 * overlap:.2f} (vs {1e3 * t_step:.2f}) |"])


def cmd_synthetic(args) -> str:
    """Write a torchvision-format cifar-10-batches-py folder of random images (for the harness)."""
    rng = np.random.default_rng(0)
    folder = os.path.join(args.dir, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    per_batch = args.train // 5
    for i, n in enumerate([per_batch] * 5 + [args.test]):
        name = f"data_batch_{i + 1}" if i < 5 else "test_batch"
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, n).tolist()}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f)
    return f"synthetic CIFAR-10 files: {5 * per_batch} train / {args.test} test random images in {folder}"


def cmd_train(args) -> str:
    """One harness run; prints its summary plus images/s as JSON."""
    config = TrainConfig(dataset="cifar10", model="resnet18", width=args.width, method=args.method,
                         epochs=args.epochs, lr=args.lr, weight_decay=args.wd, seed=args.seed,
                         data_dir=args.data_dir, train_fraction=args.train_fraction, out=args.out,
                         progress=False, deterministic=False, tag=args.tag, compile=args.compile)
    started = time.perf_counter()
    summary = run_training(config)
    wall = time.perf_counter() - started
    with open(os.path.join(args.out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    from tempbalance.train.data import load_dataset
    n_train = load_dataset("cifar10", args.data_dir, train_fraction=args.train_fraction, seed=args.seed).num_train
    epoch_times = [r["epoch_time"] for r in rows]
    steady = epoch_times[1:] or epoch_times
    summary.update(wall_s=wall, n_train=n_train, images_per_s=n_train / statistics.median(steady),
                   first_epoch_s=epoch_times[0], compiled=args.compile)
    return json.dumps(summary)


def cmd_table(args) -> str:
    """Markdown from the JSON summaries of cmd_train (throughput or comparison)."""
    runs, missing = [], 0
    for path in args.files:
        with open(path) as f:
            text = f.read().strip()
        if text:
            runs.append(json.loads(text.splitlines()[-1]))
        else:
            missing += 1  # killed by the time limit or failed
    if args.kind == "throughput":
        rows = ["| method | train images | epoch 1 (s, incl. warm-up) | later epochs: images/s | run wall (s) |",
                "|---|---|---|---|---|"]
        rows += [f"| {r['method']}{' (torch.compile)' if r.get('compiled') else ''} | {r['n_train']} | {r['first_epoch_s']:.1f} | {r['images_per_s']:.0f} | "
                 f"{r['wall_s']:.1f} |" for r in runs]
        return "\n".join([f"Harness training throughput on {describe(device())}, ResNet18, batch 128, "
                          "the harness's in-memory data path; an epoch's time as the harness logs it:", ""] + rows)
    by = {}
    for r in runs:
        if r.get("status") == "finished":
            by.setdefault(r["method"], {})[r["seed"]] = r["final_test_acc"]
    rows = ["| method | seeds | final test acc % (mean ± std) |", "|---|---|---|"]
    for method, accs in sorted(by.items()):
        values = list(accs.values())
        std = statistics.stdev(values) if len(values) > 1 else float("nan")
        rows.append(f"| {method} | {len(values)} | {statistics.fmean(values):.2f} ± {std:.2f} |")
    common = sorted(set(by.get("cal", {})) & set(by.get("tb", {})))
    if common:
        diffs = [by["tb"][s] - by["cal"][s] for s in common]
        std = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
        wins = sum(d > 0 for d in diffs)
        rows += ["", f"Paired TB - CAL over seeds {common}: {statistics.fmean(diffs):+.2f} ± {std:.2f} "
                     f"(TB won {wins} of {len(diffs)}); diffs: {', '.join(f'{d:+.2f}' for d in diffs)}"]
    unfinished = missing + len(runs) - sum(len(v) for v in by.values())
    if unfinished:
        rows.append(f"\n{unfinished} run(s) did not finish in the time left.")
    return "\n".join([args.title, ""] + rows)


def describe(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return "CPU (dry run)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--md", help="append the Markdown to this file")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("analysis")
    p.add_argument("--models", nargs="+", default=["resnet18", "vgg16", "wrn28-6"])
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    p = sub.add_parser("rebalance")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p = sub.add_parser("synthetic")
    p.add_argument("--dir", required=True)
    p.add_argument("--train", type=int, default=50_000)
    p.add_argument("--test", type=int, default=10_000)
    p = sub.add_parser("train")
    for name, kind, default in (("method", str, "cal"), ("epochs", int, 1), ("lr", float, 0.1), ("wd", float, 5e-4),
                                ("seed", int, 43), ("width", float, 1.0), ("train_fraction", float, 1.0),
                                ("tag", str, "gpu")):
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--compile", action="store_true", help="torch.compile the model (TrainConfig.compile)")
    p = sub.add_parser("table")
    p.add_argument("kind", choices=["throughput", "compare"])
    p.add_argument("files", nargs="*")
    p.add_argument("--title", default="")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    text = {"analysis": cmd_analysis, "rebalance": cmd_rebalance, "synthetic": cmd_synthetic,
            "train": cmd_train, "table": cmd_table}[args.cmd](args)
    print(text)
    if args.md:
        with open(args.md, "a") as f:
            f.write(text + "\n\n")


if __name__ == "__main__":
    sys.exit(main())
PYEOF

BENCH=("$PYTHON" "$WORK/bench.py" --md "$OUT/gpu_results.md")
if [[ "$DRY" == 1 ]]; then
    A_WIDTH=0.125; A_REPEATS=1; R_WIDTH=0.125; R_BATCH=16; R_STEPS=2; SYN_TRAIN=500; SYN_TEST=200
    T_WIDTH=0.125; T_EPOCHS=2; C_SEEDS="0"; C_MAX_EPOCHS=1; C_PAR=2
else
    A_WIDTH=1; A_REPEATS=3; R_WIDTH=1; R_BATCH=128; R_STEPS=30; SYN_TRAIN=50000; SYN_TEST=10000
    T_WIDTH=1; T_EPOCHS=2; C_SEEDS="0 1"; C_MAX_EPOCHS=40; C_PAR=4
fi
{
    echo "# gpu.sh results"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), dry=$DRY, data: $DATA_KIND, budget ${BUDGET}s."
    "$PYTHON" -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device')"
    echo
} > "$OUT/gpu_results.md"

# 1. analysis speed (capped at 120 s)
log "1/4 analysis speed"
timeout 120 "${BENCH[@]}" analysis --width "$A_WIDTH" --repeats "$A_REPEATS" || log "analysis step failed or timed out (rc $?)"

# 2. rebalance vs epoch, sync and async (capped at 90 s)
log "2/4 rebalance vs epoch"
timeout 90 "${BENCH[@]}" rebalance --width "$R_WIDTH" --batch "$R_BATCH" --steps "$R_STEPS" || log "rebalance step failed or timed out (rc $?)"

# 3. harness throughput, CAL and TB, 2 epochs each, one after the other (capped)
if [[ "$DATA_KIND" == synthetic ]]; then
    "$PYTHON" "$WORK/bench.py" synthetic --dir "$DATA_DIR" --train "$SYN_TRAIN" --test "$SYN_TEST"
fi
log "3/4 harness throughput on $DATA_KIND"
for method in cal tb; do
    cap=$(( $(left) / 3 )); (( cap > 150 )) && cap=150
    timeout "$cap" "$PYTHON" "$WORK/bench.py" train --method "$method" --epochs "$T_EPOCHS" --width "$T_WIDTH" \
        --data-dir "$DATA_DIR" --out "$WORK/thr_$method" --tag throughput > "$WORK/thr_$method.json" \
        || log "throughput run $method failed or timed out (rc $?)"
done
# the first CUDA run of --compile (TB, the same 2 epochs; epoch 1 includes compiling), capped at 120 s
cap=$(( $(left) / 4 )); (( cap > 120 )) && cap=120
timeout "$cap" "$PYTHON" "$WORK/bench.py" train --method tb --compile --epochs "$T_EPOCHS" --width "$T_WIDTH" \
    --data-dir "$DATA_DIR" --out "$WORK/thr_tb_compiled" --tag throughput > "$WORK/thr_tb_compiled.json" \
    || log "compiled throughput run failed or timed out (rc $?)"
"${BENCH[@]}" table throughput "$WORK"/thr_*.json > /dev/null || true
cp "$WORK"/thr_*.json "$OUT"/ 2>/dev/null || true

# 4. CAL vs TB on real CIFAR-10 with what is left: seeds x methods in parallel on the one GPU
if [[ "$DATA_KIND" == synthetic ]]; then
    log "4/4 skipped: no CIFAR-10 tar ($CIFAR_TAR); a CAL vs TB comparison on random images means nothing"
    echo "CAL vs TB skipped: no CIFAR-10 tar was carried (CIFAR_TAR=$CIFAR_TAR)." >> "$OUT/gpu_results.md"
else
    per_epoch="$("$PYTHON" -c "
import json, sys
r = [json.loads(open(p).read().strip().splitlines()[-1]) for p in sys.argv[1:] if open(p).read().strip()]
print(max((x['n_train'] / x['images_per_s'] for x in r), default=0))" "$WORK"/thr_*.json 2>/dev/null || echo 0)"
    runs=$(( $(echo $C_SEEDS | wc -w) * 2 ))
    avail=$(( $(left) - 40 ))
    # C_PAR runs share the GPU: assume each runs at 2/C_PAR of its solo speed (conservative), +10% margin.
    epochs="$("$PYTHON" -c "
import math; t = float('$per_epoch'); a = $avail; waves = math.ceil($runs / $C_PAR)
e = int(a / (waves * max(t, 1e-3) * $C_PAR / 2 * 1.1)) if t > 0 else 0
print(max(0, min($C_MAX_EPOCHS, e)))")"
    if (( epochs < 1 || avail < 30 )); then
        log "4/4 skipped: ${avail}s left, epoch ${per_epoch}s"
        echo "CAL vs TB skipped: not enough time left (${avail}s)." >> "$OUT/gpu_results.md"
    else
        log "4/4 CAL vs TB: $runs runs of $epochs epochs, $C_PAR at a time, ${avail}s left"
        pids=()
        for seed in $C_SEEDS; do
            for method in cal tb; do
                timeout "$avail" "$PYTHON" "$WORK/bench.py" train --method "$method" --epochs "$epochs" \
                    --width "$T_WIDTH" --seed "$seed" --data-dir "$DATA_DIR" --out "$OUT/runs/${method}_seed$seed" --tag compare \
                    > "$WORK/cmp_${method}_$seed.json" 2> "$WORK/cmp_${method}_$seed.err" &
                pids+=($!)
                if (( ${#pids[@]} >= C_PAR )); then wait "${pids[0]}" || true; pids=("${pids[@]:1}"); fi
            done
        done
        for pid in "${pids[@]}"; do wait "$pid" || true; done
        "${BENCH[@]}" table compare "$WORK"/cmp_*.json \
            --title "CAL vs TB, ResNet18 (width $T_WIDTH) on $DATA_KIND, $epochs epochs (cosine to 0), lr 0.1, wd 5e-4, batch 128, bf16:" \
            > /dev/null || true
        rm -f "$OUT"/runs/*/checkpoint*.pt
    fi
fi
log "done in $(( $(date +%s) - START ))s; tables in $OUT/gpu_results.md"
cat "$OUT/gpu_results.md"
