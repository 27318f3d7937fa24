#!/usr/bin/env bash
# A three-node RabbitMQ cluster for a test, beside the machine's own broker.
#
#   rabbit-cluster.sh start DIR          start concord-c1..c3@localhost and cluster them
#   rabbit-cluster.sh kill DIR I         kill -9 node I (1..3): a crash, no clean shutdown
#   rabbit-cluster.sh restart DIR I      start node I again over its data (it rejoins)
#   rabbit-cluster.sh await DIR N        wait until N nodes of the cluster are running
#   rabbit-cluster.sh import DIR FILE    load a definitions file (`concord broker-defs`) via c1
#   rabbit-cluster.sh stop DIR           stop every node and remove DIR (with CONCORD_CLUSTER_LOGS
#                                        set, each node's logs are first copied under that directory)
#
# Node I is concord-cI@localhost, AMQP on 127.0.0.1:568I, Erlang distribution on 2568I, data
# and logs under DIR/cI (DIR absolute), with the consistent-hash exchange plugin (the router's
# partitioned input needs it) and guest/guest allowed from localhost. Each node is started by
# tests/scripts/rabbit-node.sh; c2 and c3 join c1's cluster (`rabbitmqctl join_cluster`).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cmd=$1 dir=$2
export RABBIT_NODE_PLUGINS=rabbitmq_consistent_hash_exchange

name() { echo "concord-c$1"; }
node() { echo "concord-c$1@localhost"; }
start_node() { "$here/rabbit-node.sh" start "$dir/c$1" "$(name "$1")" "568$1" "2568$1"; }
running() {
  # The number of running nodes c1..c3 agrees on (0 when none answers).
  for i in 1 2 3; do
    if out=$(rabbitmqctl -q -n "$(node "$i")" cluster_status --formatter json 2>/dev/null); then
      echo "$out" | tr -d ' \n' | grep -o '"running_nodes":\[[^]]*\]' | grep -o '@localhost' | wc -l
      return
    fi
  done
  echo 0
}

case "$cmd" in
start)
  mkdir -p "$dir"
  chmod 0755 "$dir"
  pids=()
  for i in 1 2 3; do
    start_node "$i" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do
    wait "$pid"
  done
  for i in 2 3; do
    # (The CLI logs transient errors while a node restarts its app: kept in DIR/join.log.)
    if ! {
      rabbitmqctl -q -n "$(node "$i")" stop_app &&
        rabbitmqctl -q -n "$(node "$i")" join_cluster "$(node 1)" &&
        rabbitmqctl -q -n "$(node "$i")" start_app
    } >>"$dir/join.log" 2>&1; then
      cat "$dir/join.log" >&2
      echo "node $(node "$i") did not join $(node 1)" >&2
      exit 1
    fi
  done
  "$0" await "$dir" 3
  ;;
kill)
  i=$3
  if [ -f "$dir/c$i/node.pid" ]; then
    kill -9 "$(cat "$dir/c$i/node.pid")" 2>/dev/null || true
  fi
  # Gone once the CLI no longer reaches it.
  for _ in $(seq 1 60); do
    rabbitmqctl -q -n "$(node "$i")" ping >/dev/null 2>&1 || exit 0
    sleep 0.5
  done
  echo "node $(node "$i") still answers" >&2
  exit 1
  ;;
restart)
  start_node "$3"
  ;;
await)
  want=$3
  for _ in $(seq 1 120); do
    [ "$(running)" -ge "$want" ] && exit 0
    sleep 0.5
  done
  echo "the cluster did not reach $want running nodes (has $(running))" >&2
  exit 1
  ;;
import)
  # The CLI reads the file; the node it talks to stores the definitions cluster-wide.
  rabbitmqctl -q -n "$(node 1)" import_definitions "$3" >/dev/null
  ;;
stop)
  pids=()
  for i in 1 2 3; do
    "$here/rabbit-node.sh" stop "$dir/c$i" "$(name "$i")" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do
    wait "$pid" || true
  done
  if [ -n "${CONCORD_CLUSTER_LOGS:-}" ]; then
    for i in 1 2 3; do
      mkdir -p "$CONCORD_CLUSTER_LOGS/c$i"
      cp -r "$dir/c$i/log" "$dir/c$i/out.log" "$CONCORD_CLUSTER_LOGS/c$i/" 2>/dev/null || true
    done
  fi
  rm -rf "$dir"
  ;;
*)
  echo "usage: $0 start|stop DIR | kill|restart DIR I | await DIR N | import DIR FILE" >&2
  exit 2
  ;;
esac
