#!/bin/sh
# ready-gate.sh URL BIRD_SOCKET PROTOCOL [INTERVAL]
#
# Announces an edge host's anycast route only while its forwarder agent is ready
# (docs/fleet.md): polls URL (the agent's /ready, e.g.
# http://127.0.0.1:9477/ready) every INTERVAL seconds (default 0.1) and runs
# `birdc enable PROTOCOL` while it answers 200, `birdc disable PROTOCOL` as soon
# as it does not (refused, 503, no answer within 0.5 s). A change is sent at once;
# the current state is sent again every 50 polls as well, so that a restarted BIRD
# (whose PROTOCOL starts disabled) is brought in line within seconds. A failed
# birdc is retried on the next poll. Runs until killed.
set -u
url=$1
socket=$2
protocol=$3
interval=${4:-0.1}
state=unknown
polls=0
while :; do
    if curl -fsS -o /dev/null --max-time 0.5 "$url" 2>/dev/null; then
        want=enable
    else
        want=disable
    fi
    polls=$((polls + 1))
    if [ "$want" != "$state" ] || [ $((polls % 50)) -eq 0 ]; then
        if birdc -s "$socket" "$want" "$protocol" >/dev/null; then
            if [ "$want" != "$state" ]; then
                echo "$(date +%s.%N) ready-gate: $want $protocol"
            fi
            state=$want
        else
            state=unknown
        fi
    fi
    sleep "$interval"
done
