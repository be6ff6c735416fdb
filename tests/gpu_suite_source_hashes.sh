#!/usr/bin/env bash
# scripts/source-hashes.sh (gpu-suite's stale-build guard) in a scratch git repository, with file times
# set as the device's copy sets them (each call restores a file's original, possibly older, time):
#   a changed source is touched; an unchanged one is not (no needless rebuild);
#   a build that fails after compiling a changed source, then a call that restores the older-dated
#   content: the source is touched again (the record of the last good build alone says "unchanged");
#   once a build succeeds, that content is no longer touched.
# Usage: tests/gpu_suite_source_hashes.sh (needs git; no GPU)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
git init -q .
mkdir -p build
# shellcheck source=scripts/source-hashes.sh
. "$root/scripts/source-hashes.sh"

# Times in the past, in order: A's original time, a.o of the first build, B's time, a.o of B's build.
old=202001010000 obj_a=202101010000 newer=202201010000 obj_b=202301010000
put() { printf '%s\n' "$1" >a.cpp; touch -t "$2" a.cpp; }  # content, the time the device's copy gives it
compiled() { touch -t "$1" build/a.o; }                     # a.o built at that time
stale() { [ ! a.cpp -nt build/a.o ]; }                      # ninja would not rebuild a.o
fail() { echo "FAIL: $*"; exit 1; }

# A: the first build (no record yet); a.o from content A.
put A $old
[ "$(source_hashes_refresh build)" = 0 ] || fail "first call touched something"
compiled $obj_a
source_hashes_commit build

# The same content again: nothing touched, a.o stays up to date.
put A $old
[ "$(source_hashes_refresh build)" = 0 ] || fail "unchanged content was touched"
stale || fail "unchanged a.cpp looks newer than a.o"

# B: content B (newer-dated); touched; the build compiles a.o from B, then fails elsewhere (no commit).
put B $newer
[ "$(source_hashes_refresh build)" = 1 ] || fail "changed content was not touched"
compiled $obj_b

# C: content A restored with its old time: a.o (from B) is newer, so a.cpp must be touched.
put A $old
[ "$(source_hashes_refresh build)" = 1 ] || fail "after a failed build, restored content was not touched"
stale && fail "a.o built from B looks up to date for content A"

# C's build succeeds: a.o from A, newer than the touch; the next call with A touches nothing.
touch -d '+1 min' build/a.o
source_hashes_commit build
put A $old
[ "$(source_hashes_refresh build)" = 0 ] || fail "content of the last good build was touched"
stale || fail "a.cpp newer than a.o after a good build of the same content"
echo "gpu-suite source hashes: OK"
