#!/usr/bin/perl
# Storage migration of a disk attached with -blockdev, against real QEMUs on this host (no lab):
# a QEMU 10.0 source with qemu-server 9's node graph (throttle drive-ide0 -> raw f... -> file
# e...) is mirrored into a second QEMU 10.0's NBD export (the target's disk exported by node
# name, as qemu-server 9's target does). The library sees no BlockBackend 'drive-ide0' and uses
# blockdev-mirror: an nbd target node mt-mirror-ide0, job mirror-ide0; finish (cancel) leaves
# the target equal to the source, no job and no mt-* node; the abort path, a blockdev-mirror
# QEMU refuses and a job that fails delete the target node too. A -drive VM (QEMU 7.2, and
# QEMU 10.0) still gets drive-mirror. Skipped without QEMU 10.0 (lab/setup-qemu installs it).
# SHOW_ERRORS=1 prints the error messages the checks match.

use strict;
use warnings;
use Test::More;
use Digest::SHA ();
use File::Temp qw(tempdir);
use JSON::PP ();
use POSIX ();
use Time::HiRes qw(time sleep);

use PVE::MTunnel;

my $QEMU10 = '/opt/mtunnel-lab/qemu-10.0/bin/qemu-system-x86_64';
my $QEMU72 = '/usr/bin/qemu-system-x86_64';
plan skip_all => "QEMU 10.0 is not installed at $QEMU10 (lab/setup-qemu installs it): "
    . 'it attaches disks with -blockdev as qemu-server 9 does'
    if !-x $QEMU10;

# KVM when /dev/kvm opens (TCG still as QEMU's fallback), else TCG.
my $accel = 'tcg';
if (open(my $kvm, '+<', '/dev/kvm')) { $accel = 'kvm'; close($kvm) }
my @accel = $accel eq 'kvm' ? ('-accel', 'kvm', '-accel', 'tcg') : ('-accel', 'tcg');

my $t0 = time();
my $T = tempdir('mtunnel-bdmirror-XXXXXX', TMPDIR => 1, CLEANUP => 1);
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

sub slurp { my ($f) = @_; open(my $fh, '<', $f) or return ''; local $/; return <$fh> }
sub sha { return Digest::SHA->new(256)->addfile($_[0])->hexdigest }

