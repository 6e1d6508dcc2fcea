#!/usr/bin/env bash
# The prepared GPU check in one command (bench/device_check.py says what it proves):
#   bash bench/device_check.sh OUT [--only PARTS] [--budget SECONDS] [--cpu-dry-run]
# Runs with the machine's own python3 (PYTHON=... to choose another), from any folder.
set -euo pipefail
exec "${PYTHON:-python3}" -u "$(dirname "$0")/device_check.py" "$@"
