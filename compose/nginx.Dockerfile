# nginx for the compose stack: Debian's nginx-light, run as the non-root trackgate user.
# Its whole configuration is rendered by the init service (`trackgate prepare`) from the
# templates in nginx/, and mounted read-only; nothing here is configuration.
ARG BASE=debian:bookworm-slim
FROM ${BASE}
# No init in the image: keep the package's postinst from starting nginx during the build
# (the build runs on the host's network).
RUN printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 0755 /usr/sbin/policy-rc.d \
 && apt-get update \
 && apt-get install -y --no-install-recommends nginx-light \
 && apt-get clean && rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled/default \
 && rm /usr/sbin/policy-rc.d
ARG UID=10001
RUN groupadd --gid "${UID}" trackgate \
 && useradd --uid "${UID}" --gid trackgate --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin trackgate \
 && install -d -o trackgate -g trackgate -m 0700 /run/trackgate-nginx /run/trackgate-nginx/nginx-temp
USER trackgate
STOPSIGNAL SIGQUIT
# -e stderr: the compiled-in error log (/var/log/nginx) is not writable by this user.
CMD ["nginx", "-p", "/run/trackgate-nginx", "-e", "stderr", \
     "-c", "/var/lib/trackgate/run/nginx.conf", "-g", "daemon off;"]
