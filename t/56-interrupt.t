#!/usr/bin/perl
# The driver stopped, interrupted or cut at a given moment: INT, TERM and PIPE mid-RAM (QUIT
# and HUP share their handler; TERM as the first of two); TERM during the target start, with the tunnel up, at the switchover and after
# completion; a second signal during the cleanup; a real closed stdout pipe; SIGKILL after
# completion (settled by `mtunnel-migrate --check --fix`); and the link cut right after
# completion, where the source must stay paused until the target can be asked. SIGKILL of a
# migration with a local disk (--with-local-disks), each settled by `--check --fix`: during
# the mirror's sync, once the mirror is ready, mid-RAM, at the switchover with the mirror
# still ready (the driver stopped while QEMU migrated), during the mirror's completion after
# RAM completed, and after the mirrors finished. The target already holds an unrelated
# volume of the VM's VMID, which must survive. Each time: the VM runs on exactly one node
# with its memory (and disk) intact, the verdict says truthfully where, and nothing is left
# behind: no block job, no socket file, no ssh, no zombie, no migration record, no volume of
# the migration on the node where the VM does not run.

use strict;
use warnings;
use Test::More;
use Cwd qw(abs_path);
use File::Basename qw(dirname);
use POSIX qw(:sys_wait_h);
use Time::HiRes qw(time sleep);

use MTunnelLab;

my $top = abs_path(dirname(__FILE__) . '/..');
my $lab = MTunnelLab->up(nodes => 2);
my $dir = $lab->dir;
my $job = $lab->mirror_job('node1', 'ide0');    # drive-ide0 (7.2) or mirror-ide0 (10.0)
my ($vmid, $mem) = (600, 128);
my $ssh_file = "$dir/ssh_prefix_node2";
my @check = (
    "$top/perl/bin/mtunnel-migrate",
    '--check', $vmid, 'node2', '--node', 'node1', '--ssh-file', $ssh_file, '--pve-dir', "$dir/pve"
);
# fast failure detection when the link is cut
my @fast = (
    '--ssh-option', 'server_alive_interval_s=1', '--ssh-option', 'server_alive_count_max=3',
    '--ssh-option', 'connect_timeout_s=2', '--ssh-option', 'connect_retries=0'
);

*slurp = \&MTunnelLab::slurp;
sub qmpstatus { return $lab->qmpstatus($_[0], $vmid) }

sub link_node2 {
    system('ip', '-n', $lab->netns('node2'), 'link', 'set', 'eth0', $_[0]) == 0
        or die "ip link failed\n";
}

# the tunnel's remote end on node2
sub mtunnel_pids {
    return grep { slurp("/proc/$_/cmdline") =~ /\bqm\0mtunnel\b/ } $lab->procs_in('node2');
}

# where the VM runs: 'node1', 'node2', 'both' or 'none'
sub placement {
    my @on = grep { qmpstatus($_) eq 'running' } qw(node1 node2);
    return @on == 2 ? 'both' : @on ? $on[0] : 'none';
}

sub qmp {
    my ($node, @cmd) = @_;
    my ($rc, $out, $err) = $lab->run($node, 'qmp', $vmid, @cmd);
    die "qmp @cmd on $node: $out$err" if $rc != 0;
    return $out;
}

# volume ids of this VM on $node's local storage
sub volumes {
    return grep { m{^local:$vmid/} } $lab->volumes($_[0], 'local');
}

# node1's QEMU MIGRATION events with status $status since epoch second $since (its run-state
# log, written through a monitor of its own: readable while the driver holds the main one)
sub migration_events {
    my ($status, $since) = @_;
    return scalar grep {
        $_->{kind} eq 'MIGRATION' && $_->{detail} =~ /^\Q$status\E\b/ && $_->{t} >= $since * 1e9
    } @{ $lab->vm_events('node1', $vmid) };
}

# Stops the driver once QEMU's RAM migration is under way: QEMU goes on through the tunnel
sub stop_driver_migrating {
    my ($pid, $since) = @_;
    for (1 .. 1000) {
        last if migration_events('active', $since);
        sleep(0.01);
    }
    kill('STOP', $pid) or die "cannot stop the driver\n";
}

