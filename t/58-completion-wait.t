#!/usr/bin/perl
# The driver notices the end of a migration on QEMU's MIGRATION event (qmp_wait_migration),
# holding the source's monitor only briefly: another QMP client (pvestatd's query-status
# every few seconds on a PVE node) is answered within 1 s all through a migration. A monitor
# whose QEMU dies while held is an error at once, not at the end of the hold.

use strict;
use warnings;
use Test::More;
use Cwd qw(abs_path);
use File::Basename qw(dirname);
use IO::Socket::UNIX;
use POSIX ();
use Time::HiRes qw(time sleep);

use MTunnelLab;
use PVE::MTunnel;

my $top = abs_path(dirname(__FILE__) . '/..');
my $vmid = 100;
my $mem = 256;
my $lab = MTunnelLab->up(nodes => 2);
my $tmp = "/tmp/mtunnel-t58.$$";
mkdir $tmp or die "mkdir $tmp: $!\n";
END { system('rm', '-rf', $tmp) if $tmp }

# Another monitor client on node1: query-status every 100 ms with a 1 s deadline, until
# $tmp/stop exists or the VM left the node; one line per look: "ok STATUS" or "FAIL <error>".
my $prober = <<'EOF';
use PVE::MTunnel;
use Time::HiRes qw(sleep);
$| = 1;
my ($qmp, $stop) = @ARGV;
until (-e $stop || !-S $qmp) {
    my $st = eval { PVE::MTunnel::qmp_execute($qmp, 'query-status', undef, timeout_ms => 1000)->{status} };
    last if !defined $st && !-S $qmp;    # stopped after the migration, not a slow answer
    print defined $st ? "ok $st\n" : "FAIL $@";
    sleep(0.1);
}
EOF

sub start_prober {
    my ($log) = @_;
    unlink "$tmp/stop";
    return $lab->background('node1', $log, $^X, "-I$top/perl/lib", '-e', $prober,
        "/run/qemu-server/$vmid.qmp", "$tmp/stop");
}

sub stop_prober {
    my ($bg) = @_;
    open(my $fh, '>', "$tmp/stop") or die "$tmp/stop: $!\n";
    close $fh;
    $bg->finish(30);
    my @lines = split /\n/, $bg->output;
    return ([grep { /^ok / } @lines], [grep { !/^ok / } @lines]);
}

$lab->write_vm_config($vmid, memory => $mem);
$lab->run_ok('node1', 'qm', 'start', $vmid);
$lab->run_ok('node1', "$top/lab/guest-check", '--wait', $vmid);

# The prober can fail: a client that holds the monitor 2.5 s makes a query miss its 1 s.
{
    my $bg = start_prober("$tmp/control.log");
    $bg->wait_for(qr/^ok /m, 30);
    $lab->enter('node1');
    my $holder = IO::Socket::UNIX->new(Peer => "/run/qemu-server/$vmid.qmp") or die "connect: $!\n";
    $lab->leave;
    my $greeting = <$holder>;
    sleep(2.5);
    close $holder;
    sleep(0.5);
    my ($ok, $bad) = stop_prober($bg);
    ok(
        scalar(grep { /FAIL .*(deadline|greeting)/ } @$bad),
        'control: a monitor held 2.5 s by another client makes a query-status miss its 1 s deadline'
    ) or diag(join("\n", @$ok, @$bad));
}

