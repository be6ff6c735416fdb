#!/usr/bin/env bash
# Bad input through the real m3h binary: each case must exit non-zero (2) with a message that names
# what is wrong, never crash. Usage: cli_bad_input.sh path/to/m3h
set -u
m3h="$1"
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
    echo "$out" | head -5
    echo "  (wanted the pattern: $pattern)"
    fail=1
  else
    echo "ok: m3h $* -> $rc: $(grep -m1 -- "$pattern" <<<"$out")"
  fi
}
printf '{"hidden_size": 64, "num_hidden_layers": 2}' >"$tmp/bad.json"
expect 2 "num_attention_heads" run --config "$tmp/bad.json" --tokens 4
printf '{ broken' >"$tmp/broken.json"
expect 2 "not valid JSON" run --config "$tmp/broken.json" --tokens 4
expect 2 "unknown preset" run --preset huge --tokens 4
printf '1 2 3 600 4' >"$tmp/tokens.txt"
expect 2 "token 3 = 600 is outside the vocabulary" run --preset tiny --tokens "$tmp/tokens.txt"
printf '1 2 x' >"$tmp/words.txt"
expect 2 "is not an integer" run --preset tiny --tokens "$tmp/words.txt"
expect 2 "max_position_embeddings" run --preset tiny --tokens 5000
expect 2 "max_position_embeddings" run --preset tiny --tokens 4090 --decode 10
expect 2 "precision" run --preset tiny --tokens 4 --precision fp8
expect 2 "neither a count nor a readable file" run --preset tiny --tokens /nonexistent
expect 0 "Run the model on the CPU reference or the GPU" run --help
# GPU requests: refused with a reason on a build without CUDA or a machine without a GPU, and for
# a precision the GPU does not compute in; the same lines hold on a GPU machine (bf16 / length).
expect 2 "CUDA\|bf16" run --preset tiny --tokens 4 --device gpu --precision fp64
expect 2 "CUDA\|max_position_embeddings" compare --preset tiny --tokens 5000
expect 0 "GPU and the CPU reference" compare --help
expect 0 "Exit codes" --help
exit $fail
