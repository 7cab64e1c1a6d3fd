#!/bin/bash
# First start: generate the S3 keys (kept in the s3-secret volume, never in the repo): the store's
# identity file, and the credentials file the tracking servers read (TRACKGATE_S3_CREDENTIALS_FILE).
# Every start: run `weed mini` (master, volume, filer and S3 gateway in one process) as the weed
# user, every port given (gRPC and admin would otherwise pick their own), the bucket created.
set -Eeuo pipefail

readonly SECRETS=/run/trackgate-s3 DATA=/data
readonly APP_UID="${TRACKGATE_APP_UID:-10001}"  # the user the app image runs as
readonly BUCKET="${TRACKGATE_S3_BUCKET:-mlflow}"

umask 077
random() { head -c 64 /dev/urandom | base64 -w0 | tr -d '/+=' | head -c "$1"; }
if [[ ! -s "$SECRETS/credentials" ]]; then
  key="$(random 20)" secret="$(random 40)"
  printf '{"identities":[{"name":"mlflow","credentials":[{"accessKey":"%s","secretKey":"%s"}],"actions":["Admin","Read","List","Tagging","Write"]}]}\n' \
    "$key" "$secret" >"$SECRETS/s3.json.tmp"
  mv "$SECRETS/s3.json.tmp" "$SECRETS/s3.json"
  printf 'AWS_ACCESS_KEY_ID=%s\nAWS_SECRET_ACCESS_KEY=%s\n' "$key" "$secret" >"$SECRETS/credentials.tmp"
  chown "$APP_UID:$APP_UID" "$SECRETS/credentials.tmp"
  mv "$SECRETS/credentials.tmp" "$SECRETS/credentials"
fi
chown weed:weed "$SECRETS/s3.json" "$DATA"
install -d -o weed -g weed -m 0700 "$DATA/store" "$DATA/tmp"

exec setpriv --reuid=weed --regid=weed --init-groups env TMPDIR="$DATA/tmp" weed mini \
  -dir="$DATA/store" -ip=127.0.0.1 -ip.bind=0.0.0.0 \
  -master.port=9333 -master.port.grpc=19333 -volume.port=8080 -volume.port.grpc=18080 \
  -filer.port=8888 -filer.port.grpc=18888 -s3.port=8333 -s3.port.grpc=18333 \
  -admin.port=23646 -admin.port.grpc=33646 -s3.port.iceberg=0 -s3.port.lance=0 \
  -s3.config="$SECRETS/s3.json" -bucket="$BUCKET" \
  -webdav=false -admin.ui=false -master.telemetry=false
