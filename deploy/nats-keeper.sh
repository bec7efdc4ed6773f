#!/bin/sh
# nats-keeper.sh: runs nats-server (arguments passed through) and ends when its own health check
# has failed for a while, so that the container's restart policy starts a fresh nats-server.
#
# Why: measured with nats-server 2.15.1 (docs/reliability.md, "NATS through a full disk"), a
# stream whose write hit a full disk stays unwritable after space returns, until nats-server
# restarts; `/healthz` reports the write error meanwhile. Docker marks such a container unhealthy
# but never restarts it, so every caduceus service would wait on JetStream for good. `caduceus up`
# does the same for its embedded nats-server (cli/natskeeper.py).
#
# Settings (environment): NATS_KEEPER_URL (default http://127.0.0.1:8222/healthz, the monitoring
# port given with -m), NATS_KEEPER_INTERVAL seconds between checks (10), NATS_KEEPER_FAILS failed
# checks in a row before a restart (6), NATS_KEEPER_GRACE seconds after start before judging
# (120: a large store takes a while to recover), NATS_KEEPER_STORE the store directory whose free
# space is checked (/nats), NATS_KEEPER_MIN_FREE_KB free space below which a restart would not
# help and is put off (65536), NATS_KEEPER_TIMEOUT seconds one check may take (5).
# Exit status: nats-server's own when it ends by itself or on SIGTERM/SIGINT; 70 after a restart.
set -u

url=${NATS_KEEPER_URL:-http://127.0.0.1:8222/healthz}
interval=${NATS_KEEPER_INTERVAL:-10}
fails_allowed=${NATS_KEEPER_FAILS:-6}
grace=${NATS_KEEPER_GRACE:-120}
store=${NATS_KEEPER_STORE:-/nats}
min_free_kb=${NATS_KEEPER_MIN_FREE_KB:-65536}
timeout=${NATS_KEEPER_TIMEOUT:-5}

say() { echo "nats-keeper: $*" >&2; }

nats-server "$@" &
child=$!

stop() {
    kill -TERM "$child" 2>/dev/null
    kill -CONT "$child" 2>/dev/null
    wait "$child"
    exit $?
}
trap stop TERM INT

free_kb() { df -Pk "$store" 2>/dev/null | awk 'NR == 2 { print $4 }'; }

# Running, and not a zombie waiting to be reaped (`kill -0` succeeds for those too).
alive() {
    state=$(awk '{ print $3 }' "/proc/$child/stat" 2>/dev/null)
    [ -n "$state" ] && [ "$state" != Z ]
}

started=$(date +%s)
fails=0
while alive; do
    sleep "$interval" &
    wait $!  # a plain sleep would hold off the TERM trap until it ends
    alive || break
    [ $(( $(date +%s) - started )) -ge "$grace" ] || continue
    # timeout(1), not wget -T: GNU wget retries a timed-out read 20 times, busybox wget has no --tries.
    if timeout "$timeout" wget -q -O /dev/null "$url" 2>/dev/null; then
        fails=0
        continue
    fi
    fails=$((fails + 1))
    [ "$fails" -ge "$fails_allowed" ] || continue
    free=$(free_kb)
    if [ -n "$free" ] && [ "$free" -lt "$min_free_kb" ]; then
        [ "$fails" -eq "$fails_allowed" ] && say "unhealthy, but only ${free} KB free on $store: waiting for space"
        continue
    fi
    say "nats-server unhealthy for $fails checks in a row ($url): stopping it for a restart"
    kill -TERM "$child" 2>/dev/null
    kill -CONT "$child" 2>/dev/null  # a stopped process acts on TERM only once continued
    tries=0
    while alive && [ "$tries" -lt 20 ]; do
        sleep 0.5
        tries=$((tries + 1))
    done
    kill -KILL "$child" 2>/dev/null
    wait "$child"
    exit 70
done
wait "$child"
exit $?
