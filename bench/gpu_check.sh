#!/usr/bin/env bash
# Every GPU check of the project in one script, for one short lease of a GPU machine (about 7 minutes):
#   env        nvidia-smi, torch / CUDA / driver versions, the packages the checks import
#   train      bench/train.py --device cuda: trainer step (DeepSpeed ZeRO-2 bf16), B/2 and XL/2: ms, img/s, MFU
#   step_cost  bench/step_cost.py --device cuda: the objectives' step cost in bf16 autocast, B/2 and XL/2
#   tests      pytest -m gpu tests/test_gpu.py
#   numerics   bench/numerics.py --device cuda: derivative-term error in bf16, B/2 and XL/2 at full depth,
#              and the imagenet256-xl2 preset's own training setting (--config)
# Each part has its own timeout and the script goes on past a failed part. Logs go to $OUT/<part>.log and
# JSON to $OUT/*-<tag>.json (8 files at most). Run from the repository root.
#   OUT=/tmp/out bash bench/gpu_check.sh                       # on the GPU machine
#   GPU_CHECK_TINY=1 OUT=/tmp/out bash bench/gpu_check.sh      # dry run on the CPU: tiny settings, same code
# Optional: WHEELS=dir of wheels to install first (into /tmp/site, put on PYTHONPATH); PY=python to use.
set -u
OUT=${OUT:-bench/results/gpu-check}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1 MPLBACKEND=Agg
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch-ext-gpu-check}
start=$(date +%s)

if [ -n "${WHEELS:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site" || echo "wheel install failed"
fi
# Pure-Python packages carried as folders (deepspeed: sdist only on PyPI)
if [ -d "${PYPKGS:-}" ]; then export PYTHONPATH="$PYTHONPATH:$PYPKGS"; fi

if [ -n "${GPU_CHECK_TINY:-}" ]; then
  DEV=cpu TAG=${TAG:-cpu-dry}
  TRAIN_ARGS="--device cpu --steps 1 --cases debug:8:bf16 debug:8:fp32"
  COST_ARGS="--device cpu --steps 1 --presets debug"
  NUM_ARGS="--device cpu --parts xl --presets DuMo-B/2 --depth 1 --batch 2 --time-scales 1"
  CONF_ARGS="--device cpu --config imagenet256-xl2 --depth 1 --batch 2"
  T_TRAIN=400 T_COST=200 T_TESTS=300 T_NUM=300
else
  DEV=cuda TAG=${TAG:-h200}
  TRAIN_ARGS="--device cuda --steps 10 --cases DuMo-B/2:64:bf16 DuMo-B/2:128:bf16 DuMo-XL/2:32:bf16 DuMo-XL/2:64:bf16"
  COST_ARGS="--device cuda --steps 10"
  NUM_ARGS="--device cuda --parts xl --presets DuMo-B/2 DuMo-XL/2 --depth 0 --batch 8"
  CONF_ARGS="--device cuda --config imagenet256-xl2 --depth 0 --batch 8"
  T_TRAIN=${T_TRAIN:-150} T_COST=${T_COST:-120} T_TESTS=${T_TESTS:-200} T_NUM=${T_NUM:-120}
fi

part() {  # part NAME SECONDS CMD...: run with a timeout, log to $OUT/NAME.log (appending), report status
  local name=$1 secs=$2
  shift 2
  echo "=== $name: $* (timeout ${secs}s, t+$(($(date +%s) - start))s)" | tee -a "$OUT/$name.log"
  timeout -k 10 "$secs" "$@" >>"$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name: exit $rc after $(($(date +%s) - start))s" | tee -a "$OUT/$name.log"
  tail -n 25 "$OUT/$name.log"
  return 0
}

env_info() {
  date -u
  nvidia-smi || echo "no nvidia-smi"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  $PY - <<'EOF'
import importlib, platform, sys
import torch
print("python", sys.version.split()[0], platform.machine())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", torch.cuda.get_device_name(0), "cc", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count,
          "memory GiB", round(p.total_memory / 2**30, 1))
for name in ["deepspeed", "pydantic", "pydantic_core", "zarr", "numcodecs", "diffusers", "triton", "numpy", "yaml",
             "safetensors", "fsspec"]:
    try:
        mod = importlib.import_module(name)
        print(f"{name:14} {getattr(mod, '__version__', '?'):12} {mod.__file__}")
    except Exception as exc:
        print(f"{name:14} MISSING ({type(exc).__name__}: {exc})")
EOF
}

export -f env_info
export PY
part env 60 bash -c env_info
part train "$T_TRAIN" $PY bench/train.py $TRAIN_ARGS --out "$OUT/train-$TAG.json"
part step_cost "$T_COST" $PY bench/step_cost.py $COST_ARGS --out "$OUT/step_cost-$TAG.json"
# The tests and the numerics time nothing that is reported as a speed: run them side by side
part tests "$T_TESTS" $PY -m pytest -m gpu tests/test_gpu.py -p no:cacheprovider -rA --timeout 240 &
tests_pid=$!
part numerics "$T_NUM" $PY bench/numerics.py $NUM_ARGS --out "$OUT/numerics-$TAG.json"
part numerics 60 $PY bench/numerics.py $CONF_ARGS
wait $tests_pid
echo "all parts done after $(($(date +%s) - start))s; files in $OUT:"
ls -la "$OUT"
