#!/usr/bin/env bash
# Starts or stops an extra RabbitMQ node for a test, beside the machine's own broker.
#
#   rabbit-node.sh start DIR NAME AMQP_PORT DIST_PORT [TLS_PORT]
#   rabbit-node.sh stop DIR NAME
#
# DIR (absolute) receives the node's config, data and logs; with TLS_PORT, also a CA, a server
# certificate for localhost and a client certificate (ca.pem, server.pem/server.key,
# client.pem/client.key), and the node listens with TLS on TLS_PORT, verifying client
# certificates. The node runs as the rabbitmq user (it shares the CLI's Erlang cookie), with
# guest/guest allowed from localhost, and the plugins named (comma-separated) by
# RABBIT_NODE_PLUGINS (default none). `start` returns once the node is up; a node started
# again over its DIR keeps its data (and its cluster membership).
set -euo pipefail

cmd=$1 dir=$2 name=$3
node="$name@localhost"

case "$cmd" in
start)
  amqp_port=$4 dist_port=$5 tls_port=${6:-}
  mkdir -p "$dir"/{mnesia,log}
  {
    echo "listeners.tcp.1 = 127.0.0.1:$amqp_port"
    echo "loopback_users = none"
  } >"$dir/rabbitmq.conf"
  if [ -n "$tls_port" ]; then
    (
      cd "$dir"
      openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=concord-test-ca" \
        -keyout ca.key -out ca.pem 2>/dev/null
      for who in server client; do
        openssl req -newkey rsa:2048 -nodes -subj "/CN=$who" -keyout "$who.key" -out "$who.csr" 2>/dev/null
        printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >"$who.ext"
        openssl x509 -req -in "$who.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
          -extfile "$who.ext" -out "$who.pem" 2>/dev/null
      done
      # PKCS#8 keys (what rustls reads).
      for who in server client; do
        openssl pkcs8 -topk8 -nocrypt -in "$who.key" -out "$who.key.pk8"
        mv "$who.key.pk8" "$who.key"
      done
    )
    cat >>"$dir/rabbitmq.conf" <<CONF
listeners.ssl.1 = 127.0.0.1:$tls_port
ssl_options.cacertfile = $dir/ca.pem
ssl_options.certfile = $dir/server.pem
ssl_options.keyfile = $dir/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = true
CONF
  fi
  echo "ERL_EPMD_ADDRESS=127.0.0.1" >"$dir/rabbitmq-env.conf"
  echo "[${RABBIT_NODE_PLUGINS:-}]." >"$dir/enabled_plugins"
  echo "[]." >"$dir/advanced.config"
  chown -R rabbitmq:rabbitmq "$dir"
  chmod 0755 "$dir"
  setsid su rabbitmq -s /bin/sh -c "exec env RABBITMQ_NODENAME=$node \
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT=$amqp_port RABBITMQ_DIST_PORT=$dist_port \
    RABBITMQ_CONF_ENV_FILE=$dir/rabbitmq-env.conf RABBITMQ_CONFIG_FILE=$dir/rabbitmq.conf \
    RABBITMQ_ADVANCED_CONFIG_FILE=$dir/advanced.config RABBITMQ_ENABLED_PLUGINS_FILE=$dir/enabled_plugins \
    RABBITMQ_MNESIA_BASE=$dir/mnesia RABBITMQ_LOG_BASE=$dir/log RABBITMQ_PID_FILE=$dir/node.pid \
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS='-kernel inet_dist_use_interface {127,0,0,1}' \
    /usr/lib/rabbitmq/bin/rabbitmq-server" >"$dir/out.log" 2>&1 </dev/null &
  # A lone await_startup fails until the node registers with epmd: retry for a minute.
  for _ in $(seq 1 120); do
    if rabbitmqctl -q -n "$node" await_startup --timeout 5 >/dev/null 2>&1; then
      exit 0
    fi
    sleep 0.5
  done
  echo "node $node did not start; see $dir/out.log and $dir/log" >&2
  exit 1
  ;;
stop)
  rabbitmqctl -q -n "$node" stop >/dev/null 2>&1 || true
  # The node is gone once its pid file's process is.
  if [ -f "$dir/node.pid" ]; then
    pid=$(cat "$dir/node.pid")
    for _ in $(seq 1 60); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.5
    done
    kill -9 "$pid" 2>/dev/null || true
  fi
  ;;
*)
  echo "usage: $0 start DIR NAME AMQP_PORT DIST_PORT [TLS_PORT] | stop DIR NAME" >&2
  exit 2
  ;;
esac
