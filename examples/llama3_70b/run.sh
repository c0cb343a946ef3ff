#!/bin/bash
# Submit the 70b TPO job from the repository root: examples/llama3_70b/run.sh [sbatch options --] OVERRIDES...
# e.g. examples/llama3_70b/run.sh -p gpu -A myproj -- run.policy=/models/...
set -euo pipefail
cd "$(dirname "$0")/../.."
options=()
if [[ " $* " == *" -- "* ]]; then
    while [ "$1" != "--" ]; do options+=("$1"); shift; done
    shift
fi
exec sbatch "${options[@]}" slurm/tpo_70b.sh "$@"
