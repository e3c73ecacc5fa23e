package UpstreamLab;

# Upstream's QemuMigrate.pm on the lab (lab/upstream/qemu-migrate): the source trees, the
# qemu-server tree as released or with the series, the command that runs a migration on a
# node, and what the tests read off the nodes afterwards; a PVE lab (pve_lab: every node runs
# PVE's own qm, lab/upstream/README.md) and the runs of t/upstream/ on it
# (UpstreamLab::Harness).

use strict;
use warnings;

use Cwd qw(abs_path);
use Fcntl qw(O_WRONLY O_CREAT O_EXCL O_NOFOLLOW);
use File::Basename qw(dirname);
use File::Temp qw(tempdir);

use MTunnelLab;

my $TOP = abs_path(dirname(__FILE__) . '/../..');

# ($perl5lib, undef) when every upstream tree is there; (undef, $why) when one is missing.
sub sources {
    my $out = `bash -c '. "$TOP/lab/upstream/sources"
        if upstream_sources_check; then echo "ok \$UPSTREAM_PERL5LIB"; else echo "skip \$UPSTREAM_SKIP"; fi'`;
    chomp $out;
    return ($1, undef) if $out =~ /^ok (.*)$/;
    return (undef, $out =~ /^skip (.*)$/ ? $1 : "lab/upstream/sources failed: $out");
}

# qemu-server's tree in a temporary directory: 'off' as released, 'on' with the whole series.
# MTUNNEL_UPSTREAM_TREE_ON / _OFF name a tree made beforehand instead (lab/upstream/tree DEST
# [N]; e.g. the series at another commit).
sub tree {
    my ($stage) = @_;
    my $given = $ENV{ 'MTUNNEL_UPSTREAM_TREE_' . uc($stage) };
    if ($given) {
        die "$given is not a qemu-server tree\n" if !-f "$given/src/PVE/QemuMigrate.pm";
        return abs_path($given);
    }
    my $dir = tempdir('mtunnel-qemu-server-XXXXXX', TMPDIR => 1, CLEANUP => 1) . "/$stage";
    my @upto = $stage eq 'off' ? (0) : $stage eq 'on' ? () : die "tree: 'on' or 'off'\n";
    my $out = `"$TOP/lab/upstream/tree" "$dir" @upto 2>&1`;
    die "lab/upstream/tree failed: $out" if $? != 0;
    return $dir;
}

# Whether NODE's qm behaves as qemu-server with the series: MTunnelLab's qemu_server_series.
sub series_on_node {
    my ($lab, $node, $on) = @_;
    $lab->qemu_server_series($node, $on);
}

# The argv that runs upstream's migration of VMID from NODE (in NODE: $lab->run or
# $lab->background) with qemu-server's TREE.
sub migrate_command {
    my ($lab, $tree, $perl5lib, $node, @args) = @_;
    my $lib = $ENV{MTUNNEL_LIB} // "$TOP/target/release/libmtunnel.so";
    return (
        'env',
        'MTUNNEL_LAB_DIR=' . $lab->dir,
        "MTUNNEL_LAB_NODE=$node",
        "PERL5LIB=$tree/src:$perl5lib:$TOP/perl/lib:$TOP/lab/upstream/lib",
        'PERL5OPT=-MMTunnelCompiledStandIns',
        "MTUNNEL_LIB=$lib",
        ($lab->{env}->{LAB_PVE} ? ('MTUNNEL_LAB_PVE=1') : ()),
        'perl',
        "$TOP/lab/upstream/qemu-migrate",
        @args,
    );
}

# ------------------------------------------------------------ a PVE lab

