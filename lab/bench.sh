#!/bin/bash
# make bench: performance ratios measured in one run on a fresh lab. Numbers, not assertions.
set -euo pipefail
TOP=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
LABSH=$TOP/lab/lab.sh
export MTUNNEL_LAB=${MTUNNEL_LAB:-bench}
LAB=/run/mtunnel-lab/$MTUNNEL_LAB
OUT=$(mktemp -d)
trap '"$LABSH" down >/dev/null 2>&1 || true; rm -rf "$OUT"' EXIT
# the figures that depend on QEMU are measured on both, in this run: 10.0 (the lab's default,
# what PVE 9 runs) and Debian 12's 7.2, each on a lab whose nodes all run it
QEMUS=(10.0 7.2)
MTUNNEL_LAB_QEMU=${QEMUS[0]} "$LABSH" up 2 >/dev/null
# conf VMID LINE... : the VM's config on node1, where it starts (pmxcfs's layout: the node that
# owns it), written to a temp file of ours and renamed; the copy a migration moved to another
# node is removed first (one node holds a config)
conf() {
    local v=$1 f=$LAB/pve/nodes/node1/qemu-server/$1.conf; shift
    rm -f "$LAB"/pve/nodes/node*/qemu-server/"$v.conf"
    rm -f "$f.tmp.$$"; printf '%s\n' "$@" >"$f.tmp.$$" && mv -f "$f.tmp.$$" "$f"
}
echo "== mtunnel bench ($(date -u +%FT%TZ), $(nproc) cores, accel $(. "$LAB/env"; echo "${LAB_ACCEL:-auto}"))"

# MTUNNEL_BENCH_QEMU_ONLY=1: only the sections measured on both QEMUs (and their summary)
if [ -z "${MTUNNEL_BENCH_QEMU_ONLY:-}" ]; then
echo "-- tunnel"
"$LABSH" exec node1 "$TOP/lab/bench-tunnel"

echo "-- one migration, 256 MiB guest that keeps dirtying memory"
conf 100 'memory: 256'
"$LABSH" exec node1 qm start 100 >/dev/null
"$LABSH" exec node1 "$TOP/lab/guest-check" --wait 100 >/dev/null
out=$("$LABSH" exec node1 "$TOP/perl/bin/mtunnel-migrate" 100 node2 --node node1 --ssh-file "$LAB/ssh_prefix_node2" --pve-dir "$LAB/pve" --memory 256)
"$LABSH" exec node2 qm stop 100 >/dev/null
echo "$out" | grep -E '^(TIMING|TASK)' | sed 's/^/  /'
echo "$out" | awk '/^TIMING/ { for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
    printf "  completion detected %.0f ms after QEMU finished (driver %.3f s vs QEMU total-time %d ms)\n",
        v["migration"] * 1000 - v["qemu_total_ms"], v["migration"], v["qemu_total_ms"] }'

fi

# guest pause: source STOP to target RESUME (QEMU's event timestamps), per way of waiting for the end
sec_pause() {
# MTUNNEL_BENCH_PAUSE_ARGS: other bench-pause options (fewer runs, one mode)
    # shellcheck disable=SC2086
    "$TOP/lab/bench-pause" ${MTUNNEL_BENCH_PAUSE_ARGS:---runs 10 --failures 3 --guests dirty,idle,disk,disk-released}
}

# post-copy: a guest that dirties memory twice as fast as the link carries, pre-copy against --postcopy auto
sec_postcopy() {
"$TOP/lab/bench-postcopy"
}

