#!/usr/bin/env bash
# Start or stop the project's local Redis for the demo and manual use (tests start their own).
# Usage: services.sh up|down|status
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${SLUICEWAY_LOCAL_REDIS_PORT:-6390}
RUN=.run/redis
mkdir -p "$RUN"
url="redis://127.0.0.1:${PORT}/0"

running() { redis-cli -p "$PORT" ping >/dev/null 2>&1; }

case "${1:-up}" in
  up)
    if running; then
      echo "redis already up: $url"
      exit 0
    fi
    redis-server --port "$PORT" --bind 127.0.0.1 --dir "$PWD/$RUN" --daemonize yes \
      --pidfile "$PWD/$RUN/redis.pid" --logfile "$PWD/$RUN/redis.log" \
      --appendonly yes --save "" --protected-mode yes
    for _ in $(seq 1 50); do running && break; sleep 0.1; done
    if ! running; then
      echo "redis failed to start on port $PORT; see $RUN/redis.log (is the port taken? set SLUICEWAY_LOCAL_REDIS_PORT)" >&2
      exit 1
    fi
    echo "redis up: $url"
    ;;
  down)
    if running; then
      redis-cli -p "$PORT" shutdown nosave >/dev/null 2>&1 || true
      echo "redis on port $PORT stopped"
    fi
    ;;
  status)
    running && echo "redis up: $url" || echo "redis down"
    ;;
  *)
    echo "usage: $0 up|down|status" >&2
    exit 2
    ;;
esac
