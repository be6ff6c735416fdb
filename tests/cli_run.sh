#!/usr/bin/env bash
# `m3h run` end to end through the real binary: two processes give bit-identical logits (same
# checksum), the JSON output has the fields scripts read, and --out writes a readable run file.
# Usage: cli_run.sh path/to/m3h
set -euo pipefail
m3h="$1"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
a=$("$m3h" run --preset tiny --tokens 100 --decode 8 --format json)
b=$("$m3h" run --preset tiny --tokens 100 --decode 8 --format json --out "$tmp/run.h5")
field() { python3 -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }
ha=$(field "$a" logits_fnv1a64)
hb=$(field "$b" logits_fnv1a64)
[ "$ha" = "$hb" ] || { echo "FAIL: two runs differ: $ha vs $hb"; exit 1; }
[ "$(field "$a" logits_rows)" = 108 ] || { echo "FAIL: logits_rows"; exit 1; }
c=$("$m3h" run --preset tiny --tokens 100 --decode 8 --seed 1 --format json)
[ "$(field "$c" logits_fnv1a64)" != "$ha" ] || { echo "FAIL: another seed gave the same logits"; exit 1; }
[ -s "$tmp/run.h5" ] || { echo "FAIL: no run file"; exit 1; }
# The file's content is checked where h5py exists (Debian python3-h5py; reports need it anyway).
if /usr/bin/python3 -c "import h5py" 2>/dev/null; then
  /usr/bin/python3 - "$tmp/run.h5" <<'PY'
import sys, h5py
f = h5py.File(sys.argv[1], "r")
assert f.attrs["format"] in (b"m3h-golden", "m3h-golden"), f.attrs["format"]
assert f["logits"].shape == (100, 512), f["logits"].shape
assert f["decode/logits"].shape == (8, 512), f["decode/logits"].shape
assert f["inputs/tokens"].shape == (100,)
assert f["decode/tokens"].shape == (8,)
sel = f["trace/blk.1.selection"][...]
assert sel.shape == (2, 100, 4), sel.shape
assert (sel[:, :, 0] >= 0).all()  # at least one valid block per (head, row)
print("run file ok:", len(f["trace"]), "traced tensors")
PY
fi
# Checkpoints through the CLI: export both layouts (sharded bf16 too), inspect, run: the F32
# checkpoint gives the seeded model's logits bit for bit.
"$m3h" export --preset tiny --seed 0 --out "$tmp/ck_official" >/dev/null
"$m3h" export --preset tiny --seed 0 --out "$tmp/ck_hf" --layout hf --dtype BF16 --shards 3 >/dev/null
# (output captured first: grep -q closing the pipe early would fail the pipeline under pipefail)
ins=$("$m3h" inspect "$tmp/ck_hf")
grep -qi "hf" <<<"$ins" || { echo "FAIL: inspect does not name the HF layout"; exit 1; }
ins=$("$m3h" inspect "$tmp/run.h5")
grep -q "/trace/blk.1.selection" <<<"$ins" || { echo "FAIL: inspect of a run file"; exit 1; }
d=$("$m3h" run --checkpoint "$tmp/ck_official" --tokens 100 --decode 8 --format json)
[ "$(field "$d" logits_fnv1a64)" = "$ha" ] || { echo "FAIL: checkpoint run differs from the seeded run"; exit 1; }
"$m3h" run --checkpoint "$tmp/ck_hf" --tokens 100 --decode 8 --format json >/dev/null
rm "$tmp/ck_hf/"model-00002-of-00003.safetensors
if "$m3h" run --checkpoint "$tmp/ck_hf" --tokens 4 >"$tmp/err" 2>&1; then echo "FAIL: missing shard accepted"; exit 1; fi
grep -q "model-00002-of-00003" "$tmp/err" || { echo "FAIL: missing shard not named:"; cat "$tmp/err"; exit 1; }
# --mtp: drafted decoding gives the plain greedy tokens (fp64), reports its acceptance, and refuses
# what it does not do (a negative count, --out) with exit 2.
p=$("$m3h" run --preset tiny --tokens 100 --decode 12 --precision fp64 --format json)
m=$("$m3h" run --preset tiny --tokens 100 --decode 12 --precision fp64 --mtp 3 --mtp-modules 2 --format json)
[ "$(field "$p" greedy_tokens)" = "$(field "$m" greedy_tokens)" ] || { echo "FAIL: --mtp changed the greedy tokens"; exit 1; }
python3 -c "import json,sys; j=json.loads(sys.argv[1])['mtp']; assert j['modules']==2 and j['drafts_per_round']==3 and 0<=j['accepted']<=j['drafted'] and j['rounds']>=1, j" "$m" \
  || { echo "FAIL: --mtp stats"; exit 1; }
