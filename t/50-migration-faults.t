#!/usr/bin/perl
# Faults during a live migration, made real on the lab: the tunnel's ssh stopped, the
# migration cancelled, the lab link cut (the tunnel's ssh killed and the target QEMU killed
# mid-RAM are t/27's, with the same checks, and in t/57's deck). Each time the driver
# fails with a clear error within its deadline, the VM keeps running on node1 only with its
# memory intact, and no socket file, ssh process or zombie is left.

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
my ($vmid, $mem) = (300, 128);

*slurp = \&MTunnelLab::slurp;

# pids in node1 whose command line is the tunnel's ssh for $vmid
sub tunnel_ssh { return $lab->ssh_pids('node1', $vmid) }

sub qmpstatus { return $lab->qmpstatus($_[0], $vmid) }

my %scenario = (
    'SIGSTOP ssh' => {
        args => ['--stall-timeout', 4000],
        inject => sub { kill('STOP', tunnel_ssh()) or die "no tunnel ssh found\n" },
        error => qr/TASK ERROR: migration made no progress for \d+ s - aborting/,
    },
    'cancel' => {
        inject => sub {
            my ($rc, $out, $err) =
                $lab->run('node1', 'perl', "-I$top/perl/lib", '-MPVE::MTunnel', '-e',
                "print PVE::MTunnel::qmp_migrate_cancel('/run/qemu-server/$vmid.qmp')->{status}");
            die "cancel failed: $out$err" if $rc != 0 || $out !~ /^(cancelled|cancelling)$/;
        },
        error => qr/TASK ERROR: aborting phase 2 - cancelled/,
    },
    'cut the lab link' => {
        args => [
            '--ssh-option', 'server_alive_interval_s=1',
            '--ssh-option', 'server_alive_count_max=3',
            '--ssh-option', 'connect_timeout_s=2',
            '--ssh-option', 'connect_retries=0'
        ],
        inject => sub {
            system('ip', '-n', $lab->netns('node2'), 'link', 'set', 'eth0', 'down') == 0
                or die "ip link failed\n";
        },
        restore => sub { system('ip', '-n', $lab->netns('node2'), 'link', 'set', 'eth0', 'up') },
        # node2 could not be told to stop its incoming QEMU nor to remove its socket while cut
        # off: once reachable, a new migration must work and leave everything clean.
        unreachable_target => 1,
        error =>
            qr/TASK ERROR: aborting phase 2 - failed|TASK ERROR: .*(Broken pipe|Connection reset|Timeout)/i,
    },
);

my $only = $ENV{MTUNNEL_FAULT};    # a regex, to run some scenarios only
for my $name (sort grep { !defined($only) || /$only/ } keys %scenario) {
    my $s = $scenario{$name};
    $lab->write_vm_config($vmid, memory => $mem, accel => 'tcg');
    $lab->move_vm_config($vmid, 'node1');    # a round that migrated moved it to node2
    $lab->run_ok('node1', 'qm', 'start', $vmid);
    $lab->run_ok('node1', "$top/lab/guest-check", '--wait', $vmid);
    my $t0 = time();
    my $since = MTunnelLab::now_ns();
    # 4 MiB/s: the migration lasts long enough to hit it in the middle.
    my $bg = $lab->background(
        'node1', "$dir/fault-$vmid.log",
        "$top/perl/bin/mtunnel-migrate", $vmid,
        'node2', '--node',
        'node1', '--ssh-file',
        "$dir/ssh_prefix_node2", '--pve-dir',
        "$dir/pve", '--memory',
        $mem, '--bwlimit',
        4096, @{ $s->{args} // [] }
    );
    ok($bg->wait_for(qr/migration active/, 30), "$name: migration was under way when the fault hit")
        or diag($bg->output);
    eval { $s->{inject}->() };
    is($@, '', "$name: fault injected");
    my $done = $bg->finish(60);
    my $took = time() - $t0;
    ok($done, sprintf("$name: driver finished in bounded time (%.1f s)", $took));
    my $status = $bg->status;
    my $out = $bg->output;
    isnt(($status // 0) >> 8, 0, "$name: driver reports failure");
    like($out, $s->{error}, "$name: error says what happened") or diag($out);
    like(
        $out,
        $s->{unreachable_target}
        ? qr/^TASK ERROR: .* - VM $vmid runs on node 'node1' \(source\); node 'node2' cannot be reached to confirm that its incoming copy is gone \(run 'qm stop $vmid --skiplock --migratedfrom node1' there once it is reachable\)$/m
        : qr/^TASK ERROR: .* - VM $vmid runs on node 'node1' \(source\) only$/m,
        "$name: the verdict says where the VM runs"
    ) or diag($out);
    my ($err) = $out =~ /^(TASK ERROR: .*)$/m;
    diag("$name: " . ($err // 'no TASK ERROR line') . sprintf(" (%.1f s)", $took));
    $s->{restore}->() if $s->{restore};

    is(qmpstatus('node1'), 'running', "$name: VM runs on node1");
    isnt(qmpstatus('node2'), 'running', "$name: VM does not run on node2");
    is_deeply([$lab->resumed_after_target('node1', 'node2', $vmid, $since)],
        [], "$name: the source never resumed after the target ran (QEMU's events)");
    my ($crc, $check) = $lab->run('node1', "$top/lab/guest-check", $vmid, $mem);
    is($crc, 0, "$name: guest memory intact on node1") or diag($check);
    if ($s->{unreachable_target}) {
        # its incoming copy: the config is on node1 (as on PVE, a plain stop there fails)
        $lab->run('node2', 'qm', 'stop', $vmid, '--migratedfrom', 'node1');
        $lab->run_ok('node1', 'qm', 'resume', $vmid);
        my ($rc2, $out2) = $lab->run('node1', "$top/perl/bin/mtunnel-migrate",
            $vmid, 'node2', '--node', 'node1',
            '--ssh-file', "$dir/ssh_prefix_node2", '--pve-dir', "$dir/pve", '--memory', $mem);
        is($rc2, 0, "$name: once node2 is reachable again, the VM migrates there") or diag($out2);
        is(qmpstatus('node2'), 'running', "$name: VM runs on node2 after the new migration");
    }
    # guest-check paused the source for its dump: stop the VM for the next round
    $lab->run($_, 'qm', 'stop', $vmid) for qw(node1 node2);
    is_deeply([tunnel_ssh()], [], "$name: no tunnel ssh left");
    is_deeply([$lab->socket_files($_)], [], "$name: no socket file left on $_") for qw(node1 node2);
    is_deeply([MTunnelLab::zombies_since($t0)], [], "$name: no zombie left");
}

$lab->down;
done_testing();
