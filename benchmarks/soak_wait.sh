#!/usr/bin/env bash
# Wait for the soak started by `gpu_run.sh soak-start` (results in /tmp/soak), then copy
# what it has written to $OUT.
#   bash benchmarks/soak_wait.sh SECONDS [first]
# Returns when the soak has ended or SECONDS have passed; with `first`, as soon as the
# server has counted its first finished request.
set -uo pipefail
deadline=$((SECONDS + ${1:-540}))
until [ -f /tmp/soak/rc ] || [ $SECONDS -ge $deadline ]; do
  if [ "${2:-}" = first ] && grep -q '"success": [1-9]' /tmp/soak/soak-progress.json 2>/dev/null; then break; fi
  sleep 5
done
tail -5 /tmp/soak/soak.log | grep -v '^[IW][0-9]'
python3 - <<'PY'
import json, pathlib
p = pathlib.Path("/tmp/soak/soak-progress.json")
samples = json.loads(p.read_text()) if p.exists() else []
for s in samples[:1] + samples[-3:]:
    print(s)
PY
[ -f /tmp/soak/rc ] && echo "soak ended, rc $(cat /tmp/soak/rc)"
[ -n "${OUT:-}" ] && cp -r /tmp/soak/. "$OUT/" 2>/dev/null
exit 0
