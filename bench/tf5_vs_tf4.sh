#!/usr/bin/env bash
# Issue 21's GPU comparison: the entrypoint on transformers 5.3.0 + peft 0.18.1 against
# transformers 4.56.2 + peft 0.17.1, same GPU, same checkpoint (built once, by transformers 4,
# in the hub's per-expert layout), same data, 8 packed rows of 2048, at 2 and 4 layers.
# The two stacks alternate (tf4, tf5, tf4, tf5, ...) so clock drift falls on both.
# usage (from the repo on the device): bash bench/tf5_vs_tf4.sh TF4_WHEELS TF5_WHEELS OUTDIR [ROUNDS]
set -o pipefail
tf4=$1 tf5=$2 out=$3 rounds=${4:-2}
mkdir -p "$out"
for v in 4 5; do
  eval "wheels=\$tf$v"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "/tmp/site$v" "$wheels"/*.whl || exit 1
done
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
work=/tmp/tf5-bench
PYTHONPATH=/tmp/site4:$PWD python3 -c "
import sys; sys.path.insert(0, 'bench')
from pathlib import Path
import qlora_throughput as q
q.build_model(Path('$work'), [2, 4])" || exit 1
for r in $(seq 1 "$rounds"); do
  for v in 4 5; do
    echo "=== round $r transformers $v"
    PYTHONPATH=/tmp/site$v:$PWD python3 bench/qlora_throughput.py --no-plain --rows 8 --steps 12 \
      --repeats 1 --layers 2 4 --work "$work" --merge "$out/tf$v.json" --out "$out/tf$v.json" \
      2>&1 | tee -a "$out/tf$v.log"
  done
done
python3 "$(dirname "$0")/tf5_table.py" "$out" | tee "$out/table.txt"
