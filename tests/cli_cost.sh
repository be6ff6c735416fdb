#!/usr/bin/env bash
# `m3h cost` end to end through the real binary: the M3 ratios of spec §5 in JSON, the sweep's
# row count in CSV, exit code 2 with a message naming the context for out-of-range contexts, and
# --help. Usage: tests/cli_cost.sh path/to/m3h
set -u
M3H=${1:?usage: cli_cost.sh path/to/m3h}
fail() { echo "cli_cost: FAIL: $*" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

"$M3H" cost --preset m3 --context 1048576 --format json >"$tmp/m3.json" 2>"$tmp/err" \
  || fail "m3h cost --preset m3 --context 1048576 --format json exited $?: $(cat "$tmp/err")"
# Quoted to 3-4 significant digits in spec §5 (30.12x, 28.44x, 28.55x, 12.26x): 5e-4 relative.
python3 -c '
import json, sys
j = json.load(open(sys.argv[1]))
want = {"decode_ratio": 30.1176, "causal_avg_ratio": 28.4444, "causal_exact_ratio": 28.5457,
        "model_decode_ratio": 12.2635}
bad = [f"{k} = {j.get(k)!r}, expected {v}" for k, v in want.items()
       if not isinstance(j.get(k), (int, float)) or abs(j[k] - v) > 5e-4 * v]
for k in ("command", "config", "rules", "context"):
    if k not in j: bad.append(f"key {k} missing")
ctx = j.get("context")
if ctx != 1048576: bad.append(f"context = {ctx!r}, expected 1048576")
if bad: sys.exit("; ".join(bad))
' "$tmp/m3.json" || fail "JSON values of m3h cost --preset m3 --context 1048576"

"$M3H" cost --preset m3 --sweep --format csv >"$tmp/sweep.csv" 2>"$tmp/err" \
  || fail "m3h cost --sweep --format csv exited $?: $(cat "$tmp/err")"
python3 -c '
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
ctx = [int(r["context"]) for r in rows]
want = [1024 << i for i in range(11)]
if ctx != want: sys.exit(f"contexts {ctx}, expected {want}")
' "$tmp/sweep.csv" || fail "--sweep --format csv: expected 11 data rows 1024..1048576"

for ctx in 0 2000000; do
  "$M3H" cost --preset m3 --context "$ctx" >"$tmp/out" 2>"$tmp/err"
  rc=$?
  [ "$rc" -eq 2 ] || fail "--context $ctx exited $rc, expected 2"
  grep -q -- "--context $ctx" "$tmp/err" || fail "--context $ctx: message does not name it: $(cat "$tmp/err")"
  grep -q "max_position_embeddings" "$tmp/err" || fail "--context $ctx: message does not name the limit"
done

"$M3H" cost --help >"$tmp/help" 2>&1 || fail "m3h cost --help exited $?"
for word in --preset --config --context --sweep --format --bytes-per-element decode causal_avg causal_exact; do
  grep -q -- "$word" "$tmp/help" || fail "m3h cost --help does not mention $word"
done

echo "cli_cost: OK"
