#!/usr/bin/perl
# Upstream's QemuMigrate.pm with the patch series (patches/qemu-server/), unchanged beyond it,
# migrating real VMs on the lab: real QEMU on both nodes, real ssh and sshd, the lab's qm as the
# target (behaving as the patched qm), PVE's own monitor code talking to the real QEMU, the
# tunnel through PVE::MTunnel::Tunnel. Only PVE's cluster, config and storage layers are
# stand-ins (lab/upstream/lib/MTunnelPVEStandIns.pm). Needs the upstream trees (README,
# "Upstream sources"); make test-upstream runs it only when they are there.
#
# Each run checks where the VM runs (exactly one node), its memory (and disk), the task log's
# result, and that no socket, tunnel ssh, lock or volume is left where it should not be.

use strict;
use warnings;
use Test::More;
use Cwd qw(abs_path);
use File::Basename qw(dirname);
use Time::HiRes qw(time);

use MTunnelLab;
use UpstreamLab;

my $top = abs_path(dirname(__FILE__) . '/../..');
my ($perl5lib, $skip) = UpstreamLab::sources();
plan skip_all => "upstream trees missing: $skip" if $skip;

my %tree = map { $_ => UpstreamLab::tree($_) } qw(on off);
my $lab = MTunnelLab->up(nodes => 2, accel => 'tcg');
my $dir = $lab->dir;
UpstreamLab::series_on_node($lab, $_, 1) for $lab->nodes;
my $mem = 256;

# upstream's migration of $vmid from node1 to node2, in the background; with the series
# unless the first option is 'released'
sub migrate {
    my ($vmid, @opts) = @_;
    my $tree = $tree{on};
    $tree = $tree{off}, shift(@opts) if @opts && $opts[0] eq 'released';
    return $lab->background(
        'node1',
        "$dir/qemu-migrate-$vmid.log",
        UpstreamLab::migrate_command(
            $lab, $tree, $perl5lib, 'node1', $vmid, 'node2', '--online', @opts
        ),
    );
}

sub start_vm {
    my ($vmid, %conf) = @_;
    $lab->write_vm_config($vmid, memory => $mem, %conf);
    $lab->move_vm_config($vmid, 'node1');    # a migration of this VMID moved it to node2
    $lab->run_ok('node1', 'qm', 'start', $vmid);
    $lab->run_ok('node1', "$top/lab/guest-check", '--wait', $vmid);
}

