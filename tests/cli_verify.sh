#!/usr/bin/env bash
# `m3h case` / `m3h verify` through the real binary: exit 0 on every committed case
# (datasets/data/cases), 1 on a perturbed copy (with the element's coordinates in the report),
# 2 on bad files and requests, each with a message naming what is wrong.
# Usage: cli_verify.sh path/to/m3h. The perturbed and damaged copies are written with h5py when a
# python3 with h5py and numpy exists (/usr/bin/python3 first); otherwise those checks are skipped
# with a note (tests/test_cases.cpp covers the same ground through the C++ API).
set -u
m3h="$1"
root="$(cd "$(dirname "$0")/.." && pwd)"
cases="$root/datasets/data/cases"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail=0
expect() {  # expect <code> <pattern> <args...>
  local code="$1" pattern="$2"
  shift 2
  out=$("$m3h" "$@" 2>&1)
  rc=$?
  if [ "$rc" -ne "$code" ] || ! grep -q -- "$pattern" <<<"$out"; then
    echo "FAIL: m3h $* -> exit $rc (want $code), output:"
    echo "$out" | tail -8
    echo "  (wanted the pattern: $pattern)"
    fail=1
  else
    echo "ok: m3h $* -> $rc: $(grep -m1 -- "$pattern" <<<"$out")"
  fi
}

