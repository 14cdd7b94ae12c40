#!/usr/bin/env bash
# Before a fresh install: is there room for the virtual environment? torch 2.14.1 for x86_64 is a
# CUDA build whose NVIDIA wheels make .venv ~6.8 GB (measured on 2026-12-04: 6.8 GB, 3.2 GB of it
# nvidia/*); a disk that fills half-way through pip leaves a broken venv and an OSError deep in
# pip's output (a CI run failed that way). Stops with one line and exit status 1 when the
# filesystem that will hold the venv has less than NEED_GB (default 7) free.
#   usage: scripts/disk-room.sh VENV_DIR [NEED_GB]
set -euo pipefail
venv="${1:?usage: disk-room.sh VENV_DIR [NEED_GB]}"
need_gb="${2:-7}"
dir="$venv"
while [[ ! -d "$dir" ]]; do dir="$(dirname "$dir")"; done   # the venv may not exist yet
free_kb="$(df -Pk "$dir" | awk 'NR==2 {print $4}')"
have_gb=$((free_kb / 1024 / 1024))
if (( have_gb < need_gb )); then
  echo "make: not enough disk for $venv: ${have_gb} GB free on $(df -P "$dir" | awk 'NR==2 {print $6}'), the install needs ~${need_gb} GB (torch's CUDA wheels); free some space and rerun" >&2
  exit 1
fi
