#!/usr/bin/env bash
# Makes (once) a Python virtualenv with the peer the Redis bench compares with, Powertools for
# AWS Lambda 3.37 on redis-py, and prints its python's path:
#   IDEM_BENCH_PEER_PYTHON=$(scripts/peer-venv.sh) cargo bench -p idem-runtime --features redis --bench redis
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/peer-venv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import aws_lambda_powertools, redis, boto3' 2>/dev/null; then
    python3 -m venv "$venv" >&2
    # boto3 only because the utility's package imports its DynamoDB layer.
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        aws-lambda-powertools==3.37.0 redis==8.1.0 boto3==1.44.8 jmespath==1.1.0 >&2
fi
echo "$PWD/$venv/bin/python"
