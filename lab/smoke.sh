#!/bin/bash
# Smoke test of the lab itself: a manual PVE-style live migration of a 256 MiB
# guest from node1 to node2 through a plain OpenSSH UNIX-socket tunnel to
# `/usr/sbin/qm mtunnel` (no mtunnel library involved), with the config locked
# (lock: migrate) as PVE's source holds it and moved from node1's directory to node2's
# once the migration completed (as PVE's phase 3 renames it), then the memory pattern
# check and a full teardown check.
#
#   lab/smoke.sh                 (MTUNNEL_LAB defaults to "smoke" here)
#   SMOKE_ACCEL=tcg lab/smoke.sh (run the VMs under TCG instead of KVM)
#   SMOKE_MEM=512 lab/smoke.sh
#
# Exits 0 and prints "smoke: N passed, 0 failed" on success.

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
LABSH=$HERE/lab.sh
export MTUNNEL_LAB=${MTUNNEL_LAB:-smoke}
export MTUNNEL_LAB_ACCEL=${SMOKE_ACCEL:-auto}
LAB=/run/mtunnel-lab/$MTUNNEL_LAB
VMID=100
MEM=${SMOKE_MEM:-256}
SOCK=/run/qemu-server/$VMID.migrate
PASS=0
FAIL=0
SSH_PID=

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
ok() { PASS=$((PASS + 1)); echo "ok $((PASS + FAIL)) - $*"; }
fail() { FAIL=$((FAIL + 1)); echo "not ok $((PASS + FAIL)) - $*"; }
check() {   # check "description" CMD...
    local d=$1; shift
    if "$@"; then ok "$d"; else fail "$d"; fi
}
bail() {
    fail "$*"
    echo "smoke: $PASS passed, $FAIL failed"
    exit 1
}
x() { "$LABSH" exec "$@"; }
# the VM's config in node NODE's directory, as pmxcfs keeps it
confpath() { echo "$LAB/pve/nodes/$1/qemu-server/$VMID.conf"; }
conf() {   # conf LINE... : the VM config on node1, the source: a temp file of ours, renamed
    local f
    f=$(confpath node1)
    rm -f "$f.tmp.$$"
    printf '%s\n' "$@" >"$f.tmp.$$"
    mv -f "$f.tmp.$$" "$f"
}
qmpstatus() { x "$1" qmp $VMID query-status | jq_perl status; }   # QEMU's own run state
jq_perl() { perl -MJSON::PP -0777 -e 'my $d = decode_json(<STDIN>); for (split /\./, shift) { $d = ref $d eq "HASH" ? $d->{$_} : undef } print defined $d ? $d : "", "\n"' "$1"; }

no_lab_procs() {   # no process mentions $LAB/ in its argv (pure bash: no grep matching itself)
    local f arg left=0
    for f in /proc/[0-9]*/cmdline; do
        [ "${f#/proc/}" = "$$/cmdline" ] && continue
        while IFS= read -r -d '' arg; do
            case "$arg" in *"$LAB/"*) echo "    left: pid ${f//[!0-9]/}: $(tr '\0' ' ' <"$f")"; left=1; break;; esac
        done <"$f" 2>/dev/null
    done
    [ $left = 0 ]
}

cleanup() {
    local rc=$?
    if [ -n "$SSH_PID" ]; then kill "$SSH_PID" 2>/dev/null || true; fi
    rm -f "/tmp/smoke-tunnel.$$" "/tmp/smoke-selftest.$$"
    if [ $rc -ne 0 ]; then
        echo "smoke: failed (rc $rc) - tearing the lab down" >&2
        "$LABSH" down || true
    fi
}
trap cleanup EXIT

T0=$(now)

# --- lab up
t=$(now)
"$LABSH" up 2 || bail "lab up"
T_UP=$(since "$t")
ok "lab up (${T_UP}s)"
[ -f "$LAB/env" ] || bail "no $LAB/env"
check "node2: /usr/sbin/qm is the lab's qm" sh -c "'$LABSH' exec node2 /usr/sbin/qm mtunnel </dev/null | grep -qx 'ver 1'"
check "host: /usr/sbin/qm of the lab not visible" sh -c "! grep -qs MTUNNEL_LAB_DIR /usr/sbin/qm"
mapfile -t PREFIX2 <"$LAB/ssh_prefix_node2"

check "guest-check --self-test detects broken patterns" \
    sh -c "'$HERE/guest-check' --self-test >/tmp/smoke-selftest.$$ 2>&1"
