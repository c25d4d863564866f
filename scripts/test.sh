#!/usr/bin/env bash
# The whole test suite, from a fresh clone: start the database servers if they are down,
# check formatting and lints, then run every test in the workspace with every feature.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/services.sh

export IDEM_TEST_POSTGRES_URL="${IDEM_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}"
export IDEM_TEST_MYSQL_URL="${IDEM_TEST_MYSQL_URL:-mysql://root@127.0.0.1:3306/test}"

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --all-features -- -D warnings
# Each backend alone must build warning-free too: users enable one feature, not all.
for features in "" "sqlite" "postgres" "mysql" "axum" "nats" "amqp"; do
  echo "== cargo clippy -p idem-runtime --no-default-features --features '$features'"
  cargo clippy -p idem-runtime --no-default-features --features "$features" -- -D warnings
done
echo "== module imports point one way (no cycles)"
python3 scripts/import-graph.py
echo "== cargo doc (broken links are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps -p idem-runtime --all-features
echo "== cargo test"
cargo test --workspace --all-features
