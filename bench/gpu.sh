#!/usr/bin/env bash
# The GPU path, run for real (issue 18), in one go on a GPU machine: tests/test_cuda.py, the mission end to end
# (train on the GPU, export on the CPU with parity), the Fashion-MNIST CNN toward >= 93.5% in <= 5 s of training,
# and seconds per epoch on the GPU against the CPU of the same machine. About 6-7 minutes on an H200; a step
# that would overrun GPU_BUDGET_S (default 450 s for the whole script) is skipped and says so.
#
#   bash bench/gpu.sh [RESULTS_DIR] [FASHION_MNIST_DIR]   # RESULTS_DIR: default $OUT, else ./gpu-results;
#                                                         # FASHION_MNIST_DIR: default data/fashion-mnist-gpu
#   bash bench/gpu.sh prepare                             # on the machine you call from, once: copies Debian's
#                                                         # Fashion-MNIST (4 .gz, 30 MB) to data/fashion-mnist-gpu
#
# The device call (this workplace's `run` tool). data/ is git-ignored, so the IDX files travel only when named
# in carry (repository ~1 MB + 30 MB, under the 64 MiB limit); run `bash bench/gpu.sh prepare` first:
#
#   run(command='bash bench/gpu.sh "$OUT" data/fashion-mnist-gpu', carry=["data/fashion-mnist-gpu"], timeout_s=540)
#
# It writes 7 files to RESULTS_DIR (all come back from $OUT): summary.md (the table, also printed last),
# results.json, env.txt (nvidia-smi, versions), pytest.log, junit.xml, gpu.log (the whole console) and
# runs.tar.gz (every run's summary.json, metrics.jsonl, config.yaml, parity.json and console log; no weights).
# Re-runnable: each run starts from an empty work folder (GPU_WORK, default /tmp/t2d-gpu).
# GPU_STEPS=tests,e2e,fmnist,speed picks steps; GPU_DRY=1 runs the script's plumbing on a CPU in a minute
# or two (tiny epochs, no claims). The machine's own python3 (its torch, onnx, onnxruntime) runs everything:
# nothing is installed. BentoML is not there, so export runs with --no-register.
set -u -o pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
DEBIAN=/usr/share/datasets/fashion-mnist