# the cipher list a caller asks for with the ciphers option (the library sets none by default)
AES_GCM=aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com
# throughput: the same 1 GiB guest (every page holds data, no dirtying) over the tunnel and over a local UNIX socket
sec_throughput() {
conf 501 'memory: 1024' 'guest: idle'
# VM 500 on node1 again, its config too (the last migration moved it to node2)
fresh_source() {
    conf 500 'memory: 1024' 'guest: idle'
    "$LABSH" exec node1 qm start 500 >/dev/null; "$LABSH" exec node1 "$TOP/lab/guest-check" --wait 500 >/dev/null
}
mibps() { [ -n "$1" ] || { echo "n/a (failed)"; return; }; awk -v line="$1" 'BEGIN { n = split(line, f, " "); for (i = 1; i <= n; i++) { split(f[i], kv, "="); v[kv[1]] = kv[2] }
    ms = v["qemu_total_ms"] ? v["qemu_total_ms"] : v["total_ms"]; printf "%.0f MiB/s (%d ms)", v["transferred"] / ms * 1000 / 1048576, ms }'; }
rate() { echo "$1" | sed 's/ MiB.*//'; }
# one migration of VM 500 node1 -> node2 with mtunnel-migrate's extra options "$@"; prints its
# TIMING line (empty when it failed, the failure on stderr)
migrate_500() {
    local out t
    fresh_source
    out=$("$LABSH" exec node1 "$TOP/perl/bin/mtunnel-migrate" 500 node2 --node node1 --ssh-file "$LAB/ssh_prefix_node2" --pve-dir "$LAB/pve" --memory 1024 "$@" 2>&1 || true)
    t=$(echo "$out" | grep '^TIMING open_to_ready' || true)
    [ -n "$t" ] || { echo "  migration ($*) failed:"; echo "$out" | tail -5 | sed 's/^/    /'; } >&2
    "$LABSH" exec node2 qm stop 500 >/dev/null
    echo "$t"
}
# the median of the numbers among the arguments (a failed run's "n/a" is left out)
median() { printf '%s\n' "$@" | { grep -E '^[0-9]+([.][0-9]+)?$' || true; } | sort -n | awk '{ v[NR] = $1 } END { if (NR) print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'; }
# ssh-default: no Ciphers option (the library's default: ssh and its ssh_config choose,
# chacha20-poly1305 on a stock OpenSSH); aes-gcm: the same with the ciphers option. Paired
# runs, the order alternating, so that both see the same (shared) machine: the ratio is the
# median of the pairs' ratios. MTUNNEL_BENCH_CIPHER_RUNS pairs (default 3).
runs=${MTUNNEL_BENCH_CIPHER_RUNS:-3}
def=(); gcm=(); pairs=()
for ((r = 1; r <= runs; r++)); do
    order=(ssh-default aes-gcm); [ $((r % 2)) = 0 ] && order=(aes-gcm ssh-default)
    for c in "${order[@]}"; do
        if [ "$c" = aes-gcm ]; then g=$(rate "$(mibps "$(migrate_500 --ssh-option "ciphers=$AES_GCM")")")
        else d=$(rate "$(mibps "$(migrate_500)")")
        fi
    done
    def+=("$d"); gcm+=("$g")
    pairs+=("$(awk -v g="$g" -v d="$d" 'BEGIN { if (d > 0) printf "%.2f", g / d }')")
done
tun_insecure=$(mibps "$(migrate_500 --migration_type insecure --migration_network "$(. "$LAB/env"; echo "$LAB_MIGRATION_NETWORK")")")
fresh_source
# an incoming target as QemuMigrate starts it (qm reads the stdin lines until EOF)
echo 'nbd_protocol_version: 1' | "$LABSH" exec node1 qm start 501 --skiplock --migratedfrom node1 \
    --migration_type secure --stateuri unix >/dev/null
loc=$(mibps "$("$LABSH" exec node1 "$TOP/lab/bench-local-migrate" 500 501)")
"$LABSH" exec node1 qm stop 500 >/dev/null; "$LABSH" exec node1 qm stop 501 >/dev/null
d=$(median "${def[@]}"); g=$(median "${gcm[@]}")
echo "  tunnel, ssh's default cipher (no ciphers option, the default): $d MiB/s (median of $runs: ${def[*]})"
echo "  tunnel, AES-GCM through the ciphers option ($(grep -qw aes /proc/cpuinfo && echo 'CPU has AES' || echo 'CPU without AES')): $g MiB/s (median of $runs: ${gcm[*]})"
echo "  local UNIX socket, no ssh:                                      $loc"
awk -v g="$g" -v d="$d" -v l="$(rate "$loc")" \
    'BEGIN { if (d > 0 && l > 0) printf "  tunnel/local = %.2f (ssh default), %.2f (AES-GCM)\n", d / l, g / l }'
echo "  AES-GCM/ssh-default = $(median "${pairs[@]}") (median of the paired runs' ratios: ${pairs[*]})"
echo "  insecure (TCP on the migration network, no ssh):               $tun_insecure"
awk -v a="$d" -v i="$(rate "$tun_insecure")" \
    'BEGIN { if (i > 0) printf "  tunnel/insecure = %.2f (ssh default)\n", a / i }'
}

