#!/usr/bin/perl
# Faults during the disk mirror of a storage migration, made real on the lab: the mirror
# cancelled by someone else, the tunnel's ssh killed, the target QEMU killed, the target
# storage full (a 16 MiB tmpfs), a mirror that never gets ready before its deadline; and a
# stale _nbd.migrate socket left on the source, which must not stop a migration. Faults
# during the target's `qm start`, once it allocated the new volume and before it named it:
# the ssh running it killed (the start goes on there without anyone reading its answer),
# and the target QEMU killed (`start failed: QEMU exited`) on a target whose qm leaves what
# it allocated, as upstream's vm_start does; there an unrelated volume of the same VMID
# exists before the migration and must survive it. Each failure: a clear error, no block
# job left on the source, the target VM stopped and its new volume freed (the log says
# which), the source VM running with memory and disk intact (the guest kept writing both),
# and no socket file, ssh process or zombie left.

use strict;
use warnings;
use Test::More;
use Cwd qw(abs_path);
use File::Basename qw(dirname);
use IO::Socket::UNIX;
use POSIX qw(:sys_wait_h);
use Socket qw(SOCK_STREAM);
use Time::HiRes qw(time sleep);

use MTunnelLab;

my $top = abs_path(dirname(__FILE__) . '/..');
my $lab = MTunnelLab->up(nodes => 2);
my $dir = $lab->dir;
my $job = $lab->mirror_job('node1', 'ide0');    # drive-ide0 (7.2) or mirror-ide0 (10.0)
my ($vmid, $mem) = (500, 128);
my $volid = "local:$vmid/vm-$vmid-disk-0.raw";

*slurp = \&MTunnelLab::slurp;

sub tunnel_ssh { return $lab->ssh_pids('node1', $vmid) }

sub qmpstatus { return $lab->qmpstatus($_[0], $vmid) }

sub volumes { return $lab->volumes(@_) }

# a file in $node's own mount namespace (its storages are tmpfs of its own), looked at through
# its sshd's root: fast enough to catch a volume the moment qm allocates it
sub node_has_file {
    my ($node, $path) = @_;
    my ($sshd) = slurp("$dir/$node/sshd.pid") =~ /([0-9]+)/ or die "no sshd pid of $node\n";
    return -e "/proc/$sshd/root$path";
}

# the target's new volume (the pre-existing one is disk-0) and its file on node2
my $new_volid = "local:$vmid/vm-$vmid-disk-1.raw";
my $new_file = "$dir/local/images/$vmid/vm-$vmid-disk-1.raw";

sub wait_new_volume {
    for (1 .. 300_000) {
        return 1 if node_has_file('node2', $new_file);
    }
    die "node2 never allocated $new_volid\n";
}

# node2's QEMU started 2 s late, by a wrapper bind-mounted over it in node2's mount namespace
# that starts nothing once its `qm start` is gone; or as before
sub slow_target_qemu {
    my ($on) = @_;
    if (!$on) {
        $lab->run_ok('node2', 'umount', '/usr/bin/qemu-system-x86_64');
        return;
    }
    my ($real, $slow) = ("$dir/node2/qemu-real", "$dir/node2/qemu-slow");
    unlink($real, $slow);
    $lab->run_ok('node2', 'cp', '/usr/bin/qemu-system-x86_64', $real);
    open(my $fh, '>', "$slow.tmp") or die "$slow.tmp: $!\n";
    print $fh "#!/bin/sh\nqm=\$PPID\nsleep 2\nkill -0 \$qm 2>/dev/null || exit 1\n"
        . "exec $real \"\$@\"\n";
    close($fh) or die "$slow.tmp: $!\n";
    chmod(0755, "$slow.tmp");
    rename("$slow.tmp", $slow) or die "$slow: $!\n";
    $lab->run_ok('node2', 'mount', '--bind', $slow, '/usr/bin/qemu-system-x86_64');
}

# the ssh on node1 running the target's `qm start`
sub start_ssh {
    return grep { slurp("/proc/$_/cmdline") =~ /\bqm\W+start\W+$vmid\b/ } $lab->ssh_pids('node1');
}

# Kills the target's QEMU while its `qm start` waits for it to come up: every QEMU of this
# VM's incoming start that is not qm's own child (QEMU's -daemonize forks twice; the parent
# qm started then exits 1, "start failed: QEMU exited with code 1"). Returns how many kills.
sub kill_starting_target_qemu {
    my ($kills, $seen_parent) = (0, 0);
    for (1 .. 200_000) {
        my $parent = 0;
        for my $p (glob('/proc/[0-9]*')) {
            my $cmd = slurp("$p/cmdline");
            next if $cmd !~ /qemu-system/ || $cmd !~ /\0vm$vmid\0/ || $cmd !~ /\0-incoming\0/;
            my ($pid) = $p =~ m{([0-9]+)$};
            my ($ppid) = slurp("$p/stat") =~ /^[0-9]+ \(.*\) \S ([0-9]+)/s or next;
            if (slurp("/proc/$ppid/cmdline") =~ /\bqm\0start\0/) {
                ($parent, $seen_parent) = (1, 1);
                next;
            }
            $kills++ if kill('KILL', $pid);
        }
        last if $seen_parent && !$parent;
    }
    return $kills;
}