# Every committed case agrees with the reference that wrote it (12 ops, one file each).
n=0
for f in "$cases"/*.h5; do
  expect 0 "verdict: AGREE" verify "$f"
  n=$((n + 1))
done
[ "$n" -ge 12 ] || { echo "FAIL: only $n committed cases in $cases (want one per op, 12)"; fail=1; }
expect 0 '"verdict": "agree"' verify "$cases/moe_router.h5" --format json
expect 0 "msa_select,bf16,sel,index" verify "$cases/msa_select.h5" --format csv
# --device gpu: without CUDA in the build or without a visible device, exit 2 saying which; on a
# GPU host every committed case (all bf16) must agree on its GPU twin, and an fp32 case is refused.
if "$m3h" verify "$cases/linear.h5" --device gpu >"$tmp/gpu_probe.txt" 2>&1 || [ $? -ne 2 ]; then
  for f in "$cases"/*.h5; do
    expect 0 "verdict: AGREE" verify "$f" --device gpu
  done
  expect 0 "a = the GPU twin's outputs" verify "$cases/attention_dense.h5" --device gpu
  expect 0 '"engine": "gpu"' verify "$cases/msa_select.h5" --device gpu --format json
  expect 0 "wrote $tmp/lin32.h5" case --op linear --out "$tmp/lin32.h5" --precision fp32
  expect 2 "the GPU computes in bf16; write the case with --precision bf16" verify "$tmp/lin32.h5" --device gpu
else
  expect 2 "built without CUDA\|no CUDA device is visible" verify "$cases/linear.h5" --device gpu
fi
expect 2 "missing or not an HDF5 file" verify "$tmp/nonexistent.h5"
printf 'not hdf5' >"$tmp/text.h5"
expect 2 "missing or not an HDF5 file" verify "$tmp/text.h5"

# m3h case: writes a case that verifies; rejects unknown ops and parameters.
expect 0 "wrote $tmp/ad.h5" case --op attention_dense --out "$tmp/ad.h5" --precision bf16 T=3 N=130 Hq=8 Hkv=2 D=32
expect 0 "verdict: AGREE" verify "$tmp/ad.h5"
expect 0 "msa_attention" case --list
expect 2 "unknown op 'flash_mla'" case --op flash_mla --out "$tmp/x.h5"
expect 2 "not a parameter of linear" case --op linear --out "$tmp/x.h5" Q=3
expect 2 "Hq = 5 is not divisible by Hkv = 2" case --op attention_dense --out "$tmp/x.h5" Hq=5
expect 2 "give --op OP and --out FILE" case --op linear

py=""
for cand in /usr/bin/python3 python3; do
  if "$cand" -c "import h5py, numpy" 2>/dev/null; then py="$cand"; break; fi
done
if [ -z "$py" ]; then
  echo "SKIP: no python3 with h5py and numpy: perturbed / damaged copies and dump_case.py not checked"
  exit $fail
fi
edit() {  # edit <src> <dst> <python statements on f (h5py.File r+) and np>
  cp "$1" "$2"
  "$py" -c "import h5py, numpy as np
f = h5py.File('$2', 'r+')
$3
f.close()"
}
# One output element pushed far beyond tolerance: disagreement, reported at its coordinates.
edit "$cases/linear.h5" "$tmp/perturbed.h5" "
y = f['/outputs/y']; a = y[...]; a[3, 17] ^= 0x4000; y[...] = a"
expect 1 "y: 1 of 469 elements outside atol + rtol|b|, first at \[3, 17\]" verify "$tmp/perturbed.h5"
expect 1 '"verdict": "disagree"' verify "$tmp/perturbed.h5" --format json
edit "$cases/msa_select.h5" "$tmp/sel.h5" "
s = f['/outputs/sel']; a = s[...]; a[5, 0] = a[5, 0] + 1 if a[5, 0] >= 0 else 0; s[...] = a"
expect 1 "sel: .* rows differ" verify "$tmp/sel.h5"
edit "$cases/attention_dense.h5" "$tmp/nan_out.h5" "
o = f['/outputs/out']; a = o[...]; a[2, 5] = 0x7fc0; o[...] = a"
expect 1 "unexpected NaN at \[2, 5\]" verify "$tmp/nan_out.h5"
# Damaged files: exit 2, naming what is wrong.
edit "$cases/rms_norm.h5" "$tmp/nan_in.h5" "
x = f['/inputs/x']; a = x[...]; a[2, 5] = 0x7fc0; x[...] = a"
expect 2 "input /inputs/x has NaN at \[2, 5\]" verify "$tmp/nan_in.h5"
edit "$cases/rms_norm.h5" "$tmp/format.h5" "f.attrs['format'] = 'm3h-golden'"
expect 2 "attribute format is 'm3h-golden', expected 'm3h-case'" verify "$tmp/format.h5"
edit "$cases/rms_norm.h5" "$tmp/op.h5" "f.attrs['op'] = 'flash_mla'"
expect 2 "unknown op 'flash_mla'" verify "$tmp/op.h5"
edit "$cases/rms_norm.h5" "$tmp/missing.h5" "del f['/inputs/w']"
expect 2 "input /inputs/w is missing" verify "$tmp/missing.h5"
edit "$cases/rms_norm.h5" "$tmp/dtype.h5" "
a = f['/inputs/w'][...]; del f['/inputs/w']; f['/inputs/w'] = a.astype(np.float32)"
expect 2 "input /inputs/w is float32, expected bfloat16 in a bf16 case" verify "$tmp/dtype.h5"
edit "$cases/rms_norm.h5" "$tmp/shape.h5" "
a = f['/inputs/x'][...]; del f['/inputs/x']; f['/inputs/x'] = a[:, :100]"
expect 2 "input /inputs/x has shape \[7, 100\], expected \[T, H\] = \[7, 129\]" verify "$tmp/shape.h5"
edit "$cases/rms_norm.h5" "$tmp/param.h5" "del f.attrs['eps']"
expect 2 "parameter attribute 'eps' of op rms_norm is missing" verify "$tmp/param.h5"
# A case dumped from Python by an independent implementation agrees.
for p in fp32 bf16; do
  if "$py" "$root/datasets/tools/dump_case.py" "$tmp/py_$p.h5" --precision "$p" >/dev/null; then
    expect 0 "verdict: AGREE" verify "$tmp/py_$p.h5"
  else
    echo "FAIL: datasets/tools/dump_case.py --precision $p"
    fail=1
  fi
done
exit $fail
