#!/usr/bin/env bash
# A ring client as a plain shell script: finds the servers with `tricks-nats discover`, talks
# to "its" server (pod id modulo the servers) over bash's /dev/tcp, sends REQUESTS requests all
# the way round the ring, checks each went through every server, and records the round trips.
set -euo pipefail
PORT=${RING_PORT:-7000}
REQUESTS=${REQUESTS:-5}

mapfile -t servers < <(tricks-nats discover server)
n=${#servers[@]}
[ "$n" -gt 0 ] || { echo "no servers running"; exit 1; }
read -r sid sip <<<"${servers[$((POD_ID % n))]}"
exec 3<>"/dev/tcp/$sip/$PORT"
samples=$(mktemp)
trap 'rm -f "$samples"' EXIT

for ((seq = 0; seq < REQUESTS; seq++)); do
  start=$(date +%s%N)
  printf '{"type": "request", "seq": %d}\n' "$seq" >&3
  IFS= read -r -t 30 reply <&3
  us=$((($(date +%s%N) - start) / 1000))
  [[ $reply =~ \"seq\":\ ?([0-9]+) ]] && [ "${BASH_REMATCH[1]}" -eq "$seq" ]
  [[ $reply =~ \"hops\":\ ?([0-9]+) ]] && hops=${BASH_REMATCH[1]}
  [ "$hops" -eq "$n" ] || { echo "request $seq went $hops hops, not $n"; exit 1; }
  printf 'client %s (shell) via server %s: request %d went %d hops in %d.%03d ms\n' \
    "$POD_ID" "$sid" "$seq" "$hops" $((us / 1000)) $((us % 1000))
  printf 'request_ms %d.%03d\n' $((us / 1000)) $((us % 1000)) >>"$samples"
done
exec 3>&-
# every round trip as a sample of `request_ms`, in one call (`tricks-nats record -`)
tricks-nats record - <"$samples"