sub qmp {
    my ($node, @cmd) = @_;
    my ($rc, $out, $err) = $lab->run($node, 'qmp', $vmid, @cmd);
    die "qmp @cmd on $node: $out$err" if $rc != 0;
    return $out;
}

# waits until the disk guest has written BYTES of its disk region (which starts at 1 MiB)
sub wait_disk_written {
    my ($bytes) = @_;
    for (1 .. 600) {
        my (undef, $out) = $lab->run('node1', "$top/lab/guest-check", '--wait', $vmid);
        my ($pass, $sector) = $out =~ /disk pass (\d+) sector (\d+)/;
        return if defined $pass && ($pass > 1 || ($sector - 2048) * 512 >= $bytes);
        sleep(0.1);
    }
    die "the guest did not write $bytes bytes of its disk in time\n";
}

my %scenario = (
    'cancel the mirror' => {
        args => ['--bwlimit', 4096],
        inject => sub { qmp('node1', 'block-job-cancel', qq({"device":"$job","force":true})) },
        error => qr/^TASK ERROR: .*$job.*(cancel|vanished)/mi,
    },
    'kill ssh' => {
        args => ['--bwlimit', 4096],
        inject => sub { kill('KILL', tunnel_ssh()) or die "no tunnel ssh found\n" },
        error => qr/^TASK ERROR: .*$job/m,
    },
    'kill the target QEMU' => {
        args => ['--bwlimit', 4096],
        inject => sub {
            my @p = $lab->qemu_pids('node2');
            kill('KILL', @p) or die "no target QEMU (@p)\n";
        },
        error => qr/^TASK ERROR: .*$job/m,
    },
    'target storage full' => {
        # once the guest has written 2 MiB of its disk, more than the 1 MiB "small" storage holds
        prepare => sub { wait_disk_written(2 << 20) },
        args => ['--targetstorage', 'small'],
        target_store => 'small',
        error => qr/^TASK ERROR: .*$job.*(No space left|ENOSPC|nospace|error)/mi,
    },
    'mirror never ready' => {
        args => ['--bwlimit', 1024, '--mirror-timeout', 3],
        error =>
            qr/^TASK ERROR: storage migration not ready after \d+ s \(mirror timeout\) - aborting - /m,
    },
    'ssh of the target start killed' => {
        # once node2's qm allocated the new volume, before it printed where it listens: its
        # QEMU starts 2 s late, so `qm start` still runs however busy the machine is
        existing => 1,
        prepare => sub { slow_target_qemu(1) },
        restore => sub { slow_target_qemu(0) },
        at_start => sub {
            wait_new_volume();
            my @ssh = start_ssh();
            kill('KILL', @ssh) or die "no ssh running qm start on node1\n";
        },
        error =>
            qr/^TASK ERROR: 'qm start $vmid --skiplock --migratedfrom node1 .*' on \S+ failed: killed by signal 9 - /m,
        freed => $new_volid,
    },
    'target QEMU killed during its start, qm keeps its volumes' => {
        existing => 1,
        # node2's qm leaves what a failed start allocated, as upstream's vm_start
        prepare =>
            sub { open(my $fh, '>', "$dir/node2/qm-start-keeps-volumes") or die $!; close($fh) },
        at_start => sub {
            wait_new_volume();
            kill_starting_target_qemu() or die "no target QEMU killed during its start\n";
        },
        restore => sub { unlink("$dir/node2/qm-start-keeps-volumes") },
        error => qr/^TASK ERROR: .*start failed: QEMU exited with code 1 - /m,
        freed => $new_volid,
    },
    'stale _nbd.migrate socket' => {
        prepare => sub {
            # a socket file nobody listens on any more, where the tunnel's NBD forward goes
            $lab->run_ok('node1', 'perl', '-MIO::Socket::UNIX', '-e',
                "IO::Socket::UNIX->new(Local => '/run/qemu-server/${vmid}_nbd.migrate', Listen => 1) or die \$!"
            );
            my ($rc, $out) = $lab->run(
                'node1', 'find', '/run/qemu-server', '-name',
                "${vmid}_nbd.migrate", '-type', 's'
            );
            die "no stale socket made\n" if $out !~ /_nbd\.migrate/;
        },
        succeeds => 1,
    },
);

