# A "fresh Debian 12 server" for the Ansible tier: systemd as PID 1 and what Ansible's modules
# need (python3, python3-apt, sudo). Built by tests/infra/systemd-image.sh on the local base image;
# run as tests/infra/systemd_host.py does (--cap-add SYS_ADMIN, tmpfs /run, cgroup ro).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
# dbus for systemctl/hostnamectl, iproute2/procps for facts, ss and ps.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      systemd systemd-sysv python3 dbus python3-apt sudo ca-certificates iproute2 procps \
 && apt-get clean && rm -rf /var/lib/apt/lists/* \
 # `docker run -t` would put a login prompt on the console.
 && ln -sfn /dev/null /etc/systemd/system/console-getty.service \
 && ln -sfn /dev/null /etc/systemd/system/getty@tty1.service \
 # Empty machine-id: each container gets its own at boot, without "first boot" units.
 && : > /etc/machine-id && rm -f /var/lib/dbus/machine-id
ENV container=docker
# systemd shuts down cleanly on SIGRTMIN+3.
STOPSIGNAL SIGRTMIN+3
CMD ["/sbin/init"]
