# Stand-in for prom/prometheus:v2.55.1, built by deploy/test/build-images.sh only when no registry can
# be reached: Debian bookworm's prometheus 2.42 (it loads the shipped rules: `promtool check rules` of the
# same version runs in `make test`), with the official image's entrypoint, user and storage folder, so
# docker-compose.yml's `command:` flags apply unchanged.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
# policy-rc.d: the package's postinst would start a server inside the build step otherwise.
# hadolint ignore=DL3008
RUN printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d \
    && chmod 0755 /usr/sbin/policy-rc.d \
    && apt-get update \
    && apt-get install -y --no-install-recommends prometheus \
    && rm -rf /var/lib/apt/lists/* /usr/sbin/policy-rc.d \
    && mkdir -p /prometheus /etc/prometheus \
    && chown nobody:nogroup /prometheus
LABEL org.gd2po.stand-in="prom/prometheus:v2.55.1, from Debian bookworm's prometheus"
WORKDIR /prometheus
USER 65534:65534
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
