#!/bin/bash
# mtunnel lab: a multi-node test bed on this machine (see lab/README.md).
#
#   lab/lab.sh up [NODES]          (default 2) - first tears down stale state of the same lab
#   lab/lab.sh down                idempotent; works after a crash or a partial up
#   lab/lab.sh exec NODE CMD...    run CMD in NODE's network + mount namespaces
#   lab/lab.sh status
#   lab/lab.sh sshd NODE [KEYWORD VALUE]...   sshd options of NODE (e.g. MaxStartups 2:50:4)
#
# Environment: MTUNNEL_LAB (lab name, default "default"; [A-Za-z0-9_], so that two
# labs can coexist), MTUNNEL_LAB_ACCEL (auto|kvm|tcg: default accelerator of the
# VMs that lab/qm starts, written to $LAB/env; a VM config's "accel:" wins),
# MTUNNEL_LAB_KEEP_BASHRC=1 (keep the host's /root/.bashrc visible on the nodes),
# MTUNNEL_LAB_QEMU (the nodes' QEMU: 10.0 (default, what PVE 9 runs) or 7.2 (Debian 12's);
# a comma list gives node1, node2, ... their own, the last one repeating: "7.2,10.0" is a
# cluster being upgraded; written to $LAB/env as LAB_nodeI_QEMU),
# MTUNNEL_LAB_PVE=PROG (a Proxmox VE lab, lab/upstream/README.md: the nodes' qm, pvesm and
# pvecm run PROG NAME ARGS... instead of the lab's stand-ins, and each node gets its own /run,
# a copy-on-write /etc, /var and /usr (changes kept in a tmpfs of the node), the lab's pve/ as
# /etc/pve (/etc/pve/local: the node's directory), /var/lib/vz on its "local" storage,
# /etc/hosts naming the nodes, an ssh client config with the lab's key; LAB_PVE=1 in $LAB/env).
#
# Node i = "node$i": network namespace mtl-NAME-n$i with eth0 198.18.0.$i/24 (cluster
# network) and eth1 198.19.0.$i/24 (migration network), each on its own bridge in namespace
# mtl-NAME-br; a persistent mount namespace
# ($LAB/node$i/mnt) with private tmpfs on /run/qemu-server and /usr/local/sbin
# (wrappers qm, qmp, guest-check) and a read-only overlay on /usr/sbin that adds
# /usr/sbin/qm and /usr/sbin/pvesm (PVE runs `/usr/sbin/qm mtunnel`), its QEMU (10.0: the
# wrapper of lab/setup-qemu bind-mounted over /usr/bin/qemu-system-x86_64), and the node's own
# storages: tmpfs on $LAB/local ("local") and $LAB/small ("small", 1 MiB); an sshd on 198.18.0.$i:22 with the
# lab's own config and keys. VM configs in pmxcfs's layout,
# $LAB/pve/nodes/nodeI/qemu-server/VMID.conf. State: /run/mtunnel-lab/NAME ($LAB). No traffic leaves the
# lab's namespaces; addresses are from 198.18.0.0/15 only.

set -euo pipefail

LAB_SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
NAME=${MTUNNEL_LAB:-default}
BASE=/run/mtunnel-lab
LAB=$BASE/$NAME
PFX=mtl-$NAME
NS_BR=$PFX-br
LOCK=/run/mtunnel-lab.lock
MAX_NODES=50
LOCKED=0

die() { echo "lab.sh: error: $*" >&2; exit 1; }
log() { echo "lab[$NAME]: $*" >&2; }

[[ $NAME =~ ^[A-Za-z0-9_]{1,20}$ ]] || die "invalid MTUNNEL_LAB '$NAME' (1-20 chars of [A-Za-z0-9_])"

ns_node() { echo "$PFX-n$1"; }
ip_node() { echo "198.18.0.$1"; }
ip_migration() { echo "198.19.0.$1"; }   # the migration network (eth1)

lock() {
    [ "$LOCKED" = 1 ] && return 0
    exec 9>>"$LOCK"
    flock -w 300 9 || die "cannot lock $LOCK"
    LOCKED=1
}

is_mountpoint() {   # exact mount point in our mount namespace
    awk -v p="$1" '$5 == p { found = 1 } END { exit !found }' /proc/self/mountinfo
}

now() { date +%s.%N; }

# ---------------------------------------------------------------- exec

# setns(mnt) resets the cwd to / : go back to the caller's cwd (if it exists there)
EXEC_SH='cd "$1" 2>/dev/null || cd /; shift
case ":$PATH:" in *:/usr/local/sbin:*) ;; *) PATH=/usr/local/sbin:$PATH; export PATH;; esac
exec "$@"'

