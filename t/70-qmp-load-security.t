#!/usr/bin/perl
# QMP faults (a real QEMU whose monitor is busy; a scripted monitor for garbage, a 2 MiB line,
# silence and events), 1000 open/close cycles without growth, and secrets that never reach
# argv, the environment or a log.

use strict;
use warnings;
use Test::More;
use Cwd qw(abs_path);
use File::Basename qw(dirname);
use File::Temp qw(tempdir);
use IO::Socket::UNIX;
use POSIX qw(:sys_wait_h);
use Time::HiRes qw(time sleep);

use MTunnelLab;
use ScriptedQMP;
use PVE::MTunnel;

my $top = abs_path(dirname(__FILE__) . '/..');
my $lab = MTunnelLab->up(nodes => 2);
my $dir = $lab->dir;
$lab->enter('node1');
my @ssh = @{ $lab->ssh_prefix('node2') };

*slurp = \&MTunnelLab::slurp;
*fd_count = \&MTunnelLab::fd_count;
*children = \&MTunnelLab::children;

# --- QMP: a busy monitor on a real QEMU
{
    my $vmid = 400;
    $lab->write_vm_config($vmid, memory => 64, guest => 'idle', accel => 'tcg');
    $lab->run_ok('node1', 'qm', 'start', $vmid);
    my $qmp = "/run/qemu-server/$vmid.qmp";
    my $other = IO::Socket::UNIX->new(Peer => $qmp) or die "connect $qmp: $!";
    my $greeting = <$other>;
    like($greeting, qr/"QMP"/, 'another client holds the monitor');
    my $t0 = time();
    eval { PVE::MTunnel::qmp_query_migrate($qmp, timeout_ms => 1000) };
    like(
        $@,
        qr/^no QMP greeting on '\Q$qmp\E' before the deadline \(monitor busy with another client\?\)$/,
        'busy monitor: clear error'
    );
    is(
        $PVE::MTunnel::last_error_code,
        $PVE::MTunnel::ERROR_CODE{timeout},
        'busy monitor: timeout code'
    );
    cmp_ok(time() - $t0, '>=', 1.0, 'busy monitor: the deadline was honoured, not cut short');
    close($other);
    my $st = PVE::MTunnel::qmp_execute($qmp, 'query-status');
    is($st->{status}, 'running', 'once the other client left, the monitor answers');
    $lab->run_ok('node1', 'qm', 'stop', $vmid);
}

# --- QMP: a scripted monitor for what a real QEMU does not do on purpose
my $tmp = tempdir(CLEANUP => 1);

my $greet = $ScriptedQMP::GREETING;
*reply_to = \&ScriptedQMP::reply_id;

for my $case (
    [
        'garbage',
        sub { print { $_[0] } "this is not JSON\r\n" },
        qr/^QMP socket '.*': unexpected QMP message 'this is not JSON'$/, 'protocol'
    ],
    [
        'a 2 MiB line',
        sub { print { $_[0] } $greet; reply_to($_[0]); print { $_[0] } ('x' x (2 << 20)) . "\r\n" },
        qr/received a line longer than 1048576 bytes/,
        'protocol'
    ],
    [
        'silence after the greeting',
        sub { print { $_[0] } $greet; reply_to($_[0]); sleep 5 },
        qr/^no reply to QMP command 'qmp_capabilities' on '.*' before the deadline$/, 'timeout'
    ],
    )
{
    my ($name, $script, $re, $code) = @$case;
    my $mon = ScriptedQMP->script("$tmp/1.qmp", $script);
    eval { PVE::MTunnel::qmp_query_migrate($mon->path, timeout_ms => 1500) };
    like($@, $re, "QMP $name: clear error");
    is($PVE::MTunnel::last_error_code, $PVE::MTunnel::ERROR_CODE{$code}, "QMP $name: $code code");
    $mon->stop;
}
{
    my $mon = ScriptedQMP->script(
        "$tmp/1.qmp",
        sub {
            my ($c) = @_;
            print $c qq({"event": "RESUME", "timestamp": {}}\r\n), $greet;
            my $id = reply_to($c);
            print $c qq({"event": "STOP", "timestamp": {}}\r\n{"return": {}, "id": $id}\r\n);
            $id = reply_to($c);
            print $c
                qq({"event": "MIGRATION", "data": {"status": "active"}}\r\n{"return": {"id": "stale"}, "id": "not-ours"}\r\n);
            print $c
                qq({"return": {"status": "active", "ram": {"transferred": 42}}, "id": $id}\r\n);
        }
    );
    my $st = eval { PVE::MTunnel::qmp_query_migrate($mon->path, timeout_ms => 3000) };
    is($@, '', 'QMP events before and between replies: no error');
    is($st->{ram}{transferred}, 42, "QMP events and others' replies are skipped, ours is returned");
    $mon->wait;
}

