#!/usr/bin/perl
# Storage migration against real QEMUs on this host (no lab): a source QEMU's 16 MiB raw disk
# is mirrored with drive-mirror into a target QEMU's NBD export (-incoming defer, as PVE's
# target), as PVE::QemuServer::BlockJob does during a migration with local disks:
# mirror_start, wait_ready, finish (cancel without force) -> the two files are equal.
# Also: finish on a mirror that is not ready is refused, cancel mid-copy leaves no job and the
# source intact, and a target that disappears mid-copy fails the wait naming the job.
# SHOW_ERRORS=1 prints the error messages the checks match.

use strict;
use warnings;
use Test::More;
use Digest::SHA ();
use File::Compare ();
use File::Temp qw(tempdir);
use POSIX ();
use Time::HiRes qw(time sleep);

use PVE::MTunnel;
use EachQEMU;

# once per QEMU (Debian's 7.2, and 10.0 where lab/setup-qemu installed it), each a subtest
my ($qemu, $qemu_version) = EachQEMU::qemu();

# KVM when /dev/kvm opens (TCG still as QEMU's fallback), else TCG.
my $accel = 'tcg';
if (open(my $kvm, '+<', '/dev/kvm')) { $accel = 'kvm'; close($kvm) }
my @accel = $accel eq 'kvm' ? ('-accel', 'kvm', '-accel', 'tcg') : ('-accel', 'tcg');

my $t0 = time();
my $T = tempdir('mtunnel-mirror-XXXXXX', TMPDIR => 1, CLEANUP => 1);
my $size = 16 << 20;
my %QEMU;    # name => pid of every QEMU this test started

sub stop_qemu {
    my ($name) = @_;
    my $pid = delete $QEMU{$name} or return;
    kill('KILL', $pid);
    for (1 .. 200) { last if !kill(0, $pid); sleep(0.02) }
}
END { stop_qemu($_) for keys %QEMU }
$SIG{$_} = sub { exit(1) }
    for qw(INT TERM HUP);    # END still runs

# Starts a daemonized QEMU with one IDE disk (id drive-ide0) and its QMP socket; stderr to a log.
sub start_qemu {
    my ($name, $disk, @extra) = @_;
    my @cmd = (
        $qemu, '-name',
        $name, '-nodefaults',
        '-display', 'none',
        '-serial', 'none',
        '-monitor', 'none',
        @accel, '-cpu',
        'qemu64,-pni', '-m',
        '64', '-drive',
        "file=$disk,format=raw,if=ide,id=drive-ide0", '-qmp',
        "unix:$T/$name.qmp,server=on,wait=off", '-pidfile',
        "$T/$name.pid", '-daemonize',
        @extra
    );
    my $child = fork() // die "fork: $!";
    if (!$child) {
        open(STDIN, '<', '/dev/null');
        open(STDOUT, '>>', "$T/$name.log");
        open(STDERR, '>>', "$T/$name.log");
        exec(@cmd) or POSIX::_exit(127);
    }
    waitpid($child, 0);    # -daemonize: returns once QEMU is set up
    my $rc = $?;
    open(my $fh, '<', "$T/$name.pid")
        or die "QEMU $name did not start (exit $rc): " . slurp("$T/$name.log");
    my ($pid) = <$fh> =~ /(\d+)/;
    $QEMU{$name} = $pid;
    return "$T/$name.qmp";
}

sub slurp { my ($f) = @_; open(my $fh, '<', $f) or return ''; local $/; return <$fh> }
sub sha { return Digest::SHA->new(256)->addfile($_[0])->hexdigest }

sub qmp {
    my ($sock, $cmd, %args) = @_;
    return PVE::MTunnel::qmp_execute($sock, $cmd, %args ? \%args : undef);
}

sub dies_like(&$$) {
    my ($code, $re, $name) = @_;
    eval { $code->() };
    my $err = $@;
    note("$name: $err") if $ENV{SHOW_ERRORS};
    like($err, $re, $name) and ok($err =~ /\n\z/, "$name: message ends in a newline (PVE style)");
}