# Waits until that migration completed (node1) and node2 holds the complete state, paused.
sub wait_completed {
    my ($since) = @_;
    for (1 .. 600) {
        return 1 if migration_events('completed', $since) && qmpstatus('node2') eq 'paused';
        sleep(0.05);
    }
    return 0;
}

my $volid = "local:$vmid/vm-$vmid-disk-0.raw";    # the source's disk, on node1
my $existing = "local:$vmid/vm-$vmid-disk-0.raw";    # unrelated, on node2 before it all
my $new_volid = "local:$vmid/vm-$vmid-disk-1.raw";    # the target's new volume
my @disk = ('--with-local-disks');
my $source_settled = qr/^\S+ \S+ state: VM $vmid runs on node 'node1' \(source\) only$/m;

my %scenario;
# INT and PIPE: QUIT and HUP are deferred by the same list (@DEFERRED_SIGNALS) and handler as
# these, and TERM mid-RAM is the first signal of 'second SIGTERM during the cleanup' below
for my $sig (qw(INT PIPE)) {
    $scenario{"SIG$sig mid-RAM"} = {
        args => ['--bwlimit', 4096],
        trigger => qr/migration active/,
        signal => $sig,
        verdict =>
            qr/^TASK ERROR: interrupted by signal SIG$sig - VM $vmid runs on node 'node1' \(source\) only$/m,
        on => 'node1',
    };
}
%scenario = (
    %scenario,
    'SIGTERM during the target start' => {
        trigger => qr/starting VM $vmid on remote node/,
        signal => 'TERM',
        verdict =>
            qr/^TASK ERROR: interrupted by signal SIGTERM - VM $vmid runs on node 'node1' \(source\) only$/m,
        on => 'node1',
    },
    'SIGTERM with the tunnel up' => {
        trigger => qr/start remote tunnel/,
        signal => 'TERM',
        verdict =>
            qr/^TASK ERROR: interrupted by signal SIGTERM - VM $vmid runs on node 'node1' \(source\) only$/m,
        on => 'node1',
    },
    'SIGTERM at the switchover' => {
        # the moment QEMU reports the end of the RAM copy: whichever way it goes, the verdict must
        # match where the VM runs
        trigger => qr/migration active|migration status: completed/,
        signal => 'TERM',
        verdict =>
            qr/^(TASK OK|TASK ERROR: interrupted by signal SIGTERM - VM $vmid runs on node 'node1' \(source\) only)$/m,
    },
    'SIGTERM after completion' => {
        # as 'SIGKILL after completion': the resume waits in the stopped `qm mtunnel` until
        # the SIGTERM is sent, so it lands before the driver's last look, however fast phase 3
        trigger => qr/start migrate command/,
        inject => sub { kill('STOP', mtunnel_pids()) or die "no qm mtunnel on node2\n" },
        then => [qr/migration status: completed/, 'TERM'],
        after => sub { kill('CONT', mtunnel_pids()) },
        verdict => qr/^TASK OK$/m,
        log => qr/received signal SIGTERM after the migration completed: it was finished/,
        on => 'node2',
    },
    'second SIGTERM during the cleanup' => {
        args => ['--bwlimit', 4096],
        trigger => qr/migration active/,
        signal => 'TERM',
        then => [qr/aborting phase 2 - cleanup resources/, 'TERM'],
        verdict =>
            qr/^TASK ERROR: interrupted by signal SIGTERM - VM $vmid runs on node 'node1' \(source\) only$/m,
        on => 'node1',
    },
    'SIGKILL after completion' => {
        # node2's `qm mtunnel` is stopped before RAM starts, so the resume waits in its stdin:
        # the SIGKILL lands after completion and before the target runs, however fast the
        # driver gets from one to the other
        trigger => qr/start migrate command/,
        inject => sub { kill('STOP', mtunnel_pids()) or die "no qm mtunnel on node2\n" },
        then => [qr/migration status: completed/, 'KILL'],
        killed => 1,
        restore => sub { kill('KILL', mtunnel_pids()) },
        check_state =>
            qr/state: VM $vmid is paused on both nodes after its migration completed: the target was never resumed|state: VM $vmid runs on node 'node2' \(target\); its copy on 'node1' is left postmigrate/,
        on => 'node2',
    },
    'SIGKILL during the mirror sync (local disk)' => {
        disk => 1,
        args => [@disk, '--bwlimit', 4096],
        trigger => qr/$job: transferred/,
        signal => 'KILL',
        killed => 1,
        check_state => qr/state: VM $vmid runs on node 'node1' \(source\)/,
        on => 'node1',
    },
    'SIGKILL at mirror ready (local disk)' => {
        disk => 1,
        args => [@disk],
        trigger => qr/all 'mirror' jobs are ready/,
        signal => 'KILL',
        killed => 1,
        check_state => qr/state: VM $vmid runs on node 'node1' \(source\)/,
        on => 'node1',
    },
    'SIGKILL mid-RAM (local disk)' => {
        disk => 1,
        args => [@disk, '--bwlimit', 16384],
        trigger => qr/migration active/,
        signal => 'KILL',
        killed => 1,
        check_state => qr/state: VM $vmid runs on node 'node1' \(source\)/,
        on => 'node1',
    },
    'SIGKILL at the switchover, the mirror still ready (local disk)' => {
        # the driver is stopped while QEMU migrates RAM on its own through the tunnel, and
        # killed once that completed: the mirror is left ready, its NBD connection gone with
        # the driver
        disk => 1,
        args => [@disk],
        trigger => qr/start migrate command/,
        inject => \&stop_driver_migrating,
        then => [sub { wait_completed($_[0]) }, 'KILL'],
        killed => 1,
        check_state =>
            qr/state: VM $vmid is paused on both nodes after its migration completed, but its disks on 'node2' cannot be shown complete \(the disk mirrors were not finished \($job: ready\)\): the copy on 'node2' must not run/,
        on => 'node1',
    },
    'SIGKILL during the mirror completion (local disk)' => {
        # as above, but once RAM completed node2's link is cut and the driver continued: it
        # finishes the mirror (block-job-cancel: the target must take the last writes and
        # flush), which waits on the link, and it is killed there
        disk => 1,
        args => [@disk],
        trigger => qr/start migrate command/,
        inject => \&stop_driver_migrating,
        then => [
            sub {
                my ($since, $bg) = @_;
                wait_completed($since) or return 0;
                link_node2('down');
                kill('CONT', $bg->pid);
                return $bg->wait_for(qr/$job: Completing block job/, 30);
            },
            'KILL'
        ],
        killed => 1,
        unlike => qr/Completed successfully/,
        restore => sub { link_node2('up'); kill('KILL', mtunnel_pids()) },
        check_state =>
            qr/state: VM $vmid is paused on both nodes after its migration completed, but its disks on 'node2' cannot be shown complete \(($job: .+|the disk mirrors were not finished \($job: \w+\))\): the copy on 'node2' must not run/,
        on => 'node1',
    },
    'SIGKILL after the mirrors finished (local disk)' => {
        # as 'SIGKILL after completion': the resume waits in the stopped `qm mtunnel`
        disk => 1,
        args => [@disk],
        trigger => qr/start migrate command/,
        inject => sub { kill('STOP', mtunnel_pids()) or die "no qm mtunnel on node2\n" },
        then => [qr/$job: mirror-job finished/, 'KILL'],
        killed => 1,
        restore => sub { kill('KILL', mtunnel_pids()) },
        check_state =>
            qr/state: VM $vmid is paused on both nodes after its migration completed: the target was never resumed/,
        on => 'node2',
    },
    'link cut after completion' => {
        # node2's `qm mtunnel` is stopped before RAM starts (the resume then waits in its
        # stdin), and the link is cut once node2 holds the complete state: the resume cannot
        # reach node2, nor can anything ask it whether it runs
        args => \@fast,
        trigger => qr/start migrate command/,
        inject => sub { kill('STOP', mtunnel_pids()) or die "no qm mtunnel on node2\n" },
        then => [
            qr/migration status: completed/,
            sub {
                for (1 .. 100) { last if qmpstatus('node2') eq 'paused'; sleep(0.05) }
                link_node2('down');
            }
        ],
        verdict =>
            qr/^TASK ERROR: .* - VM $vmid is paused on node 'node1' \(source, postmigrate\) after its migration completed, and node 'node2' cannot be reached: it holds the migrated state and may run it\. Once 'node2' is reachable, run on 'node1': \S+ --check $vmid node2 --node node1 --ssh-file \S+ --pve-dir \S+ --fix$/m,
        source_paused => 1,
        restore => sub { link_node2('up'); kill('KILL', mtunnel_pids()) },
    },
);

