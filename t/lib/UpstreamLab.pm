package UpstreamLab;

# Upstream's QemuMigrate.pm on the lab (lab/upstream/qemu-migrate): the source trees, the
# qemu-server tree as released or with the series, the command that runs a migration on a
# node, and what the tests read off the nodes afterwards.

use strict;
use warnings;

use Cwd qw(abs_path);
use File::Basename qw(dirname);
use File::Temp qw(tempdir);

my $TOP = abs_path(dirname(__FILE__) . '/../..');

# ($perl5lib, undef) when every upstream tree is there; (undef, $why) when one is missing.
sub sources {
    my $out = `bash -c '. "$TOP/lab/upstream/sources"
        if upstream_sources_check; then echo "ok \$UPSTREAM_PERL5LIB"; else echo "skip \$UPSTREAM_SKIP"; fi'`;
    chomp $out;
    return ($1, undef) if $out =~ /^ok (.*)$/;
    return (undef, $out =~ /^skip (.*)$/ ? $1 : "lab/upstream/sources failed: $out");
}

# qemu-server's tree in a temporary directory: 'off' as released, 'on' with the whole series.
sub tree {
    my ($stage) = @_;
    my $dir = tempdir('mtunnel-qemu-server-XXXXXX', TMPDIR => 1, CLEANUP => 1) . "/$stage";
    my @upto = $stage eq 'off' ? (0) : $stage eq 'on' ? () : die "tree: 'on' or 'off'\n";
    my $out = `"$TOP/lab/upstream/tree" "$dir" @upto 2>&1`;
    die "lab/upstream/tree failed: $out" if $? != 0;
    return $dir;
}

# Whether NODE's qm behaves as qemu-server with the series: MTunnelLab's qemu_server_series.
sub series_on_node {
    my ($lab, $node, $on) = @_;
    $lab->qemu_server_series($node, $on);
}

# The argv that runs upstream's migration of VMID from NODE (in NODE: $lab->run or
# $lab->background) with qemu-server's TREE.
sub migrate_command {
    my ($lab, $tree, $perl5lib, $node, @args) = @_;
    my $lib = $ENV{MTUNNEL_LIB} // "$TOP/target/release/libmtunnel.so";
    return (
        'env',
        'MTUNNEL_LAB_DIR=' . $lab->dir,
        "MTUNNEL_LAB_NODE=$node",
        "PERL5LIB=$tree/src:$perl5lib:$TOP/perl/lib:$TOP/lab/upstream/lib",
        'PERL5OPT=-MMTunnelCompiledStandIns',
        "MTUNNEL_LIB=$lib",
        'perl',
        "$TOP/lab/upstream/qemu-migrate",
        @args,
    );
}

# The guest's pause of the last migration of VMID from SRC to DST in ms: the source's last STOP
# to the target's first RESUME after it (QEMU's event times, one clock); undef if either is
# missing.
sub pause_ms {
    my ($lab, $src, $dst, $vmid) = @_;
    my ($stop) = reverse grep { $_->{kind} eq 'STOP' } @{ $lab->vm_events($src, $vmid) };
    return undef if !$stop;
    my ($resume) =
        grep { $_->{kind} eq 'RESUME' && $_->{t} > $stop->{t} } @{ $lab->vm_events($dst, $vmid) };
    return undef if !$resume;
    return ($resume->{t} - $stop->{t}) / 1e6;
}

1;
