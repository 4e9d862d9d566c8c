#!/bin/sh
# Tether egress lock: in the pod's network namespace, only Tether's user id may open connections that
# leave the pod. Every other process (the agent, whatever user it runs as, root included) may only reach
# Tether's agent listeners on the pod's own addresses; anything else it tries is rejected at once
# (TCP reset, ICMP port unreachable), so a bypass attempt fails fast instead of hanging.
#
# It is run by the pod's first init container (root, with NET_ADMIN and NET_RAW), the way the
# istio-init / linkerd-init containers install their rules, and it is idempotent: running it again
# replaces its rules with the ones the current settings describe.
#
# Settings (environment variable, or the flag after it):
#   TETHER_UID                  --uid N         Tether's numeric user id (required; not 0)
#   TETHER_AGENT_PORTS          --ports LIST    Tether's agent listener ports reachable by everyone inside
#                                               the pod, e.g. "8100,8101-8103" (default 8100)
#   TETHER_EGRESS_ALLOW_UIDS    --allow-uid N   more user ids allowed out, e.g. a log shipper (default none)
#   TETHER_EGRESS_LOCAL_PORTS   --local-ports L more in-pod TCP ports other users may reach (default none)
#   TETHER_EGRESS_IPTABLES      --iptables CMD  iptables command (default iptables; e.g. iptables-legacy)
#   TETHER_EGRESS_IP6TABLES     --ip6tables CMD ip6tables command (default ip6tables)
#   TETHER_EGRESS_IPV6          --ipv6 MODE     auto (lock IPv6 where ip6tables works), on (required), off
#                               --dry-run       print the iptables-restore input instead of applying it
#
# Tether's admin listener is not in TETHER_AGENT_PORTS, so other users cannot reach it on loopback or on
# the pod address; only connections arriving from outside the pod (probes, the admin Service) get to it.

set -eu

CHAIN=TETHER_EGRESS
TETHER_UID=${TETHER_UID:-}
PORTS=${TETHER_AGENT_PORTS:-8100}
ALLOW_UIDS=${TETHER_EGRESS_ALLOW_UIDS:-}
LOCAL_PORTS=${TETHER_EGRESS_LOCAL_PORTS:-}
IPT=${TETHER_EGRESS_IPTABLES:-iptables}
IP6T=${TETHER_EGRESS_IP6TABLES:-ip6tables}
IPV6=${TETHER_EGRESS_IPV6:-auto}
DRY_RUN=0

say() { printf 'tether-egress-lock: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 2; }

usage() {
    sed -n '2,/^$/s/^# \{0,1\}//p' "$0"
}

need_value() { [ $# -ge 2 ] || die "$1 needs a value"; }

while [ $# -gt 0 ]; do
    case $1 in
        --uid) need_value "$@"; TETHER_UID=$2; shift 2 ;;
        --uid=*) TETHER_UID=${1#*=}; shift ;;
        --ports) need_value "$@"; PORTS=$2; shift 2 ;;
        --ports=*) PORTS=${1#*=}; shift ;;
        --allow-uid) need_value "$@"; ALLOW_UIDS="$ALLOW_UIDS $2"; shift 2 ;;
        --allow-uid=*) ALLOW_UIDS="$ALLOW_UIDS ${1#*=}"; shift ;;
        --local-ports) need_value "$@"; LOCAL_PORTS=$2; shift 2 ;;
        --local-ports=*) LOCAL_PORTS=${1#*=}; shift ;;
        --iptables) need_value "$@"; IPT=$2; shift 2 ;;
        --iptables=*) IPT=${1#*=}; shift ;;
        --ip6tables) need_value "$@"; IP6T=$2; shift 2 ;;
        --ip6tables=*) IP6T=${1#*=}; shift ;;
        --ipv6) need_value "$@"; IPV6=$2; shift 2 ;;
        --ipv6=*) IPV6=${1#*=}; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

is_uint() {
    case $1 in '' | *[!0-9]*) return 1 ;; esac
    [ "${#1}" -le 10 ]
}

