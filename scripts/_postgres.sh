# Sourced by scripts/test.sh: a throwaway PostgreSQL server for the tests marked
# `postgres` (pilot-checkpoint-sqlite runs its store tests on SQLite and on it).
#
# If PILOT_TEST_POSTGRES_URL is already set, it is used as is. Otherwise, when
# running as root on a machine with apt-get, this installs Debian's
# `postgresql` package if no server binaries are present (without creating the
# package's default cluster), starts a private cluster in a temporary directory
# owned by the postgres user, listening on 127.0.0.1 only, on a free port, with a
# random password (scram-sha-256), creates a database and exports
# PILOT_TEST_POSTGRES_URL. The cluster is stopped and its directory removed
# when the sourcing shell exits (an existing EXIT trap is kept and run first).
# Elsewhere it says why it did nothing, and the postgres tests are not collected.

_pilot_pg_note() { printf '[postgres] %s\n' "$*" >&2; }

_pilot_pg_bindir() {
  local d
  d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
  if [ -n "$d" ] && [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then
    printf '%s\n' "$d"
  fi
}

_pilot_pg_start() {
  if [ -n "${PILOT_TEST_POSTGRES_URL:-}" ]; then
    _pilot_pg_note "using PILOT_TEST_POSTGRES_URL from the environment"
    return 0
  fi
  if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
    _pilot_pg_note "not root or no apt-get: PostgreSQL tests not collected (set PILOT_TEST_POSTGRES_URL to run them)"
    return 0
  fi
  local bindir
  bindir="$(_pilot_pg_bindir)"
  if [ -z "$bindir" ]; then
    _pilot_pg_note "installing Debian's postgresql package"
    # No default cluster: ours is private and temporary.
    mkdir -p /etc/postgresql-common
    if ! grep -qs '^create_main_cluster' /etc/postgresql-common/createcluster.conf; then
      echo 'create_main_cluster = false' >>/etc/postgresql-common/createcluster.conf
    fi
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql >/dev/null; then
      DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql >/dev/null
    fi
    bindir="$(_pilot_pg_bindir)"
    if [ -z "$bindir" ]; then
      _pilot_pg_note "postgresql installed but initdb not found"
      return 1
    fi
  fi
  PILOT_PG_DIR="$(mktemp -d /tmp/pilot-pg.XXXXXX)"
  chown postgres: "$PILOT_PG_DIR"
  chmod 700 "$PILOT_PG_DIR"
  local port password
  port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"
  password="$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
  (umask 077 && printf '%s\n' "$password" >"$PILOT_PG_DIR/pwfile")
  chown postgres: "$PILOT_PG_DIR/pwfile"
  runuser -u postgres -- "$bindir/initdb" -D "$PILOT_PG_DIR/data" -U postgres \
    --pwfile="$PILOT_PG_DIR/pwfile" -A scram-sha-256 -E UTF8 --locale=C.UTF-8 >/dev/null
  rm -f "$PILOT_PG_DIR/pwfile"
  # A test cluster: durability of PostgreSQL itself is not under test here.
  runuser -u postgres -- "$bindir/pg_ctl" -D "$PILOT_PG_DIR/data" -l "$PILOT_PG_DIR/server.log" \
    -w -t 60 start \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $PILOT_PG_DIR -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" >/dev/null
  PILOT_PG_BINDIR="$bindir"
  PGPASSWORD="$password" runuser -u postgres -- env PGPASSWORD="$password" \
    "$bindir/createdb" -h 127.0.0.1 -p "$port" -U postgres pilot_test
  export PILOT_TEST_POSTGRES_URL="postgresql+psycopg://postgres:${password}@127.0.0.1:${port}/pilot_test"
  _pilot_pg_note "PostgreSQL $("$bindir/postgres" --version | awk '{print $3}') on 127.0.0.1:$port (PILOT_TEST_POSTGRES_URL exported)"
  local previous
  previous="$(trap -p EXIT | sed -e "s/^trap -- '\(.*\)' EXIT\$/\1/")"
  # shellcheck disable=SC2064
  trap "${previous:+$previous;} _pilot_pg_stop" EXIT
}

_pilot_pg_stop() {
  if [ -n "${PILOT_PG_DIR:-}" ] && [ -d "$PILOT_PG_DIR/data" ]; then
    runuser -u postgres -- "$PILOT_PG_BINDIR/pg_ctl" -D "$PILOT_PG_DIR/data" -m fast -w -t 30 stop >/dev/null 2>&1 || true
    rm -rf "$PILOT_PG_DIR"
  fi
}

_pilot_pg_start
