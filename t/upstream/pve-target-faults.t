#!/usr/bin/perl
# A target that fails at one step of the migration's end, on a PVE lab (lab/upstream/README.md):
# faults injected into the target node's own qm (lab/upstream/lib/MTunnelLabFaults.pm, armed
# by a file in the lab) or into its QEMU, the source running upstream's QemuMigrate.pm with the
# series. Each run checks what every harness run checks (UpstreamLab::Harness::check_vm:
# where the VM runs, never on two nodes at once, its memory, the config's node, no lock,
# socket, tunnel ssh, volume or zombie left) and the verdict that fits where the VM is.
#
# - resume refused once (patch 0004): `qm mtunnel` answers the resume with an error without
#   resuming; the resume over ssh that follows works: the VM runs on the target.
# - resume refused every time (patch 0004): the tunnel's and ssh's resume fail; the target's
#   copy never ran, so it is stopped there, the config comes back and the source continues.
#   Both VMs have a NIC on a bridge without MAC learning: the bridge's static fdb entry for it
#   must be where the VM runs (phase 3 removes the source's before the resume; 0004 puts it
#   back when the source continues).
# - nbdstop fails (patches 0005, 0006): `qm mtunnel` answers nbdstop with an error without
#   stopping the NBD server; as upstream's `qm nbdstop`, a warning: the VM runs on the target.
# - the target's NBD export breaks before the mirror completes: its NBD server is stopped
#   during the RAM migration; the completion fails, and the VM goes on on the source with its
#   disk as it was, no block job and no block node of the mirror left there.

use strict;
use warnings;
use Test::More;
use JSON::PP ();
use Time::HiRes qw(time);

use MTunnelLab;
use UpstreamLab;

my ($h, $skip) = UpstreamLab::Harness->new(nodes => 2);
plan skip_all => "upstream trees missing: $skip" if $skip;
my $lab = $h->lab;
my $dir = $lab->dir;

# arms fault NAME on NODE for COUNT ("always", or a number) firings
sub arm {
    my ($node, $name, $count) = @_;
    UpstreamLab::write_file("$dir/$node/fault-$name", "$count\n");
}

sub disarm {
    my ($node, $name) = @_;
    unlink("$dir/$node/fault-$name");
}