if [ "${1:-}" = prepare ]; then
    mkdir -p "$REPO/data/fashion-mnist-gpu" && cp -u "$DEBIAN"/*-ubyte.gz "$REPO/data/fashion-mnist-gpu/" || exit 1
    git -C "$REPO" check-ignore -q data/fashion-mnist-gpu || echo "warning: data/fashion-mnist-gpu is not git-ignored"
    du -sh "$REPO/data/fashion-mnist-gpu"
    echo "what travels besides carry: $(cd "$REPO" && git ls-files -co --exclude-standard -z | du -cb --files0-from=- | tail -1 | cut -f1) bytes"
    exit 0
fi

RES=${1:-${OUT:-./gpu-results}}
DATA=${2:-data/fashion-mnist-gpu}
mkdir -p "$RES" && RES=$(cd "$RES" && pwd)
case $DATA in /*) ;; *) DATA=$REPO/$DATA ;; esac
WORK=${GPU_WORK:-/tmp/t2d-gpu}
STEPS=${GPU_STEPS:-tests,e2e,fmnist,speed}
BUDGET=${GPU_BUDGET_S:-450}
DRY=${GPU_DRY:-0}
cd "$REPO" || exit 1
rm -rf "$WORK" && mkdir -p "$WORK" || exit 1
rm -f "$RES"/summary.md "$RES"/results.json "$RES"/env.txt "$RES"/pytest.log "$RES"/junit.xml "$RES"/runs.tar.gz
exec > >(tee "$RES/gpu.log") 2>&1
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
START=$SECONDS

if [ "$DRY" = 1 ]; then
    DEV=cpu; SHORT=(--run.max_batches 3); PRODUCT_EPOCHS=20; FM_DRY=(--epochs 2)
else
    DEV=cuda; SHORT=(); PRODUCT_EPOCHS=; FM_DRY=()
fi
QUIET=(--log.tensorboard false --log.plots false --log.progress false)

# Seconds left for a step that may take up to $1 (prints 0 when fewer than 15 would be left).
limit() {
    local left=$((BUDGET - (SECONDS - START)))
    [ "$left" -gt "$1" ] && left=$1
    [ "$left" -lt 15 ] && left=0
    echo "$left"
}
want() { [[ ",$STEPS," == *",$1,"* ]]; }
skip() { echo "skipped: $1 (budget of ${BUDGET}s spent: $((SECONDS - START))s)" | tee -a "$WORK/skipped.txt"; }

# train NAME MAX_SECONDS ARGS...: python -m train into $WORK/NAME, console in $WORK/NAME.log
train() {
    local name=$1 max=$2; shift 2
    local t; t=$(limit "$max")
    if [ "$t" = 0 ]; then skip "train $name"; return 1; fi
    echo "== train $name: $*"
    timeout "$t" "$PY" -m train --out "$WORK/$name" "$@" >"$WORK/$name.log" 2>&1
    local rc=$?
    tail -n 2 "$WORK/$name.log"
    [ $rc = 0 ] || echo "train $name failed with status $rc (log: runs.tar.gz $name.log)"
    return $rc
}

# export_cpu NAME ARGS...: python -m export of $WORK/NAME/best.pt in a process that sees no GPU
export_cpu() {
    local name=$1; shift
    local t; t=$(limit 120)
    if [ "$t" = 0 ]; then skip "export $name"; return 1; fi
    echo "== export $name on the CPU (CUDA_VISIBLE_DEVICES empty)"
    CUDA_VISIBLE_DEVICES= timeout "$t" "$PY" -m export --checkpoint "$WORK/$name/best.pt" --no-register "$@" \
        >"$WORK/$name.export.log" 2>&1
    local rc=$?
    cat "$WORK/$name.export.log" | tail -n 4
    return $rc
}

# --- the machine ----------------------------------------------------------------------------------
{
    echo "date: $(date -u +%FT%TZ)"
    echo "host: $(uname -srm), $(nproc) CPUs"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
        nvidia-smi
    else
        echo "nvidia-smi: not found"
    fi
    "$PY" - <<'EOF'
import sys, importlib.metadata as md
import torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(),
      "nccl", ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else "-")
print("cuda available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for name in ("onnx", "onnxruntime", "onnxscript", "numpy", "torchvision", "pytest", "bentoml"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
EOF
} >"$RES/env.txt" 2>&1
cat "$RES/env.txt" | head -n 3

# --- 1. the GPU tests -------------------------------------------------------------------------------
if want tests; then
    t=$(limit 300)
    if [ "$t" = 0 ]; then skip tests; else
        echo "== pytest tests/test_cuda.py (limit ${t}s)"
        timeout "$t" "$PY" -m pytest tests/test_cuda.py -m cuda -v -rs -p no:cacheprovider \
            --junitxml="$RES/junit.xml" 2>&1 | tee "$RES/pytest.log" | grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed"
        echo "pytest status ${PIPESTATUS[0]}"
    fi
fi

# --- 2. the mission end to end: `python -m train --task product` (auto: the GPU), export on the CPU ---
if want e2e; then
    if train e2e_product 120 --task product ${PRODUCT_EPOCHS:+--epochs $PRODUCT_EPOCHS} \
            $([ "$DRY" = 1 ] && echo --device cpu); then
        export_cpu e2e_product
    fi
fi

# --- 3. Fashion-MNIST CNN: >= 93.5% test accuracy in <= 5 s of training --------------------------------
# Candidates are picked by validation accuracy alone (5,000 images held out of the training set, the same for
# every candidate), among those that trained in <= 5 s; only then is the pick's test accuracy read, and the
# pick is run again on two fresh seeds. Every candidate is configs/fashion_mnist_cnn.yaml (the CPU-tuned CNN,
# bf16 autocast under auto) with larger batches for the GPU.
FM=(--config configs/fashion_mnist_cnn.yaml --device "$DEV" --data-dir "$DATA" --data.download false
    --data.val_size 5000 --data.eval_batch_size 4096 "${QUIET[@]}" "${SHORT[@]}")
CANDIDATES=(
    "yaml-b128|"
    "b256-e12|--data.batch_size 256 --optim.lr 0.012 --epochs 12"
    "b512-e16|--data.batch_size 512 --optim.lr 0.016 --epochs 16"
    "b512-e24|--data.batch_size 512 --optim.lr 0.016 --epochs 24"
    "b256-full-e10|--data.batch_size 256 --optim.lr 0.012 --epochs 10 --data.skip_easiest 0"
)
[ "$DRY" = 1 ] && CANDIDATES=("${CANDIDATES[@]:0:2}")
if want fmnist; then
    printf '%s\n' "${CANDIDATES[@]}" >"$WORK/fm_candidates.txt"
    for c in "${CANDIDATES[@]}"; do
        # shellcheck disable=SC2086  # the candidate's flags split on spaces
        train "fm_${c%%|*}" 60 "${FM[@]}" ${c#*|} "${FM_DRY[@]}"
    done
    pick=$("$PY" - "$WORK" <<'EOF'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
runs = []
for line in (work / "fm_candidates.txt").read_text().splitlines():
    name = line.split("|")[0]
    f = work / f"fm_{name}" / "summary.json"
    if f.is_file():
        s = json.loads(f.read_text())
        runs.append((s["train_seconds"] <= 5.0, s["val"]["accuracy"], -s["train_seconds"], name))
print(max(runs)[3] if runs else "")
EOF
)
    if [ -n "$pick" ]; then
        echo "picked on validation accuracy: $pick"
        echo "$pick" >"$WORK/fm_pick.txt"
        flags=$(grep "^$pick|" "$WORK/fm_candidates.txt" | cut -d'|' -f2-)
        for seed in 1 2; do
            # shellcheck disable=SC2086
            train "fm_${pick}_seed$seed" 60 "${FM[@]}" $flags --seed "$seed" "${FM_DRY[@]}"
        done
        export_cpu "fm_$pick" --data-dir "$DATA"
    fi
fi

# --- 4. seconds per epoch, GPU against this machine's CPU -------------------------------------------
# product: configs/product.yaml (the reference's recipe: 2-16-8-1, Adam, batch 100; one CPU thread as the file
# says), 200 epochs. Reference MLP: configs/mnist_mlp.yaml (784-128-10, Adam, batch 64) on Fashion-MNIST,
# 2 epochs, the CPU with torch's default threads. Median of metrics.jsonl's per-epoch seconds (training and
# validation), epoch 1 (warm-up) left out.
if want speed; then
    for dev in cuda cpu; do
        [ "$DRY" = 1 ] && [ $dev = cuda ] && continue
        train "speed_product_$dev" 60 --config configs/product.yaml --device $dev --epochs 200 "${QUIET[@]}" \
            --log.histograms 0 --log.print_every 100 "${SHORT[@]}"
        train "speed_mlp_$dev" 60 --config configs/mnist_mlp.yaml --device $dev --epochs 2 --data-dir "$DATA" \
            --data.download false "${QUIET[@]}" "${SHORT[@]}"
    done
fi

# --- results ------------------------------------------------------------------------------------------
"$PY" - "$WORK" "$RES" "$((SECONDS - START))" <<'EOF'
import json, re, statistics, sys
import xml.etree.ElementTree as ET
from pathlib import Path

work, res, elapsed = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])


def load(path):
    return json.loads(path.read_text()) if path.is_file() else None


def summary(name):
    return load(work / name / "summary.json")


def parity(name):
    p = load(work / name / "export" / "parity.json")
    if p is None:
        return None
    return {"passed": p["passed"], "atol": p["atol"], "rtol": p["rtol"], "inputs": p["inputs"],
            "max_abs_err": {f: w["max_abs_err"] for f, w in p["worst"].items()}}


def epoch_seconds(name):
    f = work / name / "metrics.jsonl"
    if not f.is_file():
        return None
    secs = [json.loads(line)["seconds"] for line in f.read_text().splitlines()]
    return statistics.median(secs[1:] or secs)


env = (res / "env.txt").read_text() if (res / "env.txt").is_file() else ""
gpu = re.search(r"^name, driver_version.*\n(.*)$", env, re.M)
torch_line = re.search(r"^torch .*$", env, re.M)
out = {"elapsed_s": elapsed, "gpu": gpu[1] if gpu else "none (nvidia-smi not found)",
       "torch": torch_line[0] if torch_line else "?", "skipped_steps": []}
if (work / "skipped.txt").is_file():
    out["skipped_steps"] = (work / "skipped.txt").read_text().splitlines()

junit = res / "junit.xml"
if junit.is_file():
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    out["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    out["tests"]["failed"] = [c.get("name") for c in suite.iter("testcase")
                              if c.find("failure") is not None or c.find("error") is not None]

s = summary("e2e_product")
if s:
    out["e2e_product"] = {"device": s["device"], "precision": s["precision"], "epochs": s["epochs_run"],
                          "train_seconds": s["train_seconds"], "test_mre_pct": s["test"]["mre"],
                          "parity": parity("e2e_product")}

pick = (work / "fm_pick.txt").read_text().strip() if (work / "fm_pick.txt").is_file() else None
cands = []
if (work / "fm_candidates.txt").is_file():
    for line in (work / "fm_candidates.txt").read_text().splitlines():
        name, flags = line.split("|", 1)
        s = summary(f"fm_{name}")
        cands.append({"name": name, "flags": flags, "train_seconds": s and s["train_seconds"],
                      "val_accuracy": s and s["val"]["accuracy"], "epochs": s and s["epochs_run"],
                      "precision": s and s["precision"]})
if cands:
    fm = {"candidates": cands, "picked_on_validation": pick}
    if pick:
        runs = [(0, summary(f"fm_{pick}"))] + [(seed, summary(f"fm_{pick}_seed{seed}")) for seed in (1, 2)]
        fm["picked_runs"] = [{"seed": seed, "test_accuracy": s["test"]["accuracy"],
                              "train_seconds": s["train_seconds"]} for seed, s in runs if s]
        fm["parity"] = parity(f"fm_{pick}")
    out["fashion_mnist_cnn"] = fm

speed = {}
for model in ("product", "mlp"):
    gpu_s, cpu_s = epoch_seconds(f"speed_{model}_cuda"), epoch_seconds(f"speed_{model}_cpu")
    speed[model] = {"gpu_s_per_epoch": gpu_s, "cpu_s_per_epoch": cpu_s,
                    "gpu_over_cpu": gpu_s / cpu_s if gpu_s and cpu_s else None}
out["seconds_per_epoch"] = speed
(res / "results.json").write_text(json.dumps(out, indent=1) + "\n")


def fmt(v, spec=".3g"):
    return "-" if v is None else format(v, spec)


lines = [f"# GPU results ({out['gpu']}; {out['torch']}; {elapsed} s in all)", ""]
t = out.get("tests")
if t:
    lines.append(f"tests/test_cuda.py: {t['tests']} tests, {t['failures']} failed, {t['errors']} errors, "
                 f"{t['skipped']} skipped" + (f" -- failed: {', '.join(t['failed'])}" if t["failed"] else ""))
e = out.get("e2e_product")
if e:
    p = e["parity"]
    lines.append(f"mission (python -m train --task product, then export on the CPU): {e['device']} {e['precision']}, "
                 f"{e['epochs']} epochs in {e['train_seconds']} s, test MRE {e['test_mre_pct']:.3f}% (target <= 1.35%); "
                 + (f"parity {'passed' if p['passed'] else 'FAILED'}, max abs err "
                    + ", ".join(f"{k} {v:.1e}" for k, v in p["max_abs_err"].items()) if p else "export: no parity.json"))
fm = out.get("fashion_mnist_cnn")
if fm:
    lines += ["", "| Fashion-MNIST CNN candidate | train s | val acc % |", "|---|---|---|"]
    lines += [f"| {c['name']}{' (picked)' if c['name'] == fm['picked_on_validation'] else ''} | "
              f"{fmt(c['train_seconds'])} | {fmt(c['val_accuracy'], '.2f')} |" for c in fm["candidates"]]
    for r in fm.get("picked_runs", []):
        ok = r["test_accuracy"] >= 93.5 and r["train_seconds"] <= 5
        lines.append(f"picked {fm['picked_on_validation']}, seed {r['seed']}: test {r['test_accuracy']:.2f}% in "
                     f"{r['train_seconds']:.2f} s ({'meets' if ok else 'misses'} >= 93.5% in <= 5 s)")
    p = fm.get("parity")
    if p:
        lines.append(f"its export on the CPU: parity {'passed' if p['passed'] else 'FAILED'} ({p['inputs']})")
lines += ["", "| s per epoch | GPU | CPU (same machine) | GPU / CPU |", "|---|---|---|---|"]
for model, v in speed.items():
    lines.append(f"| {model} | {fmt(v['gpu_s_per_epoch'])} | {fmt(v['cpu_s_per_epoch'])} | {fmt(v['gpu_over_cpu'])} |")
for step in out["skipped_steps"]:
    lines.append(step)
(res / "summary.md").write_text("\n".join(lines) + "\n")
EOF

tar czf "$RES/runs.tar.gz" -C "$WORK" --exclude='*.pt' --exclude='*.onnx' --exclude='*.pt2' --exclude=tensorboard \
    --exclude='*.png' . 2>/dev/null
echo
cat "$RES/summary.md" 2>/dev/null || echo "no summary.md: see gpu.log"
