#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/fuzz_targets) for FUZZ_SECONDS seconds each (default 20),
# starting from the committed seeds in fuzz/corpus/<target>; what the fuzzer adds goes to a
# temporary directory, so the committed corpus stays small. A crash stops the script: the
# failing input is under fuzz/artifacts/<target>/ (replay it with `cargo fuzz run <target>
# <file>`). Longer by hand: FUZZ_SECONDS=600 scripts/fuzz.sh, or one target:
# FUZZ_SECONDS=3600 scripts/fuzz.sh keys.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${FUZZ_SECONDS:-20}"

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi
# cargo-fuzz passes nightly flags (-Z sanitizer, ...); the stable toolchain accepts them with
# RUSTC_BOOTSTRAP=1, so no nightly toolchain is needed.
export RUSTC_BOOTSTRAP=1

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo fuzz list)
fi
cargo fuzz build
for target in "${targets[@]}"; do
  echo "== fuzz $target for ${seconds}s"
  scratch="$(mktemp -d)"
  mkdir -p "corpus/$target"
  cargo fuzz run "$target" "$scratch" "corpus/$target" -- \
    -max_total_time="$seconds" -print_final_stats=1 2>&1 |
    grep -E "^(stat::number_of_executed_units|stat::new_units_added|Done)|ERROR|panicked|SUMMARY" || true
  status=${PIPESTATUS[0]}
  rm -rf "$scratch"
  if [ "$status" -ne 0 ]; then
    echo "fuzz target $target failed (exit $status); the input is under fuzz/artifacts/$target/" >&2
    exit "$status"
  fi
done
echo "== fuzzing done: ${#targets[@]} targets, ${seconds}s each"
