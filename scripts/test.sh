#!/usr/bin/env bash
# The whole test suite, from a fresh clone: start the database servers if they are down,
# check formatting and lints, then run every test in the workspace with every feature.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/services.sh

# Incremental caches double the target directory and buy nothing on a one-shot run.
if [[ "${CI:-}" == "true" ]]; then
  export CARGO_INCREMENTAL=0
fi

# A three-node Redis Cluster on loopback ports 17001-17003 (IDEM_REDIS_CLUSTER_PORTS) for the
# cluster tests: started here if it is not running, and stopped again when the tests end.
cluster_ports=(${IDEM_REDIS_CLUSTER_PORTS:-17001 17002 17003})
if ! redis-cli -p "${cluster_ports[0]}" cluster info 2>/dev/null | grep -q '^cluster_state:ok'; then
  if ./scripts/redis-cluster.sh start; then
    trap './scripts/redis-cluster.sh stop' EXIT
  elif [[ "${CI:-}" == "true" ]]; then
    echo "test: the Redis Cluster could not be started; CI needs it (CI=true)" >&2
    exit 1
  fi
fi

export IDEM_TEST_POSTGRES_URL="${IDEM_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}"
export IDEM_TEST_MYSQL_URL="${IDEM_TEST_MYSQL_URL:-mysql://root@127.0.0.1:3306/test}"
export IDEM_TEST_REDIS_URL="${IDEM_TEST_REDIS_URL:-redis://127.0.0.1:6379}"
cluster_urls=$(printf 'redis://127.0.0.1:%s,' "${cluster_ports[@]}")
export IDEM_TEST_REDIS_CLUSTER="${IDEM_TEST_REDIS_CLUSTER:-${cluster_urls%,}}"

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --all-features -- -D warnings
# Each backend alone must build warning-free too: users enable one feature, not all.
for features in "" "sqlite" "postgres" "mysql" "redis" "axum" "nats" "amqp" "uuid" "ulid"; do
  echo "== cargo clippy -p idem-runtime --no-default-features --features '$features'"
  cargo clippy -p idem-runtime --no-default-features --features "$features" -- -D warnings
done
echo "== module imports point one way (no cycles)"
python3 scripts/import-graph.py
echo "== cargo doc (broken links are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps -p idem-runtime -p idem-client --all-features
echo "== cargo test"
cargo test --workspace --all-features
# Fuzzing (cargo-fuzz, installed here if missing): every target for FUZZ_SECONDS (20) each,
# two minutes of fuzzing plus the build. IDEM_SKIP_FUZZ=1 leaves it out of a local run.
if [[ "${IDEM_SKIP_FUZZ:-}" != "1" ]]; then
  echo "== fuzzing"
  ./scripts/fuzz.sh
fi
