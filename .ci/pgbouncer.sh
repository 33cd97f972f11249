#!/usr/bin/env bash
# CI: a PgBouncer in transaction-pooling mode in front of the test Postgres, so every Postgres
# suite also runs through a pooler (the deployments users have: PgBouncer, RDS Proxy, Supavisor).
#
# Sourced by .ci/run (it exports NORMANDY_TEST_PGBOUNCER_URL) or run on its own:
#   .ci/pgbouncer.sh            install if missing, configure, start, wait until it answers
#   .ci/pgbouncer.sh stop       stop the PgBouncer this script started
#
# Settings (environment):
#   NORMANDY_PGBOUNCER_PORT  listen port on 127.0.0.1 (default 6432)
#   NORMANDY_PGBOUNCER_DIR   config, pid and log directory (default /tmp/normandy-pgbouncer-PORT)
#   NORMANDY_PGBOUNCER_USER  the non-root user PgBouncer runs as (default postgres; it refuses root)
#   PG_HOST / PG_PORT        the Postgres behind it (default 127.0.0.1:5432, trust auth)
#
# The config is what users of hosted poolers run: pool_mode = transaction (a server connection
# belongs to a client only for one transaction) and ignore_startup_parameters listing
# extra_float_digits and options, which drivers send and the pooler would otherwise refuse — so
# an `options=-c search_path=...` is silently dropped, and nothing may rely on it.

pgbouncer_main() {
    local port="${NORMANDY_PGBOUNCER_PORT:-6432}"
    local dir="${NORMANDY_PGBOUNCER_DIR:-/tmp/normandy-pgbouncer-$port}"
    local user="${NORMANDY_PGBOUNCER_USER:-postgres}"
    local pg_host="${PG_HOST:-127.0.0.1}" pg_port="${PG_PORT:-5432}"
    local url="postgres://postgres@127.0.0.1:$port/test"

    if [ "${1:-}" = "stop" ]; then
        if [ -f "$dir/pgbouncer.pid" ]; then
            kill "$(cat "$dir/pgbouncer.pid")" 2>/dev/null || true
            echo "pgbouncer on 127.0.0.1:$port stopped"
        fi
        return 0
    fi

    if pgbouncer_answers "$port"; then
        echo "pgbouncer already answers on 127.0.0.1:$port"
    else
        if ! command -v pgbouncer >/dev/null 2>&1 && [ ! -x /usr/sbin/pgbouncer ]; then
            echo "installing pgbouncer (Debian package)"
            # The package's own service is not started here: policy-rc.d or no init system.
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q pgbouncer >/dev/null ||
                { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q pgbouncer >/dev/null; } ||
                { echo "could not install pgbouncer"; return 1; }
        fi
        local bin
        bin="$(command -v pgbouncer 2>/dev/null || echo /usr/sbin/pgbouncer)"
        mkdir -p "$dir"
        cat >"$dir/pgbouncer.ini" <<EOF
[databases]
* = host=$pg_host port=$pg_port

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = trust
auth_file = $dir/userlist.txt
pool_mode = transaction
max_client_conn = 2000
default_pool_size = 20
ignore_startup_parameters = extra_float_digits, options
server_check_query = select 1
logfile = $dir/pgbouncer.log
pidfile = $dir/pgbouncer.pid
admin_users = postgres
EOF
        printf '"postgres" ""\n' >"$dir/userlist.txt"
        if [ "$(id -u)" = 0 ]; then
            chown -R "$user" "$dir"
            runuser -u "$user" -- "$bin" -d "$dir/pgbouncer.ini"
        else
            "$bin" -d "$dir/pgbouncer.ini"
        fi
        local i
        for i in $(seq 1 50); do
            pgbouncer_answers "$port" && break
            sleep 0.2
        done
        if ! pgbouncer_answers "$port"; then
            echo "pgbouncer did not answer on 127.0.0.1:$port; its log:"
            tail -20 "$dir/pgbouncer.log" 2>/dev/null
            return 1
        fi
        echo "pgbouncer (transaction pooling) on 127.0.0.1:$port in front of $pg_host:$pg_port"
    fi
    export NORMANDY_TEST_PGBOUNCER_URL="${NORMANDY_TEST_PGBOUNCER_URL:-$url}"
}

# Whether a query through the pooler reaches Postgres.
pgbouncer_answers() {
    psql -X -q -h 127.0.0.1 -p "$1" -U postgres -d test -tAc 'select 1' >/dev/null 2>&1
}

# Run directly: strict mode here; sourced: the caller's (.ci/run sets -euo pipefail).
[ "${BASH_SOURCE[0]}" = "$0" ] && set -euo pipefail
pgbouncer_main "$@"
