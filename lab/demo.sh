#!/bin/bash
# make demo: a two-node lab, a VM live-migrated from node1 to node2 by the Perl driver
# (PVE::MTunnel::Migrate → libmtunnel → OpenSSH → QEMU), the memory check, teardown.
set -euo pipefail

TOP=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
LABSH=$TOP/lab/lab.sh
export MTUNNEL_LAB=${MTUNNEL_LAB:-demo}
VMID=${DEMO_VMID:-100}
MEM=${DEMO_MEM:-1024}
LAB=/run/mtunnel-lab/$MTUNNEL_LAB

trap '"$LABSH" down >/dev/null 2>&1 || true' EXIT
step() { printf '\n== %s\n' "$*"; }

step "bringing up a two-node lab (network + mount namespaces, an sshd per node)"
"$LABSH" up 2
printf 'memory: %s\n' "$MEM" >"$LAB/pve/qemu-server/$VMID.conf"

step "starting VM $VMID ($MEM MiB, a guest that keeps writing to every page) on node1"
"$LABSH" exec node1 qm start "$VMID"
"$LABSH" exec node1 "$TOP/lab/guest-check" --wait "$VMID"
"$LABSH" exec node1 qm status "$VMID" --verbose

step "live-migrating VM $VMID from node1 to node2 (perl/bin/mtunnel-migrate, run on node1)"
"$LABSH" exec node1 "$TOP/perl/bin/mtunnel-migrate" "$VMID" node2 --node node1 \
    --ssh-file "$LAB/ssh_prefix_node2" --memory "$MEM"

step "where is the VM now?"
echo "node1: $("$LABSH" exec node1 qm status "$VMID")"
echo "node2: $("$LABSH" exec node2 qm status "$VMID" --verbose | tr '\n' ' ')"

step "checking the guest's memory on node2 (every page must hold the pattern)"
"$LABSH" exec node2 "$TOP/lab/guest-check" "$VMID" "$MEM"
"$LABSH" exec node2 qm stop "$VMID"

step "leftovers"
left=$( { "$LABSH" exec node1 find /run/qemu-server -name '*.migrate'; "$LABSH" exec node2 find /run/qemu-server -name '*.migrate'; } | wc -l)
echo "socket files left on the nodes: $left"
[ "$left" -eq 0 ]

step "tearing down"
"$LABSH" down
trap - EXIT
echo
echo "demo: OK — VM $VMID migrated to node2, running there, memory intact, lab removed"