# --mtp-weights planted (reference/weights.h plant_successor): most drafts accepted (seeded: ~0), the
# main model's greedy tokens each the successor of the one before; refused without --mtp.
m=$("$m3h" run --preset tiny --tokens 70 --decode 16 --mtp 3 --mtp-weights planted --format json)
python3 -c "import json,sys; j=json.loads(sys.argv[1]); m=j['mtp']; t=j['greedy_tokens']
assert j['weights']=='planted' and m['drafted']>0 and m['accepted']>=0.9*m['drafted'], m
assert all(b==(a+1)%512 for a,b in zip(t,t[1:])), t" "$m" || { echo "FAIL: --mtp-weights planted"; exit 1; }
for bad in "--mtp -1" "--mtp 2 --out $tmp/x.h5" "--mtp-weights planted" "--mtp 2 --mtp-weights trained"; do
  set +e; "$m3h" run --preset tiny --tokens 10 --decode 2 $bad >"$tmp/o" 2>&1; code=$?; set -e
  [ $code -eq 2 ] || { echo "FAIL: run $bad -> exit $code, want 2: $(cat "$tmp/o")"; exit 1; }
done
# A checkpoint written with its MTP modules (export --mtp) drafts as the seeded preset does: the same
# tokens and the same acceptance; a checkpoint without them is refused for --mtp.
"$m3h" export --preset tiny --seed 3 --out "$tmp/ck" --mtp >/dev/null
"$m3h" export --preset tiny --seed 3 --out "$tmp/ck0" >/dev/null
mtp_of() { python3 -c "import json,sys; j=json.loads(sys.argv[1]); print(j['mtp'], j['greedy_tokens'])" "$1"; }
c1=$("$m3h" run --checkpoint "$tmp/ck" --seed 3 --tokens 60 --decode 10 --mtp 2 --precision fp64 --format json)
c2=$("$m3h" run --preset tiny --seed 3 --tokens 60 --decode 10 --mtp 2 --precision fp64 --format json)
[ "$(mtp_of "$c1")" = "$(mtp_of "$c2")" ] || { echo "FAIL: checkpoint MTP differs: $(mtp_of "$c1") vs $(mtp_of "$c2")"; exit 1; }
set +e; "$m3h" run --checkpoint "$tmp/ck0" --tokens 10 --decode 2 --mtp 2 >"$tmp/o" 2>&1; code=$?; set -e
[ $code -eq 2 ] && grep -q "no MTP modules" "$tmp/o" || { echo "FAIL: --mtp on a checkpoint without modules: $code $(cat "$tmp/o")"; exit 1; }
# --image: a seeded picture or a PPM file leads the prompt; two runs agree, another image differs,
# and a malformed file or a size the tower cannot patch is refused with exit 2.
i1=$("$m3h" run --preset tiny --tokens 20 --decode 2 --image synthetic:16x24 --format json)
i2=$("$m3h" run --preset tiny --tokens 20 --decode 2 --image synthetic:16x24 --format json)
i3=$("$m3h" run --preset tiny --tokens 20 --decode 2 --image synthetic:24x16 --format json)
[ "$(field "$i1" logits_fnv1a64)" = "$(field "$i2" logits_fnv1a64)" ] || { echo "FAIL: --image runs differ"; exit 1; }
[ "$(field "$i1" logits_fnv1a64)" != "$(field "$i3" logits_fnv1a64)" ] || { echo "FAIL: another image, same logits"; exit 1; }
[ "$(field "$i1" logits_rows)" = 28 ] || { echo "FAIL: 6 image + 20 text + 2 decode rows expected"; exit 1; }
printf 'P6\n16 8\n255\n' >"$tmp/img.ppm"; head -c 384 /dev/urandom >>"$tmp/img.ppm"
"$m3h" run --preset tiny --tokens 4 --image "$tmp/img.ppm" >"$tmp/o" 2>&1 || { echo "FAIL: a valid PPM: $(cat "$tmp/o")"; exit 1; }
printf 'P6\n16 8\n255\nshort' >"$tmp/bad.ppm"
for bad in "--image $tmp/bad.ppm" "--image synthetic:10x10" "--image synthetic:72x8" "--image $tmp/none.ppm"; do
  set +e; "$m3h" run --preset tiny --tokens 4 $bad >"$tmp/o" 2>&1; code=$?; set -e
  [ $code -eq 2 ] || { echo "FAIL: run $bad -> exit $code, want 2: $(cat "$tmp/o")"; exit 1; }
  grep -q "m3h: error:" "$tmp/o" || { echo "FAIL: run $bad: no error line"; exit 1; }
