#!/bin/sh
# resilient-ecmp.sh PREFIX TABLE GROUP [INTERVAL]
#
# On the router (docs/fleet.md): BIRD exports its routes to kernel table TABLE,
# where nothing forwards with them; this script mirrors the gateways of BIRD's
# route to PREFIX into the resilient nexthop group GROUP (64 buckets) and routes
# PREFIX in the main table through it. Every possible member must exist as a
# nexthop object beforehand (`ip nexthop add id N via GATEWAY dev IFACE`).
# A resilient group keeps the buckets of the members that stay: when an edge
# leaves, only its own flows move; a plain multipath route would rehash others.
# Polls every INTERVAL seconds (default 0.05). Runs until killed.
set -u
prefix=$1
table=$2
group=$3
interval=${4:-0.05}
current=
while :; do
    members=
    for gateway in $(ip -o route show table "$table" exact "$prefix" | grep -o 'via [0-9a-f.:]*' | cut -d' ' -f2 | sort); do
        id=$(ip -o nexthop show | awk -v gw="$gateway" '$3 == "via" && $4 == gw { print $2; exit }')
        if [ -n "$id" ]; then
            members="${members:+$members/}$id"
        fi
    done
    if [ "$members" != "$current" ]; then
        if [ -z "$members" ]; then
            ip route del "$prefix" 2>/dev/null
            changed=$?
        else
            ip nexthop replace id "$group" group "$members" type resilient buckets 64 &&
                ip route replace "$prefix" nhid "$group"
            changed=$?
        fi
        if [ "$changed" -eq 0 ] || [ -z "$members" ]; then
            current=$members
            echo "$(date +%s.%N) resilient-ecmp: $prefix via group $group members [$members]"
        fi
    fi
    sleep "$interval"
done
