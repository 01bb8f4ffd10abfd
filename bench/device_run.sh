#!/usr/bin/env bash
# The device call used for the recorded runs: carried wheels (transformers 4.56.2 and
# friends win over the image's 5.x), then the given bench commands, output under $OUT.
# usage (from the repo copy on the device): bash bench/device_run.sh WHEELDIR 'cmd1' 'cmd2' ...
set -o pipefail
wheels=$1; shift
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -c 'import torch, transformers, peft, bitsandbytes; print(torch.__version__, transformers.__version__, peft.__version__, bitsandbytes.__version__, torch.cuda.get_device_name(0))'
i=0
for cmd in "$@"; do
  i=$((i + 1))
  echo "=== $cmd"
  bash -c "$cmd" 2>&1 | tee "$OUT/step$i.log"
done
nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv
