#!/usr/bin/env bash
# Kept for old commands: runs launch/local.py (NUM_PROCESSES, DEVICES_PER_PROCESS, PORT, DRY_RUN and PYTHON still apply).
exec env PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-python3}" -m launch.local "$@"
