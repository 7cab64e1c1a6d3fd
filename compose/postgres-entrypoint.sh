#!/bin/bash
# First start: generate the trackgate database password (kept in the db-secret volume, never in
# the repo), create the cluster, the role and the database. Every start: write the pgpass file
# the tracking server reads (PGPASSFILE), then run PostgreSQL as the postgres user.
set -Eeuo pipefail

readonly BIN=/usr/lib/postgresql/15/bin
readonly PGDATA=/var/lib/postgresql/data
readonly SECRETS=/run/trackgate-db
readonly DB=trackgate ROLE=trackgate
readonly APP_UID="${TRACKGATE_APP_UID:-10001}"  # the user the app image runs as

as_postgres() { setpriv --reuid=postgres --regid=postgres --init-groups "$@"; }

umask 077
if [[ ! -s "$SECRETS/password" ]]; then
  # base64 without /+= : safe inside SQL quotes, pgpass fields and URLs
  head -c 48 /dev/urandom | base64 -w0 | tr -d '/+=' | head -c 32 >"$SECRETS/password.tmp"
  mv "$SECRETS/password.tmp" "$SECRETS/password"
fi
password="$(<"$SECRETS/password")"
printf '*:*:%s:%s:%s\n' "$DB" "$ROLE" "$password" >"$SECRETS/pgpass.tmp"
chown "$APP_UID:$APP_UID" "$SECRETS/pgpass.tmp"
mv "$SECRETS/pgpass.tmp" "$SECRETS/pgpass"

chown postgres:postgres "$PGDATA"
chmod 0700 "$PGDATA"
if [[ ! -s "$PGDATA/PG_VERSION" ]]; then
  as_postgres "$BIN/initdb" -D "$PGDATA" --username=postgres --encoding=UTF8 --locale=C.UTF-8 \
    --auth-local=peer --auth-host=scram-sha-256 >/dev/null
  # The app connects over the compose network, with its password only, to its database only.
  printf 'host %s %s all scram-sha-256\n' "$DB" "$ROLE" >>"$PGDATA/pg_hba.conf"
  # Single-user mode: one statement per line (CREATE DATABASE refuses a transaction block).
  # It exits 0 even when a statement fails, so look at what it said.
  out="$(as_postgres "$BIN/postgres" --single -D "$PGDATA" postgres 2>&1 <<SQL
CREATE ROLE $ROLE LOGIN PASSWORD '$password';
CREATE DATABASE $DB OWNER $ROLE;
SQL
)"
  if grep -q 'ERROR' <<<"$out"; then
    grep 'ERROR' <<<"$out" >&2  # only the errors: a STATEMENT line would show the password
    find "$PGDATA" -mindepth 1 -delete  # start over on the next attempt
    exit 1
  fi
  echo "trackgate-postgres: created database $DB (password in the db-secret volume)"
fi
exec setpriv --reuid=postgres --regid=postgres --init-groups \
  "$BIN/postgres" -D "$PGDATA" -c listen_addresses='*'
