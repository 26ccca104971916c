#!/usr/bin/env bash
# The GPU measurements of the registry, benchmark and SGDM issues, one part per device call
# (run there, in the repository root, after perf/gpu/prepare.py here; see README.md beside this file):
#
#   bash perf/gpu/session.sh check            versions, imports, GPU, which metric weights exist
#   bash perf/gpu/session.sh ff [MIN]         ESRGAN (PSNR stage) + SwinIR, x16, MIN (3) minutes each;
#                                                   GPU inference images/s; the checkpoints loaded and run on CPU
#   bash perf/gpu/session.sh sgdm [MIN]       small-geometry sgdm and sgdm-nomap, x32, MIN (4) minutes each
#   bash perf/gpu/session.sh speed            SGDM 50-step sampling at SD2.1-base geometry (fp32/bf16,
#                                                   batch 16/64, start=lr@400) + the metric suite on 300 pairs
#   bash perf/gpu/session.sh one [SECONDS]    THE ONE-CALL RUNBOOK (perf/gpu/runbook.py): diffusion throughput
#                                                   (fp32-eager/bf16-eager/fast), metric suite on 300 pairs, then
#                                                   sgdm vs sgdm-nomap for equal minutes; ends by SECONDS (330)
#
# Each part writes <part>.json, <part>.md (and plots) to $OUT (the device tool's folder; out/gpu elsewhere).
# DEVICE=cpu with small MIN runs the same path on a machine without a GPU (how it is tested); TRAIN_ARGS adds
# trainer options (e.g. "--set train.batch_size=2") and BENCH_ARGS runner options (e.g. "--limit 4 --conditions
# steps=5", the last occurrence wins) to shrink that smoke run; RUNBOOK_ARGS (shell words) goes to runbook.py.
set -uo pipefail
part=${1:?usage: session.sh check|ff|sgdm|speed|one [MINUTES|SECONDS]}
OUT=${OUT:-out/gpu}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
G=${GPU_CARRY:-.gpu}
RUNS=${RUNS:-runs/gpu}
mkdir -p "$OUT" "$RUNS"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TQDM_MININTERVAL=30
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
BENCH="$PY -m benchmark.cli"

