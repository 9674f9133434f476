#!/usr/bin/env bash
# Installs what the devstack needs, idempotently. Safe to run many times and concurrently.
#
#   devstack/setup.sh                apt packages, Unix users, npm packages of devstack/oidc, the ALISE venv
#   devstack/setup.sh --slurm 26.05  the same, plus that generation's chroot (24.11: Debian 13, 26.05:
#                                    Debian testing; ~30-60 s once each); repeatable
#   devstack/setup.sh --all          every chroot generation
#   devstack/setup.sh --trixie       the same as --slurm 24.11
#   extra components, each behind its own flag (their system services are stopped and disabled):
#     --redis      redis-server, redis-tools (Redis 7.0)        --postgres  postgresql-15
#     --nginx      nginx-light                                  --promtool  prometheus (for /usr/bin/promtool)
#     --otel       the OpenTelemetry Collector, built with Go into /var/cache/slurmproxy-devstack/otelcol
#                  (~3-5 min once on 2 cores, then cached)
#     --extras     all five
#
# Needs root, python3, node and npm. Fast (about a second) when everything is present.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LOCKDIR=/run/lock
CHROOTS=()
WANT_OTEL=0
EXTRA_PACKAGES=()
while [ $# -gt 0 ]; do
    case "$1" in
        --trixie) CHROOTS+=(24.11) ;;
        --all) CHROOTS+=(all) ;;
        --slurm)
            [ $# -ge 2 ] || { echo "setup.sh: --slurm needs a generation" >&2; exit 2; }
            case "$2" in 22.05) ;; *) CHROOTS+=("$2") ;; esac  # 22.05 is the host's own
            shift ;;
        --slurm=*) case "${1#--slurm=}" in 22.05) ;; *) CHROOTS+=("${1#--slurm=}") ;; esac ;;
        --redis) EXTRA_PACKAGES+=(redis-server redis-tools) ;;
        --postgres) EXTRA_PACKAGES+=(postgresql-15) ;;
        --nginx) EXTRA_PACKAGES+=(nginx-light) ;;
        --promtool) EXTRA_PACKAGES+=(prometheus) ;;
        --otel) WANT_OTEL=1 ;;
        --extras) EXTRA_PACKAGES+=(redis-server redis-tools postgresql-15 nginx-light prometheus); WANT_OTEL=1 ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "setup.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

if [ "$(id -u)" -ne 0 ]; then
    echo "setup.sh: must run as root" >&2
    exit 1
fi

mkdir -p "$LOCKDIR"

log() { echo "devstack setup: $*" >&2; }

# ---------------------------------------------------------------- apt packages
# slurmdbd and mariadb-server: accounting (SlurmCluster(accounting=True)); the harness starts its own
# MariaDB per cluster and never uses the system instance the package may start. curl: the admin's
# guide (docs/guide.md) is run as written by tests/integration/test_guide.py.
APT_PACKAGES=(slurmctld slurmd slurmrestd slurm-client munge slurm-wlm-jwt-plugin slurmdbd mariadb-server
    debootstrap util-linux curl)
