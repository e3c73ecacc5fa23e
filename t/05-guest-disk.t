#!/usr/bin/perl
# The lab's disk guest (lab/guest/guest.asm -DDISK) on a real QEMU on this host (no lab): it
# boots, keeps writing its disk, and lab/guest-check finds its RAM and disk consistent; a
# sector changed in the file behind the stopped VM's back is reported BAD by number.

use strict;
use warnings;
use Test::More;
use Cwd qw(abs_path);
use File::Basename qw(dirname);
use File::Temp qw(tempdir);
use POSIX ();
use Time::HiRes qw(time sleep);

my %bin;
for my $name (qw(nasm qemu-system-x86_64)) {
    ($bin{$name}) = grep { -x } map { "$_/$name" } split(/:/, $ENV{PATH} // '');
    plan skip_all => "$name is not installed" if !$bin{$name};
}

my $root = abs_path(dirname(__FILE__) . '/..');
my $check = "$root/lab/guest-check";
my $DSTART = 2048;
my $t0 = time();

# KVM when /dev/kvm opens (TCG still as QEMU's fallback), else TCG.
my @accel = ('-accel', 'tcg');
if (open(my $kvm, '+<', '/dev/kvm')) { @accel = ('-accel', 'kvm', '-accel', 'tcg'); close($kvm) }

my $T = tempdir('mtunnel-guest-disk-XXXXXX', TMPDIR => 1, CLEANUP => 1);
my $qemu_pid;
# QEMU is our child (no -daemonize): killed and reaped here on every path, no zombie.
sub stop_qemu {
    my $pid = $qemu_pid or return;
    undef $qemu_pid;
    kill('KILL', $pid);
    waitpid($pid, 0);
}
END { my $rc = $?; stop_qemu(); $? = $rc }
$SIG{$_} = sub { exit(1) }
    for qw(INT TERM HUP);    # END still runs

sub slurp { my ($f) = @_; open(my $fh, '<', $f) or return ''; local $/; return <$fh> }

# (exit code, stdout) of guest-check against our QEMU
$ENV{MTUNNEL_GUEST_CHECK_QMP} = "$T/qmp.sock";

sub guest_check {
    my $out = `$^X $check @_ 2>&1`;
    return ($? >> 8, $out);
}

# the image: boot sector plus the disk code's sectors, in an 8 MiB raw disk
is(system($bin{nasm}, '-f', 'bin', '-DDISK', '-o', "$T/guest.bin", "$root/lab/guest/guest.asm"),
    0, 'nasm -DDISK builds the disk guest');
my $bin = slurp("$T/guest.bin");
ok(
    length($bin) > 512 && length($bin) % 512 == 0 && length($bin) <= $DSTART * 512,
    'the image is whole sectors, all below the region the guest writes'
);
is(unpack('v', substr($bin, 510, 2)), 0xaa55, 'its first sector is a boot sector');
{
    open(my $fh, '>:raw', "$T/disk.raw") or die "$T/disk.raw: $!";
    print $fh $bin;
    truncate($fh, 8 << 20) or die "truncate: $!";
    close($fh) or die;
}
my $sectors = (8 << 20) / 512 - $DSTART;

my @cmd = (
    $bin{'qemu-system-x86_64'}, '-name',
    'guest-disk', @accel,
    '-machine', 'pc',
    '-cpu', 'qemu64,-pni',
    '-m', '64',
    '-nodefaults', '-display',
    'none', '-vga',
    'none', '-drive',
    "file=$T/disk.raw,format=raw,if=ide,id=drive-ide0", '-qmp',
    "unix:$T/qmp.sock,server=on,wait=off"
);
$qemu_pid = fork() // die "fork: $!";
if (!$qemu_pid) {
    open(STDIN, '<', '/dev/null');
    open(STDOUT, '>>', "$T/qemu.log");
    open(STDERR, '>>', "$T/qemu.log");
    exec(@cmd) or POSIX::_exit(127);
}

# wait until the guest runs, then until it has written a few hundred sectors
my ($rc, $out) = guest_check('--wait', 100, 20);
is($rc, 0, 'guest-check --wait: the guest runs') or diag($out, slurp("$T/qemu.log"));
like(
    $out,
    qr/^guest running: pass (\d+), disk pass (\d+) sector (\d+)$/m,
    '--wait shows the disk position after the RAM pass'
) or BAIL_OUT('the disk guest does not run');
my ($first) = $out =~ /sector (\d+)$/m;
my $advanced;
for (1 .. 100) {
    ($rc, $out) = guest_check('--wait', 100, 5);
    my ($p, $k) = $out =~ /disk pass (\d+) sector (\d+)/ or last;
    if ($p > 1 || $k >= $first + 300) { $advanced = $out; last }
    sleep(0.1);
}
ok($advanced, 'the guest writes its disk') or diag($out);
chomp($advanced //= '');
note($advanced);

($rc, $out) = guest_check(100, 64);
is($rc, 0, 'guest-check: RAM and disk consistent') or diag($out);
like(
    $out,
    qr/^guest memory ok: 16128 pages, value \d+, step at page \d+$/m,
    'the memory line as before'
);
like($out, qr/^guest disk ok: $sectors sectors, pass \d+, next sector \d+$/m, 'the disk line');
my ($p, $k) = $out =~ /^guest disk ok: \d+ sectors, pass (\d+), next sector (\d+)$/m;

# a lost write: zero a sector the guest has written (the one before k, or the last one of
# the previous pass if k just wrapped), with the VM still stopped
SKIP: {
    skip('no disk position', 3) if !defined $k;
    my $bad = $k > $DSTART ? $k - 1 : $DSTART + $sectors - 1;
    open(my $fh, '+<:raw', "$T/disk.raw") or die "$T/disk.raw: $!";
    sysseek($fh, $bad * 512, 0) or die;
    syswrite($fh, "\0" x 512) == 512 or die "write: $!";
    close($fh) or die;
    ($rc, $out) = guest_check(100, 64);
    is($rc, 1, 'guest-check: a zeroed sector is BAD (exit 1)') or diag($out);
    like(
        $out,
        qr/^guest disk BAD: .*1 bad sectors: sector $bad: zeros, expected pass \d+$/m,
        'the BAD line names the sector, what it held and what was expected'
    ) or diag($out);
    like($out, qr/^guest memory ok: /m, 'the memory line is still ok');
}

($rc, $out) = guest_check('--self-test');
is($rc, 0, 'guest-check --self-test passes') or diag($out);

stop_qemu();
cmp_ok(time() - $t0, '<', 30, 'within 30 s');
done_testing();
