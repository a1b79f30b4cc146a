#!/bin/sh
# Container entrypoint: run the gateway as this process (exec), so that SIGTERM from `docker stop` or
# the kubelet reaches it directly; it then drains requests and stops every engine before it exits.
# No logic here beyond defaults: everything else is the config file and GATEWAY_* variables.
#   docker run IMAGE                     -> gateway serve --config /etc/gateway/config.yaml
#   docker run IMAGE --port 9000         -> extra arguments go to `gateway serve`
#   docker run --entrypoint gateway IMAGE check --config /etc/gateway/config.yaml
set -eu
exec gateway serve --config "${GATEWAY_CONFIG:-/etc/gateway/config.yaml}" "$@"