# Writes TEXT to PATH (a temp file of ours, renamed over it).
sub write_file {
    my ($path, $text, $mode) = @_;
    my $tmp = "$path.tmp.$$";
    unlink($tmp);
    sysopen(my $fh, $tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, $mode // 0644)
        or die "cannot write $tmp: $!\n";
    print $fh $text;
    close($fh) or die "cannot write $tmp: $!\n";
    rename($tmp, $path) or die "cannot rename $tmp to $path: $!\n";
}

# A lab of Proxmox VE nodes (lab/upstream/README.md, "The PVE lab"): MTunnelLab->up(%opt) with
# every node's qm, pvesm and pvecm PVE's own (lab/upstream/pve-node), and the cluster's files
# in the lab's /etc/pve. Each node runs qemu-server's TREE (node_tree changes it).
sub pve_lab {
    my ($perl5lib, $tree, %opt) = @_;
    my $lab = MTunnelLab->up(%opt, pve => "$TOP/lab/upstream/pve-node");
    my $dir = $lab->dir;
    my $lib = $ENV{MTUNNEL_LIB} // "$TOP/target/release/libmtunnel.so";
    write_file("$dir/upstream.env", "UPSTREAM_PERL5LIB=$perl5lib\nMTUNNEL_LIB=$lib\n");
    node_tree($lab, $_, $tree) for $lab->nodes;

    # /etc/pve as pmxcfs shows it: the storages, root@pam, each node's ssh host key (PVE's ssh
    # checks it against nodes/NODE/ssh_known_hosts), priv/ for cfs locks, the qemu-server link
    my $pve = "$dir/pve";
    mkdir("$pve/priv", 0700) or die "mkdir $pve/priv: $!\n";
    mkdir("$dir/shared") or die "mkdir $dir/shared: $!\n";
    mkdir("$dir/shared/snippets") or die "mkdir $dir/shared/snippets: $!\n";
    write_file("$pve/storage.cfg", <<"END");
dir: local
	path /var/lib/vz
	content images,snippets

dir: shared
	path $dir/shared
	content images,snippets
	shared 1

dir: small
	path $dir/small
	content images
END
    write_file("$pve/user.cfg", "user:root\@pam:1:0::::::\n");
    symlink('local/qemu-server', "$pve/qemu-server") or die "symlink $pve/qemu-server: $!\n";
    my $known = MTunnelLab::slurp("$dir/known_hosts");

    for my $node ($lab->nodes) {
        my ($key) = $known =~ /^\Q$node\E,\S+ (.*)$/m or die "no host key of $node\n";
        write_file("$pve/nodes/$node/ssh_known_hosts", "$node $key\n");
    }
    # each node's bridge vmbr0 for VMs with a NIC, as a PVE node declares it in
    # /etc/network/interfaces, MAC learning off (PVE then keeps static fdb entries for the VMs)
    for my $node ($lab->nodes) {
        $lab->run_ok(
            $node, 'sh', '-ec', 'ip link add vmbr0 type bridge; ip link set vmbr0 up
            rm -f /etc/network/interfaces; mkdir -p /etc/network
            printf "%s\n" "auto lo" "iface lo inet loopback" "" "auto vmbr0" \
                "iface vmbr0 inet manual" "	bridge-ports none" "	bridge-stp off" \
                "	bridge-fd 0" "	bridge-disable-mac-learning 1" >/etc/network/interfaces',
        );
    }
    # the VMs' hookscript (lab/upstream/pve-hook: the lab's run-state log)
    write_file("$dir/shared/snippets/lab-hook",
        "#!/bin/sh\nexec perl $TOP/lab/upstream/pve-hook \"\$@\"\n", 0755);
    return $lab;
}

# NODE runs qemu-server's TREE from now on (the next qm started there), with the files the
# qemu-server package installs outside Perl's tree (QEMU's boot splash, the q35 and USB
# configs, the tap scripts) installed from TREE in the node.
sub node_tree {
    my ($lab, $node, $tree) = @_;
    write_file($lab->dir . "/$node/qemu-server-tree", "$tree\n");
    $lab->run_ok(
        $node, 'sh', '-ec', 'cd "$1/src/usr"
        install -d /usr/share/qemu-server /usr/libexec/qemu-server
        install -m 0644 pve-usb.cfg pve-q35.cfg pve-q35-4.0.cfg bootsplash.jpg /usr/share/qemu-server
        install -m 0755 pve-bridge pve-bridge-hotplug pve-bridgedown /usr/libexec/qemu-server',
        'node-tree', $tree,
    );
}

# A VM's config in a PVE lab, as PVE writes them, for the lab's guest (lab/guest/guest.asm):
# KEY => VALUE pairs on top of what every lab VM has (no KVM assumed: kvm 0; its boot disk
# ide0; no display, tablet or balloon; the lab's run-state log by the hookscript and a second
# QMP monitor). Written where the config is now (node1 for a new VM).
sub pve_vm_config {
    my ($lab, $vmid, %conf) = @_;
    my %base = (
        kvm => 0,
        boot => 'order=ide0',
        vga => 'none',
        tablet => 0,
        balloon => 0,
        hookscript => 'shared:snippets/lab-hook',
        # the lab's run-state log; SeaBIOS's boot menu (PVE's "-boot menu=on") shown 0 ms, not
        # 2.5 s: QEMU merges the two -boot options
        args => "-chardev socket,id=events,path=/run/qemu-server/$vmid.events,server=on,wait=off"
            . ' -mon chardev=events,mode=control -boot splash-time=0',
    );
    return $lab->write_vm_config($vmid, %base, %conf);
}

# Creates VOLID (a "dir" storage's STORE:VMID/NAME.raw) on NODE, SIZE bytes, allocated (a mirror
# copies all of it), with the lab's guest image GUEST (dirty, disk, idle; undef: none) at its
# start, as lab/qm creates a boot disk.
sub create_volume {
    my ($lab, $node, $volid, $size, $guest) = @_;
    my ($store, $vmid, $name) = $volid =~ m!^([a-z]+):(\d+)/(vm-\d+-disk-\d+\.raw)$!
        or die "create_volume: '$volid'\n";
    my $base = $store eq 'local' ? '/var/lib/vz' : $lab->dir . "/$store";
    my $path = "$base/images/$vmid/$name";
    my $image = !defined($guest) ? '' : $guest eq 'dirty' ? 'guest.img' : "guest-$guest.img";
    $lab->run_ok(
        $node, 'sh', '-ec',
        'mkdir -p "$(dirname "$1")"; rm -f "$1.tmp"; : >"$1.tmp"
        [ -z "$2" ] || cat "$2" >"$1.tmp"
        truncate -s "$3" "$1.tmp"; fallocate -l "$3" "$1.tmp"; mv "$1.tmp" "$1"',
        'create-volume', $path, ($image ne '' ? $lab->dir . "/$image" : ''), $size,
    );
    return $path;
}

# The guest's pause of the last migration of VMID from SRC to DST in ms: the source's last STOP
# to the target's first RESUME after it (QEMU's event times, one clock); undef if either is
# missing.
sub pause_ms {
    my ($lab, $src, $dst, $vmid) = @_;
    my ($stop) = reverse grep { $_->{kind} eq 'STOP' } @{ $lab->vm_events($src, $vmid) };
    return undef if !$stop;
    my ($resume) =
        grep { $_->{kind} eq 'RESUME' && $_->{t} > $stop->{t} } @{ $lab->vm_events($dst, $vmid) };
    return undef if !$resume;
    return ($resume->{t} - $stop->{t}) / 1e6;
}

# ------------------------------------------------------------ the harness on a PVE lab

package UpstreamLab::Harness;

# The runs of t/upstream/*.t: upstream's QemuMigrate.pm migrating the lab's guests between PVE
# lab nodes, and the checks every run makes.
#
#   my $h = UpstreamLab::Harness->new(nodes => 2);   # undef and the reason if trees are missing
#   $h->start_vm(100, guest => 'disk', store => 'local');   # on node1, running
#   my $out = $h->migrate_ok('RAM', 100, 'node1', 'node2');  # TASK OK
#   $h->check_vm('RAM', 100, 'node2');   # where it runs, memory (and disk), nothing left
#   $h->remove_vm(100);

use strict;
use warnings;

use Test::More;
use Time::HiRes qw(time);

use MTunnelLab;

my $MEM = 128;

# (harness, undef) or (undef, why not): the upstream trees, qemu-server as released ('off')
# and with the series ('on'), a PVE lab of NODES nodes running the series everywhere.
sub new {
    my ($class, %opt) = @_;
    my ($perl5lib, $skip) = UpstreamLab::sources();
    return (undef, $skip) if $skip;
    my %tree = map { $_ => UpstreamLab::tree($_) } qw(on off);
    my $lab = UpstreamLab::pve_lab($perl5lib, $tree{on}, accel => 'tcg', %opt);
    my $self = bless {
        lab => $lab,
        perl5lib => $perl5lib,
        tree => \%tree,
        node_tree => { map { $_ => 'on' } $lab->nodes },
    }, $class;
    return ($self, undef);
}

sub lab { $_[0]->{lab} }
sub tree { $_[0]->{tree}->{ $_[1] } }

# NODE's qm from now on: qemu-server with the series ('on') or as released ('off')
sub node_series {
    my ($self, $node, $stage) = @_;
    return if $self->{node_tree}->{$node} eq $stage;
    UpstreamLab::node_tree($self->{lab}, $node, $self->tree($stage));
    $self->{node_tree}->{$node} = $stage;
}

# A lab guest as a PVE VM, started on NODE (node1) with qm start, its loop running:
#   guest   dirty (default: keeps writing its memory) | disk (also its disk)
#   store   the boot disk's storage: shared (default, 1 MiB) | local (16 MiB, a local disk)
#   machine the config's machine (default: a disk on local pins pc-i440fx-9.2: README)
#   net     1: a NIC (e1000, a static MAC) on the node's bridge vmbr0 (MAC learning off)
#   conf    more config keys
sub start_vm {
    my ($self, $vmid, %o) = @_;
    my $lab = $self->{lab};
    my $node = $o{node} // 'node1';
    my $store = $o{store} // 'shared';
    my $size = $store eq 'shared' ? '1M' : '16M';
    my $volid = "$store:$vmid/vm-$vmid-disk-0.raw";
    UpstreamLab::create_volume($lab, $node, $volid, $size, $o{guest} // 'dirty');
    my %conf = (memory => $MEM, ide0 => "$volid,cache=writeback,size=$size", %{ $o{conf} // {} });
    my $machine = exists($o{machine}) ? $o{machine} : $store eq 'shared' ? undef : 'pc-i440fx-9.2';
    $conf{machine} = $machine if defined($machine);
    $conf{net0} = 'e1000=' . mac($vmid) . ',bridge=vmbr0' if $o{net};
    $lab->remove_vm_config($vmid);
    UpstreamLab::pve_vm_config($lab, $vmid, %conf);
    $lab->move_vm_config($vmid, $node);
    $lab->run_ok($node, 'qm', 'start', $vmid);
    $lab->run_ok($node, "$TOP/lab/guest-check", '--wait', $vmid);
    $self->{vm}->{$vmid} = { volid => $volid, store => $store, node => $node, net => $o{net} };
    return $volid;
}

# the static MAC of VMID's NIC
sub mac {
    my ($vmid) = @_;
    return sprintf('BC:24:11:%02X:%02X:%02X', ($vmid >> 16) & 255, ($vmid >> 8) & 255, $vmid & 255);
}

# The static fdb entries of VMID's NIC on NODE's bridge: the lines of `bridge fdb show` for its
# tap device with its MAC ('' when it has no tap there)
sub fdb {
    my ($self, $node, $vmid) = @_;
    my $mac = lc(mac($vmid));
    my (undef, $out) =
        $self->{lab}->run($node, 'sh', '-c', 'bridge fdb show dev "$1" 2>/dev/null || true',
        'fdb', "tap${vmid}i0");
    return join('', grep { /^\Q$mac\E .*\bstatic\b/ } split(/^/, $out));
}

# upstream's migration of VMID from SRC to DST, in the background: the task log in
# $LAB/qemu-migrate-VMID.log; tree => 'on' (default) | 'off' for the source's qemu-server
sub migrate {
    my ($self, $vmid, $src, $dst, %o) = @_;
    my $lab = $self->{lab};
    my $tree = $self->tree($o{tree} // $self->{node_tree}->{$src});
    return $lab->background(
        $src,
        $lab->dir . "/qemu-migrate-$vmid.log",
        UpstreamLab::migrate_command(
            $lab, $tree, $self->{perl5lib}, $src, $vmid, $dst, '--online', @{ $o{opts} // [] }
        ),
    );
}

# a migration that must succeed: its task log, once it ended with TASK OK
sub migrate_ok {
    my ($self, $name, $vmid, $src, $dst, %o) = @_;
    my $bg = $self->migrate($vmid, $src, $dst, %o);
    ok($bg->finish(180), "$name: the migration ended");
    my $out = $bg->output;
    is($bg->status >> 8, 0, "$name: exit 0") or diag($out);
    like($out, qr/^TASK OK$/m, "$name: TASK OK");
    return $out;
}

# NODE's volumes of VMID on STORE, as the files of its "dir" storage
sub volumes {
    my ($self, $node, $store, $vmid) = @_;
    my $base = $store eq 'local' ? '/var/lib/vz' : $self->{lab}->dir . "/$store";
    my (undef, $out) = $self->{lab}
        ->run($node, 'sh', '-c', 'ls "$1" 2>/dev/null || true', 'ls', "$base/images/$vmid");
    return map { "$store:$vmid/$_" } sort grep { /\.raw$/ } split(/\n/, $out);
}

# Where VMID is and what must be gone after a run that left it on NODE: it runs there and on
# no other node, and never ran on two at once (QEMU's events); its memory (and disk) intact;
# no migration socket, tunnel ssh, lock or zombie (started since $o{since}) left; its config
# on NODE; with a local disk its volume on NODE only. Stops the VM afterwards (paused by the
# memory check).
sub check_vm {
    my ($self, $name, $vmid, $node, %o) = @_;
    my $lab = $self->{lab};
    my @others = grep { $_ ne $node } $lab->nodes;
    is($lab->qmpstatus($node, $vmid), 'running', "$name: VM $vmid runs on $node");
    is($lab->qmpstatus($_, $vmid), 'stopped', "$name: VM $vmid does not run on $_") for @others;
    my @both = map {
        MTunnelLab::overlaps($lab->run_intervals($node, $vmid), $lab->run_intervals($_, $vmid))
    } @others;
    is(scalar(@both), 0, "$name: VM $vmid never ran on two nodes at once");
    my $vm = $self->{vm}->{$vmid};
    my $disk = $vm->{store} eq 'local';
    my ($rc, $check) = $lab->run($node, "$TOP/lab/guest-check", $vmid, $MEM);
    is($rc, 0, "$name: guest memory" . ($disk ? ' and disk' : '') . " intact on $node")
        or diag($check);
    like($check, qr/^guest disk ok/m, "$name: the guest's disk was checked") if $o{disk};
    # the check paused the guest: let it go on, as it ran
    $lab->run($node, 'timeout', '5', 'qmp', $vmid, 'cont');
    is_deeply([$lab->socket_files($_)], [], "$name: no migration socket left on $_")
        for $lab->nodes;
    is_deeply([map { $lab->ssh_pids($_, $vmid) } $lab->nodes], [], "$name: no tunnel ssh left");
    is($lab->vm_config_node($vmid), $node, "$name: the config is on $node, with the VM");
    unlike(MTunnelLab::slurp($lab->vm_config_path($vmid) // ''),
        qr/^lock:/m, "$name: the config is unlocked");
    if ($disk) {
        is_deeply([$self->volumes($node, 'local', $vmid)],
            [$vm->{volid}], "$name: the VM's local volume is on $node");
        is_deeply([$self->volumes($_, 'local', $vmid)], [], "$name: no volume of VM $vmid on $_")
            for @others;
    }
    if ($vm->{net}) {
        # the bridge forwards to the VM's NIC on NODE only: learning is off, PVE adds the MAC
        like($self->fdb($node, $vmid), qr/ master vmbr0 /,
            "$name: the NIC's fdb entry is on $node");
        is($self->fdb($_, $vmid), '', "$name: no fdb entry of the NIC on $_") for @others;
    }
    if (defined($o{since})) {
        is_deeply([MTunnelLab::zombies_since($o{since})], [], "$name: no zombie left");
        note(sprintf('%s: %.1f s', $name, time() - $o{since}));
    }
    $vm->{node} = $node;
}

# Stops VMID's QEMU wherever it runs and removes its config and volumes.
sub remove_vm {
    my ($self, $vmid) = @_;
    my $lab = $self->{lab};
    for my $node ($lab->nodes) {
        $lab->run($node, 'timeout', '5', 'qmp', $vmid, 'quit')
            if $lab->qmpstatus($node, $vmid) ne 'stopped';
        $lab->run($node, 'sh', '-c', 'rm -rf "/var/lib/vz/images/$1"', 'rm', $vmid);
    }
    $lab->run('node1', 'rm', '-rf', $lab->dir . "/shared/images/$vmid");
    $lab->remove_vm_config($vmid);
    delete $self->{vm}->{$vmid};
}

sub down { $_[0]->{lab}->down }

1;
