#!/usr/bin/env bash
# One prepared benchmark for a lent GPU machine: every number in one call of at most 8 minutes.
#
#   1. device self-check: a world-size-1 NCCL group, FSDP2 fully_shard on a small ResNet, one rebalance();
#   2. analysis speed: tempbalance.analyze (Gram + eigvalsh) vs the reference's svdvals path, ResNet18,
#      VGG16, WRN28-6 (random init), alpha agreement, and the alphas' change under TF32 (should be 0);
#   3. one TempBalance rebalance vs one ResNet18 epoch, and the asynchronous mode's cost;
#   4. checkpoint analysis on the GPU: a GPT-2-small-shaped Hugging Face directory (random weights)
#      generated there, timed through `tempbalance analyze DIR --device cuda` (and cpu); then Llama-2-7B
#      shapes (1 and 32 blocks of random bf16 weights made on the GPU, no file) analysed there: the
#      compute the checkpoint issue wants in <= 30 s, and the time per block (then again with MAGMA);
#   5. the data (decoded once, cached) and the harness's training throughput: CAL, TB, and TB under
#      torch.compile (every batch full: two graphs; compile time apart from steady-state images/s);
#   6. CAL vs TB, ResNet18 on CIFAR-10, 2 seeds, the 4 runs side by side, epochs planned from the
#      measured fixed overhead and per-epoch cost of step 5 (only with real data).
#
# What comes back: $OUT holds 3 files, all at its top level (the device tool returns at most 8, 16 MiB each):
#   gpu_results.md   the tables, each row appended and flushed as it is measured, then a per-step summary;
#   gpu_log.txt      the log, with the stderr tail of every failed step;
#   gpu_runs.tar.gz  the small per-run files (metrics, configs, summaries, JSON, every step's stderr),
#                    rebuilt after each step, no checkpoints, capped at 15 MiB.
# Everything else goes to a work folder under /tmp (deleted at exit). Each step runs under
# `timeout -k`, is skipped with a reason when too little time is left, and a failure becomes a row
# with its reason: nothing stops the script (no `set -e`; an ERR trap logs any failed command).
#
# Usage (repository root, in an environment with torch):
#   OUT=/some/dir benchmarks/gpu.sh
#   GPU_SH_DRY=1 OUT=/tmp/x benchmarks/gpu.sh      # tiny sizes on CPU (see BENCHMARKS.md for its time)
#   benchmarks/gpu.sh make-tar FILE.tar.gz [TRAIN_PER_CLASS] [TEST_PER_CLASS] [SRC_DIR]
#       a class-balanced image-folder subset of CIFAR-10 to carry to the machine (defaults 2048 / 1000 per
#       class from ../shared/data/cifar10: 20,480 train = 160 full batches of 128, the whole test set; 10 MB
#       gzipped, 45 MB as a plain .tar).
# On this project's lent machine: first `benchmarks/gpu.sh make-tar runs/bench/cifar10.tar.gz` here, then
#   run(command="benchmarks/gpu.sh", carry=["runs/bench/cifar10.tar.gz"], timeout_s=540)   ($OUT is set there).
# Settings (environment): OUT (default ./gpu_out); CIFAR_TAR (default runs/bench/cifar10.tar.gz: a tar, plain or
# gzipped, of an image-folder copy train/<class>/, test/<class>/ or of torchvision's cifar-10-batches-py); GPU_SH_BUDGET
# (seconds for the whole script, default 480, of which GPU_SH_MARGIN, default 60, is left unused);
# GPU_SH_COMPILE_BACKEND (default inductor; eager in dry mode); PYTHON (default python3, else python).
# Installs nothing: it puts this checkout's src/ first on PYTHONPATH (torch must be there already).
set -Euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
START=$(date +%s)

if [[ "${1:-}" == "make-tar" ]]; then
    TAR="${2:?usage: gpu.sh make-tar FILE.tar.gz [TRAIN_PER_CLASS] [TEST_PER_CLASS] [SRC_DIR]}"
    args=("$TAR")
    [[ -n "${3:-}" ]] && args+=(--train-per-class "$3")
    [[ -n "${4:-}" ]] && args+=(--test-per-class "$4")
    [[ -n "${5:-}" ]] && args+=(--src "$5")
    exec "$PYTHON" "$REPO/benchmarks/gpu_bench.py" make-tar "${args[@]}"
fi

OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)" || { echo "gpu.sh: cannot create OUT=$OUT" >&2; exit 1; }
DRY="${GPU_SH_DRY:-0}"
BUDGET="${GPU_SH_BUDGET:-480}"
MARGIN="${GPU_SH_MARGIN:-60}"
DEADLINE=$(( START + BUDGET - MARGIN ))
CIFAR_TAR="${CIFAR_TAR:-$REPO/runs/bench/cifar10.tar.gz}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_sh.XXXXXX")" || { echo "gpu.sh: no work folder" >&2; exit 1; }
MD="$OUT/gpu_results.md"
LOG="$OUT/gpu_log.txt"
mkdir -p "$WORK/logs" "$WORK/json" "$WORK/runs" "$WORK/data"
: > "$MD"; : > "$LOG"
export TEMPBALANCE_CACHE="$WORK/cache" PYTHONUNBUFFERED=1   # decoded images go there, never into the repository
cd "$REPO" || exit 1

log() { echo "[gpu.sh $(( $(date +%s) - START ))s] $*" | tee -a "$LOG" >&2; }
md() { printf '%s\n' "$@" >> "$MD"; }
left() { echo $(( DEADLINE - $(date +%s) )); }
trap 'log "command failed (rc $?): $BASH_COMMAND"' ERR

# The small files of every run and step, in one archive under $OUT (rebuilt after each step).
pack() {
    local tmp="$WORK/gpu_runs.tar.gz"
    find "$WORK/runs" -name '*.pt' -delete 2>/dev/null
    tar -czf "$tmp" -C "$WORK" --exclude='*.pt' --exclude='*.safetensors' logs json runs 2>>"$LOG" || true
    if [[ -f "$tmp" ]] && (( $(stat -c %s "$tmp") > 15 * 1024 * 1024 )); then
        log "archive over 15 MiB: keeping only logs and json"
        tar -czf "$tmp" -C "$WORK" logs json 2>>"$LOG" || true
    fi
    [[ -s "$tmp" ]] && mv -f "$tmp" "$OUT/gpu_runs.tar.gz"
    return 0
}
finish() {
    local rc=$?
    trap - ERR
    if [[ -z "${FINISHED:-}" ]]; then
        md "" "Stopped early (signal or rc $rc) at $(( $(date +%s) - START )) s; steps not reached have no row."
    fi
    pack
    rm -rf "$WORK"
}
trap finish EXIT
trap 'log "interrupted"; exit 130' INT TERM

# step NAME WANT MIN RESERVE -- COMMAND...: time-boxed run; status line in the Markdown and the summary
STEPS=()
step() {
    local name="$1" want="$2" min="$3" reserve="$4"; shift 5
    local avail=$(( $(left) - reserve )) cap rc t0 err="$WORK/logs/step_${#STEPS[@]}.err"
    cap=$(( want < avail ? want : avail ))
    if (( cap < min )); then
        STEPS+=("| $name | skipped: ${avail}s left after keeping ${reserve}s for later steps, needs ${min}s | 0 |")
        md "" "**skipped**: ${avail} s left (after ${reserve} s kept for later steps), this step needs ${min} s."
        log "$name: skipped (${avail}s available, needs ${min}s)"
        return 0
    fi
    log "$name: cap ${cap}s"
    t0=$(date +%s); rc=0
    timeout -k 10 "$cap" "$@" >> "$LOG" 2> "$err" || rc=$?
    local took=$(( $(date +%s) - t0 )) status
    if (( rc == 0 )); then
        status="ok"
    elif (( rc == 124 || rc == 137 )); then
        status="timed out at its ${cap} s cap (rc $rc)"
    else
        status="failed (rc $rc): $(grep -v '^\s*$' "$err" | tail -n 1 | cut -c1-200 | tr '|' '/')"
    fi
    if (( rc != 0 )); then
        { echo "---- $name: stderr tail"; tail -n 30 "$err"; echo "----"; } >> "$LOG"
        md "" "**${status}**; the rows above are what it measured (stderr tail in gpu_log.txt)."
    fi
    STEPS+=("| $name | $status | $took |")
    log "$name: $status in ${took}s"
    pack
    return 0
}

# ------------------------------------------------------------------ environment
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"   # this checkout's code, whatever else is installed
BENCH=("$PYTHON" "$REPO/benchmarks/gpu_bench.py" --md "$MD")
ENV_LINE="$("$PYTHON" "$REPO/benchmarks/gpu_bench.py" env 2>>"$LOG" || echo "python/torch/tempbalance not importable")"
log "$ENV_LINE"

if [[ "$DRY" == 1 ]]; then
    A_WIDTH=0.125; A_REPEATS=1; R_WIDTH=0.125; R_BATCH=16; R_STEPS=2; S_WIDTH=0.125; CK=(--tiny --devices cpu)
    LL=(--tiny --device cpu)
    SYN_TRAIN=640; SYN_TEST=200; T_WIDTH=0.0625; T_BATCH=32; T_EVAL=50; T_EPOCHS=2; C_SEEDS="0"; C_MAX_EPOCHS=2; C_PAR=2
    BACKEND="${GPU_SH_COMPILE_BACKEND:-eager}"
