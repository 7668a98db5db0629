#!/usr/bin/env bash
# Start or stop the project's local Redis and RabbitMQ for the demo and manual use (tests start
# their own). RabbitMQ runs as a private node (own node name, epmd port, cookie and data under
# .run/rabbitmq), never as the system service.
# Usage: services.sh up|down|status
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${SLUICEWAY_LOCAL_REDIS_PORT:-6390}
AMQP_PORT=${SLUICEWAY_LOCAL_RABBITMQ_PORT:-5690}
RUN=.run/redis
RABBIT_RUN=.run/rabbitmq
PY=${PY:-.venv/bin/python}
mkdir -p "$RUN"
url="redis://127.0.0.1:${PORT}/0"
amqp_url="amqp://guest:guest@127.0.0.1:${AMQP_PORT}/%2F"

running() { redis-cli -p "$PORT" ping >/dev/null 2>&1; }
rabbit_running() { [ -f "$RABBIT_RUN/state.json" ] && kill -0 "$(sed -E 's/.*"pid": ([0-9]+).*/\1/' "$RABBIT_RUN/state.json")" 2>/dev/null; }

case "${1:-up}" in
  up)
    if running; then
      echo "redis already up: $url"
    else
      redis-server --port "$PORT" --bind 127.0.0.1 --dir "$PWD/$RUN" --daemonize yes \
        --pidfile "$PWD/$RUN/redis.pid" --logfile "$PWD/$RUN/redis.log" \
        --appendonly yes --save "" --protected-mode yes
      for _ in $(seq 1 50); do running && break; sleep 0.1; done
      if ! running; then
        echo "redis failed to start on port $PORT; see $RUN/redis.log (is the port taken? set SLUICEWAY_LOCAL_REDIS_PORT)" >&2
        exit 1
      fi
      echo "redis up: $url"
    fi
    if rabbit_running; then
      echo "rabbitmq already up: $amqp_url"
    else
      rm -f "$RABBIT_RUN/state.json"
      "$PY" -m tests.support.rabbitmq_server up "$RABBIT_RUN" "$AMQP_PORT" || {
        echo "rabbitmq failed to start on port $AMQP_PORT; see $RABBIT_RUN/log (is the port taken? set SLUICEWAY_LOCAL_RABBITMQ_PORT)" >&2
        exit 1
      }
    fi
    ;;
  down)
    if running; then
      redis-cli -p "$PORT" shutdown nosave >/dev/null 2>&1 || true
      echo "redis on port $PORT stopped"
    fi
    if [ -f "$RABBIT_RUN/state.json" ]; then
      "$PY" -m tests.support.rabbitmq_server down "$RABBIT_RUN"
    fi
    ;;
  status)
    running && echo "redis up: $url" || echo "redis down"
    rabbit_running && echo "rabbitmq up: $amqp_url" || echo "rabbitmq down"
    ;;
  *)
    echo "usage: $0 up|down|status" >&2
    exit 2
    ;;
esac
