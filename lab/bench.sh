#!/bin/bash
# make bench: performance ratios measured in one run on a fresh lab. Numbers, not assertions.
set -euo pipefail
TOP=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
LABSH=$TOP/lab/lab.sh
export MTUNNEL_LAB=${MTUNNEL_LAB:-bench}
LAB=/run/mtunnel-lab/$MTUNNEL_LAB
trap '"$LABSH" down >/dev/null 2>&1 || true' EXIT
"$LABSH" up 2 >/dev/null
echo "== mtunnel bench ($(date -u +%FT%TZ), $(nproc) cores, accel $(. "$LAB/env"; echo "${LAB_ACCEL:-auto}"))"

echo "-- tunnel"
"$LABSH" exec node1 "$TOP/lab/bench-tunnel"

echo "-- one migration, 256 MiB guest that keeps dirtying memory"
printf 'memory: 256\n' >"$LAB/pve/qemu-server/100.conf"
"$LABSH" exec node1 qm start 100 >/dev/null
"$LABSH" exec node1 "$TOP/lab/guest-check" --wait 100 >/dev/null
out=$("$LABSH" exec node1 "$TOP/perl/bin/mtunnel-migrate" 100 node2 --node node1 --ssh-file "$LAB/ssh_prefix_node2" --memory 256)
"$LABSH" exec node2 qm stop 100 >/dev/null
echo "$out" | grep -E '^(TIMING|TASK)' | sed 's/^/  /'
echo "$out" | awk '/^TIMING/ { for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
    printf "  completion detected %.0f ms after QEMU finished (driver %.3f s vs QEMU total-time %d ms)\n",
        v["migration"] * 1000 - v["qemu_total_ms"], v["migration"], v["qemu_total_ms"] }'

echo "-- parallel migrations node1 -> node2 (64 MiB idle guests, stock sshd)"
one=$("$TOP/lab/parallel-migrate" 1 --vmid-base 2000 | sed -n 's/.*wall \([0-9.]*\) s.*/\1/p')
echo "  one migration alone: $one s"
for n in 16 48; do
    for p in --no-protection --protection; do
        line=$("$TOP/lab/parallel-migrate" "$n" $p || true)
        wall=$(echo "$line" | sed -n '1s/.*wall \([0-9.]*\) s.*/\1/p')
        echo "$line" | sed '1s/$/'"$(awk -v w="$wall" -v o="$one" -v n="$n" 'BEGIN { printf " (%.2f x N x one)", w / (n * o) }')"'/; s/^/  /'
    done
done
