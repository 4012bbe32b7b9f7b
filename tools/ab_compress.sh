#!/usr/bin/env bash
# Interleaved A/B of two streamq installs on the same GPTQ run (issue 14's protocol): wall, user + sys CPU and max RSS by
# /usr/bin/time, and the report's peak. Not in CI.
#   tools/ab_compress.sh PYTHON_A PYTHON_B [ROUNDS] [extra compress flags...]
# PYTHON_A / PYTHON_B: interpreters whose `import streamq` is each version (e.g. a venv with
# `pip install --no-deps -e` of a `git worktree add --detach DIR COMMIT`). Needs the SmolLM2 cache
# (tools/fetch_smollm2.py) and the shared data folder (STREAMQ_DATA, default ../shared/data of the main checkout or
# /work/shared/data). Run from a folder without a streamq/ in it (python -m puts the cwd first on sys.path), on an
# otherwise idle machine: each run prints the load average before it and the sha256 of model.safetensors.
set -euo pipefail
a=${1:?PYTHON_A}; b=${2:?PYTHON_B}; rounds=${3:-2}; shift $(( $# < 3 ? $# : 3 ))
model=${STREAMQ_CACHE:-$HOME/.cache/streamq}/SmolLM2-135M-Instruct
data=${STREAMQ_DATA:-$(cd "$(dirname "$0")/../.." && pwd)/shared/data}
[ -d "$data" ] || data=/work/shared/data
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for r in $(seq "$rounds"); do
  order="A B"; [ $((r % 2)) -eq 0 ] && order="B A"  # alternate who goes first
  for v in $order; do
    py=$a; [ "$v" = B ] && py=$b
    rm -rf "$work/out"
    echo "$v round $r: load $(cut -d' ' -f1-3 /proc/loadavg)"
    /usr/bin/time -f "$v round $r: wall %e s, user %U s, sys %S s, max RSS %M kB" "$py" -m streamq.cli compress "$model" "$work/out" \
      --bits 4 --group-size 64 --calib "$data/austen-calib.txt" --nsamples 32 --seqlen 512 --no-progress "$@" \
      > "$work/log" 2>&1 || { cat "$work/log"; exit 1; }
    tail -1 "$work/log"
    echo "  model.safetensors sha256 $(sha256sum < "$work/out/model.safetensors" | cut -c1-16)"
    "$py" -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"  report: {r['seconds_total']:.1f} s, peak {r['peak_rss_bytes']/1e9:.2f} GB\")" "$work/out/streamq_report.json"
  done
done
