# PostgreSQL 15 from Debian for the compose stack's PostgreSQL variant (compose.postgres.yaml).
# The entrypoint starts as root only to set up the data and secret volumes, then runs the
# server as the postgres user.
ARG BASE=debian:bookworm-slim
FROM ${BASE}
RUN printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 0755 /usr/sbin/policy-rc.d \
 && apt-get update \
 && apt-get install -y --no-install-recommends postgresql-15 \
 && apt-get clean && rm -rf /var/lib/apt/lists/* /usr/sbin/policy-rc.d \
 # the package's default cluster: ours lives in the data volume instead
 && rm -rf /var/lib/postgresql/15 /etc/postgresql/15 \
 && install -d -o postgres -g postgres -m 0700 /var/lib/postgresql/data
COPY --chmod=0755 postgres-entrypoint.sh /usr/local/bin/trackgate-postgres
STOPSIGNAL SIGINT
CMD ["trackgate-postgres"]
