#!/bin/bash
# Submit one of slurm/tpo_*.sh from the repository root, sbatch options before "--":
#   examples/submit.sh 8b -p gpu -A myproj -- run.policy=/models/...
set -euo pipefail
cd "$(dirname "$0")/.."
script="slurm/tpo_$1.sh"
shift
options=()
if [[ " $* " == *" -- "* ]]; then
    while [ "$1" != "--" ]; do options+=("$1"); shift; done
    shift
fi
exec sbatch "${options[@]}" "$script" "$@"