# The disks: random data on the source, zeros on the target.
{
    open(my $in, '<:raw', '/dev/urandom') or die;
    open(my $out, '>:raw', "$T/src.raw") or die;
    my $left = $size;
    while ($left > 0) {
        read($in, my $buf, 1 << 20) == 1 << 20 or die;
        print $out $buf or die;
        $left -= 1 << 20;
    }
    close($out) or die;
    open($out, '>', "$T/dst.raw") or die;
    truncate($out, $size) or die;
    close($out);
}
my $src_sha = sha("$T/src.raw");

# -S: the source guest never runs, so nothing but the mirror touches the disks.
my $src = start_qemu('src', "$T/src.raw", '-S');
my $dst = start_qemu('dst', "$T/dst.raw", '-incoming', 'defer');
my ($blk) = grep { $_->{device} eq 'drive-ide0' } @{ qmp($dst, 'query-block') };
my $node = $blk->{inserted}{'node-name'} or BAIL_OUT('no node-name for drive-ide0 on the target');
qmp($dst, 'nbd-server-start', addr => { type => 'unix', data => { path => "$T/nbd.sock" } });
qmp(
    $dst, 'block-export-add',
    type => 'nbd',
    id => 'drive-ide0',
    'node-name' => $node,
    name => 'drive-ide0',
    writable => JSON::PP::true
);
my $nbd = "nbd:unix:$T/nbd.sock:exportname=drive-ide0";
my @jobs = ('drive-ide0');
note("accel $accel, QEMUs up after " . sprintf('%.1f', time() - $t0) . ' s');

isnt(File::Compare::compare("$T/src.raw", "$T/dst.raw"),
    0, 'before: the target disk differs from the source');

# --- the migration path: start, ready, finish with cancel
{
    my $job = PVE::MTunnel::qmp_mirror_start($src, 'drive-ide0', $nbd);
    is($job, 'drive-ide0', 'mirror_start returns the job id (the device)');
    dies_like { PVE::MTunnel::qmp_mirror_start($src, 'drive-ide0', $nbd) }
    qr/^drive-ide0: starting the mirror to '\Q$nbd\E': QMP command 'drive-mirror' failed: GenericError: /,
        'a second mirror of the same device: QEMU refuses, its message is passed on';
    is($PVE::MTunnel::last_error_code, $PVE::MTunnel::ERROR_CODE{qmp}, 'QEMU refused: qmp code');
    my $st = PVE::MTunnel::qmp_mirror_status($src, \@jobs);
    is($st->{jobs}[0]{id}, 'drive-ide0', 'status names the job');
    is($st->{jobs}[0]{type}, 'mirror', 'status: a mirror job');
    my $ready = PVE::MTunnel::qmp_mirror_wait_ready($src, \@jobs, timeout_ms => 20_000);
    ok($ready->{all_ready} && $ready->{jobs}[0]{ready}, 'wait_ready: all ready');
    my $r = PVE::MTunnel::qmp_mirror_finish($src, \@jobs, mode => 'cancel', timeout_ms => 20_000);
    is($r->{jobs}[0]{id}, 'drive-ide0', 'finish reports the job');
    cmp_ok($r->{jobs}[0]{offset}, '>=', $size, 'finish: the whole disk was copied');
    is_deeply(qmp($src, 'query-block-jobs'), [], 'finish: no job left (dismissed)');
    is(File::Compare::compare("$T/src.raw", "$T/dst.raw"),
        0, 'the target disk equals the source disk (cmp)');
    my ($after) = grep { $_->{device} eq 'drive-ide0' } @{ qmp($src, 'query-block') };
    is($after->{inserted}{file}, "$T/src.raw", 'the source VM still uses its own disk (no pivot)');
}

