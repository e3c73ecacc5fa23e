#!/usr/bin/perl
# Nodes of one cluster on different qemu-server builds (patches/qemu-server/README.md,
# "Compatibility between nodes"), on a PVE lab (lab/upstream/README.md): each node runs PVE's
# own qm of its build, as released (lab/upstream/tree DEST 0) or with the series.
#
# - a patched source and a released target, RAM and a local disk: the target announces no
#   mtunnel commands, so nbdstop goes over ssh (qm nbdstop), never into its tunnel;
# - a released source and a patched target, RAM and a local disk: the source ignores the
#   target's "mtunnel commands:" line.
# Each run checks what every harness run checks (UpstreamLab::Harness::check_vm).

use strict;
use warnings;
use Test::More;
use Time::HiRes qw(time);

use MTunnelLab;
use UpstreamLab;

my ($h, $skip) = UpstreamLab::Harness->new(nodes => 2);
plan skip_all => "upstream trees missing: $skip" if $skip;
my $lab = $h->lab;

my %runs = (
    'released target' => { node1 => 'on', node2 => 'off' },
    'released source' => { node1 => 'off', node2 => 'on' },
);
my $vmid = 200;
for my $mix (sort keys %runs) {
    $h->node_series($_, $runs{$mix}->{$_}) for qw(node1 node2);
    for my $disk (0, 1) {
        my $name = $mix . ($disk ? ', local disk' : ', RAM');
        my $t0 = time();
        $h->start_vm(++$vmid, $disk ? (guest => 'disk', store => 'local') : ());
        my $out = $h->migrate_ok($name, $vmid, 'node1', 'node2',
            $disk ? (opts => ['--with-local-disks']) : ());
        if ($disk) {
            my $commands = MTunnelLab::slurp($lab->dir . '/node2/pve-cli.log');
            # a released target announces no tunnel commands; a released source knows none
            unlike(
                $out,
                qr/no reply to command 'nbdstop|tunnel does not know nbdstop/,
                "$name: nbdstop never went into the tunnel"
            );
            like($commands, qr/^qm nbdstop $vmid$/m, "$name: qm nbdstop over ssh instead");
            like($out, qr/^drive-ide0: Completed successfully\.$/m, "$name: mirror finished");
            like(
                $out,
                qr/ stopping NBD storage migration server on target\.$/m,
                "$name: NBD stopped"
            );
        }
        like($out, qr/ migration finished successfully /m, "$name: upstream's success line");
        $h->check_vm($name, $vmid, 'node2', disk => $disk, since => $t0);
        $h->remove_vm($vmid);
    }
}

$h->down;
done_testing();
