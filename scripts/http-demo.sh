#!/usr/bin/env bash
# The HTTP walkthrough of the README (steps 1-3, 5 and 6), run end to end: the orders example on a
# SQLite file, curl, the example's idem-client mode through the lossy link, a server killed
# mid-request, and the /metrics lines that moved. Uses ports 3000 and 3001.
set -u
cd "$(dirname "$0")/.."
cargo build -q --example http
BIN="${CARGO_TARGET_DIR:-./target}/debug/examples/http"
rm -f /tmp/idem-demo.db /tmp/idem-demo.db-wal /tmp/idem-demo.db-shm
$BIN sqlite:///tmp/idem-demo.db > /tmp/server1.log 2>&1 &
SERVER=$!
sleep 1.5
K=$(cat /proc/sys/kernel/random/uuid)
echo "## 1"; curl -s -i -X POST localhost:3000/orders -H "Idempotency-Key: $K" -H 'X-Api-Key: alice' -H 'Content-Type: application/json' -d '{"sku":"tea","quantity":2}' | grep -iE "^HTTP|replayed|^\{"; echo
echo "## 2"; curl -s -i -X POST localhost:3000/orders -H "Idempotency-Key: $K" -H 'X-Api-Key: alice' -H 'Content-Type: application/json' -d '{"sku":"tea","quantity":2}' | grep -iE "^HTTP|replayed|^\{"; echo
echo "## 3"; curl -s -o /dev/null -w "%{http_code}\n" -X POST localhost:3000/orders -H "Idempotency-Key: $K" -H 'X-Api-Key: alice' -H 'Content-Type: application/json' -d '{"sku":"coffee","quantity":1}'
echo "## 5 client through the lossy link"
$BIN client http://127.0.0.1:3001/orders '{"sku":"tea","quantity":3}'
echo "## metrics"
curl -s localhost:3000/metrics | grep -E '^idem_(calls|takeovers|errors)_total'
echo "## 6 kill mid-request"
$BIN client 'http://127.0.0.1:3000/orders?delay_ms=3000' '{"sku":"jam","quantity":1}' > /tmp/client6.log 2>&1 &
CLIENT=$!
sleep 1
kill -9 $SERVER
sleep 1
$BIN sqlite:///tmp/idem-demo.db > /tmp/server2.log 2>&1 &
SERVER=$!
wait $CLIENT
cat /tmp/client6.log
echo "## metrics after"
curl -s localhost:3000/metrics | grep -E '^idem_(calls|takeovers|errors)_total'
curl -s localhost:3000/orders
kill $SERVER
