#!/usr/bin/env bash
# `m3h study` (CPU parts) end to end through the real binary on the small preset at real head
# geometry: the counted multiply-adds equal the analytic model at every context, the counted FLOP
# ratio equals the analytic ratio, MSA equals dense attention (recall 1, output error ~0) while
# top-k covers the whole context (n <= 16*128), and the JSON file is written.
# Usage: tests/cli_study.sh path/to/m3h
set -u
M3H=${1:?usage: cli_study.sh path/to/m3h}
fail() { echo "cli_study: FAIL: $*" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$M3H" study --preset small --part cpu,quality --min-context 1024 --max-context 16384 \
  --quality-max-context 8192 --queries 3 --format json --out "$tmp/s.json" >"$tmp/stdout.json" 2>"$tmp/err" \
  || fail "m3h study exited $?: $(tail -3 "$tmp/err")"
cat >"$tmp/check.py" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
bad = []
cpu = j.get("cpu_decode", [])
if [r["context"] for r in cpu] != [1024, 2048, 4096, 8192, 16384]: bad.append(f"cpu contexts {[r['context'] for r in cpu]}")
for r in cpu:
    if not r["counts_match_analytic"]: bad.append(f"counts differ at {r['context']}")
    # 1e-12: both are ratios of exact integer counts
    if abs(r["flops_ratio_counted"] - r["flops_ratio_analytic"]) > 1e-12 * r["flops_ratio_analytic"]:
        bad.append(f"ratio {r['flops_ratio_counted']} vs analytic {r['flops_ratio_analytic']} at {r['context']}")
    if not (r["dense_ms"] > 0 and r["msa_ms"] > 0): bad.append(f"no time at {r['context']}")
q = j.get("quality", [])
if len(q) != 3 * 4: bad.append(f"{len(q)} quality points, expected 3 patterns x 4 contexts")
for r in q:
    if r["context"] <= 2048:  # top-16 blocks of 128 cover every key: MSA is dense attention
        if abs(r["recall_mean"] - 1) > 1e-12 or r["out_rel_l2"] > 1e-5:
            bad.append(f"{r['pattern']} at {r['context']}: recall {r['recall_mean']}, error {r['out_rel_l2']}")
    elif not (0 <= r["recall_min"] <= r["recall_mean"] <= 1): bad.append(f"recall out of [0, 1]: {r}")
if json.load(open(sys.argv[2])) != j: bad.append("--out file differs from stdout")
if bad: sys.exit("; ".join(bad))
PY
python3 "$tmp/check.py" "$tmp/stdout.json" "$tmp/s.json" || fail "values"
"$M3H" study --preset small --part gpu0 >/dev/null 2>"$tmp/err"; rc=$?
[ $rc -eq 2 ] && grep -q "unknown part" "$tmp/err" || fail "unknown part: exit $rc, $(cat "$tmp/err")"
# Refused before any part runs (a long sweep must not be lost to a later typo or an unwritable file):
# no section header on stdout, and an existing --out file left as it was.
"$M3H" study --preset small --part cpu,gpu0 --min-context 1024 --max-context 1024 >"$tmp/out" 2>"$tmp/err"; rc=$?
[ $rc -eq 2 ] && grep -q "unknown part 'gpu0'" "$tmp/err" && ! grep -q "## CPU decode" "$tmp/out" \
  || fail "cpu,gpu0: exit $rc, ran a part before refusing: $(cat "$tmp/out" "$tmp/err")"
"$M3H" study --preset small --part cpu --min-context 1024 --max-context 1024 --out "$tmp/no/such/dir.json" \
  >"$tmp/out" 2>"$tmp/err"; rc=$?
[ $rc -eq 2 ] && grep -q "cannot write" "$tmp/err" && ! grep -q "## CPU decode" "$tmp/out" \
  || fail "unwritable --out: exit $rc, $(cat "$tmp/out" "$tmp/err")"
echo keep >"$tmp/keep.json"
"$M3H" study --preset small --part cpu,gpu0 --out "$tmp/keep.json" >/dev/null 2>&1
[ "$(cat "$tmp/keep.json")" = keep ] || fail "a refused study changed its --out file"
echo "cli_study: ok"
