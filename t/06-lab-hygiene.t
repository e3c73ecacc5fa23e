#!/usr/bin/perl
# The lab never writes through a path it did not create: a node's /usr/local/sbin starts as a
# copy of the host's, and the host may hold symlinks there with the names of the lab's own
# tools (qm, pvesm, ...). Canary symlinks planted in the host's /usr/local/sbin, pointing at
# canary files in a temp dir, survive `lab.sh up` and `down` with their targets unchanged.

use strict;
use warnings;
use Test::More;
use File::Temp qw(tempdir);

use MTunnelLab;

my $sbin = '/usr/local/sbin';
plan skip_all => "no $sbin on this host (the lab overlays /usr/local then)" if !-d $sbin;

my $dir = tempdir('mtunnel-canary-XXXXXX', TMPDIR => 1, CLEANUP => 1);
my @planted;
END { unlink @planted }    # our links only, on every path
for my $tool (qw(qm pvesm qmp guest-check)) {
    my $link = "$sbin/$tool";
    next if -e $link || -l $link;    # the host's own file: not ours to replace
    my $canary = "$dir/$tool";
    open(my $fh, '>', $canary) or die "$canary: $!\n";
    print $fh "canary $tool\n";
    close $fh;
    symlink($canary, $link) or die "symlink $link: $!\n";
    push @planted, $link;
}
plan skip_all => "the host has its own $sbin/{qm,pvesm,qmp,guest-check}" if !@planted;

my $lab = MTunnelLab->up(nodes => 1);
my ($rc, $out) = $lab->run('node1', 'sh', '-c', 'head -c 200 /usr/local/sbin/qm');
like($out, qr/MTUNNEL_LAB_DIR=/, "the node's /usr/local/sbin/qm is the lab's wrapper");
$lab->down;

for my $link (@planted) {
    my ($tool) = $link =~ m{([^/]+)\z};
    ok(-l $link && readlink($link) eq "$dir/$tool", "$link is still the planted symlink");
    is(MTunnelLab::slurp("$dir/$tool"), "canary $tool\n", "its target was not written through");
}
done_testing();
