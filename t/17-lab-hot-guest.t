#!/usr/bin/perl
# The lab's hot guest (lab/guest/guest.asm -DHOT, VM config "guest: hot" and "hot: W:R"): lab/qm
# hands W:R to QEMU as the fw_cfg file opt/mtunnel/hot, the guest reads them back (its status
# block, guest-check --stall), calibrates its TSC, rewrites its working set and publishes its
# achieved rate and its stalls (the longest gap between two page writes, since boot and per
# pass); after a plain pre-copy migration node1 -> node2 (the lab's tools, over the migration
# network) it goes on on the target and guest-check finds its memory intact: the working set
# under the step rule, every page after it still 1. No timed assertions (a noisy host): only
# what the guest reports must be present and sane.
# Run as `make test` does: MTUNNEL_LIB=... lab/reap-run prove -Iperl/lib -It/lib t/17-lab-hot-guest.t

use strict;
use warnings;
use Test::More;
use Cwd qw(abs_path);
use File::Basename qw(dirname);
use JSON::PP ();
use Time::HiRes qw(time sleep);

use MTunnelLab;

my $top = abs_path(dirname(__FILE__) . '/..');
my $vmid = 100;
my ($W, $R) = (24, 12);    # not the defaults: the config must reach the guest
my $MEM = 128;

my $lab = MTunnelLab->up(nodes => 2);
my $dir = $lab->dir;