# node_exec N CMD... : run in node N's namespaces (cwd kept, PATH has /usr/local/sbin)
node_exec() {
    local i=$1; shift
    nsenter --net="/run/netns/$(ns_node "$i")" --mount="$LAB/node$i/mnt" -- \
        /bin/sh -c "$EXEC_SH" lab-exec "$PWD" "$@" 9>&-
}

node_index() {   # node1 | 1 -> 1
    local n=$1
    n=${n#node}
    [[ $n =~ ^[0-9]+$ ]] || die "invalid node '$1' (want nodeN)"
    echo $((10#$n))
}

cmd_exec() {
    [ $# -ge 2 ] || die "usage: lab.sh exec NODE CMD..."
    local i
    i=$(node_index "$1"); shift
    [ -e "/run/netns/$(ns_node "$i")" ] && [ -e "$LAB/node$i/mnt" ] ||
        die "node$i of lab '$NAME' is not up"
    # exec all the way down (nsenter, sh): the pid of `lab.sh exec` is CMD's pid
    exec nsenter --net="/run/netns/$(ns_node "$i")" --mount="$LAB/node$i/mnt" -- \
        /bin/sh -c "$EXEC_SH" lab-exec "$PWD" "$@"
}

# ---------------------------------------------------------------- down

# lab netns names (from ip netns: works even when $LAB is gone)
lab_netns() {
    ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$PFX-(n[0-9]+|br)\$" || true
}

lab_node_indices() {
    {
        lab_netns | sed -n "s/^$PFX-n\([0-9]*\)\$/\1/p"
        for d in "$LAB"/node*; do
            [ -d "$d" ] && basename "$d" | sed -n 's/^node\([0-9]*\)$/\1/p'
        done
    } | sort -un
}

ns_inode() { stat -L -c %i "$1" 2>/dev/null || true; }

# the pids that must survive: this script and its ancestors
ancestors() {
    local p=$$
    while [ -n "$p" ] && [ "$p" -gt 1 ] 2>/dev/null; do
        echo "$p"
        p=$(awk '/^PPid:/ {print $2}' "/proc/$p/status" 2>/dev/null || true)
    done
}

alive() {   # pid exists and is no zombie
    local st
    st=$(awk '{ sub(/^.*\) /, ""); print $1 }' "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

collect_pids() {
    local netns_ino=() mnt_ino=() ns f pid i
    for ns in $(lab_netns); do
        f=/run/netns/$ns
        mountpoint -q "$f" 2>/dev/null || continue    # not (yet) a namespace
        netns_ino+=("$(ns_inode "$f")")
        ip netns pids "$ns" 2>/dev/null || true
    done
    for i in $(lab_node_indices); do
        f=$LAB/node$i/mnt
        mountpoint -q "$f" 2>/dev/null && mnt_ino+=("$(ns_inode "$f")")
        # daemons the lab started (pidfiles), checked against their command line
        for f in "$LAB/node$i/sshd.pid" "$LAB"/node"$i"/qemu-*.pid; do
            [ -f "$f" ] || continue
            pid=$(head -c 20 "$f" | tr -dc 0-9)
            [ -n "$pid" ] || continue
            if { tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null | grep -qF "$LAB/"; then
                echo "$pid"
            fi
        done
    done
    # safety net: anything living in one of the lab's namespaces
    if [ ${#netns_ino[@]} -gt 0 ] || [ ${#mnt_ino[@]} -gt 0 ]; then
        find /proc/[0-9]*/ns -maxdepth 1 \( -name net -o -name mnt \) -printf '%h %l\n' 2>/dev/null |
            awk -v want="${netns_ino[*]:-} ${mnt_ino[*]:-}" '
                BEGIN { n = split(want, w, " "); for (j = 1; j <= n; j++) if (w[j] ~ /^[0-9]+$/) set[w[j]] = 1 }
                {
                    ino = $2; gsub(/^[a-z]+:\[|\]$/, "", ino)
                    if (ino ~ /^[0-9]+$/ && (ino in set)) { split($1, p, "/"); print p[3] }
                }'
    fi
}

kill_lab_procs() {
    local keep pids=() p sig round
    keep=" 1 2 $BASHPID $(ancestors | tr '\n' ' ') "
    for sig in TERM KILL; do
        pids=()
        for p in $(collect_pids | sort -un); do
            case "$keep" in *" $p "*) continue;; esac
            alive "$p" && pids+=("$p")
        done
        [ ${#pids[@]} -eq 0 ] && return 0
        [ $sig = KILL ] && log "down: SIGKILL to ${pids[*]}"
        kill -s $sig "${pids[@]}" 2>/dev/null || true
        for round in $(seq 100); do      # up to 5 s
            local left=0
            for p in "${pids[@]}"; do alive "$p" && left=1 && break; done
            [ $left = 0 ] && break
            sleep 0.05
        done
    done
    for p in "${pids[@]}"; do
        alive "$p" && log "down: warning: pid $p survived SIGKILL"
    done
    return 0
}

do_down() (
    set +e
    kill_lab_procs
    local i f ns m
    # mount namespaces: drop the bind mounts that keep them alive
    for i in $(lab_node_indices); do
        f=$LAB/node$i/mnt
        for _ in 1 2 3; do
            mountpoint -q "$f" 2>/dev/null || break
            umount "$f" 2>/dev/null || umount -l "$f" 2>/dev/null
        done
    done
    # anything else still mounted under $LAB (should be nothing)
    awk -v p="$LAB/" 'index($5, p) == 1 {print $5}' /proc/self/mountinfo | sort -r |
        while read -r m; do umount -l "$m" 2>/dev/null; done
    for ns in $(lab_netns); do
        ip netns del "$ns" 2>/dev/null && continue
        # a plain file left from a reboot (/run on disk) is no namespace any more
        mountpoint -q "/run/netns/$ns" 2>/dev/null || { rm -f "/run/netns/$ns"; continue; }
        log "down: warning: cannot delete netns $ns"
    done
    if [ -d "$LAB" ]; then
        case "$LAB" in
            /run/mtunnel-lab/?*) rm -rf --one-file-system "$LAB" ;;
        esac
        [ -e "$LAB" ] && log "down: warning: $LAB not removed"
    fi
    # last lab gone: undo the global bits we created
    if [ -d "$BASE" ] && [ -z "$(ls -A "$BASE" | grep -v '^\.created-')" ]; then
        if [ -e "$BASE/.created-run-sshd" ]; then
            rmdir /run/sshd 2>/dev/null; rm -f "$BASE/.created-run-sshd"
        fi
        if [ -e "$BASE/.created-run-qemu-server" ]; then
            rmdir /run/qemu-server 2>/dev/null; rm -f "$BASE/.created-run-qemu-server"
        fi
        for _ in 1 2 3; do
            is_mountpoint "$BASE" || break
            umount "$BASE" 2>/dev/null || umount -l "$BASE" 2>/dev/null
        done
        is_mountpoint "$BASE" || rmdir "$BASE" 2>/dev/null
    fi
    return 0
)

cmd_down() {
    [ $# -eq 0 ] || die "usage: lab.sh down"
    lock
    do_down
    log "down"
}

# ---------------------------------------------------------------- up

need_tools() {
    local t missing=()
    for t in ip ping nsenter unshare mount umount mountpoint flock nasm perl \
             /usr/sbin/sshd /usr/bin/ssh ssh-keygen qemu-system-x86_64 truncate; do
        command -v "$t" >/dev/null 2>&1 || missing+=("$t")
    done
    [ ${#missing[@]} -eq 0 ] || die "missing tools: ${missing[*]} (run lab/setup-packages)"
    [ "$(id -u)" = 0 ] || die "must run as root"
}

ensure_base() {
    mkdir -p "$BASE"
    # nsfs bind mounts (unshare --mount=FILE) need a non-shared parent mount
    if ! is_mountpoint "$BASE"; then
        mount --bind "$BASE" "$BASE"
    fi
    mount --make-private "$BASE"
    if [ ! -d /run/sshd ]; then       # sshd's privilege separation directory
        mkdir -m 0755 /run/sshd && touch "$BASE/.created-run-sshd"
    fi
    if [ ! -d /run/qemu-server ]; then   # only a mount point for the nodes' tmpfs
        mkdir -m 0755 /run/qemu-server && touch "$BASE/.created-run-qemu-server"
    fi
}

no_ipv6() {   # only 198.18.0.0/15 addresses in the lab: no IPv6 link-local either
    nsenter --net="/run/netns/$1" -- /bin/sh -c '
        [ -d /proc/sys/net/ipv6 ] || exit 0
        echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6
        echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6'
}

# runs inside a node's new mount namespace (sh): $1=LAB $2=index $3=LAB_SRC $4=the node's
# QEMU binary when it is not Debian's /usr/bin/qemu-system-x86_64 (else empty) $5=the
# program of a PVE lab's qm, pvesm and pvecm (MTUNNEL_LAB_PVE; else empty) $6=the node count
NODE_MNT_SETUP='
set -eu
LAB=$1 i=$2 SRC=$3 QEMU=$4 PVE=$5 NODES=$6
# copies of namespace bind mounts (other nodes/labs, /run/netns/*) would keep
# those namespaces alive after their lab is down: drop them in this namespace
awk "\$0 ~ / - nsfs / {print \$5}" /proc/self/mountinfo | while read -r m; do
    umount -l "$m" 2>/dev/null || true
done
mount -t tmpfs -o mode=0755,size=50% mtl-qemu-server /run/qemu-server
# node-local storages (lab/LabStorage.pm): the same path on every node, a different tmpfs
# in each node, so no other node sees them; "small" is for storage-full tests
mount -t tmpfs -o mode=0755,size=4g mtl-local "$LAB/local"
mount -t tmpfs -o mode=0755,size=1m mtl-small "$LAB/small"
if [ ! -d /usr/local/sbin ]; then
    # no /usr/local/sbin on this host: never create it there - overlay /usr/local
    # in this namespace only, the upper layer on a tmpfs
    [ -d /usr/local ] || { echo "no /usr/local" >&2; exit 1; }
    o=$LAB/node$i/.ovl
    mkdir -p "$o"
    mount -t tmpfs -o mode=0755 mtl-ovl "$o"
    mkdir "$o/upper" "$o/work"
    mount -t overlay -o "lowerdir=/usr/local,upperdir=$o/upper,workdir=$o/work" mtl-usr-local /usr/local
    mkdir -m 0755 /usr/local/sbin
fi
# a neutral root ~/.bashrc, as on a PVE host: the host one (pyenv init, cargo env)
# would run for every remote command (+0.17 s each); MTUNNEL_LAB_KEEP_BASHRC=1 keeps it
if [ -f /root/.bashrc ] && [ "${MTUNNEL_LAB_KEEP_BASHRC:-0}" != 1 ]; then
    printf "%s\n" "# mtunnel lab node (lab.sh): the host root bashrc is hidden in this mount namespace" \
        "[ -z \"\${PS1:-}\" ] && return" > "$LAB/node$i/bashrc"
    mount --bind "$LAB/node$i/bashrc" /root/.bashrc
fi
s=$LAB/node$i/.sbin
mkdir -p "$s"
mount -t tmpfs -o mode=0755 mtl-sbin "$s"
cp -a /usr/local/sbin/. "$s/"
for t in qm qmp guest-check pvesm; do
    # the copy may hold a symlink of the host by that name: never write through it
    rm -f "$s/$t"
    printf "#!/bin/sh\nexec env MTUNNEL_LAB_DIR=%s MTUNNEL_LAB_NODE=node%s perl %s/%s \"\$@\"\n" \
        "$LAB" "$i" "$SRC" "$t" > "$s/$t"
    chmod 0755 "$s/$t"
done
pve_cmds=
if [ -n "$PVE" ]; then
    # a PVE lab: the commands of PVE itself (lab/upstream/README.md)
    pve_cmds=pvecm
    for t in qm pvesm pvecm; do
        rm -f "$s/$t"
        printf "#!/bin/sh\nexec env MTUNNEL_LAB_DIR=%s MTUNNEL_LAB_NODE=node%s %s %s \"\$@\"\n" \
            "$LAB" "$i" "$PVE" "$t" > "$s/$t"
        chmod 0755 "$s/$t"
    done
fi
# PVE runs the tunnel as /usr/sbin/qm: the same wrapper there, by a read-only overlay of
# /usr/sbin in this namespace (two lower layers, no upper): nothing is written to the host
u=$LAB/node$i/.usrsbin
mkdir -p "$u"
mount -t tmpfs -o mode=0755,size=1m mtl-usrsbin "$u"
cp -p "$s/qm" "$s/pvesm" ${pve_cmds:+"$s/$pve_cmds"} "$u/"
mount -t overlay -o "lowerdir=$u:/usr/sbin" mtl-usr-sbin /usr/sbin
mount --move "$s" /usr/local/sbin
# this node QEMU, for every program on it (lab/qm, the vm_start of upstream): a read-only bind
# mount over the binary in this namespace only
if [ -n "$QEMU" ]; then
    mount --bind "$QEMU" /usr/bin/qemu-system-x86_64
    mount -o remount,bind,ro /usr/bin/qemu-system-x86_64
fi
[ -n "$PVE" ] || exit 0
# A PVE node (MTUNNEL_LAB_PVE): what PVE writes outside the lab stays in this namespace
p=$LAB/node$i/.pve
mkdir -p "$p"
mount -t tmpfs -o mode=0755,size=64m mtl-pve "$p"
mkdir "$p/etc" "$p/etc.work" "$p/var" "$p/var.work" "$p/usr" "$p/usr.work"
# a /run of its own (config locks, port reservations, ...), with the lab state and this node
# /run/qemu-server in it; the old /run stays reachable through the cwd
cd /run
mount -t tmpfs -o mode=0755,size=64m mtl-run /run
mkdir -m 0755 /run/mtunnel-lab /run/qemu-server /run/sshd
mkdir -m 1777 /run/lock
mount --no-canonicalize --rbind ./mtunnel-lab /run/mtunnel-lab
mount --no-canonicalize --rbind ./qemu-server /run/qemu-server
cd /
# copy-on-write /etc, /var and /usr (PVE installs files there); mount points below them (the
# node /usr/sbin, its QEMU, a container bind-mounting /etc/hosts) mounted again over the
# overlay, except where the node gets its own
for d in etc var usr; do
    subs=$(awk -v d="/$d/" "index(\$5, d) == 1 {print \$5}" /proc/self/mountinfo)
    cd "/$d"
    mount -t overlay -o "lowerdir=/$d,upperdir=$p/$d,workdir=$p/$d.work" "mtl-$d" "/$d"
    for m in $subs; do
        case $m in /etc/hosts | /etc/ssh/ssh_config | /etc/pve | /etc/pve/* | /var/lib/vz | /var/lib/vz/*) continue ;; esac
        if [ -e "$m" ]; then mount --no-canonicalize --bind ".${m#/$d}" "$m"; fi
    done
    cd /
done
rm -f /etc/hosts /etc/ssh/ssh_config /etc/pve-local
n=1
{
    echo "127.0.0.1 localhost"
    while [ "$n" -le "$NODES" ]; do echo "198.18.0.$n node$n"; n=$((n + 1)); done
} >/etc/hosts
mkdir -p /etc/ssh /etc/pve /var/lib/vz
printf "%s\n" "# mtunnel lab node (lab.sh): ssh with the lab key" "Host *" \
    "    IdentityFile $LAB/id_ed25519" "    IdentitiesOnly yes" >/etc/ssh/ssh_config
# /etc/pve/local is a link to /etc/pve-local, which is this node directory
ln -s "/etc/pve/nodes/node$i" /etc/pve-local
mount --bind "$LAB/pve" /etc/pve
mount --bind "$LAB/local" /var/lib/vz
'

# A PVE node's /sys (node_exec, in its network namespace): a sysfs mounted there shows the
# node's network devices (PVE looks for its bridges and taps in /sys/class/net); the mounts
# below /sys (cgroups, ...) mounted again over it from the old /sys, reached through the cwd
NODE_SYSFS_SETUP='
set -eu
subs=$(awk "index(\$5, \"/sys/\") == 1 {print \$5}" /proc/self/mountinfo)
cd /sys
mount -t sysfs mtl-sys /sys
done=
for m in $subs; do
    case " $done " in *" ${m%/*} "* | *" ${m%/*/*} "*) continue ;; esac
    if [ -e "$m" ]; then mount --no-canonicalize --rbind ".${m#/sys}" "$m"; fi
    done="$done $m"
done
'

# write_sshd_config N [KEYWORD VALUE]... : the node's sshd_config, extra options at the end
# (written to a temp name of ours and renamed over the file)
write_sshd_config() {
    local i=$1 d=$LAB/node$1
    shift
    rm -f "$d/sshd_config.tmp"
    {
    cat <<EOF
# mtunnel lab sshd for node$i (generated by lab/lab.sh; no Include of /etc/ssh)
# both addresses, as a PVE node's sshd: QemuMigrate.pm reaches a target over the
# migration network when one is set (PVE::SSHInfo)
ListenAddress $(ip_node "$i")
ListenAddress $(ip_migration "$i")
Port 22
AddressFamily inet
HostKey $d/ssh_host_ed25519_key
PidFile $d/sshd.pid
AuthorizedKeysFile $LAB/authorized_keys
StrictModes no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitUserRC no
PermitUserEnvironment no
AcceptEnv none
X11Forwarding no
PrintMotd no
PrintLastLog no
UseDNS no
LogLevel VERBOSE
EOF
    while [ $# -ge 2 ]; do
        printf '%s %s\n' "$1" "$2"
        shift 2
    done
    } >"$d/sshd_config.tmp"
    mv -f "$d/sshd_config.tmp" "$d/sshd_config"
}

# lab.sh sshd NODE [KEYWORD VALUE]... : rewrite the node's sshd_config with these options
# (none: the stock lab config), check it, and make the running sshd reread it (SIGHUP: it
# re-executes itself); returns once it listens again. E.g. a contended sshd:
#   lab.sh sshd node2 MaxStartups 2:50:4
cmd_sshd() {
    [ $# -ge 1 ] && [ $(($# % 2)) -eq 1 ] || die "usage: lab.sh sshd NODE [KEYWORD VALUE]..."
    local i pid before n k
    i=$(node_index "$1"); shift
    [ -f "$LAB/node$i/sshd.pid" ] || die "node$i of lab '$NAME' is not up"
    for k in "$@"; do
        [[ $k =~ ^[A-Za-z0-9:.,_/-]+$ ]] || die "invalid sshd option word '$k'"
    done
    write_sshd_config "$i" "$@"
    if ! /usr/sbin/sshd -t -f "$LAB/node$i/sshd_config"; then
        write_sshd_config "$i"    # the stock config back: the running sshd never saw it
        die "node$i: sshd refuses the options: $*"
    fi
    pid=$(cat "$LAB/node$i/sshd.pid")
    alive "$pid" || die "node$i: sshd (pid $pid) is not running"
    before=$(grep -c 'Server listening on' "$LAB/node$i/sshd.log" || true)
    kill -HUP "$pid"
    for n in $(seq 100); do
        [ "$(grep -c 'Server listening on' "$LAB/node$i/sshd.log" || true)" -gt "$before" ] && return 0
        sleep 0.05
    done
    die "node$i: sshd did not listen again within 5 s after SIGHUP"
}

cmd_up() {
    local n=${1:-2} t0 i ns ipaddr
    [ $# -le 1 ] || die "usage: lab.sh up [NODES]"
    [[ $n =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le $MAX_NODES ] ||
        die "NODES must be 1..$MAX_NODES"
    local accel=${MTUNNEL_LAB_ACCEL:-auto}
    local pve=${MTUNNEL_LAB_PVE:-}
    [ -z "$pve" ] || [[ $pve =~ ^/[A-Za-z0-9_./+-]+$ && -x $pve ]] ||
        die "MTUNNEL_LAB_PVE must be the absolute path of an executable, not '$pve'"
    [[ $accel =~ ^(auto|kvm|tcg)$ ]] || die "MTUNNEL_LAB_ACCEL must be auto, kvm or tcg"
    local qemus=${MTUNNEL_LAB_QEMU:-10.0} v
    local -a node_qemu node_qemu_bin
    [[ $qemus =~ ^[0-9.]+(,[0-9.]+)*$ ]] ||
        die "MTUNNEL_LAB_QEMU must be 10.0 or 7.2, or a comma list of them (one per node), not '$qemus'"
    IFS=, read -r -a node_qemu <<<"$qemus"
    [ ${#node_qemu[@]} -le "$n" ] ||
        die "MTUNNEL_LAB_QEMU names ${#node_qemu[@]} QEMUs for $n nodes"
    for i in $(seq "$n"); do
        v=${node_qemu[$((i - 1))]:-${node_qemu[-1]}}
        case $v in
            10.0) node_qemu_bin[i]=$("$LAB_SRC/setup-qemu" --path) ||
                die "QEMU 10.0 is not installed (run lab/setup-packages)" ;;
            7.2) node_qemu_bin[i]= ;;
            *) die "MTUNNEL_LAB_QEMU: no QEMU '$v' in the lab (10.0 or 7.2)" ;;
        esac
        node_qemu[i - 1]=$v
    done
    need_tools
    lock
    t0=$(now)
    do_down
    trap 'rc=$?; if [ $rc -ne 0 ]; then log "up failed - tearing down"; do_down; fi' EXIT

    ensure_base
    mkdir -m 0700 "$LAB"
    # pmxcfs's layout: each VM's config in the directory of the node that owns it
    # (pve/nodes/nodeI/qemu-server/VMID.conf, moved by rename); qm's config locks in pve/lock
    mkdir -p "$LAB/pve/lock"
    for i in $(seq "$n"); do mkdir -p "$LAB/pve/nodes/node$i/qemu-server"; done
    # a PVE lab: pmxcfs's per-node link, here to /etc/pve-local, which each node has its own of
    [ -z "$pve" ] || ln -s /etc/pve-local "$LAB/pve/local"
    # mount points of the node-local storages (an empty directory on the host)
    mkdir -m 0755 "$LAB/local" "$LAB/small"

    # guest image: the boot sector in a 1 MiB raw disk
    nasm -f bin -o "$LAB/guest.bin" "$LAB_SRC/guest/guest.asm"
    [ "$(stat -c %s "$LAB/guest.bin")" = 512 ] || die "guest.bin is not 512 bytes"
    cp "$LAB/guest.bin" "$LAB/guest.img"
    truncate -s 1M "$LAB/guest.img"
    # idle variant: writes the pattern once, then halts (VM config "guest: idle")
    nasm -f bin -DIDLE -o "$LAB/guest-idle.bin" "$LAB_SRC/guest/guest.asm"
    cp "$LAB/guest-idle.bin" "$LAB/guest-idle.img"
    truncate -s 1M "$LAB/guest-idle.img"
    # disk variant: also keeps writing its disk (VM config "guest: disk")
    nasm -f bin -DDISK -o "$LAB/guest-disk.bin" "$LAB_SRC/guest/guest.asm"
    cp "$LAB/guest-disk.bin" "$LAB/guest-disk.img"
    truncate -s 1M "$LAB/guest-disk.img"
    # hot variant: rewrites a working set at a set rate (VM config "guest: hot", "hot: W:R")
    nasm -f bin -DHOT -o "$LAB/guest-hot.bin" "$LAB_SRC/guest/guest.asm"
    cp "$LAB/guest-hot.bin" "$LAB/guest-hot.img"
    truncate -s 1M "$LAB/guest-hot.img"

    # client key
    ssh-keygen -q -t ed25519 -N '' -C "mtunnel-lab-$NAME" -f "$LAB/id_ed25519"
    cp "$LAB/id_ed25519.pub" "$LAB/authorized_keys"
    chmod 0600 "$LAB/authorized_keys"
    : >"$LAB/known_hosts"

    # network: a bridge in its own namespace, one veth per node
    ip netns add "$NS_BR"
    no_ipv6 "$NS_BR"
    ip -n "$NS_BR" link set lo up
    ip -n "$NS_BR" link add br0 type bridge
    ip -n "$NS_BR" link set br0 up
    ip -n "$NS_BR" link add br1 type bridge
    ip -n "$NS_BR" link set br1 up
    for i in $(seq "$n"); do
        ns=$(ns_node "$i")
        ipaddr=$(ip_node "$i")
        mkdir "$LAB/node$i"
        : >"$LAB/node$i/qm-start.log"    # one line per qm start on the node (lab/qm)
        ip netns add "$ns"
        no_ipv6 "$ns"
        ip -n "$ns" link set lo up
        ip -n "$NS_BR" link add "veth$i" type veth peer name eth0 netns "$ns"
        ip -n "$NS_BR" link set "veth$i" master br0
        ip -n "$NS_BR" link set "veth$i" up
        ip -n "$ns" addr add "$ipaddr/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$NS_BR" link add "mveth$i" type veth peer name eth1 netns "$ns"
        ip -n "$NS_BR" link set "mveth$i" master br1
        ip -n "$NS_BR" link set "mveth$i" up
        ip -n "$ns" addr add "$(ip_migration "$i")/24" dev eth1
        ip -n "$ns" link set eth1 up

        # persistent mount namespace
        touch "$LAB/node$i/mnt"
        unshare --mount="$LAB/node$i/mnt" --propagation private -- \
            /bin/sh -c "$NODE_MNT_SETUP" node-setup "$LAB" "$i" "$LAB_SRC" "${node_qemu_bin[i]}" \
            "$pve" "$n" 9>&- ||
            die "node$i: mount namespace setup failed"
        [ -z "$pve" ] || node_exec "$i" /bin/sh -c "$NODE_SYSFS_SETUP" ||
            die "node$i: /sys setup failed"
        node_exec "$i" /usr/bin/qemu-system-x86_64 -version | grep -q "version ${node_qemu[i - 1]}[.(]" ||
            die "node$i: /usr/bin/qemu-system-x86_64 is not QEMU ${node_qemu[i - 1]}: $(node_exec "$i" /usr/bin/qemu-system-x86_64 -version | head -1)"

        # sshd
        ssh-keygen -q -t ed25519 -N '' -C "node$i" -f "$LAB/node$i/ssh_host_ed25519_key"
        echo "node$i,$ipaddr $(cut -d' ' -f1,2 "$LAB/node$i/ssh_host_ed25519_key.pub")" >>"$LAB/known_hosts"
        write_sshd_config "$i"
        /usr/sbin/sshd -t -f "$LAB/node$i/sshd_config" || die "node$i: bad sshd config"
        node_exec "$i" /usr/sbin/sshd -f "$LAB/node$i/sshd_config" -E "$LAB/node$i/sshd.log" \
            </dev/null >/dev/null 2>>"$LAB/node$i/sshd.log" ||
            die "node$i: sshd failed to start (see $LAB/node$i/sshd.log)"

        printf '%s\n' /usr/bin/ssh -e none -o BatchMode=yes -o "HostKeyAlias=node$i" \
            -o "UserKnownHostsFile=$LAB/known_hosts" -o GlobalKnownHostsFile=/dev/null \
            -o IdentitiesOnly=yes -i "$LAB/id_ed25519" -F /dev/null "root@$ipaddr" \
            >"$LAB/ssh_prefix_node$i"
    done

    {
        echo "# mtunnel lab '$NAME' (generated by lab/lab.sh up)"
        echo "MTUNNEL_LAB=$NAME"
        echo "LAB_DIR=$LAB"
        echo "LAB_SRC=$LAB_SRC"
        echo "LAB_NODES=$n"
        echo "LAB_NODE_NAMES='$(for i in $(seq "$n"); do printf 'node%s ' "$i"; done | sed 's/ $//')'"
        echo "LAB_ACCEL=$accel"
        echo "LAB_BRIDGE_NETNS=$NS_BR"
        echo "LAB_MIGRATION_NETWORK=198.19.0.0/24"
        [ -z "$pve" ] || echo "LAB_PVE=1"
        for i in $(seq "$n"); do
            echo "LAB_node${i}_IP=$(ip_node "$i")"
            echo "LAB_node${i}_MIGRATION_IP=$(ip_migration "$i")"
            echo "LAB_node${i}_NETNS=$(ns_node "$i")"
            echo "LAB_node${i}_MNT=$LAB/node$i/mnt"
            echo "LAB_node${i}_QEMU=${node_qemu[i - 1]}"
        done
    } >"$LAB/env"

    # the nodes' /usr/sbin overlay is theirs alone: the host never gets our qm
    ! grep -qs MTUNNEL_LAB_DIR /usr/sbin/qm || die "/usr/sbin/qm of the lab is visible on the host"
    ! grep -qs MTUNNEL_LAB_DIR /usr/sbin/pvesm || die "/usr/sbin/pvesm of the lab is visible on the host"

    # checks: ping every node from node1, then wait until every sshd accepts
    for i in $(seq 2 "$n"); do
        node_exec 1 ping -q -n -c 1 -W 3 "$(ip_node "$i")" >/dev/null ||
            die "ping node1 -> node$i ($(ip_node "$i")) failed"
        node_exec 1 ping -q -n -c 1 -W 3 "$(ip_migration "$i")" >/dev/null ||
            die "ping node1 -> node$i ($(ip_migration "$i"), migration network) failed"
    done
    for i in $(seq "$n"); do
        local ok=0 try prefix
        mapfile -t prefix <"$LAB/ssh_prefix_node$i"
        for try in $(seq 50); do
            if node_exec 1 "${prefix[@]}" -o ConnectTimeout=3 true </dev/null 2>"$LAB/node$i/ssh-check.err"; then
                ok=1; break
            fi
            sleep 0.2
        done
        [ $ok = 1 ] || die "sshd on node$i does not accept: $(tail -3 "$LAB/node$i/ssh-check.err")"
        rm -f "$LAB/node$i/ssh-check.err"
    done

    trap - EXIT
    log "up: $n nodes in $(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }')s, dir $LAB, accel $accel, QEMU $(for i in $(seq "$n"); do printf '%s ' "${node_qemu[i - 1]}"; done | sed 's/ $//')"
}

# ---------------------------------------------------------------- status

cmd_status() {
    if [ ! -f "$LAB/env" ]; then
        echo "lab '$NAME': down"
        [ -n "$(lab_netns)" ] && echo "  stale netns: $(lab_netns | tr '\n' ' ')"
        [ -d "$LAB" ] && echo "  stale dir: $LAB"
        return 0
    fi
    # shellcheck disable=SC1091
    . "$LAB/env"
    echo "lab '$NAME': up, $LAB_NODES nodes, dir $LAB, accel $LAB_ACCEL"
    local i pid f st vms
    for i in $(seq "$LAB_NODES"); do
        st=down
        pid=$(cat "$LAB/node$i/sshd.pid" 2>/dev/null || true)
        [ -n "$pid" ] && alive "$pid" && st="up (pid $pid)"
        vms=""
        for f in "$LAB"/node"$i"/qemu-*.pid; do
            [ -f "$f" ] || continue
            pid=$(cat "$f")
            f=${f##*/qemu-}; f=${f%.pid}
            alive "$pid" && vms="$vms $f(pid $pid)"
        done
        v=LAB_node${i}_QEMU
        echo "  node$i $(ip_node "$i") netns $(ns_node "$i") QEMU ${!v:-7.2} sshd $st vms:${vms:- none}"
    done
}

# ---------------------------------------------------------------- main

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    up) cmd_up "$@" ;;
    down) cmd_down "$@" ;;
    exec) cmd_exec "$@" ;;
    status) cmd_status "$@" ;;
    sshd) cmd_sshd "$@" ;;
    *) die "usage: lab.sh up [NODES] | down | exec NODE CMD... | status | sshd NODE [KEYWORD VALUE]..." ;;
esac
