# Sourced by scripts/gpu-suite (tested by tests/gpu_suite_source_hashes.sh): keeps a build directory
# from looking up to date when it is not. The device's copy of the tree keeps each file's original
# modification time, so a source whose content changed to an older-dated version (2026-11-29: a file
# reverted in one call and restored in the next) looks up to date to ninja. BUILD/.source-hashes
# records the content hash of every source; a source whose hash differs from the record gets a fresh
# time before the build.
#   source_hashes_refresh BUILD   before the build: touches the changed sources, prints their count
#   source_hashes_commit BUILD    after a successful build
# Until a build succeeds, the record names the sources it touched 'dirty' (a hash no content has),
# so they are touched again by every later call until one build succeeds: a build that fails or is
# cut off half way leaves objects made from those sources' new content, and a later call that
# restores the older-dated content must not find them up to date (the record of the last good build
# alone would say "unchanged" there).

source_hashes_refresh() {
  local rec="$1/.source-hashes" now changed=""
  now=$(mktemp)
  git ls-files -co --exclude-standard 2>/dev/null | grep -E '\.(c|cc|cpp|cu|h|hpp|cuh|inc)$|CMakeLists\.txt$|\.cmake$' |
    sort | xargs -r sha1sum >"$now" 2>/dev/null
  if [ -f "$rec" ]; then
    changed=$(comm -13 <(sort "$rec") <(sort "$now") | awk '{print $2}')
    [ -n "$changed" ] && printf '%s\n' "$changed" | xargs -r touch
  fi
  awk 'NR == FNR { d[$0] = 1; next } ($2 in d) { print "dirty", $2; next } { print }' \
    <(printf '%s\n' "$changed") "$now" >"$rec"
  mv "$now" "$rec.pending"
  if [ -n "$changed" ]; then printf '%s\n' "$changed" | wc -l; else echo 0; fi
}

source_hashes_commit() {
  [ -f "$1/.source-hashes.pending" ] && mv "$1/.source-hashes.pending" "$1/.source-hashes"
}
