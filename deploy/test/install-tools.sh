#!/usr/bin/env bash
# What `make test-deploy` needs from the system, installed with apt-get when missing:
#   docker.io   Debian's Docker engine and CLI (20.10 on bookworm, with containerd and runc); dockerd runs
#               without systemd, and the test starts and stops its own by PID
#   mmdebstrap  builds the Debian base image offline when no registry can be reached
#   iproute2    `ip`, with which the test checks and restores the docker0 bridge
set -euo pipefail

missing=()
{ [ -x /usr/sbin/dockerd ] && [ -x /usr/bin/docker ]; } || missing+=(docker.io)
command -v mmdebstrap > /dev/null || missing+=(mmdebstrap)
command -v ip > /dev/null || missing+=(iproute2)  # the engine test checks and restores the docker0 bridge with it
if [ "${#missing[@]}" -eq 0 ]; then
  echo "install-tools: $(/usr/sbin/dockerd --version); mmdebstrap $(mmdebstrap --version | cut -d' ' -f2)"
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get > /dev/null; then
  echo "install-tools: ${missing[*]} missing; installing needs root and apt-get (Debian/Ubuntu)" >&2
  exit 1
fi
# The package would start a dockerd of its own (default data root) where an init system runs: forbid
# service starts for the install, unless the machine already has such a policy.
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod 0755 /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
echo "install-tools: apt-get install ${missing[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" > /dev/null
/usr/sbin/dockerd --version