# the "NAME COMMAND" lines of the faults that fired on NODE since OFFSET (fault.log)
sub fired {
    my ($node, $offset) = @_;
    my $log = MTunnelLab::slurp("$dir/$node/fault.log");
    return substr($log, $offset // 0);
}

my $vmid = 500;

# --- resume refused once: the retry over ssh resumes it
{
    my $name = 'resume refused once';
    my $t0 = time();
    my $offset = length(fired('node2'));
    $h->start_vm(++$vmid, net => 1);
    arm('node2', 'resume', 1);
    my $out = $h->migrate_ok($name, $vmid, 'node1', 'node2');
    like(fired('node2', $offset), qr/^resume qm mtunnel$/m, "$name: the tunnel's resume failed");
    like(
        $out,
        qr/tunnel replied 'ERR: resume failed - lab fault: resume refused'/,
        "$name: the source saw the refusal"
    );
    like(
        MTunnelLab::slurp("$dir/node2/pve-cli.log"),
        qr/^qm resume $vmid --skiplock --nocheck$/m,
        "$name: and resumed it over ssh"
    );
    $h->check_vm($name, $vmid, 'node2', since => $t0);
    disarm('node2', 'resume');
    $h->remove_vm($vmid);
}

# --- resume refused every time: the target's copy never ran; back to the source
{
    my $name = 'resume refused';
    my $t0 = time();
    my $offset = length(fired('node2'));
    $h->start_vm(++$vmid, net => 1);
    arm('node2', 'resume', 'always');
    my $bg = $h->migrate($vmid, 'node1', 'node2');
    ok($bg->finish(180), "$name: the migration ended");
    my $out = $bg->output;
    isnt($bg->status >> 8, 0, "$name: exit status is a failure");
    like($out, qr/ migration status: completed$/m, "$name: the RAM migration had completed");
    like(fired('node2', $offset), qr/^resume qm mtunnel$/m, "$name: the tunnel's resume failed");
    like($out, qr/^TASK ERROR: /m, "$name: the task says it failed") or diag($out);
    disarm('node2', 'resume');
    $h->check_vm($name, $vmid, 'node1', since => $t0);
    $h->remove_vm($vmid);
}

# --- nbdstop fails: a warning, the migration succeeds
{
    my $name = 'nbdstop fails';
    my $t0 = time();
    my $offset = length(fired('node2'));
    $h->start_vm(++$vmid, guest => 'disk', store => 'local');
    arm('node2', 'nbdstop', 1);
    my $out = $h->migrate_ok($name, $vmid, 'node1', 'node2', opts => ['--with-local-disks']);
    like(fired('node2', $offset), qr/^nbdstop qm mtunnel$/m, "$name: the tunnel's nbdstop failed");
    like($out, qr/nbdstop failed - lab fault: nbd-server-stop failed/, "$name: the source said so");
    unlike($out, qr/ERROR: .*nbdstop/, "$name: as a warning, not an error");
    like($out, qr/ migration finished successfully /m, "$name: upstream's success line");
    $h->check_vm($name, $vmid, 'node2', disk => 1, since => $t0);
    disarm('node2', 'nbdstop');
    $h->remove_vm($vmid);
}

# --- the target's NBD export breaks before the mirror completes
{
    my $name = 'NBD export broken';
    my $t0 = time();
    # a guest that wrote its memory and halts: the RAM migration takes 8 s at 16 MiB/s (the
    # window for the fault) and its disk stays as it was (compared by checksum)
    my $volid = $h->start_vm(++$vmid, guest => 'idle', store => 'local');
    my $sum = sub { scalar $lab->run_ok('node1', 'sh', '-c', 'sha256sum < "$1"', 'sum', $_[0]) };
    my $path = "/var/lib/vz/images/$vmid/vm-$vmid-disk-0.raw";
    my $before = $sum->($path);
    my $nodes = sub {
        my $json = $lab->run_ok('node1', 'qmp', $vmid, 'query-named-block-nodes');
        return [sort map { $_->{'node-name'} } @{ JSON::PP::decode_json($json) }];
    };
    my $nodes_before = $nodes->();
    my $bg =
        $h->migrate($vmid, 'node1', 'node2', opts => ['--with-local-disks', '--bwlimit', 16384]);
    ok($bg->wait_for(qr/ migration active, /, 120), "$name: the RAM migration was under way")
        or diag($bg->output);
    my ($rc, $o, $e) = $lab->run('node2', 'qmp', $vmid, 'nbd-server-stop');
    is($rc, 0, "$name: the target's NBD server stopped") or diag("$o$e");
    ok($bg->finish(180), "$name: the migration ended");
    my $out = $bg->output;
    isnt($bg->status >> 8, 0, "$name: exit status is a failure");
    like($out, qr/ ERROR: online migrate failure - /m, "$name: phase 2 failed") or diag($out);
    like($out, qr/^TASK ERROR: migration problems$/m, "$name: the task says it failed");
    my ($why) = $out =~ / ERROR: (online migrate failure - .*)$/m;
    diag("$name: " . ($why // 'no phase 2 failure line'));
    is($lab->run_ok('node1', 'qmp', $vmid, 'query-block-jobs'),
        "[]\n", "$name: no block job left on the source");
    is_deeply($nodes->(), $nodes_before, "$name: no block node of the mirror left on the source");
    $h->check_vm($name, $vmid, 'node1', since => $t0);
    is($sum->($path), $before, "$name: the source's disk is as it was");
    $h->remove_vm($vmid);
}

$h->down;
done_testing();
