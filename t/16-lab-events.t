#!/usr/bin/perl
# Every lab VM's run state is logged with timestamps (lab/qmp-eventlog on QEMU's second QMP
# monitor, $LAB/NODE/events-VMID.log), so a test can prove a VM never ran on two nodes at the
# same moment: a real migration node1 -> node2 shows the source's STOP (switch-over) before the
# target's RESUME, and MTunnelLab's run_intervals/overlaps find no moment with both running;
# on made-up records they do find one. The logger ends with its QEMU (qm stop), never holds the
# main QMP monitor, and lab.sh down leaves none behind.
# Run as `make test` does: MTUNNEL_LIB=... lab/reap-run prove -Iperl/lib -It/lib t/16-lab-events.t

use strict;
use warnings;
use Test::More;
use Cwd qw(abs_path);
use File::Basename qw(dirname);
use POSIX ();
use Time::HiRes qw(time sleep);

use MTunnelLab;

my $top = abs_path(dirname(__FILE__) . '/..');
my $vmid = 100;
my $t0 = time;

my $lab = MTunnelLab->up(nodes => 2, accel => 'tcg');
my $dir = $lab->dir;
$lab->write_vm_config($vmid, memory => 64);

sub kinds {
    join(' ', map { $_->{kind} eq 'status' ? "status:$_->{detail}" : $_->{kind} } @{ $_[0] });
}

sub dump_log {
    join('', map { "$_->{t} $_->{pid} $_->{kind} $_->{detail}\n" } @{ $_[0] });
}

sub wait_until {
    my ($cond, $timeout) = @_;
    my $deadline = time + $timeout;
    while (time < $deadline) {
        return 1 if $cond->();
        sleep 0.05;
    }
    return $cond->();
}

sub now_ns { int(time * 1e6) * 1000 }

# ---------------------------------------------------------------- start on node1

my $before = now_ns();
$lab->run_ok('node1', 'qm', 'start', $vmid);
my ($qemu1) = $lab->qemu_pids('node1');
ok($qemu1, 'VM started on node1');
my $ev1 = $lab->vm_events('node1', $vmid);
is(kinds($ev1), 'status:running',
    'when qm start returns, the log already has the initial status: running');