missing_packages() {
    local p status list=("$@")
    [ $# -gt 0 ] || list=("${APT_PACKAGES[@]}")
    for p in "${list[@]}"; do
        status="$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)"
        [ "$status" = "installed" ] || echo "$p"
    done
}
MISSING="$(missing_packages)"
if [ -n "$MISSING" ]; then
    # shellcheck disable=SC2086
    log "installing apt packages: $(echo $MISSING)"
    APT=(apt-get -o DPkg::Lock::Timeout=600 -o Acquire::Retries=3)
    export DEBIAN_FRONTEND=noninteractive
    # apt-get update takes the lists lock; serialise it between concurrent setups too.
    flock -w 900 "$LOCKDIR/slurmproxy-devstack-apt.lock" "${APT[@]}" update -qq
    # shellcheck disable=SC2046
    flock -w 900 "$LOCKDIR/slurmproxy-devstack-apt.lock" \
        "${APT[@]}" install -y -qq $(missing_packages) >/dev/null
fi
# The packages try to start the daemons through systemd, which may or may not exist here;
# the devstack never uses those instances. munge's key is created by the package's postinst.
if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    (umask 077; dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none)
    chown munge:munge /etc/munge/munge.key 2>/dev/null || true
fi

# ---------------------------------------------------------------- Unix users
# Table: name:uid:kind, from devstack/users.py (stdlib only, runs without the venv).
ensure_users() {
    local name uid kind shell
    while IFS=: read -r name uid kind; do
        [ -n "$name" ] || continue
        if current="$(id -u "$name" 2>/dev/null)"; then
            if [ "$current" != "$uid" ]; then
                echo "setup.sh: user $name exists with uid $current, expected $uid" >&2
                return 1
            fi
            continue
        fi
        if getent passwd "$uid" >/dev/null; then
            echo "setup.sh: uid $uid (for $name) is taken by $(getent passwd "$uid" | cut -d: -f1)" >&2
            return 1
        fi
        if ! getent group "$name" >/dev/null; then
            groupadd -g "$uid" "$name"
        fi
        shell=/bin/bash
        [ "$kind" = daemon ] && shell=/usr/sbin/nologin
        useradd -m -u "$uid" -g "$name" -s "$shell" -c "slurmproxy devstack $kind" -K UID_MIN=100 -K SYS_UID_MIN=100 "$name"
    done
}
TABLE="$(python3 "$HERE/users.py")"
if ! python3 - "$TABLE" <<'PY'
import pwd, sys
for line in sys.argv[1].splitlines():
    name, uid, _ = line.split(":")
    try:
        if pwd.getpwnam(name).pw_uid != int(uid):
            sys.exit(1)
    except KeyError:
        sys.exit(1)
PY
then
    log "creating Unix users"
    exec 8>"$LOCKDIR/slurmproxy-devstack-users.lock"
    flock -w 300 8
    ensure_users <<<"$TABLE"
    exec 8>&-
fi

# ---------------------------------------------------------------- npm packages (devstack/oidc)
OIDC="$HERE/oidc"
lock_sum="$(sha256sum "$OIDC/package-lock.json" | cut -d' ' -f1)"
stamp="$OIDC/node_modules/.devstack-lock-sha256"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$lock_sum" ]; then
    exec 9>"$LOCKDIR/slurmproxy-devstack-npm-$(echo "$OIDC" | sha256sum | cut -c1-12).lock"
    flock -w 600 9
    if [ "$(cat "$stamp" 2>/dev/null || true)" != "$lock_sum" ]; then
        log "npm ci in $OIDC"
        (cd "$OIDC" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
        echo "$lock_sum" >"$stamp"
    fi
    exec 9>&-
fi

# ---------------------------------------------------------------- ALISE (account linking) virtualenv
# alise 1.1.5 from PyPI needs Python >= 3.12; devstack/alise.py finds one and builds the venv once.
PYTHONPATH="$(dirname "$HERE")${PYTHONPATH:+:$PYTHONPATH}" python3 -m devstack.alise build >/dev/null

# ---------------------------------------------------------------- extra components (optional flags)
# Redis, PostgreSQL, nginx and promtool for devstack/redis_server.py, postgres.py, nginx.py and
# the rule checks. Installed without recommends (prometheus would pull prometheus-node-exporter).
# Their packages start system instances where services can start (redis on 6379, nginx on :80,
# prometheus on :9090, a postgresql cluster on 5432): the devstack never uses them, so they are
# stopped and disabled right after the install.
if [ ${#EXTRA_PACKAGES[@]} -gt 0 ]; then
    EXTRA_MISSING="$(missing_packages "${EXTRA_PACKAGES[@]}")"
    if [ -n "$EXTRA_MISSING" ]; then
        # shellcheck disable=SC2086
        log "installing apt packages: $(echo $EXTRA_MISSING)"
        APT=(apt-get -o DPkg::Lock::Timeout=600 -o Acquire::Retries=3)
        export DEBIAN_FRONTEND=noninteractive
        flock -w 900 "$LOCKDIR/slurmproxy-devstack-apt.lock" "${APT[@]}" update -qq
        # shellcheck disable=SC2046
        flock -w 900 "$LOCKDIR/slurmproxy-devstack-apt.lock" \
            "${APT[@]}" install -y -qq --no-install-recommends $(missing_packages "${EXTRA_PACKAGES[@]}") >/dev/null
        for svc in redis-server nginx prometheus postgresql; do
            case " $EXTRA_MISSING " in
                *" $svc "*|*" $svc-"*) ;;
                *) continue ;;
            esac
            if [ -d /run/systemd/system ]; then
                systemctl disable --now "$svc" >/dev/null 2>&1 || true
            else
                service "$svc" stop >/dev/null 2>&1 || true
                update-rc.d "$svc" disable >/dev/null 2>&1 || true
            fi
        done
    fi
fi
if [ "$WANT_OTEL" = 1 ]; then
    PYTHONPATH="$(dirname "$HERE")${PYTHONPATH:+:$PYTHONPATH}" python3 -m devstack.otel build >/dev/null
fi

# ---------------------------------------------------------------- Slurm chroots (optional)
if [ ${#CHROOTS[@]} -gt 0 ]; then
    PYTHONPATH="$(dirname "$HERE")${PYTHONPATH:+:$PYTHONPATH}" python3 -m devstack.chroot build "${CHROOTS[@]}"
fi
