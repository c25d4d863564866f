#!/usr/bin/env bash
# A three-node Redis Cluster for the tests, on loopback ports 17001-17003 (override with
# IDEM_REDIS_CLUSTER_PORTS="p1 p2 p3"), keeping nothing on disk.
#
#   scripts/redis-cluster.sh start   # starts the nodes that are down, forms the cluster, waits for it
#   scripts/redis-cluster.sh stop    # stops the nodes this script started, by their pid
#
# Node files (pid, cluster config, log) live in target/redis-cluster/.
set -uo pipefail
cd "$(dirname "$0")/.."

ports=(${IDEM_REDIS_CLUSTER_PORTS:-17001 17002 17003})
dir="$PWD/target/redis-cluster"

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

cluster_ok() {
  redis-cli -h 127.0.0.1 -p "${ports[0]}" cluster info 2>/dev/null | grep -q '^cluster_state:ok'
}

start() {
  command -v redis-server >/dev/null && command -v redis-cli >/dev/null || {
    echo "redis-cluster: redis-server and redis-cli are needed" >&2
    return 1
  }
  if cluster_ok; then
    echo "redis-cluster: up on ${ports[*]}"
    return 0
  fi
  mkdir -p "$dir"
  for port in "${ports[@]}"; do
    port_open "$port" && continue
    rm -f "$dir/nodes-$port.conf"
    redis-server --daemonize yes --bind 127.0.0.1 --port "$port" \
      --cluster-enabled yes --cluster-config-file "$dir/nodes-$port.conf" \
      --cluster-node-timeout 2000 --save "" --appendonly no \
      --pidfile "$dir/redis-$port.pid" --logfile "$dir/redis-$port.log" || return 1
  done
  for port in "${ports[@]}"; do
    for _ in $(seq 1 50); do port_open "$port" && break; sleep 0.1; done
  done
  # Slots are assigned only on a fresh cluster: a node that already knows others is kept.
  if ! redis-cli -h 127.0.0.1 -p "${ports[0]}" cluster info | grep -q '^cluster_slots_assigned:16384'; then
    local nodes=()
    for port in "${ports[@]}"; do nodes+=("127.0.0.1:$port"); done
    redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes >/dev/null || return 1
  fi
  for _ in $(seq 1 100); do
    if cluster_ok; then
      echo "redis-cluster: up on ${ports[*]}"
      return 0
    fi
    sleep 0.1
  done
  echo "redis-cluster: the cluster did not become ok" >&2
  return 1
}

stop() {
  for port in "${ports[@]}"; do
    local pidfile="$dir/redis-$port.pid"
    [[ -f "$pidfile" ]] || continue
    kill "$(cat "$pidfile")" 2>/dev/null || true
    rm -f "$pidfile" "$dir/nodes-$port.conf"
  done
  echo "redis-cluster: stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