install_wheels() {  # resolve against what the image has; if that fails, force the locked set
  [ -d "$G/whl" ] || return 0
  $PY -m pip install -q --no-index --find-links "$G/whl" diffusers normflows lpips torch_fidelity spandrel openai-clip \
    2>&1 | tail -3 || true
  $PY -c "import diffusers, normflows, lpips, torch_fidelity, spandrel, ftfy" 2>/dev/null \
    || $PY -m pip install -q --no-index --no-deps --force-reinstall "$G"/whl/*.whl
  $PY -m pip install -q --no-index --no-deps "$G"/whl/pyiqa-*.whl  # its declared extras are not needed
  $PY -c "import pkg_resources" 2>/dev/null \
    || $PY -m pip install -q --no-index --no-deps "$G"/whl/setuptools-*.whl  # openai-clip imports pkg_resources
}

train() {  # method data minutes extra-args...
  local m=$1 data=$2 min=$3; shift 3
  $BENCH train --method "$m" --data "$data" --out "$RUNS/$m" --device "$DEVICE" --max-minutes "$min" \
    --set train.val_every=1000000 --set train.save_every=1000000 --set train.log_every=25 "$@" ${TRAIN_ARGS:-} \
    2>&1 | tee "$RUNS/$m.log" | grep -v "it/s\]$" | tail -5
}

case "$part" in
check)
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
    $PY - <<'EOF'
import importlib, json, os, sys, torch
mods = {}
for name in ("numpy", "pandas", "pyarrow", "scipy", "PIL", "yaml", "click", "safetensors", "diffusers", "transformers",
             "huggingface_hub", "tokenizers", "normflows", "lpips", "torch_fidelity", "pyiqa", "spandrel", "timm", "clip"):
    try:
        mods[name] = getattr(importlib.import_module(name), "__version__", "?")
    except Exception as e:  # noqa: BLE001
        mods[name] = f"MISSING: {type(e).__name__}: {e}"[:160]
print(json.dumps({"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
                  "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "modules": mods,
                  "torch_home": torch.hub.get_dir(), "cached": sorted(os.listdir(torch.hub.get_dir()))
                  if os.path.isdir(torch.hub.get_dir()) else []}, indent=1))
EOF
  } > "$OUT/check.json" 2>&1
  install_wheels > "$OUT/install.log" 2>&1
  $PY -c "import baselines.sgdm, benchmark.metrics, cmsrd.data; print('imports ok')" >> "$OUT/install.log" 2>&1
  $BENCH weights verify > "$OUT/weights.txt" 2>&1
  cat "$OUT/check.json" "$OUT/install.log" "$OUT/weights.txt"
  ;;
ff)
  min=${2:-3}
  install_wheels
  ff_set=(--set train.precision=bf16 --set train.num_workers=8 --set train.val_every_minutes="$(awk "BEGIN{print $min / 6}")"
          --set train.val_max_images=64 --set train.val_batch_size=16)
  train esrgan "$G/real" "$min" "${ff_set[@]}"
  train swinir "$G/real" "$min" "${ff_set[@]}"
  w=(--weights "esrgan=$RUNS/esrgan/model.safetensors" --weights "swinir=$RUNS/swinir/model.safetensors")
  $BENCH run --data "$G/real" --methods bicubic,esrgan,swinir "${w[@]}" --metrics psnr_y,ssim_y,psnr_rgb,ssim_rgb \
    --device "$DEVICE" --batch-size 16 --out "$RUNS/bench-ff" ${BENCH_ARGS:-} 2>&1 | tail -3
  # the GPU-trained checkpoints load and run on a CPU (a fresh process that sees no GPU)
  CUDA_VISIBLE_DEVICES= $BENCH run --data "$G/real" --methods esrgan,swinir "${w[@]}" --metrics psnr_y \
    --device cpu --batch-size 4 --limit 4 --out "$RUNS/bench-ff-cpu" 2>&1 | tail -3
  $PY perf/gpu/collect.py --name ff --runs "$RUNS/esrgan" "$RUNS/swinir" --bench "$RUNS/bench-ff" \
    --cpu-bench "$RUNS/bench-ff-cpu" --out "$OUT"
  ;;
sgdm)
  min=${2:-4}
  install_wheels
  s_set=(--config baselines/configs/sgdm-small.yaml --set train.val_every_minutes="$(awk "BEGIN{print $min / 4}")"
         --set train.num_workers=8)
  train sgdm "$G/synthetic" "$min" "${s_set[@]}"
  train sgdm-nomap "$G/synthetic" "$min" "${s_set[@]}"
  w=(--weights "sgdm=$RUNS/sgdm/model.safetensors" --weights "sgdm-nomap=$RUNS/sgdm-nomap/model.safetensors")
  $BENCH run --data "$G/synthetic" --methods bicubic,sgdm,sgdm-nomap "${w[@]}" --metrics psnr_y,ssim_y,lpips \
    --skip-missing --device "$DEVICE" --batch-size 16 --limit 32 --out "$RUNS/bench-sgdm" ${BENCH_ARGS:-} 2>&1 | tail -3
  $PY perf/gpu/collect.py --name sgdm --runs "$RUNS/sgdm" "$RUNS/sgdm-nomap" --bench "$RUNS/bench-sgdm" --out "$OUT"
  ;;
speed)
  install_wheels
  batches=${BATCHES:-16 64}
  $PY -m baselines.sgdm.throughput --method sgdm --batch $batches --precision fp32 bf16 --start-t 400 --repeats 1 \
    --device "$DEVICE" ${THROUGHPUT_ARGS:-} | tee "$OUT/throughput.jsonl"
  $PY perf/metrics_bench.py --data "$G/real" --n "${PAIRS:-300}" --metrics all --device "$DEVICE" \
    --out "$OUT/metrics_cached_weights.json" | tail -16
  $PY perf/metrics_bench.py --data "$G/real" --n "${PAIRS:-300}" --metrics all --device "$DEVICE" \
    --stand-in-weights --out "$OUT/metrics_stand_in.json" | tail -16
  ;;
one)
  deadline=$(( $(date +%s) + ${2:-330} ))  # set first: the wheel install counts against it
  install_wheels > "$RUNS/install.log" 2>&1
  eval "extra=(${RUNBOOK_ARGS:-})"  # shell words, so quoted values such as --train-args "..." survive
  $PY perf/gpu/runbook.py --deadline "$deadline" --out "$OUT" --runs "$RUNS" --device "$DEVICE" \
    --train-data "$G/synthetic" "${extra[@]}" 2>&1 | tee "$OUT/runbook.log"
  ;;
*)
  echo "unknown part $part (check|ff|sgdm|speed|one)" >&2; exit 2 ;;
esac