done
# A checkpoint's vision tower (export --vision): run --image --checkpoint uses it and says so; a
# checkpoint without one falls back to the seeded tower (the preset's logits bit for bit); the
# tower's weights really come from the files (a BF16 export gives other logits).
"$m3h" export --preset tiny --seed 3 --out "$tmp/ckv" --vision --layout hf >/dev/null
"$m3h" export --preset tiny --seed 3 --out "$tmp/ckv16" --vision --dtype BF16 --shards 2 >/dev/null
ins=$("$m3h" inspect "$tmp/ckv")
grep -q "vision        'tiny-vision': Hv 32, 2 blocks" <<<"$ins" || { echo "FAIL: inspect shows no vision tower: $ins"; exit 1; }
img() { "$m3h" run --seed 3 --tokens 20 --decode 2 --image synthetic:16x24 --format json "$@"; }
tower() { python3 -c "import json,sys; j=json.loads(sys.argv[1]); print(j['image']['tower'], j['logits_rows'], 'warnings' in j)" "$1"; }
v1=$(img --checkpoint "$tmp/ckv"); v2=$(img --checkpoint "$tmp/ckv")
v0=$(img --checkpoint "$tmp/ck0"); vp=$(img --preset tiny); v16=$(img --checkpoint "$tmp/ckv16")
[ "$(tower "$v1")" = "checkpoint 28 False" ] || { echo "FAIL: checkpoint tower not used: $(tower "$v1")"; exit 1; }
[ "$(tower "$v0")" = "seeded 28 False" ] || { echo "FAIL: no-tower checkpoint: $(tower "$v0")"; exit 1; }
[ "$(field "$v1" logits_fnv1a64)" = "$(field "$v2" logits_fnv1a64)" ] || { echo "FAIL: checkpoint tower runs differ"; exit 1; }
[ "$(field "$v0" logits_fnv1a64)" = "$(field "$vp" logits_fnv1a64)" ] || { echo "FAIL: seeded fallback differs from the preset"; exit 1; }
[ "$(field "$v16" logits_fnv1a64)" != "$(field "$v1" logits_fnv1a64)" ] || { echo "FAIL: BF16 tower, same logits"; exit 1; }
"$m3h" run --checkpoint "$tmp/ckv" --seed 3 --tokens 4 --image synthetic:16x24 | grep -q "vision tower tiny-vision from the checkpoint" \
  || { echo "FAIL: the table does not name the checkpoint's tower"; exit 1; }
# Golden files with an image and with MTP drafts (schema 2) reproduce through --check.
"$m3h" golden --preset tiny --tokens 30 --decode 4 --image synthetic:16x16 --out "$tmp/gi.h5" >/dev/null
"$m3h" golden --check "$tmp/gi.h5" | grep -q "verdict: OK" || { echo "FAIL: golden --image does not reproduce"; exit 1; }
"$m3h" golden --preset tiny --tokens 30 --decode 8 --mtp 2 --out "$tmp/gm.h5" >/dev/null
"$m3h" golden --check "$tmp/gm.h5" | grep -q "verdict: OK" || { echo "FAIL: golden --mtp does not reproduce"; exit 1; }
echo "cli_run: OK ($ha)"
