# Monitoring for the compose stack (profile "monitoring"): Debian's prometheus and
# prometheus-nginx-exporter. The config is rendered by the app image's `trackgate monitoring
# render` (the one template Ansible renders too) into a volume this image reads.
ARG BASE=debian:bookworm-slim
FROM ${BASE}
RUN printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 0755 /usr/sbin/policy-rc.d \
 && apt-get update \
 && apt-get install -y --no-install-recommends prometheus prometheus-nginx-exporter \
 && apt-get clean && rm -rf /var/lib/apt/lists/* \
 && rm /usr/sbin/policy-rc.d \
 && install -d -o prometheus -g prometheus -m 0750 /prometheus
USER prometheus
