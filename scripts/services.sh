#!/usr/bin/env bash
# Makes sure the servers the server-backed tests use are running on this machine: the
# databases PostgreSQL (127.0.0.1:5432), MariaDB (127.0.0.1:3306) and Redis (127.0.0.1:6379),
# and the brokers NATS with JetStream (127.0.0.1:4222) and RabbitMQ (127.0.0.1:5672).
# Each one that is down is started with this machine's own start command, then waited for.
#
# With CI=true a server that cannot be started is an error (exit 1). Elsewhere it is a
# warning: the SQLite and in-memory tests still run, and the server-backed ones report
# themselves as skipped.
set -uo pipefail

ci=false
[[ "${CI:-}" == "true" ]] && ci=true
failed=()

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() { # name port
  for _ in $(seq 1 120); do # up to a minute: RabbitMQ takes seconds to boot
    port_open "$2" && return 0
    sleep 0.5
  done
  return 1
}

ensure() { # name port start-command...
  local name=$1 port=$2
  shift 2
  if port_open "$port"; then
    echo "services: $name is up on 127.0.0.1:$port"
    return
  fi
  echo "services: $name is down; starting it: $*"
  if ! "$@" >/dev/null 2>&1 && ! port_open "$port"; then
    echo "services: could not start $name" >&2
  fi
  if wait_for "$name" "$port"; then
    echo "services: $name is up on 127.0.0.1:$port"
  else
    failed+=("$name")
  fi
}

start_postgres() {
  command -v pg_ctlcluster >/dev/null || return 1
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
}

start_mariadb() {
  command -v start-stop-daemon >/dev/null && [[ -x /usr/sbin/mariadbd ]] || return 1
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
}

start_redis() {
  command -v redis-server >/dev/null || return 1
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
}

# The same command line the machine starts NATS with: JetStream on, its store in
# /var/lib/nats-server. (`--oknodo`: nothing to do if a nats-server already runs.)
start_nats() {
  command -v start-stop-daemon >/dev/null && [[ -x /usr/sbin/nats-server ]] || return 1
  mkdir -p /var/lib/nats-server
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
    -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log
}

# Debian's wrapper runs the broker as the rabbitmq user, with /etc/rabbitmq's settings
# (listening on 127.0.0.1:5672).
start_rabbitmq() {
  command -v rabbitmq-server >/dev/null || return 1
  rabbitmq-server -detached
}

ensure PostgreSQL 5432 start_postgres
ensure MariaDB 3306 start_mariadb
ensure Redis 6379 start_redis
ensure "NATS JetStream" 4222 start_nats
ensure RabbitMQ 5672 start_rabbitmq

if ((${#failed[@]})); then
  if $ci; then
    echo "services: not running: ${failed[*]}; CI needs every server (CI=true)" >&2
    exit 1
  fi
  echo "services: not running: ${failed[*]}; their tests will be skipped (start them, or set CI=true to make this an error)" >&2
fi
exit 0
