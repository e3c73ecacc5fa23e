#!/usr/bin/perl
# Post-copy through the library against real QEMUs on this host (no lab, no ssh): a source
# QEMU running the lab's guest (lab/guest/guest.asm, which keeps dirtying its memory)
# migrates over a UNIX socket into a target QEMU started with -incoming and -S, as PVE's
# target, both on the one disk image (shared storage, no snapshot: QEMU's image locks hand
# it over at the switch). Both get "postcopy" in qmp_migrate_setup; qmp_migrate_start_postcopy
# switches, and the target is resumed only once the source's side of the switch is through
# (postcopy-bytes), as the driver does;
# qmp_migrate_pause breaks the channel as a hung link would; qmp_migrate_recover on the target
# and qmp_migrate_resume on the source continue it over a new socket; qmp_wait_migration wakes
# on each post-copy status. At the end the guest runs on the target with its memory intact.
# SHOW_ERRORS=1 prints the error messages the checks match; KEEP=1 keeps the scratch directory.

use strict;
use warnings;
use Test::More;
use File::Temp qw(tempdir);
use FindBin;
use POSIX ();
use Time::HiRes qw(time sleep);

use PVE::MTunnel;
use EachQEMU;

# once per QEMU (Debian's 7.2, and 10.0 where lab/setup-qemu installed it), each a subtest
my ($qemu, $qemu_version) = EachQEMU::qemu();
my ($nasm) = grep { -x } map { "$_/nasm" } split(/:/, $ENV{PATH} // '');
plan skip_all => 'nasm is not installed (lab/setup-packages installs it)' if !$nasm;

my $accel = 'tcg';
if (open(my $kvm, '+<', '/dev/kvm')) { $accel = 'kvm'; close($kvm) }
my @accel = $accel eq 'kvm' ? ('-accel', 'kvm', '-accel', 'tcg') : ('-accel', 'tcg');

my $T = tempdir('mtunnel-postcopy-XXXXXX', TMPDIR => 1, CLEANUP => !$ENV{KEEP});
my $MEM = 128;
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

# The guest: the boot sector in a 1 MiB raw disk, opened by both QEMUs as shared storage is.
system($nasm, '-f', 'bin', '-o', "$T/guest.img", "$FindBin::Bin/../lab/guest/guest.asm") == 0
    or BAIL_OUT('nasm failed on lab/guest/guest.asm');
truncate("$T/guest.img", 1 << 20) or die "truncate: $!";

sub start_qemu {
    my ($name, @extra) = @_;
    my @cmd = (
        $qemu, '-name',
        $name, '-nodefaults',
        '-display', 'none',
        '-serial', 'none',
        '-monitor', 'none',
        @accel, '-cpu',
        'qemu64,-pni', '-m',
        $MEM, '-drive',
        "file=$T/guest.img,format=raw,if=ide,id=drive-ide0", '-qmp',
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
    waitpid($child, 0);
    my $rc = $?;
    open(my $fh, '<', "$T/$name.pid")
        or die "QEMU $name did not start (exit $rc): " . slurp("$T/$name.log");
    my ($pid) = <$fh> =~ /(\d+)/;
    $QEMU{$name} = $pid;
    return "$T/$name.qmp";
}

sub qmp {
    my ($sock, $cmd, %args) = @_;
    return PVE::MTunnel::qmp_execute($sock, $cmd, %args ? \%args : undef);
}

sub run_state { return qmp($_[0], 'query-status')->{status} }

# Waits (qmp_wait_migration in a loop) until $sock's migration reaches one of @want; returns
# the statuses seen on the way and the last answer.
sub wait_status {
    my ($sock, $limit_s, @want) = @_;
    my %want = map { $_ => 1 } @want;
    my (@seen, $stat);
    my $end = time() + $limit_s;
    while (time() < $end) {
        $stat = PVE::MTunnel::qmp_wait_migration($sock, hold_ms => 250);
        push @seen, $stat->{status} if !@seen || $seen[-1] ne $stat->{status};
        last if $want{ $stat->{status} } || $stat->{status} =~ /^(failed|cancelled)$/;
    }
    return (\@seen, $stat);
}

sub guest_loop_pass {
    my ($sock) = @_;
    my $out = qmp($sock, 'human-monitor-command', 'command-line' => 'xp /2wx 0x500');
    my ($magic, $pass) = $out =~ /:\s*0x([0-9a-f]+)\s+0x([0-9a-f]+)/;
    return ($magic // '') eq '474c544d' ? hex($pass) : undef;
}

my $src = start_qemu('src');
my $boot_end = time() + 60;
sleep(0.2) until defined(guest_loop_pass($src)) || time() > $boot_end;
ok(defined guest_loop_pass($src), 'the guest runs on the source') or BAIL_OUT('guest did not boot');
my $dst = start_qemu('dst', '-incoming', "unix:$T/migrate.sock", '-S');

# Without post-copy in the setup QEMU refuses the switch; the error is QEMU's.
eval { PVE::MTunnel::qmp_migrate_start_postcopy($src) };
like($@, qr/postcopy|migrat/i, 'a switch without a post-copy migration is QEMU\'s error');
is($PVE::MTunnel::last_error_code, $PVE::MTunnel::ERROR_CODE{qmp}, '... with the QMP code');
note("start_postcopy refused: $@") if $ENV{SHOW_ERRORS};

my $bw = 16 << 20;    # the first pass takes a few seconds: the switch comes mid-way
# the target first, as the driver does: the source's postcopy-preempt follows what the target
# took (QEMU 8.1 and later refuse it on a target whose -incoming already listens)
my $dst_preempt;
for my $side ([dst => $dst], [src => $src]) {
    my %caps = (events => 1);
    $caps{'postcopy-preempt'} = $dst_preempt if $side->[0] eq 'src' && !$dst_preempt;
    my $applied = PVE::MTunnel::qmp_migrate_setup(
        $side->[1],
        {
            capabilities => \%caps,
            parameters => { 'max-bandwidth' => $bw },
            postcopy => 1
        }
    );
    ok($applied->{capabilities}{'postcopy-ram'}, "$side->[0]: postcopy-ram on");
    my $offered = (grep { $_->{capability} eq 'postcopy-preempt' }
            @{ qmp($side->[1], 'query-migrate-capabilities') }) ? 1 : 0;
    my $on = $applied->{capabilities}{'postcopy-preempt'} ? 1 : 0;
    if ($side->[0] eq 'dst') {
        $dst_preempt = $on;
        # on or refused, never silently off: where QEMU offers it and is off, QEMU said why
        is($on || defined $applied->{'postcopy-preempt-refused'} ? 1 : 0,
            $offered, 'dst: postcopy-preempt on where QEMU offers it, unless QEMU refused it');
        note(
            "QEMU $qemu_version, dst: postcopy-preempt "
                . (
                  $on ? 'on'
                : $offered ? "refused: $applied->{'postcopy-preempt-refused'}"
                : 'not offered'
                )
        );
        like(
            $applied->{'postcopy-preempt-refused'},
            qr/Postcopy preempt must be set before incoming starts/,
            'dst: QEMU 10.0 refuses postcopy-preempt on a listening target, and the refusal is returned'
        ) if $qemu_version eq '10.0';
    } else {
        is(
            $on,
            $dst_preempt && $offered ? 1 : 0,
            'src: postcopy-preempt exactly as the target took it'
        );
    }
    is($applied->{parameters}{'max-postcopy-bandwidth'},
        $bw, "$side->[0]: the limit holds after the switch");
}

PVE::MTunnel::qmp_migrate($src, "unix:$T/migrate.sock", { setup => 0 });
is(run_state($dst), 'inmigrate', 'the target waits for the incoming migration');
sleep(1);
is(PVE::MTunnel::qmp_query_migrate($src)->{status}, 'active', 'pre-copy runs');
my $switch_t = time();
PVE::MTunnel::qmp_migrate_start_postcopy($src);
my ($seen, $stat) = wait_status($src, 60, 'postcopy-active', 'completed');
is($stat->{status}, 'postcopy-active', 'after the switch the source reports postcopy-active')
    or diag("statuses seen: @$seen");
isnt(run_state($dst), 'running',
    'the target is not run by the switch itself (-S): ' . run_state($dst));
# postcopy-active comes before the device state went over (a pause then fails the migration,
# a 'cont' then takes the disk the source still holds): the target is resumed once the
# source's side is through, when pages are sent in post-copy
my $through;
for (1 .. 5000) {
    $through = PVE::MTunnel::qmp_query_migrate($src)->{ram}{'postcopy-bytes'} // 0;
    last if $through > 0;
    sleep(0.002);
}
cmp_ok($through, '>', 0, 'the source reports its side of the switch through (postcopy-bytes)');
is(run_state($src), 'finish-migrate', 'the source is stopped when the target is resumed');
qmp($dst, 'cont');
my ($src_run, $dst_run);
for (1 .. 300) {
    ($src_run, $dst_run) = (run_state($src), run_state($dst));
    last if $dst_run eq 'running';
    sleep(0.02);
}
note(
    sprintf(
        "target ran %.2f s after the switch; source %s, migration %s",
        time() - $switch_t,
        $src_run, PVE::MTunnel::qmp_query_migrate($src)->{status}
    )
);
is($dst_run, 'running', 'the guest runs on the target during post-copy');
is($src_run, 'finish-migrate', 'the source is stopped');
my $pass0 = guest_loop_pass($dst);

# A hung channel: pause it; both sides go to postcopy-paused.
PVE::MTunnel::qmp_migrate_pause($src);
($seen, $stat) = wait_status($src, 30, 'postcopy-paused');
is($stat->{status}, 'postcopy-paused', 'migrate-pause pauses the source')
    or diag("statuses seen: @$seen");
my $dst_status;
for (1 .. 100) {
    $dst_status = PVE::MTunnel::qmp_query_migrate($dst)->{status};
    last if $dst_status eq 'postcopy-paused';
    sleep(0.1);
}
is($dst_status, 'postcopy-paused', 'the target notices and pauses too');

# Resuming into a URI nobody listens on fails; the migration stays paused.
eval { PVE::MTunnel::qmp_migrate_resume($src, "exec:cat") };
like($@, qr/invalid migration URI 'exec:cat'/, 'a bad resume URI is refused by name');
note("bad resume: $@") if $ENV{SHOW_ERRORS};

PVE::MTunnel::qmp_migrate_recover($dst, "unix:$T/recover.sock");
PVE::MTunnel::qmp_migrate_resume($src, "unix:$T/recover.sock");
($seen, $stat) = wait_status($src, 120, 'completed');
is($stat->{status}, 'completed', 'the resumed post-copy migration completes')
    or diag("statuses seen: @$seen; " . ($stat->{'error-desc'} // ''));
ok((grep { /^postcopy-/ } @$seen), "the wait reported post-copy statuses on the way (@$seen)");
is(run_state($dst), 'running', 'the guest runs on the target');
my $pass1 = guest_loop_pass($dst);
cmp_ok($pass1 // -1, '>=', $pass0 // 0, 'the guest loop went on on the target');

my $check = `MTUNNEL_GUEST_CHECK_QMP=$T/dst.qmp $FindBin::Bin/../lab/guest-check 100 $MEM 2>&1`;
like($check, qr/^guest memory ok/, 'guest memory intact on the target') or diag($check);
stop_qemu($_) for qw(src dst);
done_testing();