# "8100, 8101-8103" -> "8100 8101:8103" (iptables --dport syntax), refusing anything else.
port_list() {
    out=""
    for p in $(printf '%s' "$1" | tr ',' ' '); do
        lo=${p%-*}
        hi=${p#*-}
        if ! is_uint "$lo" || ! is_uint "$hi"; then
            die "'$p' is not a port or a port range like 8101-8103"
        fi
        if [ "$lo" -lt 1 ] || [ "$hi" -gt 65535 ] || [ "$lo" -gt "$hi" ]; then
            die "'$p' is not a port or a port range within 1-65535"
        fi
        if [ "$lo" = "$hi" ]; then out="$out $lo"; else out="$out $lo:$hi"; fi
    done
    printf '%s' "${out# }"
}

is_uint "$TETHER_UID" || die "TETHER_UID (--uid) must be Tether's numeric user id, got '${TETHER_UID}'"
[ "$TETHER_UID" -ne 0 ] || die "TETHER_UID must not be 0: root would exempt every root process in the pod"
UIDS=$TETHER_UID
for u in $(printf '%s' "$ALLOW_UIDS" | tr ',' ' '); do
    is_uint "$u" || die "TETHER_EGRESS_ALLOW_UIDS: '$u' is not a numeric user id"
    [ "$u" -ne 0 ] || die "TETHER_EGRESS_ALLOW_UIDS must not contain 0"
    UIDS="$UIDS $u"
done
AGENT_PORTS=$(port_list "$PORTS") || exit 2
[ -n "$AGENT_PORTS" ] || die "TETHER_AGENT_PORTS (--ports) is empty"
EXTRA_PORTS=$(port_list "$LOCAL_PORTS") || exit 2
case $IPV6 in auto | on | off) ;; *) die "TETHER_EGRESS_IPV6 must be auto, on or off, got '$IPV6'" ;; esac

# The iptables-restore input for one family (4 or 6). Declaring the chain flushes it, so re-running
# replaces the old rules in one atomic commit.
ruleset() {
    family=$1
    echo "*filter"
    echo ":$CHAIN - [0:0]"
    # replies on connections someone else opened (kubelet probes, the admin Service) and their errors
    echo "-A $CHAIN -m conntrack --ctstate ESTABLISHED,RELATED -j RETURN"
    for u in $UIDS; do
        echo "-A $CHAIN -m owner --uid-owner $u -j RETURN"
    done
    if [ "$family" = 6 ]; then
        # neighbour discovery is sent by the kernel, owned by nobody; IPv6 does not work without it
        for t in router-solicitation neighbour-solicitation neighbour-advertisement 131 143; do
            echo "-A $CHAIN -p ipv6-icmp -m icmp6 --icmpv6-type $t -j RETURN"
        done
    fi
    # inside the pod (loopback or the pod's own address, both leave through lo): Tether's agent ports only
    for p in $AGENT_PORTS $EXTRA_PORTS; do
        echo "-A $CHAIN -o lo -p tcp -m tcp --dport $p -j RETURN"
    done
    echo "-A $CHAIN -p tcp -j REJECT --reject-with tcp-reset"
    if [ "$family" = 6 ]; then
        echo "-A $CHAIN -j REJECT --reject-with icmp6-port-unreachable"
    else
        echo "-A $CHAIN -j REJECT --reject-with icmp-port-unreachable"
    fi
    echo "COMMIT"
}

apply() {
    family=$1
    cmd=$2
    if [ "$DRY_RUN" = 1 ]; then
        echo "# $cmd-restore --noflush"
        ruleset "$family"
        echo "# $cmd -C OUTPUT -j $CHAIN || $cmd -I OUTPUT 1 -j $CHAIN"
        return 0
    fi
    ruleset "$family" | "$cmd-restore" -w 5 --noflush
    "$cmd" -w 5 -C OUTPUT -j "$CHAIN" 2>/dev/null || "$cmd" -w 5 -I OUTPUT 1 -j "$CHAIN"
    say "IPv$family: only uid(s) $UIDS may leave the pod; others may reach tcp port(s) $AGENT_PORTS $EXTRA_PORTS inside it"
    "$cmd" -w 5 -S "$CHAIN" >&2
}

if [ "$DRY_RUN" = 0 ]; then
    command -v "$IPT" >/dev/null 2>&1 || die "'$IPT' not found"
    command -v "$IPT-restore" >/dev/null 2>&1 || die "'$IPT-restore' not found"
fi
apply 4 "$IPT"

if [ "$IPV6" = off ]; then
    say "IPv6 left alone (TETHER_EGRESS_IPV6=off)"
elif [ "$DRY_RUN" = 1 ]; then
    apply 6 "$IP6T"
elif command -v "$IP6T" >/dev/null 2>&1 && command -v "$IP6T-restore" >/dev/null 2>&1 \
        && "$IP6T" -w 5 -S OUTPUT >/dev/null 2>&1; then
    apply 6 "$IP6T"
elif [ "$IPV6" = on ]; then
    die "TETHER_EGRESS_IPV6=on but '$IP6T' is missing or does not work here"
elif [ -e /proc/net/if_inet6 ]; then
    die "IPv6 is enabled in this pod but '$IP6T' is missing or does not work: refusing to leave IPv6 open"
else
    say "IPv6 is disabled in this pod: nothing to lock"
fi