# disk mirror: a 1 GiB local disk full of data through the tunnel's NBD forward and to an NBD export on the same node
sec_mirror() {
conf 601 'memory: 64' 'guest: idle' 'ide0: local:601/vm-601-disk-0.raw,size=1G'
# a fresh VM 600 on node1 whose disk holds 1023 MiB of non-zero data after its boot sector
# (zeros would be skipped by the mirror and measure nothing); its config on node1 again
data_source() {
    conf 600 'memory: 64' 'guest: idle' 'ide0: local:600/vm-600-disk-0.raw,size=1G'
    "$LABSH" exec node1 qm start 600 >/dev/null
    "$LABSH" exec node1 qm stop 600 >/dev/null
    "$LABSH" exec node1 sh -c "tr '\\0' x </dev/zero | dd of=\"\$(pvesm path local:600/vm-600-disk-0.raw)\" bs=1M seek=1 count=1023 conv=notrunc iflag=fullblock status=none"
    "$LABSH" exec node1 qm start 600 >/dev/null
    "$LABSH" exec node1 "$TOP/lab/guest-check" --wait 600 >/dev/null
}
data_source
out=$("$LABSH" exec node1 "$TOP/perl/bin/mtunnel-migrate" 600 node2 --node node1 --ssh-file "$LAB/ssh_prefix_node2" --pve-dir "$LAB/pve" --with-local-disks 2>&1 || true)
t=$(echo "$out" | grep '^TIMING open_to_ready' || true)
[ -n "$t" ] || { echo "  storage migration failed:"; echo "$out" | tail -5 | sed 's/^/    /'; }
"$LABSH" exec node2 qm stop 600 >/dev/null; "$LABSH" exec node2 pvesm free local:600/vm-600-disk-0.raw >/dev/null
tun_mirror=$(echo "$t" | awk '{ for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] } if (v["mirror"] > 0) printf "%.0f MiB/s (%d ms)", v["mirror_bytes"] / v["mirror"] / 1048576, v["mirror"] * 1000 }')
data_source
echo 'nbd_protocol_version: 1' | "$LABSH" exec node1 qm start 601 --skiplock --migratedfrom node1 \
    --migration_type secure --stateuri unix --targetstorage 1 >/dev/null
m=$("$LABSH" exec node1 "$TOP/lab/bench-local-mirror" 600 nbd:unix:/run/qemu-server/601_nbd.migrate:exportname=drive-ide0)
loc_mirror=$(echo "$m" | awk '{ for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] } printf "%.0f MiB/s (%d ms)", v["bytes"] / v["total_ms"] * 1000 / 1048576, v["total_ms"] }')
for v in 600 601; do "$LABSH" exec node1 qm stop $v >/dev/null; done
"$LABSH" exec node1 sh -c 'for v in $(pvesm list local | awk "NR > 1 { print \$1 }"); do pvesm free $v; done' >/dev/null
echo "  mirror through the tunnel (driver): $tun_mirror"
echo "  mirror to a local NBD export:       $loc_mirror"
awk -v a="$(rate "$tun_mirror")" -v l="$(rate "$loc_mirror")" 'BEGIN { if (l > 0) printf "  tunnel/local = %.2f\n", a / l }'
}

