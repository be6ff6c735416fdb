#!/usr/bin/env bash
# reports/tools/ncu_hot.py (scripts/gpu-profile's reader of ncu's SASS source page) on a CSV laid
# out as ncu prints it: two kernels' tables, each after a title row. Checks the order (most stall
# samples first), the shares of the kernel's samples, --top, that each kernel gets its own table,
# and exit 1 with a message on a CSV with no recognizable table. Needs python3; no GPU.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
tool="$root/reports/tools/ncu_hot.py"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

cat >"$tmp/src.csv" <<'CSV'
"Kernel Name","void attn_partial_kernel<128>"
"Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)","Instructions Executed"
"00a0","LDG.E R2, [R4.64]","120","100","256"
"00b0","HMMA.16816.F32.BF16 R8, R12, R16, R8","30","20","4,096"
"00c0","EXIT","50","40","256"
"Kernel Name","void msa_select_split_kernel<4>"
"Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)","Instructions Executed"
"0010","BAR.SYNC 0x0","10","10","64"
CSV
got=$(python3 "$tool" "$tmp/src.csv" --top 2)
echo "$got"
[ "$(grep -c '^== ' <<<"$got")" -eq 2 ] || fail "expected two kernel tables"
grep -q '^== Kernel Name void attn_partial_kernel<128>: 3 instructions' <<<"$got" || fail "first table's title or size"
# attn: 200 samples; the top two are LDG (60%) then EXIT (25%); HMMA (15%) is cut by --top 2.
first=$(grep -A4 'attn_partial' <<<"$got" | grep '%' | head -1)
second=$(grep -A4 'attn_partial' <<<"$got" | grep '%' | sed -n 2p)
[[ "$first" == *"60.0%"*"LDG.E"* ]] || fail "first line: $first"
[[ "$second" == *"25.0%"*"EXIT"* ]] || fail "second line: $second"
grep -q 'HMMA' <<<"$got" && fail "--top 2 printed a third instruction"
grep -q '100.0%.*BAR.SYNC' <<<"$got" || fail "second kernel's own shares"

printf 'a,b\n1,2\n' >"$tmp/bad.csv"
if python3 "$tool" "$tmp/bad.csv" >"$tmp/out" 2>"$tmp/err"; then fail "a CSV with no table exited 0"; fi
grep -q "no table" "$tmp/err" || fail "no message for a CSV with no table"
echo "ncu_hot: passed"
