#!/bin/bash
# The tiny CPU TPO run and its direct-response baseline; arguments go to tpo-tiny.
set -euo pipefail
cd "$(dirname "$0")/../.."
make setup
exec .venv/bin/tpo-tiny "$@"
