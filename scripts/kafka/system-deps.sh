#!/usr/bin/env bash
# The Debian packages the Kafka test broker needs (tests/support/kafka_server.py assembles it from
# Maven Central jars): a JRE (Kafka 4.x runs on Java 17+) and Maven. Idempotent. Run by
# `make system-deps` after scripts/system-deps.sh.
set -euo pipefail

need=()
command -v java >/dev/null 2>&1 || need+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || need+=(maven)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null 2>&1; then
  echo "system-deps: need root (or sudo) to install: ${need[*]}" >&2
  exit 1
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "system-deps: installing ${need[*]} from Debian's packages (for the Kafka test broker)"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