# --- a slow mirror: finish refused while not ready, wait_ready's deadline, cancel mid-copy
{
    # 1 MiB/s: QEMU copies a first burst, then sleeps ~16 s before it could become ready.
    PVE::MTunnel::qmp_mirror_start($src, 'drive-ide0', $nbd, { speed => 1 << 20 });
    my $st = PVE::MTunnel::qmp_mirror_status($src, \@jobs);
    is($st->{jobs}[0]{speed}, 1 << 20, 'speed reaches QEMU as a number');
    ok(!$st->{all_ready}, 'the slow mirror is not ready');
    dies_like { PVE::MTunnel::qmp_mirror_finish($src, \@jobs) }
    qr/^drive-ide0 at \d+ of \d+ bytes \([\d.]+%\) is not ready \(status '\w+'\): wait until every mirror is ready before finishing$/,
        'finish on a mirror that is not ready is refused';
    is(
        $PVE::MTunnel::last_error_code,
        $PVE::MTunnel::ERROR_CODE{invalid_argument},
        'finish refused: invalid_argument code'
    );
    is(scalar(@{ qmp($src, 'query-block-jobs') }), 1, 'finish refused: the job was left alone');
    my $w0 = time();
    dies_like { PVE::MTunnel::qmp_mirror_wait_ready($src, \@jobs, timeout_ms => 600) }
    qr/^mirror not ready after 0\.\d s: drive-ide0 at \d+ of \d+ bytes \([\d.]+%\)$/,
        'wait_ready deadline: the job and its progress are named';
    cmp_ok(time() - $w0, '<', 3, 'wait_ready honoured its deadline');
    is(
        $PVE::MTunnel::last_error_code,
        $PVE::MTunnel::ERROR_CODE{timeout},
        'wait_ready deadline: timeout code'
    );

    my $r = PVE::MTunnel::qmp_mirror_cancel($src, \@jobs, timeout_ms => 10_000);
    is_deeply(
        $r,
        { cancelled => ['drive-ide0'], already_gone => [] },
        'cancel mid-copy: the job was cancelled'
    );
    is_deeply(qmp($src, 'query-block-jobs'),
        [], 'cancel mid-copy: no job left, not even a concluded one');
    is(sha("$T/src.raw"), $src_sha, 'cancel mid-copy: the source disk is intact');
    is(qmp($src, 'query-status')->{status},
        'prelaunch', 'cancel mid-copy: the source VM is as it was');
    is_deeply(
        PVE::MTunnel::qmp_mirror_cancel($src, \@jobs, timeout_ms => 10_000),
        { cancelled => [], already_gone => ['drive-ide0'] },
        'cancel again: the job is already gone, which is fine'
    );
}

# --- the target disappears mid-copy
{
    # 4 MiB/s: a burst, then ~4 s of sleep; the target dies in between.
    PVE::MTunnel::qmp_mirror_start($src, 'drive-ide0', $nbd, { speed => 4 << 20 });
    ok(!PVE::MTunnel::qmp_mirror_status($src, \@jobs)->{all_ready},
        'target loss: the mirror is copying');
    stop_qemu('dst');
    dies_like { PVE::MTunnel::qmp_mirror_wait_ready($src, \@jobs, timeout_ms => 20_000) }
    qr/^drive-ide0: mirror failed: .+ \(io-status: [\w-]+\)$/,
        'target loss: wait_ready fails naming the job and QEMU\'s error';
    is($PVE::MTunnel::last_error_code, $PVE::MTunnel::ERROR_CODE{qmp}, 'target loss: qmp code');
    is_deeply(qmp($src, 'query-block-jobs'), [], 'target loss: the failed job was dismissed');
    dies_like { PVE::MTunnel::qmp_mirror_status($src, \@jobs) }
    qr/^drive-ide0: block job has vanished \(cancelled\?\)$/,
        'status of a job that is gone names it';
    is(sha("$T/src.raw"), $src_sha, 'target loss: the source disk is intact');
}

stop_qemu($_) for keys %QEMU;
note(sprintf('t/35 took %.1f s', time() - $t0));
done_testing();