my $only = $ENV{MTUNNEL_FAULT};    # a regex, to run some scenarios only
for my $name (sort grep { !defined($only) || /$only/ } keys %scenario) {
    my $s = $scenario{$name};
    $lab->write_vm_config(
        $vmid,
        memory => $mem,
        $s->{disk} ? (guest => 'disk', ide0 => "$volid,size=32M") : ()
    );
    $lab->move_vm_config($vmid, 'node1');    # a round that migrated moved it to node2
    $lab->run_ok('node1', 'qm', 'start', $vmid);
    $lab->run_ok('node1', "$top/lab/guest-check", '--wait', $vmid);
    $lab->run_ok('node2', 'pvesm', 'alloc', 'local', $vmid, "vm-$vmid-disk-0.raw", '1M')
        if $s->{disk};
    my $t0 = time();
    my $since = MTunnelLab::now_ns();
    my $bg = $lab->background('node1', "$dir/interrupt-$vmid.log", "$top/perl/bin/mtunnel-migrate",
        $vmid, 'node2', '--node', 'node1', '--ssh-file', $ssh_file, '--pve-dir', "$dir/pve",
        @{ $s->{args} // [] });
    my $pid = $bg->pid;
    ok($bg->wait_for($s->{trigger}, 30), "$name: the moment came") or diag($bg->output);

    if ($s->{inject}) {
        $s->{inject}->($pid, $t0);
    } else {
        kill($s->{signal}, $pid);
    }
    if (my $then = $s->{then}) {
        my $came =
            ref $then->[0] eq 'CODE'
            ? $then->[0]->($t0, $bg)
            : $bg->wait_for($then->[0], 30);
        ok($came, "$name: the second moment came") or diag($bg->output);
        ref $then->[1] ? $then->[1]->() : kill($then->[1], $pid);
        kill('CONT', $pid);    # a stopped driver gets its SIGKILL either way
        $s->{after}->() if $s->{after};
    }
    ok($bg->finish(120), sprintf("$name: driver ended in bounded time (%.1f s)", time() - $t0));
    my $status = $bg->status;
    my $out = $bg->output;
    my ($verdict) = $out =~ /^(TASK (?:OK|ERROR: .*))$/m;
    diag("$name: " . ($verdict // 'no verdict') . sprintf(" (%.1f s)", time() - $t0));
    unlike($out, $s->{unlike}, "$name: the fault landed at its moment") if $s->{unlike};

    if ($s->{killed}) {
        # nothing ran after SIGKILL: --check says what is where, and --fix settles it
        $s->{restore}->() if $s->{restore};
        # the driver's ssh die with it (PDEATHSIG), then the source's migration fails
        for (1 .. 100) { last if !$lab->ssh_pids('node1'); sleep(0.05) }
        for (1 .. 200) {
            last
                if qmpstatus('node1') eq 'stopped'
                || (eval { qmp('node1', 'query-migrate') } // '') !~
                /"status":"(active|setup|device|pre-switchover)"/;
            sleep(0.05);
        }
        my ($rc, $o) = $lab->run('node1', @check);
        is($rc, 1, "$name: --check says a fix is needed") or diag($o);
        like($o, $s->{check_state}, "$name: --check tells the state") or diag($o);
        like(
            $o,
            qr/to fix \(run again with --fix\): /,
            "$name: --check names the fix and changes nothing"
        );
        isnt(qmpstatus('node1'), 'stopped', "$name: --check left the source alone");
        ($rc, $o) = $lab->run('node1', @check, '--fix');
        is($rc, 0, "$name: --check --fix settles it") or diag($o);
        note($o);
        my $where = $s->{on} eq 'node1' ? "'node1' \\(source\\)" : "'node2' \\(target\\)";
        like(
            $o,
            qr/state: VM $vmid runs on node $where only$/m,
            "$name: after the fix the VM runs on $s->{on} only"
        ) or diag($o);
        # what the fix did, and the state after it
        my ($after) = $o =~ /^\S+ \S+ fix: [^\n]*\n(?!.*^\S+ \S+ fix: )(.*)\z/ms;
        unlike($after // $o, qr/left behind|fix failed/, "$name: the fix left nothing behind")
            or diag($o);
    } else {
        like($out, $s->{verdict}, "$name: the verdict") or diag($out);
        like($out, $s->{log}, "$name: the log says so") if $s->{log};
        is(
            ($status // 0) >> 8,
            ($verdict // '') eq 'TASK OK' ? 0 : 1,
            "$name: exit code matches the verdict"
        );
    }
    if ($s->{source_paused}) {
        is(qmpstatus('node1'), 'postmigrate',
            "$name: the source stays paused while node2 cannot be reached");
        $s->{restore}->();
        my ($rc, $o) = $lab->run('node1', @check, '--fix');
        is($rc, 0, "$name: once node2 is reachable, --check --fix settles it") or diag($o);
        $s->{on} = 'node2';
    }
    my $on = $s->{on} // (($verdict // '') eq 'TASK OK' ? 'node2' : 'node1');
    is(placement(), $on, "$name: the VM runs on $on only");
    is_deeply([$lab->resumed_after_target('node1', 'node2', $vmid, $since)],
        [], "$name: the source never resumed after the target ran (QEMU's events)");
    for my $node (grep { qmpstatus($_) ne 'stopped' } qw(node1 node2)) {
        is(qmp($node, 'query-block-jobs'), "[]\n", "$name: no block job left on $node");
    }
    my ($crc, $check) = $lab->run($on, "$top/lab/guest-check", $vmid, $mem);
    is($crc, 0, "$name: guest memory intact on $on") or diag($check);
    like($check, qr/^guest disk ok:/m, "$name: guest disk intact on $on") if $s->{disk};
    $lab->run($_, 'qm', 'stop', $vmid) for qw(node1 node2);
    if ($s->{disk}) {
        # the VM's disk where it runs, the unrelated volume of node2, nothing else
        is_deeply([volumes('node1')], $on eq 'node1' ? [$volid] : [],
            "$name: the volumes on node1");
        is_deeply(
            [volumes('node2')],
            $on eq 'node2' ? [$existing, $new_volid] : [$existing],
            "$name: the volumes on node2"
        );
        for my $node (qw(node1 node2)) {
            $lab->run($node, 'pvesm', 'free', $_) for volumes($node);
        }
    }
    my ($rrc) = $lab->run('node1', 'test', '-e', "/run/qemu-server/$vmid.mtunnel");
    isnt($rrc, 0, "$name: no migration record left on node1");
    is_deeply([$lab->ssh_pids('node1')], [], "$name: no ssh left");
    is_deeply([$lab->socket_files($_)], [], "$name: no socket file left on $_") for qw(node1 node2);
    is_deeply([MTunnelLab::zombies_since($t0)], [], "$name: no zombie left");
}

# A real closed pipe: the task log's reader goes away mid-RAM.
{
    my $name = 'stdout reader gone';
    $lab->write_vm_config($vmid, memory => $mem);
    $lab->move_vm_config($vmid, 'node1');    # a round that migrated moved it to node2
    $lab->run_ok('node1', 'qm', 'start', $vmid);
    $lab->run_ok('node1', "$top/lab/guest-check", '--wait', $vmid);
    my $t0 = time();
    local $ENV{MTUNNEL_LAB} = $lab->name;
    my $pid = open(
        my $fh, '-|', "$top/lab/lab.sh",
        'exec', 'node1', "$top/perl/bin/mtunnel-migrate",
        $vmid, 'node2', '--node',
        'node1', '--ssh-file', $ssh_file,
        '--pve-dir', "$dir/pve", '--bwlimit',
        4096
    ) // die;
    my $seen = 0;

    while (my $line = <$fh>) {
        if ($line =~ /migration active/) { $seen = 1; last }
    }
    ok($seen, "$name: the migration was under way");
    close($fh);    # waits for the driver: its next log line meets a closed pipe
    isnt($? >> 8, 0, "$name: the driver reports failure");
    is(placement(), 'node1', "$name: the VM runs on node1 only");
    is(qmpstatus('node2'), 'stopped', "$name: nothing left on node2");
    $lab->run($_, 'qm', 'stop', $vmid) for qw(node1 node2);
    is_deeply([$lab->socket_files($_)], [], "$name: no socket file left on $_") for qw(node1 node2);
    is_deeply([MTunnelLab::zombies_since($t0)], [], "$name: no zombie left");
}

$lab->down;
done_testing();