my $only = $ENV{MTUNNEL_FAULT};    # a regex, to run some scenarios only
for my $name (sort grep { !defined($only) || /$only/ } keys %scenario) {
    my $s = $scenario{$name};
    $lab->write_vm_config($vmid, memory => $mem, guest => 'disk', ide0 => "$volid,size=32M");
    $lab->move_vm_config($vmid, 'node1');    # a round that migrated moved it to node2
    $lab->run_ok('node1', 'qm', 'start', $vmid);
    $lab->run_ok('node1', "$top/lab/guest-check", '--wait', $vmid);
    # an unrelated volume of this VMID on the target, there before the migration
    my @existing = $s->{existing} ? ("local:$vmid/vm-$vmid-disk-0.raw") : ();
    $lab->run_ok('node2', 'pvesm', 'alloc', 'local', $vmid, "vm-$vmid-disk-0.raw", '1M')
        if @existing;
    $s->{prepare}->() if $s->{prepare};
    my $t0 = time();
    my $since = MTunnelLab::now_ns();
    my $bg = $lab->background(
        'node1', "$dir/fault-$vmid.log",
        "$top/perl/bin/mtunnel-migrate", $vmid,
        'node2', '--node',
        'node1', '--ssh-file',
        "$dir/ssh_prefix_node2", '--pve-dir',
        "$dir/pve", '--online',
        '--with-local-disks', @{ $s->{args} // [] }
    );
    if ($s->{at_start}) {
        eval { $s->{at_start}->() };
        is($@, '', "$name: fault injected during the target's start");
    }
    if ($s->{inject}) {
        ok($bg->wait_for(qr/$job: transferred/, 30),
            "$name: the mirror was under way when the fault hit")
            or diag($bg->output);
        eval { $s->{inject}->() };
        is($@, '', "$name: fault injected");
    }
    my $done = $bg->finish(120);
    $s->{restore}->() if $s->{restore};
    my $took = time() - $t0;
    ok($done, sprintf("$name: driver finished in bounded time (%.1f s)", $took));
    my $status = $bg->status;
    my $out = $bg->output;
    my ($err) = $out =~ /^(TASK (?:ERROR: .*|OK))$/m;
    diag("$name: " . ($err // 'no TASK line') . sprintf(" (%.1f s)", $took));
    is_deeply([$lab->resumed_after_target('node1', 'node2', $vmid, $since)],
        [], "$name: the source never resumed after the target ran (QEMU's events)");

    if ($s->{succeeds}) {
        is(($status // -1) >> 8, 0, "$name: the migration succeeds") or diag($out);
        is(qmpstatus('node2'), 'running', "$name: VM runs on node2");
        is(qmpstatus('node1'), 'stopped', "$name: VM stopped on node1");
        my ($crc, $check) = $lab->run('node2', "$top/lab/guest-check", $vmid, $mem);
        is($crc, 0, "$name: guest memory and disk intact on node2") or diag($check);
        $lab->run('node2', 'qm', 'stop', $vmid);
        $lab->run('node2', 'pvesm', 'free', $volid);
    } else {
        isnt(($status // 0) >> 8, 0, "$name: driver reports failure");
        like($out, $s->{error}, "$name: error says what happened") or diag($out);
        like($out, qr/$job: Cancelling block job/, "$name: the cleanup cancelled the block job")
            if !$s->{at_start};
        like(
            $out,
            qr/^\S+ \S+ freed volume '\Q$s->{freed}\E' on node 'node2' \(allocated for this migration\)$/m,
            "$name: the log says which volume of node2 was freed"
        ) if $s->{freed};
        like(
            $out,
            qr/^TASK ERROR: .* - VM $vmid runs on node 'node1' \(source\) only$/m,
            "$name: the verdict says where the VM runs"
        );
        is(qmp('node1', 'query-block-jobs'), "[]\n", "$name: no block job left on the source");
        is(qmpstatus('node1'), 'running', "$name: VM runs on node1");
        isnt(qmpstatus('node2'), 'running', "$name: VM does not run on node2");
        is_deeply([volumes('node2', $s->{target_store} // 'local')],
            [@existing], "$name: the target's new volume was freed")
            or diag($out);
        ok(
            (grep { $_ eq $existing[0] } volumes('node2', 'local')),
            "$name: the volume node2 had before is kept"
        ) if @existing;
        is_deeply([volumes('node1', 'local')], [$volid], "$name: the source volume is kept");
        my ($crc, $check) = $lab->run('node1', "$top/lab/guest-check", $vmid, $mem);
        is($crc, 0, "$name: guest memory and disk intact on node1") or diag($check);
        like($check, qr/^guest disk ok:/m, "$name: the disk check ran");
        # guest-check paused the source for its dump: stop the VM for the next round
        $lab->run($_, 'qm', 'stop', $vmid) for qw(node1 node2);
        $lab->run_ok('node1', 'pvesm', 'free', $volid);
        $lab->run('node2', 'pvesm', 'free', $_) for volumes('node2', 'local');
    }
    is_deeply([tunnel_ssh()], [], "$name: no tunnel ssh left");
    is_deeply([$lab->socket_files($_)], [], "$name: no socket file left on $_") for qw(node1 node2);
    is_deeply([MTunnelLab::zombies_since($t0)], [], "$name: no zombie left");
    is($lab->qmpstatus('node2', $vmid), 'stopped', "$name: no QEMU of the VM left on node2");
    ok(!node_has_file('node1', "/run/qemu-server/$vmid.mtunnel"),
        "$name: no migration record left on node1");
}

$lab->down;
done_testing();
