#!/usr/bin/env bash
# Two network namespaces joined by a rate-limited veth pair: a robot and a server on one machine,
# talking over a slow link, for the rate-limited-link benchmarks (issue 5).
#
#   netns_link.sh up     NS_A NS_B RATE_KBIT [--net 198.18.N] [--burst-bytes B] [--limit-bytes L]
#   netns_link.sh down   NS_A NS_B
#   netns_link.sh status NS_A NS_B
#
# up      creates NS_A and NS_B if missing, a veth pair between them (created directly inside the
#         namespaces, so nothing ever appears in the host's namespace), addresses <net>.1/24 in NS_A
#         and <net>.2/24 in NS_B, loopback up, a default route over the veth when the namespace has
#         none (DDS discovery needs a route for its multicast and SPDP traffic), and a tc tbf shaper
#         of RATE_KBIT kbit/s on the egress of both ends, i.e. on both directions.
#         Running it again with other values updates the link in place (idempotent).
# down    deletes both namespaces (and with them the veth pair). Missing ones are not an error.
# status  prints the state; exit 0 when the link is fully up, 3 otherwise.
#
# Addresses come only from 198.18.0.0/15, the range RFC 2544 sets aside for benchmarking
# interconnects, so they cannot collide with a real network. --net picks the /24 (default
# 198.18.0); give each link its own when several exist at once.
#
# tbf parameters, chosen so the shaper measures the rate and not its own artefacts:
# - burst (bucket size): max(4096, 10 ms worth of RATE) bytes. It must hold at least one full
#   frame (1514 B) or tbf drops every packet; keeping it to a few frames keeps the sending rate
#   close to RATE even on short time scales (the verified recipe used 4 kB at 1 Mbit/s).
# - limit (queue length): max(400 ms worth of RATE, 2 x 64 KiB + burst) bytes. DDS sends large
#   samples as UDP datagrams of up to 64 KiB that IP splits into ~45 fragments: a queue that cannot
#   hold a whole datagram drops a fragment, which loses the whole datagram, and the reliable
#   writer resends all 64 KiB again, so a large sample may never get through a slow link. The
#   price is queueing delay (up to ~4 s at 250 kbit/s), which a real slow link with deep buffers
#   (Wi-Fi, LTE) also has; it shows up in the measured latency, which is the point.
# netem (delay, loss) is not available in every kernel (not in the one this was written on), so
# the link models bandwidth only.
set -euo pipefail

PROG="netns_link"
die() { printf '%s: %s\n' "$PROG" "$*" >&2; exit 2; }
log() { printf '[%s] %s\n' "$PROG" "$*" >&2; }

usage() {
  sed -n '5,7p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  exit "${1:-2}"
}

check_ns_name() {
  [[ $1 =~ ^[A-Za-z0-9_.-]{1,64}$ ]] || die "bad namespace name '$1': use 1-64 of [A-Za-z0-9_.-]"
}