# guest-check --stall as a hash (undef values when it failed)
sub stall {
    my ($node, $v) = @_;
    my ($rc, $out, $err) = $lab->run($node, "$top/lab/guest-check", '--stall', $v // $vmid);
    my %st = map { /^(\w+): (.*)$/ ? ($1 => $2) : () } split /\n/, $out;
    $st{rc} = $rc;
    $st{text} = "$out$err";
    $st{passes} = { map { split /:/ } split / /, $st{stall_pass_us} // '' };
    return \%st;
}

# wait (a guard against a hang, not a timing check) until $cond->() holds
sub wait_until {
    my ($cond, $timeout) = @_;
    my $deadline = time + $timeout;
    while (time < $deadline) {
        my $r = $cond->();
        return $r if $r;
        sleep 0.2;
    }
    return $cond->();
}

sub qmp {
    my ($node, $cmd, $args) = @_;
    my ($rc, $out, $err) =
        $lab->run($node, 'qmp', $vmid, $cmd, defined $args ? JSON::PP::encode_json($args) : ());
    die "qmp $cmd on $node failed: $out$err" if $rc != 0;
    return $out =~ /^\s*[\[{]/ ? JSON::PP::decode_json($out) : $out;
}

sub cmdline {
    my ($node) = @_;
    my ($pid) = $lab->qemu_pids($node) or return '';
    return MTunnelLab::slurp("/proc/$pid/cmdline") =~ tr/\0/ /r;
}

# ------------------------------------------------------------ config checks of lab/qm

{
    $lab->write_vm_config(101, memory => 64, guest => 'hot', hot => '0:5');
    my ($rc, $out, $err) = $lab->run('node1', 'qm', 'start', 101);
    isnt($rc, 0, 'hot: with W = 0 is refused');
    like($err, qr/^VM 101: invalid hot '0:5' \(W_MIB:RATE_MIBS/m, 'naming the line') or diag($err);
    $lab->write_vm_config(101, memory => 64, guest => 'dirty', hot => '8:8');
    ($rc, $out, $err) = $lab->run('node1', 'qm', 'start', 101);
    isnt($rc, 0, 'hot: without guest: hot is refused');
    like($err, qr/^VM 101: 'hot' needs 'guest: hot'$/m, 'saying why') or diag($err);
    is_deeply([$lab->qemu_pids('node1')], [], 'no QEMU from the refused starts');
    $lab->remove_vm_config(101);
}

# ------------------------------------------------------------ the hot guest on node1

$lab->write_vm_config($vmid, memory => $MEM, guest => 'hot', hot => "$W:$R");
$lab->run_ok('node1', 'qm', 'start', $vmid);
like(
    cmdline('node1'),
    qr/ -fw_cfg name=opt\/mtunnel\/hot,string=$W:$R( |$)/,
    'qm passes the config\'s W:R to QEMU as fw_cfg opt/mtunnel/hot'
);
my ($rc, $out, $err) = $lab->run('node1', "$top/lab/guest-check", '--wait', $vmid, 120);
is($rc, 0, 'the hot guest boots: its loop runs') or diag("$out$err");
like(
    $out,
    qr/^guest running: pass \d+, hot $W MiB at $R MiB\/s$/m,
    'guest-check --wait names the setting the guest read'
);

my $st = wait_until(sub { my $s = stall('node1'); ($s->{pass} // 0) >= 2 ? $s : undef }, 120)
    // stall('node1');
is($st->{rc}, 0, 'guest-check --stall reads the figures without stopping the VM')
    or diag($st->{text});
note($st->{text});
is($st->{working_set_mib}, $W, 'the guest read W from fw_cfg');
is($st->{working_set_pages}, $W * 256, 'its working set: W MiB of pages from 1 MiB');
is($st->{rate_set_mibs}, $R, 'the guest read R from fw_cfg');
like($st->{flags} // '', qr/^0x1 \(W:R from fw_cfg\)$/, 'flags: read from fw_cfg, no error');
cmp_ok($st->{pass} // 0, '>=', 2, 'it completes passes over the working set');
ok(($st->{tsc_khz} // 0) >= 100_000 && $st->{tsc_khz} <= 10_000_000,
    'a TSC calibration between 0.1 and 10 GHz');
ok(
    ($st->{rate_last_pass_kibs} // 0) > 0 && $st->{rate_last_pass_kibs} <= $R * 1024 * 1.5,
    "an achieved rate > 0 and at most 1.5 x the set $R MiB/s ($st->{rate_last_pass_kibs} KiB/s)"
);
ok(($st->{stall_max_us} // 0) > 0, 'the longest stall since boot is published');
my @listed = sort { $a <=> $b } keys %{ $st->{passes} };
is_deeply(\@listed, [0 .. $st->{pass}], 'a per-pass stall for every pass so far (fewer than 16)');
ok((!grep { $st->{passes}{$_} > $st->{stall_max_us} } @listed),
    'none longer than the longest since boot');
ok((!grep { !$st->{passes}{$_} } grep { $_ < $st->{pass} } @listed),
    'every completed pass has its stall figure');

# ------------------------------------------------------------ a plain migration to node2

my $before = stall('node1');
($rc, $out, $err) = $lab->run(
    'node2', 'qm', 'start', $vmid,
    '--migratedfrom', 'node1', '--migration_type', 'insecure',
    '--migration_network', '198.19.0.0/24', '--stateuri', 'tcp'
);
is($rc, 0, 'the target starts (insecure, on the migration network)') or diag($err);
my ($uri) = $out =~ /^migration listens on (tcp:198\.19\.0\.2:\d+)$/m;
ok($uri, 'it listens on the migration network') or diag($out);
like(
    cmdline('node2'),
    qr/ -fw_cfg name=opt\/mtunnel\/hot,string=$W:$R /,
    'the target QEMU gets the same fw_cfg file'
);
qmp('node1', 'migrate-set-parameters', { 'max-bandwidth' => 1 << 30 });
qmp('node1', 'migrate', { uri => $uri // 'tcp:198.19.0.2:1' });
my $mig = wait_until(
    sub {
        my $m = qmp('node1', 'query-migrate');
        return ($m->{status} // '') =~ /^(completed|failed|cancelled)$/ ? $m : undef;
    },
    600
) // qmp('node1', 'query-migrate');
is($mig->{status}, 'completed', 'the pre-copy migration completes') or diag(explain($mig));
qmp('node1', 'migrate_cancel') if ($mig->{status} // '') ne 'completed';
note(
    sprintf(
        'migration: %d ms, downtime %d ms, %d sync rounds',
        $mig->{'total-time'} // -1,
        $mig->{downtime} // -1,
        ($mig->{ram} // {})->{'dirty-sync-count'} // -1
    )
);
# as a source ends a migration: its QEMU stopped, the config moved to the target (a rename),
# the target resumed
$lab->run_ok('node1', 'qm', 'stop', $vmid);
$lab->move_vm_config($vmid, 'node2');
$lab->run_ok('node2', 'qm', 'resume', $vmid);

# the guest goes on where it was: the target's passes continue the source's
my $after = wait_until(
    sub {
        my $s = stall('node2');
        ($s->{pass} // 0) >= ($before->{pass} // 0) + 2 ? $s : undef;
    },
    120
) // stall('node2');
is($after->{rc}, 0, 'guest-check --stall on the target') or diag($after->{text});
note($after->{text});
cmp_ok(
    $after->{pass} // 0,
    '>=',
    ($before->{pass} // 0) + 2,
    'the guest runs on on the target: its pass count goes on from the source\'s'
);
is($after->{working_set_mib} . ':' . $after->{rate_set_mibs}, "$W:$R", 'same W and R there');
is($after->{tsc_khz}, $before->{tsc_khz}, 'its calibration came along (in RAM)');
ok(
    ($after->{rate_last_pass_kibs} // 0) > 0 && $after->{rate_last_pass_kibs} <= $R * 1024 * 1.5,
    "an achieved rate > 0 and at most 1.5 x the set rate on the target ($after->{rate_last_pass_kibs} KiB/s)"
);
cmp_ok(
    $after->{stall_max_us} // 0,
    '>=',
    $before->{stall_max_us} // 0,
    'the longest stall since boot never shrinks'
);
SKIP: {
    skip('more than 15 passes since the migration began: the ring moved on', 1)
        if $after->{pass} - $before->{pass} > 15;
    ok(
        (!grep { !defined $after->{passes}{$_} } $before->{pass} .. $after->{pass}),
        "the stall of every pass since the migration began can be read ($before->{pass}.."
            . "$after->{pass}: "
            . join(' ', map { $after->{passes}{$_} // '-' } $before->{pass} .. $after->{pass})
            . ' us)'
    );
}

($rc, $out, $err) = $lab->run('node2', "$top/lab/guest-check", $vmid, $MEM);
is($rc, 0, 'guest-check on the target: memory intact') or diag("$out$err");
my $pages = ($MEM - 1) * 256;
my $after_set = $pages - $W * 256;
like(
    $out,
    qr/^guest memory ok: $pages pages, value \d+, step at page \d+, working set @{[$W * 256]} pages, $after_set pages after it hold 1$/m,
    'the working set under the step rule, the pages after it still hold 1'
);
$lab->run_ok('node2', 'qm', 'stop', $vmid);

# ------------------------------------------------------------ no hot: line: the defaults

$lab->write_vm_config($vmid, memory => $MEM, guest => 'hot', accel => 'tcg');
$lab->run_ok('node2', 'qm', 'start', $vmid);
like(
    cmdline('node2'),
    qr/ -fw_cfg name=opt\/mtunnel\/hot,string=64:64( |$)/,
    'without a hot: line qm passes the defaults 64:64'
);
$lab->run_ok('node2', "$top/lab/guest-check", '--wait', $vmid, 120);
$st = stall('node2');
is($st->{working_set_mib} . ':' . $st->{rate_set_mibs}, '64:64', 'and the guest uses them')
    or diag($st->{text});
$lab->run_ok('node2', 'qm', 'stop', $vmid);

$lab->down;
done_testing();
