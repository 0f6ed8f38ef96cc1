#!/usr/bin/env bash
# The Docker engine that `leti execute` and the sandbox tests need, plus debootstrap (to make
# a base image without a container registry) and bubblewrap (the local backend).
# Idempotent: a reachable engine is left alone. As root with apt-get, what is missing is
# installed and dockerd is started in the background; otherwise this says how, and fails.
set -euo pipefail

engine_up() { docker info >/dev/null 2>&1; }

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    if engine_up; then
        exit 0
    fi
    cat >&2 <<'HELP'
docker-engine.sh: no Docker engine answers (`docker info` failed).
  Install one (Debian/Ubuntu: sudo apt-get install docker.io debootstrap bubblewrap),
  start it (sudo systemctl start docker, or: sudo dockerd &),
  and let your user reach its socket (sudo usermod -aG docker "$USER", then log in again).
  Or run this script as root on Debian/Ubuntu, which does all of that.
HELP
    exit 1
fi

missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v docker >/dev/null 2>&1 || missing+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
command -v bwrap >/dev/null 2>&1 || missing+=(bubblewrap)
# The local backend runs programs with the system's Python, which every sandbox user can read.
[ -x /usr/bin/python3 ] || missing+=(python3)
if [ ${#missing[@]} -gt 0 ]; then
    echo "docker-engine.sh: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if engine_up; then
    exit 0
fi
dockerd_running() {
    local pid
    pid=$(cat /var/run/docker.pid 2>/dev/null) || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = dockerd ]
}
start_engine() {
    if [ -d /run/systemd/system ]; then
        systemctl start docker
    elif ! dockerd_running; then
        # No init system to manage it (a container, a CI machine): run it detached. One still
        # starting, or still shutting down, is waited for.
        setsid nohup dockerd >>/var/log/dockerd.log 2>&1 </dev/null &
    fi
}
for _ in $(seq 90); do
    if engine_up; then
        echo "docker-engine.sh: the Docker engine is up" >&2
        exit 0
    fi
    start_engine
    sleep 1
done
echo "docker-engine.sh: dockerd did not answer within 90 s; the end of /var/log/dockerd.log:" >&2
tail -n 20 /var/log/dockerd.log >&2 || true
exit 1
