#!/usr/bin/perl
# Upstream's QemuMigrate.pm with the patch series (patches/qemu-server/), unchanged beyond it,
# migrating real VMs between the nodes of a PVE lab (lab/upstream/README.md, "The PVE lab"):
# real QEMU, ssh and sshd; on both nodes PVE's own qm (PVE::CLI::qm of the tree under test:
# vm_start, vm_stop, mtunnel, nbdstop), PVE::Cluster on the lab's /etc/pve (configs moved by
# rename between nodes/NODE/qemu-server), PVE::Storage on dir storages; the tunnel through
# PVE::MTunnel::Tunnel. Stand-ins only for what needs a daemon or hardware the lab lacks
# (lab/upstream/lib). Needs the upstream trees (README, "Upstream sources"); make test-upstream
# runs it only when they are there.
#
# Runs: RAM (secure), a local disk, insecure on the migration network, the tunnel's ssh killed
# and the target QEMU killed mid-RAM. Each checks where the VM runs (exactly one node, never
# two at once), its memory (and disk), the task log's result, the config's node, and that no
# socket, tunnel ssh, lock, volume or zombie is left.

use strict;
use warnings;
use Test::More;
use Time::HiRes qw(time);

use MTunnelLab;
use UpstreamLab;

my ($h, $skip) = UpstreamLab::Harness->new(nodes => 2);
plan skip_all => "upstream trees missing: $skip" if $skip;
my $lab = $h->lab;

# --- RAM only, secure: through the tunnel's UNIX socket
{
    my $vmid = 100;
    my $t0 = time();
    $h->start_vm($vmid);
    my $out = $h->migrate_ok('RAM', $vmid, 'node1', 'node2');
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
    $h->check_vm('RAM', $vmid, 'node2', since => $t0);
    # and back: the config moved to node2, so node2 is the source now
    $out = $h->migrate_ok('RAM back', $vmid, 'node2', 'node1');
    $h->check_vm('RAM back', $vmid, 'node1', since => $t0);
    $h->remove_vm($vmid);
}

# --- a local disk (--with-local-disks): mirrored into the target's NBD export
{
    my $vmid = 101;
    my $t0 = time();
    $h->start_vm($vmid, guest => 'disk', store => 'local');
    my $out = $h->migrate_ok('disk', $vmid, 'node1', 'node2', opts => ['--with-local-disks']);
    like($out, qr/^drive-ide0: Completed successfully\.$/m, 'disk: the mirror was finished');
    like($out, qr/ stopping NBD storage migration server on target\.$/m, 'disk: NBD stopped');
    unlike(
        MTunnelLab::slurp($lab->dir . '/node2/pve-cli.log'),
        qr/^qm nbdstop $vmid$/m,
        'disk: through the tunnel (no qm nbdstop over ssh)'
    );
    like(
        MTunnelLab::slurp($lab->dir . '/node2/qm-start.log'),
        qr/^start $vmid args=.*--targetstorage 1 .*stdin=nbd_protocol_version:1$/m,
        'disk: the target was started with --targetstorage'
    );
    $h->check_vm('disk', $vmid, 'node2', disk => 1, since => $t0);
    $h->remove_vm($vmid);
}

# --- insecure, on the migration network: plain TCP to the target's QEMU
{
    my $vmid = 102;
    my $t0 = time();
    my $net = $lab->{env}->{LAB_MIGRATION_NETWORK};
    my $ip = $lab->{env}->{LAB_node2_MIGRATION_IP};
    $h->start_vm($vmid);
    my $out = $h->migrate_ok('insecure', $vmid, 'node1', 'node2',
        opts => ['--migration_type', 'insecure', '--migration_network', $net]);
    like(
        $out,
        qr/ start migrate command to tcp:\Q$ip\E:\d+$/m,
        'insecure: straight to the target in the migration network'
    );
    $h->check_vm('insecure', $vmid, 'node2', since => $t0);
    $h->remove_vm($vmid);
}

# --- faults in the middle of the RAM migration: the VM stays on node1
my %fault = (
    'ssh killed' => sub {
        my ($vmid) = @_;
        my @ssh = $lab->ssh_pids('node1', $vmid);
        kill('KILL', @ssh) or die "no tunnel ssh for VM $vmid\n";
    },
    'target QEMU killed' => sub {
        my ($vmid) = @_;
        my @qemu = $lab->qemu_pids('node2');
        kill('KILL', @qemu) or die "no QEMU on node2\n";
    },
);
my $vmid = 110;
for my $name (sort keys %fault) {
    my $t0 = time();
    $h->start_vm($vmid);
    # 8 MiB/s: the RAM migration lasts long enough to be hit in the middle
    my $bg = $h->migrate($vmid, 'node1', 'node2', opts => ['--bwlimit', 8192]);
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
    $h->check_vm($name, $vmid, 'node1', since => $t0);
    $h->remove_vm($vmid);
}

$h->down;
done_testing();
