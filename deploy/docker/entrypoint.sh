#!/bin/sh
# One entrypoint for every gd2po role, so images, compose and Helm start services the same way.
# Every service listens on $GD2PO_PORT (default 8000) on all interfaces inside its container and reads
# the experiment YAML at $GD2PO_CONFIG; secrets come only from the environment (GD2PO_AUTH__TOKEN,
# GD2PO_REDIS__PASSWORD).
set -eu

port="${GD2PO_PORT:-8000}"
config="${GD2PO_CONFIG:-/etc/gd2po/config.yaml}"
role="${1:-help}"
[ "$#" -gt 0 ] && shift

case "$role" in
  trainer)
    # The trainer serves only /healthz, /readyz and /metrics; its bind address comes from the config.
    export GD2PO_TRAINER__HOST=0.0.0.0 GD2PO_TRAINER__METRICS_PORT="$port"
    exec python -m trainer --config "$config" "$@"
    ;;
  rollout)
    exec python -m rollout_service --config "$config" --host 0.0.0.0 --port "$port" "$@"
    ;;
  reward)
    # `reward <name>` serves that entry of the config's `rewards`; `reward --scorer X ...` a bare scorer.
    case "${1:-}" in
      "" | -*) exec python -m reward_service --host 0.0.0.0 --port "$port" "$@" ;;
      *) name="$1"; shift
         exec python -m reward_service --config "$config" --reward "$name" --host 0.0.0.0 --port "$port" "$@" ;;
    esac
    ;;
  healthcheck)
    exec python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=4)" \
      "http://127.0.0.1:${port}/healthz"
    ;;
  help | -h | --help)
    echo "usage: (trainer [--resume] | rollout | reward NAME | reward --scorer S | healthcheck | CMD...)"
    ;;
  *)
    exec "$role" "$@"
    ;;
esac
