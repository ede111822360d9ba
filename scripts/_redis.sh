# Sourced by scripts/test.sh: makes Debian's redis-server available for the
# channels benchmark, which starts its own throwaway instance on a free
# loopback port (the anchor of bench_channels.py).
if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "redis-server not found: installing Debian's package" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y redis-server >/dev/null \
      || { apt-get update >/dev/null && apt-get install -y redis-server >/dev/null; }
  else
    echo "redis-server not found (and not root): the channels benchmark test will fail" >&2
  fi
fi