else
    A_WIDTH=1; A_REPEATS=2; R_WIDTH=1; R_BATCH=128; R_STEPS=30; S_WIDTH=0.25; CK=(--devices cuda cpu)
    LL=(--device cuda --cap 40)
    SYN_TRAIN=49920; SYN_TEST=10000; T_WIDTH=1; T_BATCH=128; T_EVAL=500; T_EPOCHS=2; C_SEEDS="0 1"; C_MAX_EPOCHS=40; C_PAR=4
    BACKEND="${GPU_SH_COMPILE_BACKEND:-inductor}"
fi

# ------------------------------------------------------------------ the data
DATA_KIND=synthetic
DATA_DIR="$WORK/data"
if [[ -f "$CIFAR_TAR" ]]; then
    if tar -xf "$CIFAR_TAR" -C "$DATA_DIR" 2>>"$LOG"; then
        found="$(find "$DATA_DIR" -maxdepth 3 -type d \( -name cifar-10-batches-py -o -name train \) -print -quit)"
        if [[ -n "$found" ]]; then
            [[ "$(basename "$found")" == train ]] && found="$(dirname "$found")"
            DATA_DIR="$found"; DATA_KIND="cifar10 ($(basename "$CIFAR_TAR"))"
        else
            log "no CIFAR-10 layout inside $CIFAR_TAR: using synthetic data"
        fi
    else
        log "could not unpack $CIFAR_TAR: using synthetic data"
    fi
fi
if [[ "$DATA_KIND" == synthetic ]]; then
    rm -rf "$WORK/data" && mkdir -p "$WORK/data" && DATA_DIR="$WORK/data"
    "$PYTHON" "$REPO/benchmarks/gpu_bench.py" synthetic --dir "$DATA_DIR" --train "$SYN_TRAIN" --test "$SYN_TEST" >> "$LOG" 2>&1 \
        || log "synthetic data failed"
fi

md "# gpu.sh results" "" \
   "$(date -u '+%Y-%m-%d %H:%M UTC'), dry=$DRY, data: $DATA_KIND, budget ${BUDGET} s (steps end by $(( BUDGET - MARGIN )) s)." \
   "$ENV_LINE" ""

