#!/bin/bash
# make demo: a two-node lab, a VM with a local disk live-migrated from node1 to node2 by the
# Perl driver (PVE::MTunnel::Migrate → libmtunnel → OpenSSH → QEMU): the disk mirrored into
# the target's NBD export and RAM through the same ssh tunnel, then the memory and disk
# checks, teardown.
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
# the VM's config where pmxcfs keeps it: in the directory of node1, the node that owns the VM
# (a file of ours, renamed into place); the migration moves it to node2
conf=$LAB/pve/nodes/node1/qemu-server/$VMID.conf
printf 'memory: %s\nguest: disk\nide0: local:%s/vm-%s-disk-0.raw,size=64M\n' "$MEM" "$VMID" "$VMID" \
    >"$conf.tmp.$$"
mv -f "$conf.tmp.$$" "$conf"

step "starting VM $VMID ($MEM MiB, a 64 MiB disk on node1's own storage; the guest keeps writing to every page and to its disk) on node1"
"$LABSH" exec node1 qm start "$VMID"
"$LABSH" exec node1 "$TOP/lab/guest-check" --wait "$VMID"
"$LABSH" exec node1 qm status "$VMID" --verbose

echo "node1 storage local: $("$LABSH" exec node1 pvesm list local | tail -n +2)"
# how the library will mirror the disk, from what QEMU attached (QEMU 10.0, machine 10.0:
# -blockdev, as qemu-server 9 attaches it, so blockdev-mirror)
echo "QEMU on node1: $("$LABSH" exec node1 qmp "$VMID" query-version | perl -MJSON::PP -0ne 'my $q = decode_json($_)->{qemu}; print "$q->{major}.$q->{minor}.$q->{micro}"')"
echo "disk drive-ide0: $("$LABSH" exec node1 perl -I"$TOP/perl/lib" -MPVE::MTunnel -e \
    'print PVE::MTunnel::qmp_mirror_method("/run/qemu-server/$ARGV[0].qmp", "drive-ide0")' "$VMID")"

step "live-migrating VM $VMID with its local disk from node1 to node2 (perl/bin/mtunnel-migrate --online --with-local-disks, run on node1)"
"$LABSH" exec node1 "$TOP/perl/bin/mtunnel-migrate" "$VMID" node2 --node node1 \
    --ssh-file "$LAB/ssh_prefix_node2" --pve-dir "$LAB/pve" --online --with-local-disks

step "where is the VM now? (its config moved with it: qm status on node1 would not find it)"
echo "config: $(cd "$LAB/pve" && ls nodes/*/qemu-server/"$VMID.conf")"
echo "node1: $("$LABSH" exec node1 sh -c "test -e /run/qemu-server/$VMID.pid && echo running || echo 'no QEMU of VM $VMID'")"
echo "node2: $("$LABSH" exec node2 qm status "$VMID" --verbose | tr '\n' ' ')"

echo "node1 storage local: $("$LABSH" exec node1 pvesm list local | tail -n +2)"
echo "node2 storage local: $("$LABSH" exec node2 pvesm list local | tail -n +2)"

step "checking the guest on node2: every page holds the pattern, every disk write it made is on node2's disk"
"$LABSH" exec node2 "$TOP/lab/guest-check" "$VMID" "$MEM"
"$LABSH" exec node2 qm stop "$VMID"

step "leftovers"
left=$( { "$LABSH" exec node1 find /run/qemu-server -name '*.migrate'; "$LABSH" exec node2 find /run/qemu-server -name '*.migrate'; } | wc -l)
echo "socket files left on the nodes: $left"
[ "$left" -eq 0 ]
# the source's copy of the migrated disk was freed once the VM ran on node2 (as upstream)
src_vols=$("$LABSH" exec node1 pvesm list local | tail -n +2 | wc -l)
echo "volumes left on node1's local storage: $src_vols"
[ "$src_vols" -eq 0 ]

step "tearing down"
"$LABSH" down
trap - EXIT
echo
echo "demo: OK — VM $VMID and its disk migrated to node2, running there, memory and disk intact, lab removed"