tail -1 /tmp/smoke-selftest.$$; rm -f /tmp/smoke-selftest.$$

# --- VM on node1
conf "memory: $MEM"
t=$(now)
x node1 qm start $VMID || bail "qm start $VMID on node1"
T_START=$(since "$t")
st=$(x node1 qm status $VMID --verbose)
echo "$st" | sed 's/^/    node1: /'
check "node1: VM running" grep -qx 'status: running' <<<"$st"
ACCEL=$(sed -n 's/^accel: //p' <<<"$st")
t=$(now)
x node1 guest-check --wait $VMID 60 || bail "guest loop on node1 not running"
T_BOOT=$(since "$t")
ok "node1: guest loop runs (boot ${T_BOOT}s after qm start returned in ${T_START}s)"
check "node1: qm start refuses a running VM" sh -c "! '$LABSH' exec node1 qm start $VMID 2>/dev/null"

# --- target: qm start --migratedfrom, as QemuMigrate runs it (config locked by the source,
# migration parameters on stdin)
conf "memory: $MEM" "lock: migrate"
check "node2: qm start refuses the locked config without --skiplock" \
    sh -c "'$LABSH' exec node2 qm start $VMID --migratedfrom node1 </dev/null 2>&1 | grep -qx 'VM is locked (migrate)'"
t=$(now)
out=$(printf 'nbd_protocol_version: 1\n' | x node2 qm start $VMID --skiplock --migratedfrom node1 \
    --migration_type secure --stateuri unix) ||
    bail "qm start --migratedfrom on node2"
T_TSTART=$(since "$t")
echo "    node2: $out"
check "node2: prints the listens line" test "$out" = "migration listens on unix:$SOCK"
check "node2: qm-start.log records the start and its stdin" \
    grep -qx "start $VMID args=--skiplock --migratedfrom node1 --migration_type secure --stateuri unix stdin=nbd_protocol_version:1" \
    "$LAB/node2/qm-start.log"
check "node2: incoming socket exists at once" x node2 test -S "$SOCK"
check "node1: no socket yet at $SOCK (separate /run/qemu-server)" x node1 test ! -e "$SOCK"
# qm status on node2 loads node2's config, which is still on node1 (as on PVE): ask QEMU
check "node2: qm status does not find the config (still on node1)" \
    sh -c "'$LABSH' exec node2 qm status $VMID 2>&1 | grep -qx \"Configuration file 'nodes/node2/qemu-server/$VMID.conf' does not exist\""
check "node2: qmpstatus inmigrate" test "$(qmpstatus node2)" = inmigrate

# --- the tunnel: plain OpenSSH, as PVE does it
t=$(now)
coproc TUN { exec "$LABSH" exec node1 "${PREFIX2[@]}" -o ExitOnForwardFailure=yes \
    -L "$SOCK:$SOCK" /usr/sbin/qm mtunnel 2>/tmp/smoke-tunnel.$$; }
SSH_PID=$TUN_PID
exec {TIN}>&"${TUN[1]}" {TOUT}<&"${TUN[0]}"
read_tun() {   # read_tun VAR TIMEOUT
    local line
    IFS= read -r -t "$2" -u "$TOUT" line || { cat /tmp/smoke-tunnel.$$ >&2; return 1; }
    printf -v "$1" '%s' "$line"
}
read_tun l1 60 || bail "tunnel: no greeting"
read_tun l2 10 || bail "tunnel: no version"
T_TUN=$(since "$t")
check "tunnel: 'tunnel online'" test "$l1" = "tunnel online"
check "tunnel: 'ver 1'" test "$l2" = "ver 1"
ok "tunnel ready in ${T_TUN}s"
check "node1: forwarded socket $SOCK is a socket" x node1 test -S "$SOCK"

# --- migrate (source QEMU via QMP, as PVE phase 2)
t=$(now)
x node1 qmp $VMID migrate-set-parameters '{"max-bandwidth": 8589934592, "downtime-limit": 300}' >/dev/null ||
    bail "migrate-set-parameters"
x node1 qmp $VMID migrate "{\"uri\": \"unix:$SOCK\"}" >/dev/null || bail "migrate"
status=
deadline=$(( $(date +%s) + 300 ))
while :; do
    q=$(x node1 qmp $VMID query-migrate) || bail "query-migrate"
    status=$(jq_perl status <<<"$q")
    case "$status" in completed|failed|cancelled) break ;; esac
    [ "$(date +%s)" -lt "$deadline" ] || bail "migration did not finish in 300 s (status $status)"
    sleep 0.1