# Starts a daemonized, stopped (-S) QEMU $bin named $name with @disk (its disk arguments) and
# its QMP socket; stderr to a log. Returns the QMP socket.
sub start_qemu {
    my ($name, $bin, @disk) = @_;
    my @cmd = (
        $bin, '-name',
        $name, '-nodefaults',
        '-display', 'none',
        '-serial', 'none',
        '-monitor', 'none',
        @accel, '-cpu',
        'qemu64,-pni', '-m',
        '64', '-S',
        @disk, '-qmp',
        "unix:$T/$name.qmp,server=on,wait=off", '-pidfile',
        "$T/$name.pid", '-daemonize',
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

# A node name as qemu-server 9's Blockdev::get_node_name makes it: $prefix (f: format, e: file)
# and 30 hex digits of a hash.
sub node_name {
    my ($prefix, $id, $file) = @_;
    return $prefix . substr(Digest::SHA::sha256_hex("drive=$id,volid=$file"), 0, 30);
}

# qemu-server 9's arguments for IDE disk $id on $file: throttle group, the -blockdev node
# graph and the device.
sub blockdev_disk {
    my ($id, $file) = @_;
    my $common = { cache => { direct => JSON::PP::false, 'no-flush' => JSON::PP::false } };
    my $node = {
        driver => 'throttle',
        'node-name' => "drive-$id",
        'throttle-group' => "throttle-drive-$id",
        'read-only' => JSON::PP::false,
        file => {
            %$common,
            driver => 'raw',
            'node-name' => node_name('f', $id, $file),
            'read-only' => JSON::PP::false,
            'detect-zeroes' => 'on',
            discard => 'ignore',
            file => {
                %$common,
                driver => 'file',
                filename => $file,
                'node-name' => node_name('e', $id, $file),
                aio => 'threads',
                'read-only' => JSON::PP::false,
                'detect-zeroes' => 'on',
                discard => 'ignore',
            },
        },
    };
    my $n = $id =~ /(\d+)$/ ? $1 : 0;    # as qemu-server: two units per IDE bus
    my $json = JSON::PP->new->canonical;
    return (
        '-object',
        $json->encode({ id => "throttle-drive-$id", limits => {}, 'qom-type' => 'throttle-group' }),
        '-blockdev',
        $json->encode($node),
        '-device',
        "ide-hd,bus=ide." . int($n / 2) . ",unit=" . ($n % 2) . ",drive=drive-$id,id=$id",
    );
}

# A disk of $bytes: random data, or zeros.
sub make_disk {
    my ($path, $bytes, $random) = @_;
    open(my $out, '>:raw', $path) or die "$path: $!";
    if ($random) {
        open(my $in, '<:raw', '/dev/urandom') or die;
        for (1 .. $bytes >> 20) {
            read($in, my $buf, 1 << 20) == 1 << 20 or die;
            print $out $buf or die;
        }
    }
    truncate($out, $bytes) or die;
    close($out) or die;
}

sub qmp {
    my ($sock, $cmd, %args) = @_;
    return PVE::MTunnel::qmp_execute($sock, $cmd, %args ? \%args : undef);
}

sub nodes {
    my ($sock) = @_;
    return { map { $_->{'node-name'} => $_ }
            @{ qmp($sock, 'query-named-block-nodes', flat => JSON::PP::true) } };
}

# The library's target nodes (mt-*, mt2-*) on $sock.
sub mt_nodes {
    return [sort grep { /^mt2?-/ } keys %{ nodes($_[0]) }];
}

# Starts an NBD server on $qmp's QEMU at $path and exports, writable, each node of %exports
# (export name => node name).
sub export_nbd {
    my ($qmp, $path, %exports) = @_;
    qmp($qmp, 'nbd-server-start', addr => { type => 'unix', data => { path => $path } });
    for my $name (sort keys %exports) {
        qmp(
            $qmp, 'block-export-add',
            type => 'nbd',
            id => $name,
            'node-name' => $exports{$name},
            name => $name,
            writable => JSON::PP::true
        );
    }
}

sub dies_like(&$$) {
    my ($code, $re, $name) = @_;
    my $r = eval { $code->() };
    my $err = $@;
    note("$name: $err") if $ENV{SHOW_ERRORS};
    like($err, $re, $name)
        or diag('it returned ' . JSON::PP->new->canonical->allow_nonref->encode($r));
}

# Writes 64 KiB of $byte at $offset through the guest's device $qdev, as the guest would.
sub guest_write {
    my ($qmp, $qdev, $byte, $offset) = @_;
    my $out = qmp($qmp, 'human-monitor-command',
        'command-line' => sprintf('qemu-io -d %s "write -P 0x%02x %d 64k"', $qdev, $byte, $offset));
    die "qemu-io on $qdev: $out" if $out =~ /error|fail/i;
}

# ------------------------------------------------------------ -blockdev: blockdev-mirror

make_disk("$T/src.raw", $size, 1);
make_disk("$T/dst.raw", $size, 0);
make_disk("$T/small.raw", $size / 2, 0);
make_disk("$T/dst2.raw", $size, 0);
my $src_sha = sha("$T/src.raw");
my $src_fmt = node_name('f', 'ide0', "$T/src.raw");    # the node below the throttle node

my $src = start_qemu('src', $QEMU10, blockdev_disk('ide0', "$T/src.raw"));
my $dst = start_qemu(
    'dst', $QEMU10,
    blockdev_disk('ide0', "$T/dst.raw"),
    blockdev_disk('ide1', "$T/small.raw"),
    blockdev_disk('ide2', "$T/dst2.raw"),
    '-incoming', 'defer'
);
export_nbd($dst, "$T/nbd.sock", map { ("drive-ide$_" => "drive-ide$_") } 0 .. 2);
my $nbd = "nbd:unix:$T/nbd.sock:exportname=drive-ide0";
note("accel $accel, QEMU 10.0 source and target up after " . sprintf('%.1f', time() - $t0) . ' s');

{
    my ($blk) = @{ qmp($src, 'query-block') };
    is($blk->{device}, '', 'the -blockdev source has no BlockBackend named after the disk');
    is($blk->{inserted}{'node-name'}, 'drive-ide0', 'its top node is drive-ide0');

    is(PVE::MTunnel::qmp_mirror_method($src, 'drive-ide0'),
        'blockdev-mirror',
        'qmp_mirror_method: a -blockdev top node is mirrored with blockdev-mirror');
    dies_like { PVE::MTunnel::qmp_mirror_method($src, 'drive-scsi5') }
    qr/^'drive-scsi5' is neither a drive \(.*\) nor a block node \(.*\)$/,
        'qmp_mirror_method: a device that is neither a drive nor a block node is named';
    is(
        $PVE::MTunnel::last_error_code,
        $PVE::MTunnel::ERROR_CODE{invalid_argument},
        'an unknown device: invalid_argument code'
    );
    dies_like { PVE::MTunnel::qmp_mirror_start($src, 'drive-scsi5', $nbd) }
    qr/^'drive-scsi5' is neither a drive/,
        'qmp_mirror_start: an unknown device is refused naming it';
    is_deeply(mt_nodes($src), [], 'an unknown device: no target node was added');
}

# --- the migration path: start, ready, guest writes, finish with cancel
{
    my $job = PVE::MTunnel::qmp_mirror_start($src, 'drive-ide0', $nbd);
    is($job, 'mirror-ide0', 'mirror_start returns upstream\'s job id mirror-ide0');
    my $target = nodes($src)->{'mt-mirror-ide0'};
    is($target && $target->{drv}, 'nbd', 'the target is the nbd node mt-mirror-ide0')
        or diag(explain([sort keys %{ nodes($src) }]));
    dies_like { PVE::MTunnel::qmp_mirror_start($src, 'drive-ide0', $nbd) }
    qr/^drive-ide0: starting the mirror to '\Q$nbd\E': a block job 'mirror-ide0' exists already/,
        'a second mirror of the disk is refused before anything is added';
    is($PVE::MTunnel::last_error_code, $PVE::MTunnel::ERROR_CODE{qmp}, 'second mirror: qmp code');
    is_deeply(mt_nodes($src), ['mt-mirror-ide0'],
        'second mirror: the running job\'s node is untouched');

    my $ready = PVE::MTunnel::qmp_mirror_wait_ready($src, [$job], timeout_ms => 30_000);
    ok($ready->{all_ready} && $ready->{jobs}[0]{ready}, 'wait_ready: the blockdev mirror is ready');
    is($ready->{jobs}[0]{type}, 'mirror', 'status: a mirror job');

    guest_write($src, 'ide0', 0xa5, 1 << 20);
    guest_write($src, 'ide0', 0x5a, $size - (64 << 10));
    my $written_sha = sha("$T/src.raw");
    isnt($written_sha, $src_sha, 'the guest wrote to its disk while the mirror was ready');

    my $r = PVE::MTunnel::qmp_mirror_finish($src, [$job], mode => 'cancel', timeout_ms => 30_000);
    is($r->{jobs}[0]{id}, 'mirror-ide0', 'finish reports the job');
    cmp_ok($r->{jobs}[0]{offset}, '>=', $size, 'finish: the whole disk was copied');
    is_deeply($r->{detached}, ['mt-mirror-ide0'], 'finish: the target node was deleted')
        or diag(explain($r));
    ok(!exists $r->{detach_errors}, 'finish: no node failed to be deleted') or diag(explain($r));
    is_deeply(qmp($src, 'query-block-jobs'), [], 'finish: no job left (dismissed)');
    is_deeply(mt_nodes($src), [], 'finish: no mt-* node left on the source');
    is(sha("$T/dst.raw"), $written_sha,
        'the target disk equals the source disk, the guest\'s writes during the mirror included');
    my $after = nodes($src);
    is($after->{$src_fmt} && $after->{$src_fmt}{file},
        "$T/src.raw", 'the source VM still uses its own disk below the throttle node (no pivot)')
        or diag(explain([sort keys %$after]));
    $src_sha = $written_sha;
}

# --- the abort path: cancel mid-copy
{
    # 1 MiB/s: QEMU copies a first burst, then sleeps ~16 s before it could become ready.
    my $job = PVE::MTunnel::qmp_mirror_start($src, 'drive-ide0', $nbd, { speed => 1 << 20 });
    my $st = PVE::MTunnel::qmp_mirror_status($src, [$job]);
    is($st->{jobs}[0]{speed}, 1 << 20, 'abort: speed reaches blockdev-mirror');
    ok(!$st->{all_ready}, 'abort: the slow mirror is not ready');
    my $r = PVE::MTunnel::qmp_mirror_cancel($src, [$job], timeout_ms => 10_000);
    is_deeply(
        $r,
        { cancelled => ['mirror-ide0'], already_gone => [], detached => ['mt-mirror-ide0'] },
        'abort: the job was cancelled and its target node deleted'
    );
    is_deeply(qmp($src, 'query-block-jobs'), [], 'abort: no job left, not even a concluded one');
    is_deeply(mt_nodes($src), [], 'abort: no mt-* node left on the source');
    is(sha("$T/src.raw"), $src_sha, 'abort: the source disk is intact');
    is_deeply(
        PVE::MTunnel::qmp_mirror_cancel($src, [$job], timeout_ms => 10_000),
        { cancelled => [], already_gone => ['mirror-ide0'] },
        'abort again: the job is already gone and there is nothing to delete'
    );
}

# --- QEMU refuses blockdev-mirror after the target node was added
{
    # another job holds the disk (its own job id, so its own node)
    my $other =
        PVE::MTunnel::qmp_mirror_start($src, 'drive-ide0', $nbd,
        { speed => 1 << 20, job_id => 'other' });
    is_deeply(mt_nodes($src), ['mt-other'], 'refused: the other job\'s target node is mt-other');
    dies_like { PVE::MTunnel::qmp_mirror_start($src, 'drive-ide0', $nbd) }
    qr/^drive-ide0: starting the mirror to '\Q$nbd\E': QMP command 'blockdev-mirror' failed: \w+: .+$/,
        'refused: QEMU\'s refusal of blockdev-mirror is passed on';
    is_deeply(mt_nodes($src), ['mt-other'],
        'refused: the target node mt-mirror-ide0 it had added was deleted again');
    my $r = PVE::MTunnel::qmp_mirror_cancel($src, [$other], timeout_ms => 10_000);
    is_deeply($r->{detached}, ['mt-other'], 'refused: cancelling the other job deletes its node');
    is_deeply(mt_nodes($src), [], 'refused: no mt-* node left');
}

# --- a job that fails: the target is smaller than the source
{
    my $small = "nbd:unix:$T/nbd.sock:exportname=drive-ide1";
    my $job = PVE::MTunnel::qmp_mirror_start($src, 'drive-ide0', $small);
    dies_like { PVE::MTunnel::qmp_mirror_wait_ready($src, [$job], timeout_ms => 30_000) }
    qr/^mirror-ide0: mirror failed: .+ \(io-status: [\w-]+\)$/,
        'a failing job: wait_ready fails naming the job and QEMU\'s error';
    is($PVE::MTunnel::last_error_code, $PVE::MTunnel::ERROR_CODE{qmp}, 'a failing job: qmp code');
    is_deeply(qmp($src, 'query-block-jobs'), [], 'a failing job: it was dismissed');
    is_deeply(mt_nodes($src), [], 'a failing job: its target node was deleted');
    is(sha("$T/src.raw"), $src_sha, 'a failing job: the source disk is intact');
}

# --- complete (a disk move): the disk is switched over to the target, twice
{
    my $job = PVE::MTunnel::qmp_mirror_start($src, 'drive-ide0', $nbd);
    PVE::MTunnel::qmp_mirror_wait_ready($src, [$job], timeout_ms => 30_000);
    my $r = PVE::MTunnel::qmp_mirror_finish($src, [$job], mode => 'complete', timeout_ms => 30_000);
    ok(!exists $r->{detached} && !exists $r->{detach_errors},
        'complete: nothing to delete, QEMU dropped the old inline node itself')
        or diag(explain($r));
    my $now = nodes($src);
    ok(!$now->{$src_fmt}, 'complete: the node the disk left is gone');
    is_deeply(mt_nodes($src), ['mt-mirror-ide0'], 'complete: the target node is the disk now');

    my $nbd2 = "nbd:unix:$T/nbd.sock:exportname=drive-ide2";
    $job = PVE::MTunnel::qmp_mirror_start($src, 'drive-ide0', $nbd2);
    is_deeply(
        mt_nodes($src),
        ['mt-mirror-ide0', 'mt2-mirror-ide0'],
        'a second move: mt-mirror-ide0 is in use, the target is mt2-mirror-ide0'
    );
    PVE::MTunnel::qmp_mirror_wait_ready($src, [$job], timeout_ms => 30_000);
    $r = PVE::MTunnel::qmp_mirror_finish($src, [$job], mode => 'complete', timeout_ms => 30_000);
    is_deeply($r->{detached}, ['mt-mirror-ide0'],
        'a second move: the node the disk left (added by blockdev-add) was deleted')
        or diag(explain($r));
    is_deeply(mt_nodes($src), ['mt2-mirror-ide0'], 'a second move: the disk is mt2-mirror-ide0');
    is(sha("$T/dst2.raw"), $src_sha, 'a second move: the new disk holds the data');
    is_deeply(qmp($src, 'query-block-jobs'), [], 'complete: no job left');
}
stop_qemu($_) for qw(src dst);

# ------------------------------------------------------------ -drive: drive-mirror, unchanged

for my $case ([$QEMU72, '7.2 (Debian)'], [$QEMU10, '10.0']) {
    my ($bin, $version) = @$case;
SKIP: {
        skip("QEMU $version is not installed at $bin", 7) if !-x $bin;
        make_disk("$T/dsrc.raw", $size, 1);
        make_disk("$T/ddst.raw", $size, 0);
        my $drive = sub { ('-drive', "file=$_[0],format=raw,if=ide,id=drive-ide0") };
        my $s = start_qemu('dsrc', $bin, $drive->("$T/dsrc.raw"));
        my $d = start_qemu('ddst', $bin, $drive->("$T/ddst.raw"), '-incoming', 'defer');
        my ($blk) = grep { $_->{device} eq 'drive-ide0' } @{ qmp($d, 'query-block') };
        export_nbd($d, "$T/dnbd.sock", 'drive-ide0' => $blk->{inserted}{'node-name'});
        my $uri = "nbd:unix:$T/dnbd.sock:exportname=drive-ide0";

        is(PVE::MTunnel::qmp_mirror_method($s, 'drive-ide0'),
            'drive-mirror', "QEMU $version -drive: qmp_mirror_method picks drive-mirror");
        my $job = PVE::MTunnel::qmp_mirror_start($s, 'drive-ide0', $uri);
        is($job, 'drive-ide0', "QEMU $version -drive: the job id is the device, as before");
        PVE::MTunnel::qmp_mirror_wait_ready($s, [$job], timeout_ms => 30_000);
        my $r = PVE::MTunnel::qmp_mirror_finish($s, [$job], timeout_ms => 30_000);
        is_deeply([sort keys %$r], ['jobs'], "QEMU $version -drive: finish's result is as before")
            or diag(explain($r));
        is_deeply(mt_nodes($s), [], "QEMU $version -drive: no target node was ever added");
        is_deeply(qmp($s, 'query-block-jobs'), [], "QEMU $version -drive: no job left");
        is(sha("$T/ddst.raw"), sha("$T/dsrc.raw"),
            "QEMU $version -drive: the target equals the source");
        ok(grep({ $_->{device} eq 'drive-ide0' } @{ qmp($s, 'query-block') }),
            "QEMU $version -drive: the source keeps its drive");
        stop_qemu($_) for qw(dsrc ddst);
        unlink("$T/dnbd.sock");
    }
}

note(sprintf('t/37 took %.1f s', time() - $t0));
done_testing();