# each section per QEMU, the lab brought up again on the other one in between; printed below
# one block per QEMU under the section's title, with a summary table at the end.
# MTUNNEL_BENCH_SECTIONS: only these of them ("throughput", "pause postcopy", ...); with
# MTUNNEL_BENCH_QEMU_ONLY=1, `MTUNNEL_BENCH_QEMU_ONLY=1 MTUNNEL_BENCH_SECTIONS=throughput
# lab/bench.sh` measures the tunnel's throughput (ciphers) alone
SECTIONS=(${MTUNNEL_BENCH_SECTIONS:-pause postcopy throughput mirror})
for sec in "${SECTIONS[@]}"; do
    case $sec in pause|postcopy|throughput|mirror) ;; *) echo "bench: unknown section '$sec' in MTUNNEL_BENCH_SECTIONS" >&2; exit 2;; esac
done
for q in "${QEMUS[@]}"; do
    if [ "$q" != "${QEMUS[0]}" ]; then
        "$LABSH" down >/dev/null
        MTUNNEL_LAB_QEMU=$q "$LABSH" up 2 >/dev/null
    fi
    for sec in "${SECTIONS[@]}"; do
        "sec_$sec" >"$OUT/$sec.$q" 2>&1 || echo "  (section failed: exit $?)" >>"$OUT/$sec.$q"
    done
done
"$LABSH" down >/dev/null
[ -n "${MTUNNEL_BENCH_QEMU_ONLY:-}" ] || MTUNNEL_LAB_QEMU=${QEMUS[0]} "$LABSH" up 2 >/dev/null
section_out() {   # section_out SECTION TITLE: its block per QEMU, if it ran
    [ -f "$OUT/$1.${QEMUS[0]}" ] || return 0
    echo "-- $2"
    for q in "${QEMUS[@]}"; do echo "  [QEMU $q]"; sed 's/^/  /' "$OUT/$1.$q"; done
}
section_out pause "guest pause: source STOP to target RESUME (QEMU's event timestamps), per way of waiting for the end"
section_out postcopy "post-copy: a guest that dirties memory twice as fast as the link carries, pre-copy against --postcopy auto"
section_out throughput "throughput: the same 1 GiB guest (every page holds data, no dirtying) over the tunnel and over a local UNIX socket"
section_out mirror "disk mirror: a 1 GiB local disk full of data through the tunnel's NBD forward and to an NBD export on the same node"

