#!/usr/bin/env bash
# Every accelerator line of docs/benchmarks.md in one run (about 6 minutes on one GPU):
#   1. yolov9-c's train step, bfloat16, batch 64 at 640: images/s, planned and peak memory;
#   2. folded gelan-c with NMS on the device, batch 64 and batch 1 (and the network alone);
#   3. the input pipeline at 640 with every host core.
# Each prints JSON lines; all land in $OUT (or the folder given as $1) with the versions.
#
#   bash benchmarks/accelerator_check.sh [OUT_DIR]          # SMOKE=1: tiny sizes, any machine
#
# On a machine without internet whose Python lacks some requirements (ml-collections,
# pycocotools, tensorflow-datasets, ...), carry their wheels in .whl/ (docs/benchmarks.md says
# how); they are installed into /tmp/site first. Targets (issue 16): training >= 230 images/s
# within 64.6 GiB; gelan-c with NMS >= 1750 images/s at batch 64 and < 8 ms at batch 1.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-runs/accelerator_check}}"
mkdir -p "$out"
python="${PYTHON:-python3}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # benchmarks/*.py import the package
cores="$(nproc)"
if [ "${SMOKE:-0}" = 1 ]; then  # the same commands at toy sizes: checks the script itself
  train_model=gelan-t infer_model=gelan-t size=64 batch=8 steps=2 images=16 batches=2
else
  train_model=yolov9-c infer_model=gelan-c size=640 batch=64 steps=20 images=256 batches=16
fi

"$python" - >"$out/versions.json" <<'EOF'
import json, platform, subprocess
import jax, flax, optax
info = {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
        "optax": optax.__version__, "backend": jax.default_backend(),
        "devices": [d.device_kind for d in jax.devices()]}
try:
  info["nvidia_smi"] = subprocess.run(
      ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
      capture_output=True, text=True, timeout=30).stdout.strip()
except (OSError, subprocess.SubprocessError):
  info["nvidia_smi"] = None
print(json.dumps(info))
EOF
cat "$out/versions.json"

status=0
run() {  # name, timeout in seconds, command...
  local name="$1" limit="$2"
  shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" 2>"$out/$name.stderr" | tee "$out/$name.jsonl" || {
    status=1
    echo "== $name failed; the end of its stderr:"
    tail -20 "$out/$name.stderr"
  }
}
run train 240 "$python" -m yolov9_jax.bench --model "$train_model" --benchmarks train \
  --batch_size "$batch" --image_size "$size" --dtype bfloat16 --steps "$steps" --max_boxes 100
run inference_batch64 120 "$python" -m yolov9_jax.bench --model "$infer_model" \
  --benchmarks inference,inference_nms --batch_size "$batch" --image_size "$size" \
  --dtype bfloat16 --steps "$((steps * 2))"
run inference_batch1 90 "$python" -m yolov9_jax.bench --model "$infer_model" \
  --benchmarks inference,inference_nms --batch_size 1 --image_size "$size" --dtype bfloat16 \
  --steps "$((steps * 5))"
run input_pipeline 120 "$python" benchmarks/input_pipeline.py --images "$images" \
  --batches "$batches" --batch_size 16 --workers "$cores"
exit "$status"
