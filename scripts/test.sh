#!/usr/bin/env bash
# Install chatmem with its test dependencies and everything the tests run for real
# (Caddy, wrk, valgrind and strace from Debian's packages, the machine's PostgreSQL 15), then run the test suite.
# Extra arguments go to pytest, e.g. `scripts/test.sh -k streaming`.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'

export DEBIAN_FRONTEND=noninteractive
if ! command -v caddy >/dev/null 2>&1; then
    apt-get install -y -q caddy >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q caddy; }
fi
# benchmarks.wrk_check loads the gateway with wrk, a load generator in C.
if ! command -v wrk >/dev/null 2>&1; then
    apt-get install -y -q wrk >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q wrk; }
fi
# benchmarks.instructions counts the gateway's instructions with callgrind.
if ! command -v callgrind_control >/dev/null 2>&1; then
    apt-get install -y -q valgrind >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q valgrind; }
fi
# benchmarks.syscalls counts the gateway's system calls with strace.
if ! command -v strace >/dev/null 2>&1; then
    apt-get install -y -q strace >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q strace; }
fi
# Debian starts a system Caddy on port 80/443 when it installs the package; the tests
# run their own, so stop the system one if it is running (harmless when it is not).
(systemctl stop caddy 2>/dev/null || pkill -x caddy 2>/dev/null) || true

if command -v pg_ctlcluster >/dev/null 2>&1; then
    pg_ctlcluster 15 main start 2>/dev/null || true
fi
# The PostgreSQL tests connect over the local socket as the user running them (peer
# authentication), so that user needs a role that may create the throwaway databases.
if [ "$(id -u)" = 0 ] && command -v psql >/dev/null 2>&1; then
    me="$(id -un)"
    if ! su postgres -c "psql -XtAc \"SELECT 1 FROM pg_roles WHERE rolname = '$me'\"" | grep -q 1; then
        su postgres -c "createuser --superuser '$me'" || true  # the tests say so if it failed
    fi
fi

# Two processes (pytest-xdist), each taking whole test files, so a file's module-scoped
# servers start once: about 2 min 45 s on two cores instead of 5. `-n 0` runs it in one.
exec python3 -m pytest -q -n 2 --dist loadfile "$@"