is($ev1->[0]{pid}, $qemu1, 'the record names the QEMU pid');
ok(
    $ev1->[0]{t} >= $before && $ev1->[0]{t} <= now_ns(),
    'its time is CLOCK_REALTIME ns, taken during qm start'
) or diag(dump_log($ev1));
my @logger1 = $lab->eventlog_pids('node1');
is(scalar @logger1, 1, 'one qmp-eventlog process for the VM on node1');
ok(!(grep { $_ == ($logger1[0] // 0) } $lab->procs_in('node1')),
    'the logger lives in a network namespace of its own, not among node1\'s processes');
like(
    scalar($lab->run_ok('node1', 'qm', 'status', $vmid, '--verbose')),
    qr/^qmpstatus: running$/m,
    'the main QMP monitor stays free while the logger runs (QMP serves one client per monitor)'
);
$lab->run_ok('node1', "$top/lab/guest-check", '--wait', $vmid);
sleep 0.5;

# ---------------------------------------------------------------- migrate to node2

my ($rc, $out, $err) = $lab->run(
    'node1', "$top/perl/bin/mtunnel-migrate", $vmid, 'node2',
    '--node', 'node1', '--ssh-file', "$dir/ssh_prefix_node2",
    '--pve-dir', "$dir/pve"
);
is($rc, 0, 'migration node1 -> node2: driver exits 0') or diag("$out$err");
like($out, qr/^TASK OK$/m, 'task OK');
my ($qemu2) = $lab->qemu_pids('node2');
ok($qemu2, 'the VM runs on node2');
# the driver waited for the source QEMU to exit; its logger writes EOF right after
ok(
    wait_until(
        sub {
            grep { $_->{kind} eq 'EOF' } @{ $lab->vm_events('node1', $vmid) };
        },
        5
    ),
    'node1\'s log gets its EOF once the source QEMU is gone'
);

$ev1 = $lab->vm_events('node1', $vmid);
my $ev2 = $lab->vm_events('node2', $vmid);
note("node1:\n" . dump_log($ev1) . "node2:\n" . dump_log($ev2));
is($ev1->[0]{kind} . ' ' . $ev1->[0]{detail}, 'status running', 'node1: initial status running');
my ($stop) = grep { $_->{kind} eq 'STOP' } @$ev1;
ok($stop, 'node1: STOP at the switch-over') or diag(kinds($ev1));
is($ev1->[-1]{kind}, 'EOF', 'node1: EOF last (the source QEMU quit)');
ok((grep { $_->{kind} eq 'SHUTDOWN' && $_->{detail} eq 'host-qmp-quit' } @$ev1),
    'node1: SHUTDOWN host-qmp-quit (the driver\'s QMP quit)');
is_deeply([sort { $a <=> $b } keys %{ { map { $_->{pid} => 1 } @$ev1 } }],
    [$qemu1], 'node1: all records of the source QEMU');
is($ev2->[0]{kind} . ' ' . $ev2->[0]{detail}, 'status inmigrate',
    'node2: initial status inmigrate');
my ($resume) = grep { $_->{kind} eq 'RESUME' } @$ev2;
ok($resume, 'node2: RESUME (the tunnel\'s resume)') or diag(kinds($ev2));
is($ev2->[0]{pid}, $qemu2, 'node2: records of the target QEMU');
ok($stop && $resume && $stop->{t} < $resume->{t}, 'the source STOPped before the target RESUMEd');
diag(
    sprintf('STOP on node1 -> RESUME on node2: %.1f ms (the downtime as the event log sees it)',
        ($resume->{t} - $stop->{t}) / 1e6)
) if $stop && $resume;

my $run1 = $lab->run_intervals('node1', $vmid);
my $run2 = $lab->run_intervals('node2', $vmid);
is(scalar @$run1, 1, 'node1: one run');
is($run1->[0]{start}, $ev1->[0]{t}, 'node1: it runs from the first record');
is($run1->[0]{end}, $stop && $stop->{t}, 'node1: until its STOP');
is(scalar @$run2, 1, 'node2: one run');
is($run2->[0]{start}, $resume && $resume->{t}, 'node2: from its RESUME');
ok(!defined $run2->[0]{end}, 'node2: still running (end undef)');
ok(defined $run1->[0]{end} && $run1->[0]{end} <= $run2->[0]{start},
    'node1\'s run ends before node2\'s begins');
is_deeply([MTunnelLab::overlaps($run1, $run2)],
    [], 'overlaps: the VM never ran on both nodes at once');
is_deeply([$lab->resumed_after_target('node1', 'node2', $vmid)],
    [], "the source never resumed after the target's first RESUME");

# ---------------------------------------------------------------- the check can fail

my @real = MTunnelLab::overlaps($run1, [{ start => $stop->{t} - 1000, end => undef }]);
is(scalar @real, 1, 'a target resumed 1 µs before the source stopped is an overlap');
is(scalar(() = MTunnelLab::overlaps([[100, 200]], [[150, 300]])),
    1, 'overlaps finds [100,200) x [150,300)');
is(scalar(() = MTunnelLab::overlaps([[150, 300]], [[100, 200], [400, 500], [290, undef]])),
    2, 'two of three overlap, an open end counts as running now');
is_deeply([MTunnelLab::overlaps([[100, 200]], [[200, 300]])],
    [], 'touching intervals do not overlap');
is_deeply([MTunnelLab::overlaps([], [[0, undef]])], [], 'nothing ran: no overlap');

# a made-up log: a QEMU stopped/resumed/quit, then one whose logger died (no EOF) followed by a
# third QEMU, and a line still being written
{
    my $path = "$dir/node1/events-999.log";
    open(my $fh, '>', $path) or die "$path: $!\n";
    print $fh
        "1000 11 status running\n2000 11 STOP -\n3000 11 RESUME -\n4000 11 SHUTDOWN host-qmp-quit\n",
        "4100 11 EOF -\n5000 12 status prelaunch\n6000 12 RESUME -\n9000 13 status paused\n",
        "9200 13 MIGRATION completed\n9500 13 EOF -\n9600 13 RES";
    close($fh) or die "$path: $!\n";
    is(scalar @{ $lab->vm_events('node1', 999) }, 10, 'vm_events: complete lines only');
    is_deeply(
        $lab->run_intervals('node1', 999),
        [
            { start => 1000, end => 2000, pid => 11 },
            { start => 3000, end => 4000, pid => 11 },
            { start => 6000, end => 9000, pid => 12 }
        ],
        'run_intervals: STOP/RESUME/SHUTDOWN, several QEMUs, a run without end closed by the next QEMU'
    );
    is_deeply($lab->vm_events('node1', 998), [], 'vm_events: no log, no records');
    is_deeply($lab->run_intervals('node1', 998), [], 'run_intervals: no log, no runs');
    unlink($path);
}

# a made-up rollback: the source resumed after the target's first RESUME (a failed
# post-copy continued on the source), and the same without it
{
    my %log = (
        node1 => "1000 21 status running\n2000 21 STOP -\n",
        node2 => "1500 22 status inmigrate\n2500 22 RESUME -\n",
    );
    for my $node (sort keys %log) {
        my $path = "$dir/$node/events-997.log";
        open(my $fh, '>', $path) or die "$path: $!\n";
        print $fh $log{$node};
        close($fh) or die "$path: $!\n";
    }
    is_deeply([$lab->resumed_after_target('node1', 'node2', 997)],
        [], 'resumed_after_target: the source stopped, the target ran: no rollback');
    open(my $fh, '>>', "$dir/node1/events-997.log") or die;
    print $fh "3000 21 RESUME -\n";
    close($fh);
    is_deeply([map { $_->{t} } $lab->resumed_after_target('node1', 'node2', 997)],
        [3000], 'resumed_after_target: the source\'s RESUME after the target\'s first is found');
    is_deeply([$lab->resumed_after_target('node1', 'node2', 997, 2600)],
        [], 'resumed_after_target: only the records since the given time');
    unlink("$dir/$_/events-997.log") for keys %log;
}

# ---------------------------------------------------------------- qm stop ends the logger

my @logger2 = $lab->eventlog_pids('node2');
is(scalar @logger2, 1, 'one logger on node2');
is_deeply([$lab->eventlog_pids('node1')], [], 'node1\'s logger exited with the source QEMU');
$lab->run_ok('node2', 'qm', 'stop', $vmid);
ok(!(grep { MTunnelLab::alive($_) } @logger2), 'when qm stop returns, the logger is gone');
$ev2 = $lab->vm_events('node2', $vmid);
is($ev2->[-1]{kind}, 'EOF', 'node2: EOF last') or diag(dump_log($ev2));
like(
    kinds($ev2),
    qr/^status:inmigrate RESUME .*SHUTDOWN EOF$/,
    'node2: inmigrate, RESUME, ..., SHUTDOWN, EOF'
);
ok(defined $lab->run_intervals('node2', $vmid)->[0]{end}, 'node2: the run has ended');
is(($lab->run('node2', 'test', '-e', "/run/qemu-server/$vmid.events"))[0],
    1, 'qm stop removed VMID.events');

# ---------------------------------------------------------------- a second QEMU in one log

$lab->move_vm_config($vmid, 'node1');    # the migration moved it to node2
$lab->run_ok('node1', 'qm', 'start', $vmid);
my ($qemu3) = $lab->qemu_pids('node1');
$ev1 = $lab->vm_events('node1', $vmid);
is(
    $ev1->[-1]{pid} . ' ' . kinds([$ev1->[-1]]),
    "$qemu3 status:running",
    'started again on node1: the new QEMU is appended'
);
$run1 = $lab->run_intervals('node1', $vmid);
is(scalar @$run1, 2, 'node1: two runs');
ok(defined $run1->[0]{end} && !defined $run1->[1]{end}, 'the first ended, the second runs');
is_deeply([MTunnelLab::overlaps($run1, $lab->run_intervals('node2', $vmid))],
    [], 'still no overlap with node2');

# ---------------------------------------------------------------- lab.sh down

my @logger3 = $lab->eventlog_pids('node1');
is(scalar @logger3, 1, 'the new QEMU has its logger');
ok($lab->down, 'lab down');
ok(
    wait_until(
        sub {
            !grep { MTunnelLab::alive($_) } @logger3;
        },
        2
    ),
    'lab.sh down killed the logger'
);
my @left = grep {
           MTunnelLab::slurp("/proc/$_/cmdline") =~ m{/qmp-eventlog\0}
        && MTunnelLab::slurp("/proc/$_/environ") =~ /(?:^|\0)MTUNNEL_LAB_DIR=\Q$dir\E\0/
} map { m{^/proc/([0-9]+)$} ? $1 : () } glob('/proc/[0-9]*');
is_deeply(\@left, [], 'no qmp-eventlog process of this lab is left');
# zombie loggers (their parent, qm's intermediate child, is gone: lab/reap-run collects them)
my @zombies;
my ($btime) = MTunnelLab::slurp('/proc/stat') =~ /^btime (\d+)$/m;
my $hz = POSIX::sysconf(POSIX::_SC_CLK_TCK()) || 100;
wait_until(
    sub {
        @zombies = grep {
            my @f = split / /, (MTunnelLab::slurp($_) =~ /^\d+ \(qmp-eventlog\) (.*)$/s ? $1 : 'X');
            # $f[0] state, $f[19] start time in clock ticks since boot
            $f[0] eq 'Z' && $btime + $f[19] / $hz >= $^T - 1
        } glob('/proc/[0-9]*/stat');
        !@zombies;
    },
    2
);
is_deeply(\@zombies, [], 'no qmp-eventlog zombie');
is_deeply([MTunnelLab::zombies_since($^T)], [], 'no zombie left by this test');
diag(sprintf('t/16 took %.1f s', time - $t0));

done_testing();