# the summary: one figure per QEMU from the sections' output above
fig() { [ -f "$1" ] || return 0; sed -n "$2" "$1" | head -n1; }   # fig FILE SED-SCRIPT: the first line it prints
# the events-mode (the driver's) row of one guest in bench-pause's table: "pause / downtime"
pause_fig() {
    [ -f "$1" ] || return 0
    awk -v g="$2" '/guest that/ { cur = index($0, g) > 0 } cur && /events \(new default\)/ {
        printf "%s %s / %s %s", $4, $5, $9, $10; exit }' "$1"
}
f_pause_dirty() { pause_fig "$OUT/pause.$1" 'keeps dirtying its memory:'; }
f_pause_disk() { pause_fig "$OUT/pause.$1" 'local disk, target with the series'; }
f_pause_disk_released() { pause_fig "$OUT/pause.$1" 'local disk, target as released'; }
f_postcopy() { fig "$OUT/postcopy.$1" 's/.*--postcopy auto: completed in \([0-9.]* s\) (\([0-9.]*\) x.*/\1 (\2 x)/p'; }
f_postcopy_pause() { fig "$OUT/postcopy.$1" 's/.*--postcopy auto: .*; pause \([0-9]* ms\) (QEMU downtime \([0-9]* ms\).*/\1 \/ \2/p'; }
f_tunnel() { fig "$OUT/throughput.$1" "s/.*tunnel, ssh's default cipher[^:]*: *\\([0-9]* MiB\\/s\\).*/\\1/p"; }
f_tunnel_aes() { fig "$OUT/throughput.$1" 's/.*tunnel, AES-GCM through the ciphers option[^:]*: *\([0-9]* MiB\/s\).*/\1/p'; }
f_aes_ratio() { fig "$OUT/throughput.$1" 's/.*AES-GCM\/ssh-default = \([0-9.]*\).*/\1/p'; }
f_local() { fig "$OUT/throughput.$1" 's/.*local UNIX socket, no ssh: *\([0-9]* MiB\/s\).*/\1/p'; }
f_mirror() { fig "$OUT/mirror.$1" 's/.*mirror through the tunnel (driver): *\([0-9]* MiB\/s\).*/\1/p'; }
f_mirror_local() { fig "$OUT/mirror.$1" 's/.*mirror to a local NBD export: *\([0-9]* MiB\/s\).*/\1/p'; }
echo "-- QEMU ${QEMUS[*]} side by side (from the sections above, all measured in this run)"
printf '  %-46s' ''; for q in "${QEMUS[@]}"; do printf ' %22s' "QEMU $q"; done; echo
for r in 'f_pause_dirty:RAM: pause / QEMU downtime (dirty guest)' \
         'f_pause_disk:disk, nbdstop in the tunnel: pause / downtime' \
         'f_pause_disk_released:disk, qm nbdstop over ssh: pause / downtime' \
         "f_tunnel:RAM through the tunnel (ssh's default cipher)" \
         'f_tunnel_aes:RAM through the tunnel (ciphers=AES-GCM)' 'f_aes_ratio:AES-GCM / ssh default' \
         'f_local:RAM over a local UNIX socket' \
         'f_mirror:disk mirror through the tunnel' 'f_mirror_local:disk mirror to a local NBD export' \
         'f_postcopy:--postcopy auto: time (x one RAM transfer)' \
         'f_postcopy_pause:--postcopy auto: pause / QEMU downtime'; do
    printf '  %-46s' "${r#*:}"
    for q in "${QEMUS[@]}"; do v=$("${r%%:*}" "$q" || true); printf ' %22s' "${v:-n/a}"; done
    echo
done

[ -n "${MTUNNEL_BENCH_QEMU_ONLY:-}" ] && exit 0

echo "-- upstream's QemuMigrate.pm on the lab: the guest's pause, qemu-server as released against with the series"
"$TOP/lab/bench-upstream-pause" --runs 5

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

echo "-- 48 parallel migrations against a hardened or busy sshd (node2: MaxStartups 2:50:4) and the stock one"
echo "   old: 8 fixed handshake slots, 4 retries, the target's sockets removed by a second connection at close"
old_args=(--arg=--ssh-option --arg=adaptive_slots=0 --arg=--ssh-option --arg=connect_retries=4
    --arg=--tunnel-option --arg=cleanup_in_command=0)
for sshd in stock contended; do
    if [ "$sshd" = contended ]; then "$LABSH" sshd node2 MaxStartups 2:50:4; else "$LABSH" sshd node2; fi
    for way in old new; do
        drops0=$(grep -c 'drop connection' "$LAB/node2/sshd.log" || true)
        if [ "$way" = old ]; then args=("${old_args[@]}"); else args=(); fi
        line=$("$TOP/lab/parallel-migrate" 48 --vmid-base 5000 "${args[@]}" || true)
        drops=$(($(grep -c 'drop connection' "$LAB/node2/sshd.log" || true) - drops0))
        echo "$line" | sed "1s/^/$sshd sshd, $way: /; 1s/\$/ (sshd dropped $drops handshakes)/; s/^/  /"
    done
done
"$LABSH" sshd node2

# ssh connection sharing against a connection per use (docs/sharing.md)
"$TOP/lab/bench-sharing"