# where the VM is, its memory and disk, and what must be gone; stops the VM afterwards
sub check_vm {
    my ($name, $vmid, $node, %o) = @_;
    my $other = $node eq 'node1' ? 'node2' : 'node1';
    is($lab->qmpstatus($node, $vmid), 'running', "$name: VM $vmid runs on $node");
    is($lab->qmpstatus($other, $vmid), 'stopped', "$name: VM $vmid does not run on $other");
    my ($rc, $check) = $lab->run($node, "$top/lab/guest-check", $vmid, $mem);
    is($rc, 0, "$name: guest memory" . ($o{disk} ? ' and disk' : '') . " intact on $node")
        or diag($check);
    like($check, qr/^guest disk ok/m, "$name: the guest's disk was checked") if $o{disk};
    is_deeply([$lab->socket_files($_)], [], "$name: no migration socket left on $_")
        for qw(node1 node2);
    is_deeply([$lab->ssh_pids('node1', $vmid)], [], "$name: no tunnel ssh left");
    is($lab->vm_config_node($vmid), $node, "$name: the config is on $node, with the VM");
    unlike(MTunnelLab::slurp($lab->vm_config_path($vmid) // ''),
        qr/^lock:/m, "$name: the config is unlocked");
    $lab->run($_, 'qm', 'stop', $vmid) for qw(node1 node2);
}

# a migration that must succeed: the task log, once it ended with TASK OK
sub migrate_ok {
    my ($name, $vmid, @opts) = @_;
    my $bg = migrate($vmid, @opts);
    ok($bg->finish(180), "$name: the migration ended");
    my $out = $bg->output;
    is($bg->status >> 8, 0, "$name: exit 0") or diag($out);
    like($out, qr/^TASK OK$/m, "$name: TASK OK");
    return $out;
}

# --- RAM only, secure: through the tunnel's UNIX socket
{
    my $vmid = 100;
    start_vm($vmid, guest => 'dirty', ide0 => "shared:$vmid/vm-$vmid-disk-0.raw,size=1M");
    my $out = migrate_ok('RAM', $vmid);
    like($out, qr/ ssh tunnel ver 1$/m, 'RAM: the tunnel came through the drop-in');
    like(
        $out,
        qr/ start migrate command to unix:\/run\/qemu-server\/$vmid\.migrate$/m,
        'RAM: migrated into the forwarded socket'
    );
    like($out, qr/ migration finished successfully /m, "RAM: upstream's success line");
    my $pause = UpstreamLab::pause_ms($lab, 'node1', 'node2', $vmid);
    ok(defined($pause), 'RAM: the source stopped and the target resumed')
        and diag(sprintf('RAM: guest paused %.1f ms (source STOP to target RESUME)', $pause));
    check_vm('RAM', $vmid, 'node2');
}

# --- a local disk (--with-local-disks): mirrored into the target's NBD export
{
    my $vmid = 101;
    start_vm(
        $vmid,
        guest => 'disk',
        ide0 => "local:$vmid/vm-$vmid-disk-0.raw,size=16M"
    );
    my $out = migrate_ok('disk', $vmid, '--with-local-disks');
    like($out, qr/^drive-ide0: Completed successfully\.$/m, 'disk: the mirror was finished');
    like($out, qr/ stopping NBD storage migration server on target\.$/m, 'disk: NBD stopped');
    like(
        MTunnelLab::slurp("$dir/node2/qm-start.log"),
        qr/^start $vmid args=.*--targetstorage 1 stdin=nbd_protocol_version:1$/m,
        'disk: the target was started with --targetstorage'
    );
    is_deeply([$lab->volumes('node1', 'local')], [], 'disk: the source volume was freed');
    is_deeply(
        [$lab->volumes('node2', 'local')],
        ["local:$vmid/vm-$vmid-disk-0.raw"],
        'disk: the target has its volume'
    );
    check_vm('disk', $vmid, 'node2', disk => 1);
    $lab->run('node2', 'pvesm', 'free', "local:$vmid/vm-$vmid-disk-0.raw");
}

# --- insecure, on the migration network: plain TCP to the target's QEMU
{
    my $vmid = 102;
    my $net = $lab->{env}->{LAB_MIGRATION_NETWORK};
    my $ip = $lab->{env}->{LAB_node2_MIGRATION_IP};
    start_vm($vmid, guest => 'dirty', ide0 => "shared:$vmid/vm-$vmid-disk-0.raw,size=1M");
    my $out =
        migrate_ok('insecure', $vmid, '--migration_type', 'insecure', '--migration_network', $net);
    like(
        $out,
        qr/ start migrate command to tcp:\Q$ip\E:\d+$/m,
        'insecure: straight to the target in the migration network'
    );
    check_vm('insecure', $vmid, 'node2');
}

# --- mixed nodes: a patched source and a released target, and the other way round
{
    my $vmid = 103;
    UpstreamLab::series_on_node($lab, 'node2', 0);
    start_vm(
        $vmid,
        guest => 'disk',
        ide0 => "local:$vmid/vm-$vmid-disk-0.raw,size=16M"
    );
    my $out = migrate_ok('released target', $vmid, '--with-local-disks');
    unlike(
        $out,
        qr/no reply to command 'nbdstop|tunnel does not know nbdstop/,
        'released target: nbdstop never went into its tunnel (it was not announced)'
    );
    check_vm('released target', $vmid, 'node2', disk => 1);
    $lab->run('node2', 'pvesm', 'free', "local:$vmid/vm-$vmid-disk-0.raw");
    UpstreamLab::series_on_node($lab, 'node2', 1);

    start_vm($vmid, guest => 'dirty', ide0 => "shared:$vmid/vm-$vmid-disk-0.raw,size=1M");
    migrate_ok('released source', $vmid, 'released');
    check_vm('released source', $vmid, 'node2');
}

# --- faults in the middle of the RAM migration: the VM stays on node1
my %fault = (
    'ssh killed' => sub {
        my ($vmid) = @_;
        my @ssh = $lab->ssh_pids('node1', $vmid);
        kill('KILL', @ssh) or die "no tunnel ssh for VM $vmid\n";
    },
    'target QEMU killed' => sub {
        my @qemu = $lab->qemu_pids('node2');
        kill('KILL', @qemu) or die "no QEMU on node2\n";
    },
);
my $vmid = 110;
for my $name (sort keys %fault) {
    start_vm($vmid, guest => 'dirty', ide0 => "shared:$vmid/vm-$vmid-disk-0.raw,size=1M");
    my $t0 = time();
    # 8 MiB/s: the RAM migration lasts long enough to be hit in the middle
    my $bg = migrate($vmid, '--bwlimit', 8192);
    ok($bg->wait_for(qr/ migration active, /, 60), "$name: the RAM migration was under way")
        or diag($bg->output);
    eval { $fault{$name}->($vmid) };
    is($@, '', "$name: fault injected");
    ok($bg->finish(120), "$name: the migration ended");
    my $out = $bg->output;
    isnt($bg->status >> 8, 0, "$name: exit status is a failure");
    like($out, qr/ ERROR: online migrate failure - /m, "$name: phase 2 failed") or diag($out);
    like($out, qr/ aborting phase 2 - cleanup resources$/m, "$name: phase 2 was cleaned up");
    like($out, qr/^TASK ERROR: migration problems$/m, "$name: the task says it failed");
    my ($why) = $out =~ / ERROR: (online migrate failure - .*)$/m;
    diag("$name: " . ($why // 'no phase 2 failure line'));
    check_vm($name, $vmid, 'node1');
    is_deeply([MTunnelLab::zombies_since($t0)], [], "$name: no zombie left");
}

$lab->down;
done_testing();