done
T_MIG=$(since "$t")
check "migration completed (status $status)" test "$status" = completed
echo "    total-time $(jq_perl total-time <<<"$q") ms, downtime $(jq_perl downtime <<<"$q") ms," \
     "ram transferred $(( $(jq_perl ram.transferred <<<"$q") / 1048576 )) MiB," \
     "dirty-sync-count $(jq_perl ram.dirty-sync-count <<<"$q")," \
     "$(jq_perl ram.mbps <<<"$q") Mbps"

# --- phase 3: the config moves to the target (one rename, as move_config_to_node), resume
# through the tunnel, quit
mv "$(confpath node1)" "$(confpath node2)"
echo "resume $VMID" >&"$TIN"
read_tun r 10 || bail "tunnel: no reply to resume"
check "tunnel: resume -> OK" test "$r" = OK
echo "bogus command" >&"$TIN"
if read_tun r 1 2>/dev/null; then fail "tunnel: unknown command got a reply '$r'"; else ok "tunnel: unknown command gets no reply"; fi
echo "quit" >&"$TIN"
read_tun r 10 || bail "tunnel: no reply to quit"
check "tunnel: quit -> OK" test "$r" = OK
exec {TIN}>&-
for _ in $(seq 100); do kill -0 "$SSH_PID" 2>/dev/null || break; sleep 0.05; done
check "tunnel: ssh exited" sh -c "! kill -0 $SSH_PID 2>/dev/null"
wait "$SSH_PID" 2>/dev/null && ok "tunnel: ssh exit code 0" || fail "tunnel: ssh exit code $?"
SSH_PID=
rm -f /tmp/smoke-tunnel.$$

check "node2: target QEMU removed its incoming socket after accepting" x node2 test ! -e "$SOCK"
st=$(x node2 qm status $VMID --verbose)
echo "$st" | sed 's/^/    node2: /'
check "node2: status running" grep -qx 'status: running' <<<"$st"
check "node2: qmpstatus running" grep -qx 'qmpstatus: running' <<<"$st"
check "node1: source qmpstatus postmigrate" test "$(qmpstatus node1)" = postmigrate
# upstream stops the source with vm_stop(..., nocheck) in-process: its config is gone from
# node1; the lab's qm stop does that with its MTUNNEL_LAB_QM_NOCHECK hook
x node1 env MTUNNEL_LAB_QM_NOCHECK=1 qm stop $VMID --skiplock || fail "qm stop (nocheck) on node1"
x node2 qm unlock $VMID || fail "qm unlock on node2"
check "qm unlock removed the lock" sh -c "! grep -q '^lock:' '$(confpath node2)'"
check "node1: qm status finds no config there (it moved)" \
    sh -c "! '$LABSH' exec node1 qm status $VMID >/dev/null 2>&1"
check "node1: no QEMU left" sh -c "! ls '$LAB'/node1/qemu-*.pid >/dev/null 2>&1"
x node1 test -e "$SOCK" && echo "    note: ssh left $SOCK behind on node1 (expected: OpenSSH does not unlink it)"

sleep 1   # let the guest run on the target for a while
out=$(x node2 guest-check $VMID "$MEM") && rc=0 || rc=$?
echo "    node2: $out"
check "node2: guest memory pattern intact after migration" test $rc = 0
x node2 qm stop $VMID || fail "qm stop on node2"
check "node2: status stopped" test "$(x node2 qm status $VMID)" = "status: stopped"

# --- down and leftovers
t=$(now)
"$LABSH" down || fail "lab down"
T_DOWN=$(since "$t")
ok "lab down (${T_DOWN}s)"
check "no lab netns left" sh -c "! ip netns list | grep -q '^mtl-$MTUNNEL_LAB-'"
check "no lab processes left (sshd, qemu)" no_lab_procs
check "no $LAB left" test ! -e "$LAB"
check "nothing of the lab mounted" sh -c "! awk '{print \$5}' /proc/self/mountinfo | grep -q '^$LAB'"
check "lab down is idempotent" "$LABSH" down

trap - EXIT
echo "timings: lab up ${T_UP}s, qm start ${T_START}s + guest boot ${T_BOOT}s (accel ${ACCEL:-?})," \
     "target start ${T_TSTART}s, tunnel ready ${T_TUN}s, migration of ${MEM} MiB ${T_MIG}s," \
     "lab down ${T_DOWN}s, total $(since "$T0")s"
echo "smoke: $PASS passed, $FAIL failed"
[ "$FAIL" = 0 ]
