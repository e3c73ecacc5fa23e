#!/usr/bin/perl
# The library inside a real Perl host that does what PVE workers do: ignore SIGCHLD, reap
# with waitpid(-1), take a storm of alarms, fork with open handles, die by SIGKILL, exit with a
# tunnel in a global. Nothing may hang, panic, leak a child, or lose a deadline.

use strict;
use warnings;
use Test::More;
use Cwd qw(abs_path);
use File::Basename qw(dirname);
use POSIX qw(:sys_wait_h :signal_h);
use Time::HiRes qw(time sleep ualarm);

use MTunnelLab;
use PVE::MTunnel;

my $top = abs_path(dirname(__FILE__) . '/..');
my $lab = MTunnelLab->up(nodes => 2);
my $dir = $lab->dir;
$lab->enter('node1');
my @ssh = @{ $lab->ssh_prefix('node2') };
my $sock = '/run/qemu-server/100.migrate';

*slurp = \&MTunnelLab::slurp;
*alive = \&MTunnelLab::alive;

sub wait_gone {
    my ($pid, $secs) = @_;
    for (1 .. $secs * 10) { return 1 if !alive($pid); sleep(0.1) }
    return 0;
}

# One round of everything a migration does with the library: tunnel open, ready, command,
# close, and a one-shot remote command.
sub round_trip {
    my ($label) = @_;
    my $t = PVE::MTunnel->open(ssh => \@ssh, forwards => [$sock]);
    my $pid = $t->pid;
    $t->wait_ready(timeout_ms => 30_000);
    is($t->status->{state}, 'ready', "$label: tunnel ready");
    eval { $t->command('resume 999') };
    like($@, qr/^tunnel replied 'ERR: /, "$label: command answered");
    $t->close;
    ok(!-e $sock, "$label: socket removed");
    ok(!alive($pid), "$label: ssh gone");
    my $res = PVE::MTunnel::ssh_run(ssh => \@ssh, command => ['echo', 'hello']);
    is($res->{stdout}, "hello\n", "$label: ssh_run output");
    return $res;
}

{
    local $SIG{CHLD} = 'IGNORE';
    my $res = round_trip("SIGCHLD ignored");
    ok(
        !defined($res->{exit_code}) || $res->{exit_code} == 0,
        'SIGCHLD ignored: exit status is unknown or 0, never an error'
    );
}

{
    my $reaped = 0;
    local $SIG{CHLD} = sub { $reaped++ while waitpid(-1, WNOHANG) > 0 };
    round_trip("waitpid(-1) reaper");
    note("the host's reaper collected $reaped children");
}

{
    my $alarms = 0;
    local $SIG{ALRM} = sub { $alarms++ };
    ualarm(10_000, 10_000);
    round_trip("10 ms alarm storm");
    my $t = PVE::MTunnel->open(
        ssh => \@ssh,
        forwards => [$sock],
        command => ['sleep', '30'],
        greeting_timeout_ms => 1500
    );
    my $t0 = time();
    eval { $t->wait_ready(timeout_ms => 30_000) };
    my $took = time() - $t0;
    like(
        $@,
        qr/^no reply from tunnel to .* within \d+ ms while waiting for 'tunnel online'/,
        'alarm storm: silent remote times out'
    );
    # A lower bound only: interrupted waits must not end a deadline early.
    cmp_ok($took, '>=', 1.5,
        sprintf('alarm storm: the 1.5 s deadline was not shortened (%.2f s)', $took));
    $t->close(remote_cleanup => 0);
    ualarm(0);
    # The library holds handled signals back during a call; they run when it returns.
    cmp_ok($alarms, '>', 0, "alarm storm: $alarms alarm handlers ran, the host survived");
}

{
    # SIGPIPE at its default, SIGINT ignored, SIGTERM blocked, an inheritable fd: none of it
    # may reach ssh.
    local $SIG{PIPE} = 'DEFAULT';
    local $SIG{INT} = 'IGNORE';
    my $old = POSIX::SigSet->new;
    sigprocmask(SIG_BLOCK, POSIX::SigSet->new(SIGTERM), $old);
    local $^F = 1000;    # Perl marks fds above $^F close-on-exec: now none are
    open(my $canary, '>', "$dir/inherit-canary") or die;
    my $t = PVE::MTunnel->open(ssh => \@ssh, forwards => [$sock]);
    $t->wait_ready(timeout_ms => 30_000);
    my $pid = $t->pid;
    my $status = slurp("/proc/$pid/status");
    my ($blk) = $status =~ /^SigBlk:\s+(\S+)/m;
    my ($ign) = $status =~ /^SigIgn:\s+(\S+)/m;
    is(hex($blk), 0, 'ssh starts with an empty signal mask');
    is(hex($ign) & (1 << (SIGINT - 1)), 0, "ssh does not inherit the host's ignored SIGINT");
    my @fds = map { readlink($_) // '' } glob("/proc/$pid/fd/*");
    ok(!grep({ $_ eq "$dir/inherit-canary" } @fds), "ssh does not inherit the host's open files")
        or diag("@fds");
    like(
        slurp("/proc/$pid/cmdline"),
        qr/\0-o\0ConnectTimeout=10\0-o\0ServerAliveInterval=15\0-o\0ServerAliveCountMax=3\0/,
        'ssh gets ConnectTimeout and ServerAlive defaults'
    );
    unlike(slurp("/proc/$pid/cmdline"),
        qr/Ciphers/, 'no Ciphers unless asked for: ssh_config decides');
    $t->close;
    close($canary);
    sigprocmask(SIG_SETMASK, $old);
    my $t2 = PVE::MTunnel->open(
        ssh => [$ssh[0], '-o', 'ConnectTimeout=3', @ssh[1 .. $#ssh]],
        forwards => [$sock],
        server_alive_interval_s => 5,
        server_alive_count_max => 2,
        ciphers => 'aes128-gcm@openssh.com,chacha20-poly1305@openssh.com',
    );
    my $cmd = slurp("/proc/" . $t2->pid . "/cmdline");
    like(
        $cmd,
        qr/\0-o\0Ciphers=aes128-gcm\@openssh\.com,chacha20-poly1305\@openssh\.com\0/,
        'the ciphers option reaches ssh'
    );
    like(
        $cmd,
        qr/\0-o\0ConnectTimeout=3\0.*\0-o\0ConnectTimeout=10\0/,
        "the caller's ConnectTimeout comes first, so it wins"
    );
    like(
        $cmd,
        qr/\0ServerAliveInterval=5\0-o\0ServerAliveCountMax=2\0/,
        'keepalive settings can be changed'
    );
    $t2->close(remote_cleanup => 0);
    my $out = PVE::MTunnel::ssh_run(
        ssh => \@ssh,
        command => ['true'],
        ciphers => 'aes256-gcm@openssh.com'
    );
    is($out->{exit_code}, 0, 'ssh_run takes the ciphers option');
    eval { PVE::MTunnel::ssh_run(ssh => \@ssh, command => ['true'], ciphers => 'no-such-cipher'); };
    like($@, qr/no-such-cipher|cipher/i,
        "ssh_run's ciphers reach ssh (an unknown one fails there)");
}

{
    # A forked child that inherited the handle must not close the parent's tunnel.
    my $t = PVE::MTunnel->open(ssh => \@ssh, forwards => [$sock]);
    $t->wait_ready(timeout_ms => 30_000);
    my $pid = fork() // die;
    if (!$pid) {
        eval { $t->close };
        undef $t;
        POSIX::_exit($@ ? 1 : 0);
    }
    waitpid($pid, 0);
    is($?, 0, 'fork: close and DESTROY in the child succeed');
    ok(alive($t->pid), "fork: the parent's ssh still runs");
    ok(-S $sock, "fork: the parent's socket is still there");
    eval { $t->command('resume 999') };
    like($@, qr/^tunnel replied 'ERR: /, 'fork: the parent can still talk through its tunnel');
    $t->close;
    ok(!-e $sock, 'fork: the parent closes normally');
}

my $helper = <<'PERL';
use strict; use warnings; use PVE::MTunnel;
my ($mode, @ssh) = @ARGV;
our $T = PVE::MTunnel->open(ssh => \@ssh, forwards => ['/run/qemu-server/100.migrate']);
$T->wait_ready(timeout_ms => 30_000);
$| = 1;
print $T->pid, "\n";
if ($mode eq 'sleep') { sleep 60 }
exit 0;    # mode 'exit': global destruction closes the tunnel
PERL

{
    # The host is SIGKILLed: ssh must follow it (parent-death signal), not linger.
    open(my $kid, '-|', $^X, "-I$top/perl/lib", '-e', $helper, 'sleep', @ssh) or die;
    my $ssh_pid = <$kid>;
    chomp $ssh_pid;
    ok($ssh_pid && alive($ssh_pid), 'SIGKILL: the host has a tunnel open');
    my ($host_pid) = grep { slurp("/proc/$_/stat") =~ /^\d+ \(perl\) \S+ $$ / }
        map { m{/proc/(\d+)/} ? $1 : () } glob('/proc/[0-9]*/stat');
    kill('KILL', $host_pid);
    close($kid);
    ok(wait_gone($ssh_pid, 10), 'SIGKILL: ssh exits soon after its host died');
    my $mtunnel_left = 0;

    for (1 .. 50) {
        my ($rc, $out) = $lab->run('node2', 'sh', '-c',
            'ps -eo args | grep -c "^perl .*/lab/qm mtunnel" || true');
        $mtunnel_left = $out + 0;
        last if !$mtunnel_left;
        sleep(0.1);
    }
    is($mtunnel_left, 0, "SIGKILL: no orphaned 'qm mtunnel' left on node2");
    unlink($sock);    # ssh leaves its socket file; the next open would remove it anyway
}

{
    # Exit with a tunnel in a global: global destruction closes it cleanly.
    open(my $kid, '-|', $^X, "-I$top/perl/lib", '-e', $helper, 'exit', @ssh) or die;
    my $ssh_pid = <$kid>;
    chomp $ssh_pid;
    my $ok = close($kid);
    is($?, 0, 'global destruction: the host exits 0 (no crash, no panic)');
    ok(!alive($ssh_pid), 'global destruction: ssh was closed and reaped');
    ok(!-e $sock, 'global destruction: the socket file was removed');
}

is_deeply([MTunnelLab::zombies_since($^T)], [], 'no zombie left');
$lab->leave;
$lab->down;
done_testing();
