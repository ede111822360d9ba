# Sourced by scripts/test.sh: makes Debian's iptables available for the NAT tests
# (integration-tests/tests/test_pilot_node_nat.py), which build routers doing
# masquerading NAT between network namespaces they create and remove themselves.
# Elsewhere (not root, or no apt-get) those tests skip and say why.
if ! command -v iptables >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "iptables not found: installing Debian's package" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends iptables >/dev/null \
      || { apt-get update >/dev/null && apt-get install -y --no-install-recommends iptables >/dev/null; }
  else
    echo "iptables not found (and not root): the pilot-node NAT tests will be skipped" >&2
  fi
fi
