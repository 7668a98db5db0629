#!/usr/bin/env bash
# Install the Debian packages that tests and the demo run for real: Redis, RabbitMQ, and a JRE plus
# Maven for the Kafka test broker (tests/support/kafka_server.py assembles it from Maven Central
# jars). Idempotent: does nothing when everything is present.
#
# One list of "what to check | which package provides it": every check runs before the single
# early exit below, so adding a package is one line and never skipped by that exit.
set -euo pipefail

# have_cmd NAME, or have_file PATH: true when the package is already installed.
have_cmd() { command -v "$1" >/dev/null 2>&1; }
have_file() { [ -x "$1" ]; }

PACKAGES=(
  "have_cmd redis-server|redis-server"
  # RabbitMQ (Debian 3.10.x with its Erlang); the test fixtures run the server binary directly.
  "have_file /usr/lib/rabbitmq/bin/rabbitmq-server|rabbitmq-server"
  "have_cmd openssl|openssl"
  "have_file /usr/bin/time|time"
  # The GitOps tests serve a git repository to Argo CD over file://.
  "have_cmd git|git"
  # The Kafka test broker: Kafka 4.x runs on Java 17+; Maven resolves its jars on first use.
  "have_cmd java|openjdk-17-jre-headless"
  "have_cmd mvn|maven"
)

need=()
for entry in "${PACKAGES[@]}"; do
  check="${entry%%|*}"
  # shellcheck disable=SC2086 # the check is a function name and its one argument
  $check || need+=("${entry##*|}")
done

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null 2>&1; then
  echo "system-deps: need root (or sudo) to install: ${need[*]}" >&2
  exit 1
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "system-deps: installing ${need[*]} from Debian's packages"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# Debian starts system services on install; the project runs its own on private ports and node names,
# so stop them (and keep them from coming back at boot).
for svc in redis-server rabbitmq-server; do
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
    $SUDO systemctl stop "$svc" || true
    $SUDO systemctl disable "$svc" >/dev/null 2>&1 || true
  fi
done
# Without systemd the package's postinst may still have started a node through the init script,
# and it leaves a system epmd on the default port 4369 behind. The project's nodes use their own
# epmd on a private port, so stop both (epmd -kill refuses while a node is registered with it).
if [ -x /etc/init.d/rabbitmq-server ]; then
  $SUDO /etc/init.d/rabbitmq-server stop >/dev/null 2>&1 || true
fi
if command -v epmd >/dev/null 2>&1 && epmd -names 2>/dev/null | grep -q '^epmd: up' \
  && ! epmd -names 2>/dev/null | grep -q '^name '; then
  epmd -kill >/dev/null 2>&1 || true
fi
