# Stand-in for redis:7.4-alpine, built by deploy/test/build-images.sh only when no registry can be
# reached: Debian bookworm's redis-server 7.0 (Streams, AOF and requirepass as docker-compose.yml uses
# them) with `sh`, `redis-server` and `redis-cli` (compose's command and healthcheck) and /data.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
# The user first, with the official image's uid/gid 999 (the package's postinst keeps an existing one).
# policy-rc.d: the package's postinst would start a server inside the build step otherwise.
# hadolint ignore=DL3008
RUN groupadd --system --gid 999 redis \
    && useradd --system --uid 999 --gid redis --home-dir /var/lib/redis --shell /usr/sbin/nologin redis \
    && printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d \
    && chmod 0755 /usr/sbin/policy-rc.d \
    && apt-get update \
    && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* /usr/sbin/policy-rc.d \
    && mkdir -p /data \
    && chown redis:redis /data
LABEL org.gd2po.stand-in="redis:7.4-alpine, from Debian bookworm's redis-server"
WORKDIR /data
USER 999:999
EXPOSE 6379
CMD ["redis-server"]