# The veth end inside namespace X that leads to peer Y is named after Y (interface names are at
# most 15 characters; long peer names are replaced by a checksum so they stay unique).
ifname_to() {
  local peer=$1
  if (( ${#peer} <= 14 )); then
    printf 'v%s' "$peer"
  else
    printf 'v%08x' "$(printf '%s' "$peer" | cksum | cut -d' ' -f1)"
  fi
}

ns_exists() { ip netns list | awk '{print $1}' | grep -qxF -- "$1"; }

check_tools() {
  [ "$(id -u)" = 0 ] || die "must run as root (ip netns needs CAP_SYS_ADMIN)"
  command -v ip >/dev/null || die "'ip' (iproute2) not found"
  command -v tc >/dev/null || die "'tc' (iproute2) not found"
}

cmd_up() {
  local a=$1 b=$2 rate=$3
  shift 3
  local net="198.18.0" burst="" limit=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --net) net=${2:?--net needs a value}; shift 2 ;;
      --burst-bytes) burst=${2:?--burst-bytes needs a value}; shift 2 ;;
      --limit-bytes) limit=${2:?--limit-bytes needs a value}; shift 2 ;;
      *) die "unknown option '$1'" ;;
    esac
  done
  [[ $rate =~ ^[0-9]+$ ]] && (( rate >= 8 && rate <= 10000000 )) \
    || die "bad RATE_KBIT '$rate': an integer from 8 to 10000000 (kbit/s)"
  [[ $net =~ ^198\.(18|19)\.([0-9]{1,3})$ ]] && (( 10#${BASH_REMATCH[2]} <= 255 )) \
    || die "bad --net '$net': must be 198.18.N or 198.19.N (RFC 2544 benchmark range), N 0-255"
  local rate_bps=$(( rate * 1000 / 8 ))  # bytes per second
  if [ -z "$burst" ]; then
    burst=$(( rate_bps / 100 )); (( burst < 4096 )) && burst=4096
  fi
  if [ -z "$limit" ]; then
    limit=$(( rate_bps * 4 / 10 ))
    (( limit < 2 * 65536 + burst )) && limit=$(( 2 * 65536 + burst ))
  fi
  [[ $burst =~ ^[0-9]+$ ]] && (( burst >= 1600 )) || die "bad --burst-bytes '$burst': at least 1600 (one frame)"
  [[ $limit =~ ^[0-9]+$ ]] && (( limit >= burst )) || die "bad --limit-bytes '$limit': at least the burst ($burst)"

  local if_a if_b ns dev addr pair
  if_a=$(ifname_to "$b"); if_b=$(ifname_to "$a")
  for ns in "$a" "$b"; do
    ns_exists "$ns" || ip netns add "$ns"
    ip -n "$ns" link set lo up
  done
  if ! ip -n "$a" link show "$if_a" >/dev/null 2>&1; then
    # A half-made pair cannot exist (deleting one veth end deletes the other), but a stale
    # interface of that name in NS_B would make the creation fail with a clear message anyway.
    ip -n "$a" link add "$if_a" type veth peer name "$if_b" netns "$b"
  fi
  local addr_a="$net.1" addr_b="$net.2" other
  for pair in "$a:$if_a:$addr_a" "$b:$if_b:$addr_b"; do
    IFS=: read -r ns dev addr <<<"$pair"
    other=$(ip -n "$ns" -o -4 addr show to "$net.0/24" | awk -v d="$dev" '$2 != d {print $2}' | head -n1)
    [ -z "$other" ] || die "$net.0/24 is already used by $other in namespace $ns: pick another --net"
    ip -n "$ns" addr flush dev "$dev"
    ip -n "$ns" addr add "$addr/24" dev "$dev"
    ip -n "$ns" link set "$dev" up
    if [ -z "$(ip -n "$ns" route show default)" ]; then
      ip -n "$ns" route add default dev "$dev"
    fi
    tc -n "$ns" qdisc replace dev "$dev" root tbf rate "${rate}kbit" burst "$burst" limit "$limit"
  done
  log "up: $a($if_a $addr_a) <-> $b($if_b $addr_b), tbf rate ${rate}kbit burst ${burst}B limit ${limit}B each way"
}

cmd_down() {
  local a=$1 b=$2 ns
  for ns in "$a" "$b"; do
    if ns_exists "$ns"; then
      ip netns del "$ns"
      log "deleted namespace $ns"
    fi
  done
}

cmd_status() {
  local a=$1 b=$2 ok=1 if_a if_b ns dev pair
  if_a=$(ifname_to "$b"); if_b=$(ifname_to "$a")
  for pair in "$a:$if_a" "$b:$if_b"; do
    IFS=: read -r ns dev <<<"$pair"
    if ! ns_exists "$ns"; then
      echo "$ns: namespace missing"; ok=0; continue
    fi
    if ! ip -n "$ns" link show "$dev" >/dev/null 2>&1; then
      echo "$ns: no interface $dev"; ok=0; continue
    fi
    local state addr qd
    state=$(ip -n "$ns" -o link show "$dev" | grep -o 'state [A-Z]*' | cut -d' ' -f2)
    addr=$(ip -n "$ns" -o -4 addr show dev "$dev" | awk '{print $4}' | paste -sd, -)
    qd=$(tc -n "$ns" qdisc show dev "$dev" | head -n1)
    echo "$ns: $dev state=$state addr=${addr:-none} qdisc: $qd"
    tc -n "$ns" -s qdisc show dev "$dev" | sed -n 's/^ *\(Sent .*\)/    \1/p'
    [ "$state" = UP ] && [ -n "$addr" ] && [[ $qd == *tbf* ]] || ok=0
  done
  (( ok )) && { echo "link up"; return 0; }
  echo "link not (fully) up"; return 3
}

[ $# -ge 1 ] || usage
case "$1" in
  -h|--help|help) usage 0 ;;
  up)     [ $# -ge 4 ] || usage; check_tools; check_ns_name "$2"; check_ns_name "$3"
          [ "$2" != "$3" ] || die "NS_A and NS_B must differ"; cmd_up "${@:2}" ;;
  down)   [ $# -eq 3 ] || usage; check_tools; check_ns_name "$2"; check_ns_name "$3"; cmd_down "$2" "$3" ;;
  status) [ $# -eq 3 ] || usage; check_tools; check_ns_name "$2"; check_ns_name "$3"; cmd_status "$2" "$3" ;;
  *) usage ;;
esac
