#!/usr/bin/env bash
# The conformance scenario as a shell script (same steps as scenario.py), on
# `tricks-nats event/wait/discover/record/publish/subscribe` alone.
set -euo pipefail

[ -n "$TAG" ] && [ -n "$EXP_ID" ] && [ "$POD_ID" -ge 0 ] && [ "$POD_ID" -lt "$REPLICAS" ]
echo "config $TAG $POD_ID/$REPLICAS $EXP_ID $POD_IP"

peers=$(tricks-nats discover "$TAG" --count "$REPLICAS" --timeout 60)
[ "$(echo "$peers" | wc -l)" -ge "$REPLICAS" ]
echo "$peers" | grep -qx "$POD_ID $POD_IP"
[ "$(echo "$peers" | head -n "$REPLICAS" | cut -d' ' -f1 | tr '\n' ' ')" = "$(seq -s' ' 0 $((REPLICAS - 1))) " ]
echo "discovered $(echo "$peers" | wc -l)"

id="try-$RANDOM$RANDOM"
first=$(tricks-nats event hello --id "$id")
again=$(tricks-nats event hello --id "$id")   # the retry of the same registration
[ "$first" = "$again" ]
plain=$(tricks-nats event hello)
[ "$plain" -gt "$first" ]
echo "registered $first $again $plain"

total=${HELLO_TOTAL:-$((2 * REPLICAS))}
reached=$(tricks-nats wait hello "$total" --timeout 60)
[ "$reached" -ge "$total" ]
echo "waited $reached"

tricks-nats record conformance_ms $((POD_ID * 10 + 1)) --label lang=shell
printf 'conformance_ms %d lang=shell\nconformance_ms %d\n' $((POD_ID * 10 + 2)) $((POD_ID * 10 + 3)) \
  | tricks-nats record -
echo "recorded 3"

tricks-nats publish greeting "{\"tag\": \"$TAG\", \"pod_id\": $POD_ID}" --json >/dev/null
greet_total=${GREET_TOTAL:-$REPLICAS}
greetings=$(tricks-nats subscribe greeting --count "$greet_total" --json --timeout 60)
[ "$(echo "$greetings" | wc -l)" -eq "$greet_total" ]
seqs=$(echo "$greetings" | sed 's/^{"seq": \([0-9]*\),.*/\1/')
[ "$seqs" = "$(echo "$seqs" | sort -n -u)" ]
echo "$greetings" | grep -qF "\"pod\": \"$TAG-$POD_ID\", \"data\": {\"tag\": \"$TAG\", \"pod_id\": $POD_ID}}"
echo "exchanged $greet_total"

code=0
tricks-nats wait never 1 --timeout 0.5 || code=$?
[ "$code" -eq 1 ] || { echo "wait for 'never' exited $code, not 1 (timeout)"; exit 1; }
echo "timed out as expected (exit 1)"
echo "scenario ok"
