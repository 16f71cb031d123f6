#!/usr/bin/env bash
# Start the local PostgreSQL 15 cluster for the `postgres`-marked tests. Idempotent; run as root.
#
# Leaves: role `router` (password `router`), database `router_test` owned by it, accepting
# connections on 127.0.0.1:5432 -> ROUTER_TEST_POSTGRES_URL's default in tests/pg.py.
set -euo pipefail

PG_VERSION="${PG_VERSION:-15}"
PG_CLUSTER="${PG_CLUSTER:-main}"
PG_ROLE="${PG_ROLE:-router}"
PG_PASSWORD="${PG_PASSWORD:-router}"
PG_DB="${PG_DB:-router_test}"
PG_HOST=127.0.0.1
PG_PORT=5432

as_postgres() {
    # `su` rather than sudo: sudo is not installed on every CI image.
    su postgres -c "$*"
}

if ! pg_lsclusters --no-header | awk -v v="$PG_VERSION" -v c="$PG_CLUSTER" \
        '$1 == v && $2 == c && $4 ~ /^online/ { found = 1 } END { exit !found }'; then
    echo "postgres.sh: starting cluster $PG_VERSION/$PG_CLUSTER"
    pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" start
fi

# Wait for the server socket before issuing DDL (start returns before recovery may finish).
for _ in $(seq 1 60); do
    if pg_isready -q -h "$PG_HOST" -p "$PG_PORT"; then
        break
    fi
    sleep 0.5
done
pg_isready -h "$PG_HOST" -p "$PG_PORT" >/dev/null || {
    echo "postgres.sh: server not accepting connections on $PG_HOST:$PG_PORT" >&2
    exit 1
}

role_exists=$(as_postgres "psql -tAc \"SELECT 1 FROM pg_roles WHERE rolname = '$PG_ROLE'\"")
if [[ "$role_exists" != "1" ]]; then
    echo "postgres.sh: creating role $PG_ROLE"
    as_postgres "psql -q -c \"CREATE ROLE $PG_ROLE LOGIN PASSWORD '$PG_PASSWORD'\""
fi

db_exists=$(as_postgres "psql -tAc \"SELECT 1 FROM pg_database WHERE datname = '$PG_DB'\"")
if [[ "$db_exists" != "1" ]]; then
    echo "postgres.sh: creating database $PG_DB owned by $PG_ROLE"
    as_postgres "createdb -O $PG_ROLE $PG_DB"
fi

# Final check as the application role over TCP with a password: what the tests will do.
for _ in $(seq 1 60); do
    if PGPASSWORD="$PG_PASSWORD" psql -h "$PG_HOST" -p "$PG_PORT" -U "$PG_ROLE" -d "$PG_DB" \
            -tAc "SELECT 1" >/dev/null 2>&1; then
        echo "postgres.sh: ready at postgresql+psycopg://$PG_ROLE:***@$PG_HOST:$PG_PORT/$PG_DB"
        exit 0
    fi
    sleep 0.5
done
echo "postgres.sh: cannot log in as $PG_ROLE to $PG_DB on $PG_HOST:$PG_PORT" >&2
exit 1
