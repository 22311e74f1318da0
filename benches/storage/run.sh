#!/usr/bin/env bash
# Builds the storage comparison and runs every store 3 times at 5 KiB and at 200-byte records
# (5 s each, interleaved), then prints the medians. Data goes to a temporary folder on the same
# filesystem as the repo; results.raw keeps one line per run. About 3 minutes.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"
cargo build --release --quiet
data="$(mktemp -d -p "$here")"
trap 'rm -rf "$data"' EXIT
: > results.raw
for run in 1 2 3; do
  for rec in 5120 200; do
    for s in plain fjall redb; do
      ./target/release/storage-bench "$s" "$rec" 5 "$data/$s-$rec-$run" | sed "s/^/run=$run /" >> results.raw
      rm -rf "$data/$s-$rec-$run"
    done
  done
done
python3 summarize.py results.raw