# A migration that lasts a few seconds (100 MiB/s), its end waited for with events.
{
    my $bg = start_prober("$tmp/prober.log");
    $bg->wait_for(qr/^ok /m, 30);
    my $since = MTunnelLab::now_ns();
    my ($rc, $out, $err) = $lab->run(
        'node1', "$top/perl/bin/mtunnel-migrate",
        $vmid, 'node2',
        '--node', 'node1',
        '--ssh-file', $lab->dir . '/ssh_prefix_node2',
        '--pve-dir', $lab->dir . '/pve',
        '--memory', $mem,
        '--bwlimit', 102400
    );
    my ($ok, $bad) = stop_prober($bg);
    like($out, qr/^TASK OK$/m, 'migration with the event wait: task OK') or diag("$out$err");
    is_deeply([$lab->resumed_after_target('node1', 'node2', $vmid, $since)],
        [], "the source never resumed after the target ran (QEMU's events)");
    is_deeply($bad, [],
        "another client's query-status was answered within 1 s every time during the migration");
    cmp_ok(scalar(@$ok), '>=', 10,
              'the other client was answered at least 10 times ('
            . scalar(@$ok)
            . ') while the driver ran');
    my $ev = $lab->vm_events('node1', $vmid);
    my @mig = map { $_->{detail} } grep { $_->{kind} eq 'MIGRATION' } @$ev;
    is($mig[-1], 'completed',
        "the source's MIGRATION events (the 'events' capability is on) end in 'completed'")
        or diag("MIGRATION events: @mig");
    my ($timing) = $out =~ /^TIMING (.*)$/m;
    like(
        $timing // '',
        qr/ noticed=\d+\.\d+ resumed=\d+\.\d+/,
        'the TIMING line says when the end was noticed and the target resumed'
    );
    is($lab->qmpstatus('node2', $vmid), 'running', 'the VM runs on node2');
    my ($crc, $check) = $lab->run('node2', "$top/lab/guest-check", $vmid, $mem);
    is($crc, 0, 'guest memory intact') or diag($check);
    $lab->run_ok('node2', 'qm', 'stop', $vmid);
}

# A source QEMU that dies while its monitor is held: qmp_wait_migration fails at once.
{
    my ($src, $dst) = (101, 102);
    $lab->write_vm_config($_, memory => 64) for $src, $dst;
    $lab->run_ok('node1', 'qm', 'start', $src);
    $lab->run_ok('node1', "$top/lab/guest-check", '--wait', $src);
    $lab->run_ok(
        'node1', 'qm', 'start', $dst,
        '--skiplock', '--migratedfrom', 'node1', '--migration_type',
        'secure', '--stateuri', 'unix'
    );
    my ($qemu) = grep { index(MTunnelLab::slurp("/proc/$_/cmdline"), "$src.qmp") >= 0 }
        $lab->qemu_pids('node1');
    $lab->enter('node1');
    my $qmp = "/run/qemu-server/$src.qmp";
    PVE::MTunnel::qmp_migrate(
        $qmp,
        "unix:/run/qemu-server/$dst.migrate",
        { capabilities => { events => 1 }, parameters => { 'max-bandwidth' => 1 << 20 } }
    );
    my $killer = fork() // die "fork: $!\n";
    if (!$killer) { sleep(0.5); kill 'KILL', $qemu; POSIX::_exit(0) }
    my $t0 = time();
    my $st = eval { PVE::MTunnel::qmp_wait_migration($qmp, hold_ms => 60_000) };
    my ($err, $took) = ($@, time() - $t0);
    waitpid($killer, 0);
    $lab->leave;
    like(
        $err,
        qr/QEMU closed QMP socket '\Q$qmp\E'/,
        'a source QEMU killed while its monitor is held: the wait fails naming the socket'
    ) or diag(explain($st));
    cmp_ok($took, '<', 30, 'and it fails when the monitor closes, not when the 60 s hold ends');
    $lab->run('node1', 'qm', 'stop', $_) for $src, $dst;
    # the incoming QEMU's listening socket (no tunnel here to remove it)
    $lab->run_ok('node1', 'rm', '-f', "/run/qemu-server/$dst.migrate");
}

like(
    scalar(
        (
            $lab->run(
                'node1', "$top/perl/bin/mtunnel-migrate",
                $vmid, 'node2',
                '--node', 'node1',
                '--ssh-file', $lab->dir . '/ssh_prefix_node2',
                '--pve-dir', $lab->dir . '/pve',
                '--completion-wait', 'sometimes'
            )
        )[1]
    ),
    qr/^TASK ERROR: invalid completion wait 'sometimes' \(events, poll or pve\)$/m,
    'an unknown --completion-wait is refused by name'
);

is_deeply([$lab->socket_files($_)], [], "no socket file left on $_") for qw(node1 node2);
is_deeply([MTunnelLab::zombies_since($^T)], [], 'no zombie left by this test');
$lab->down;
done_testing();