# Minimum seconds of each step, in order: each step keeps the minimums of the steps after it.
MINS=(15 20 20 20 25 10 20 20 60 60)
reserve() { local i sum=0; for (( i = $1 + 1; i < ${#MINS[@]}; i++ )); do sum=$(( sum + MINS[i] )); done; echo $sum; }

md "## 1. Device self-check" ""
step "1 device self-check" 40 "${MINS[0]}" "$(reserve 0)" -- "${BENCH[@]}" selfcheck --width "$S_WIDTH"

md "" "## 2. Analysis speed" ""
step "2 analysis speed" 75 "${MINS[1]}" "$(reserve 1)" -- "${BENCH[@]}" analysis --width "$A_WIDTH" --repeats "$A_REPEATS"

md "" "## 3. One rebalance vs one epoch" ""
step "3 rebalance vs epoch" 60 "${MINS[2]}" "$(reserve 2)" -- \
    "${BENCH[@]}" rebalance --width "$R_WIDTH" --batch "$R_BATCH" --steps "$R_STEPS"

md "" "## 4. Checkpoint analysis on the GPU" ""
step "4 checkpoint analysis" 75 "${MINS[3]}" "$(reserve 3)" -- \
    "${BENCH[@]}" checkpoint --dir "$WORK/gpt2" --json-dir "$WORK/json" "${CK[@]}"
rm -rf "$WORK/gpt2"
md ""
step "4b Llama-2-7B shapes on the device" 120 "${MINS[4]}" "$(reserve 4)" -- "${BENCH[@]}" llama "${LL[@]}"

md "" "## 5. Data and training throughput" ""
step "5a data" 60 "${MINS[5]}" "$(reserve 5)" -- \
    "${BENCH[@]}" prepare --data-dir "$DATA_DIR" --label "$DATA_KIND" --batch "$T_BATCH" --eval-batch "$T_EVAL"
md "" "Harness runs (ResNet18 width $T_WIDTH, $T_EPOCHS epochs, bf16 on CUDA, the in-memory data path); steady = median of" \
   "epochs 2+; fixed overhead = process wall - epochs x (steady epoch + checkpoint)." ""
md "| method | batch / eval batch | train images | epoch 1 (s) | steady epoch (s) | images/s | checkpoint (s) | fixed overhead (s) | process wall (s) | compile |" \
   "|---|---|---|---|---|---|---|---|---|---|"
TRAIN=(train --epochs "$T_EPOCHS" --width "$T_WIDTH" --batch "$T_BATCH" --eval-batch "$T_EVAL" --data-dir "$DATA_DIR" --tag throughput --row)
step "5b throughput cal" 60 "${MINS[6]}" "$(reserve 6)" -- "${BENCH[@]}" "${TRAIN[@]}" --method cal \
    --out "$WORK/runs/thr_cal" --json "$WORK/json/thr_cal.json" --started "$(date +%s.%N)"
step "5c throughput tb" 60 "${MINS[7]}" "$(reserve 7)" -- "${BENCH[@]}" "${TRAIN[@]}" --method tb \
    --out "$WORK/runs/thr_tb" --json "$WORK/json/thr_tb.json" --started "$(date +%s.%N)"
step "5d throughput tb torch.compile" 150 "${MINS[8]}" "$(reserve 8)" -- "${BENCH[@]}" "${TRAIN[@]}" --method tb \
    --compile --compile-backend "$BACKEND" --out "$WORK/runs/thr_tb_compiled" --json "$WORK/json/thr_tb_compiled.json" \
    --started "$(date +%s.%N)"

md "" "## 6. CAL vs TB" ""
if [[ "$DATA_KIND" == synthetic ]]; then
    md "**skipped**: no CIFAR-10 tar was carried (CIFAR_TAR=$CIFAR_TAR); CAL vs TB on random images means nothing."
    STEPS+=("| 6 CAL vs TB | skipped: no CIFAR-10 tar | 0 |")
else
    runs=$(( $(echo $C_SEEDS | wc -w) * 2 ))
    avail=$(( $(left) - 10 ))
    epochs="$("${BENCH[@]}" plan "$WORK/json/thr_cal.json" "$WORK/json/thr_tb.json" --avail "$avail" \
        --parallel "$C_PAR" --max-epochs "$C_MAX_EPOCHS" 2>>"$LOG" | tail -n 1)"
    [[ "$epochs" =~ ^[0-9]+$ ]] || epochs=0
    if (( epochs < 1 )); then
        md "" "**skipped**: ${avail} s left is not enough for one epoch of $runs runs side by side."
        STEPS+=("| 6 CAL vs TB | skipped: ${avail}s left, too little for one epoch | 0 |")
    else
        md "" "ResNet18 (width $T_WIDTH) on $DATA_KIND, $epochs epochs (cosine to 0), lr 0.1, wd 5e-4, batch $T_BATCH, bf16;" \
           "$runs runs, $C_PAR at a time on the one GPU, each capped at ${avail} s." ""
        log "6 CAL vs TB: $runs runs of $epochs epochs, $C_PAR at a time, ${avail}s left"
        t0=$(date +%s); pids=(); dirs=()
        for seed in $C_SEEDS; do
            for method in cal tb; do
                name="cmp_${method}_seed$seed"; dirs+=("$WORK/runs/$name")
                timeout -k 10 "$avail" "$PYTHON" "$REPO/benchmarks/gpu_bench.py" train --method "$method" --epochs "$epochs" \
                    --width "$T_WIDTH" --batch "$T_BATCH" --eval-batch "$T_EVAL" --seed "$seed" --data-dir "$DATA_DIR" \
                    --tag compare --out "$WORK/runs/$name" --json "$WORK/json/$name.json" --started "$(date +%s.%N)" \
                    > "$WORK/logs/$name.out" 2> "$WORK/logs/$name.err" &
                pids+=($!)
                if (( ${#pids[@]} >= C_PAR )); then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
            done
        done
        for pid in "${pids[@]}"; do wait "$pid"; done
        for name in "${dirs[@]}"; do
            base="$(basename "$name")"
            [[ -s "$WORK/logs/$base.err" ]] && { echo "---- $base: stderr tail"; tail -n 15 "$WORK/logs/$base.err"; } >> "$LOG"
        done
        "${BENCH[@]}" compare "${dirs[@]}" >> "$LOG" 2>&1 || md "" "**failed**: the comparison table (see gpu_log.txt)."
        STEPS+=("| 6 CAL vs TB | $epochs epochs, $runs runs | $(( $(date +%s) - t0 )) |")
        pack
    fi
fi

md "" "## Summary" "" "| step | status | seconds |" "|---|---|---|" "${STEPS[@]}" "" \
   "Total $(( $(date +%s) - START )) s of a ${BUDGET} s budget."
FINISHED=1
log "done in $(( $(date +%s) - START ))s; tables in $MD"
cat "$MD"
