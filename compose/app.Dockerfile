# The trackgate app image: `trackgate serve tracking|gateway`, `trackgate prepare` and the users CLI.
# Built from the repo root (context ..): the same app/ package and nginx/ templates as every
# other way of running trackgate. Builds need network (pip): compose builds with network: host.
ARG BASE=debian:bookworm-slim

FROM ${BASE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && apt-get clean && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/trackgate
WORKDIR /src
# Dependencies first, from pyproject.toml alone (with a stub package and README), so that changing
# the code or docs rebuilds only the last layers; the pip cache survives rebuilds (BuildKit cache mount).
COPY pyproject.toml ./
# build_ca (optional build secret): the CA bundle of the build host, for networks whose HTTPS
# proxy re-signs PyPI's certificates. The pip step uses it when it is given.
RUN --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    --mount=type=secret,id=build_ca \
    if [ -s /run/secrets/build_ca ]; then export PIP_CERT=/run/secrets/build_ca; fi \
 && mkdir -p app/trackgate nginx monitoring \
 && touch README.md app/trackgate/__init__.py nginx/.stub monitoring/.stub \
 && /opt/trackgate/bin/pip install --disable-pip-version-check '.[postgres,s3]' \
 && rm -rf README.md app nginx monitoring \
 # The server never plots or trains: drop mlflow's client-side ML/plotting stack (~290 MB).
 && /opt/trackgate/bin/pip uninstall -y --disable-pip-version-check scikit-learn scipy \
      matplotlib fonttools kiwisolver contourpy cycler pillow joblib threadpoolctl
COPY README.md ./
COPY app ./app
COPY nginx ./nginx
COPY monitoring ./monitoring
RUN --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    --mount=type=secret,id=build_ca \
    if [ -s /run/secrets/build_ca ]; then export PIP_CERT=/run/secrets/build_ca; fi \
 && /opt/trackgate/bin/pip install --disable-pip-version-check --no-deps --force-reinstall . \
 && /opt/trackgate/bin/trackgate --version

FROM ${BASE}
# pg_dump/pg_restore: `trackgate backup` and `restore` of a PostgreSQL store (compose.postgres).
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 postgresql-client-15 \
 && apt-get clean && rm -rf /var/lib/apt/lists/*
# A fixed uid/gid, shared with the nginx image: nginx reads the key the init service wrote.
ARG UID=10001
RUN groupadd --gid "${UID}" trackgate \
 && useradd --uid "${UID}" --gid trackgate --home-dir /var/lib/trackgate --no-create-home \
      --shell /usr/sbin/nologin trackgate \
 && install -d -o trackgate -g trackgate -m 0700 /var/lib/trackgate \
 && install -d -o trackgate -g trackgate -m 0750 \
      /var/lib/trackgate/artifacts /var/lib/trackgate/tls /var/lib/trackgate/users \
      /var/lib/trackgate/run \
 # The CA key's own volume (see compose.yaml) takes this directory's owner and mode.
 && install -d -o trackgate -g trackgate -m 0700 /var/lib/trackgate/tls/ca-key \
 # The Prometheus config the profile "monitoring" renders (its volume takes this owner).
 && install -d -o trackgate -g trackgate -m 0755 /etc/trackgate-prometheus
COPY --from=build /opt/trackgate /opt/trackgate
ENV PATH=/opt/trackgate/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TRACKGATE_DATA_DIR=/var/lib/trackgate \
    TRACKGATE_LOG_DIR=-
USER trackgate
WORKDIR /var/lib/trackgate
CMD ["trackgate", "--help"]