# --- load: 1000 open/close cycles, no growth in fds or processes
{
    # The tests' fake ssh speaks the tunnel protocol at once: a real handshake costs ~0.3 s,
    # so the real sshd gets 50 cycles below and the fake gets the 1000.
    my $fake = "$top/tests/fake-ssh";
    my ($fds, @kids) = (fd_count(), children());
    for (1 .. 1000) {
        my $t = PVE::MTunnel->open(ssh => [$fake, 'root@198.18.0.2'], handshake_slots => 0);
        $t->wait_ready(timeout_ms => 10_000);
        $t->close(remote_cleanup => 0);
    }
    is(fd_count(), $fds, '1000 cycles: no fd growth');
    is_deeply([children()], \@kids, '1000 cycles: no process growth');
    for (1 .. 50) {
        my $t = PVE::MTunnel->open(ssh => \@ssh, forwards => ['/run/qemu-server/100.migrate']);
        $t->wait_ready(timeout_ms => 30_000);
        $t->close(remote_cleanup => 0);
    }
    is(fd_count(), $fds, '50 cycles through the real sshd: no fd growth');
    is_deeply([children()], \@kids, '50 cycles through the real sshd: no process growth');
}

# --- security: a secret given as input never shows in argv, environment or log
{
    my $secret = "spice-ticket-" . join('', map { ('a' .. 'z')[rand 26] } 1 .. 24);
    my @log;
    my $pid = fork() // die;
    if (!$pid) {
        my $r = PVE::MTunnel::ssh_run(
            ssh => \@ssh,
            command => ['sh', '-c', "read t; echo \"\$t\" > $dir/ticket-seen; sleep 2"],
            input => "$secret\n"
        );
        POSIX::_exit(0);
    }
    my $seen_in = '';
    my $until = time() + 1.8;
    while (time() < $until) {
        for my $p (glob('/proc/[0-9]*')) {
            for my $what (qw(cmdline environ)) {
                $seen_in .= "$p/$what " if index(slurp("$p/$what"), $secret) >= 0;
            }
        }
        sleep(0.05);
    }
    waitpid($pid, 0);
    is($seen_in, '', 'the secret never appeared in any process argv or environment on either node');
    is(slurp("$dir/ticket-seen"), "$secret\n", 'the remote command received it on stdin');
    my $t = PVE::MTunnel->open(
        ssh => \@ssh,
        forwards => ['/run/qemu-server/100.migrate'],
        log => sub { push @log, $_[1] }
    );
    $t->wait_ready(timeout_ms => 30_000);
    $t->close;
    ok(!grep({ index($_, $secret) >= 0 } @log), 'nor in the log');
}
{
    # A VMID with shell syntax is refused before anything runs.
    require PVE::MTunnel::Migrate;
    eval {
        PVE::MTunnel::Migrate->new(
            vmid => "100\$(touch $dir/pwned)",
            node => 'node1',
            target => 'node2',
            ssh => \@ssh
        );
    };
    like($@, qr/^invalid VMID/, 'a VMID carrying $(touch …) is refused by the driver');
    eval {
        PVE::MTunnel::migrate_listen_parse(
            "migration listens on unix:/run/qemu-server/100.migrate\n",
            "100;touch $dir/pwned");
    };
    like($@, qr/^invalid VMID/, 'and by the listen parser');
    ok(!-e "$dir/pwned", 'nothing ran');
}

$lab->leave;
$lab->down;
done_testing();
