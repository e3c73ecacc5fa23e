package MTunnelCompiledStandIns;

# Stand-ins for the compiled parts of PVE's Perl stack, so that upstream's Perl trees load on a
# plain Debian machine: PVE::RS::* and Proxmox::RS::* (Rust, proxmox-perl-rs), PVE::IPCC (XS,
# pve-cluster), PVE::RADOS (XS, librados2-perl) and PVE::Cluster::IPCConst (generated at build
# time from pmxcfs's header). Loaded with -MMTunnelCompiledStandIns, before anything else.
# Every function of a compiled stand-in dies naming itself: neither the migration suite nor
# the lab harness may depend on one.

use strict;
use warnings;

my $compiled = qr{^(?:PVE/RS/.*|Proxmox/RS/.*|PVE/IPCC|PVE/RADOS)\.pm$};

# An empty package whose every call dies with the function's name.
my sub compiled_source {
    my ($package) = @_;
    return <<"END";
package $package;
our \$AUTOLOAD;
sub AUTOLOAD {
    return if \$AUTOLOAD =~ /::DESTROY\$/;
    die "\$AUTOLOAD: a compiled module, not available here (MTunnelCompiledStandIns)\\n";
}
1;
END
}

# PVE::Cluster::IPCConst: the CFS_IPC_* constants, read from pmxcfs/cfs-ipc-ops.h of the
# pve-cluster tree whose PVE/Cluster.pm is in @INC (as its Makefile generates the module).
my sub ipc_const_source {
    for my $dir (grep { !ref } @INC) {
        my $header = "$dir/pmxcfs/cfs-ipc-ops.h";
        next if !-f "$dir/PVE/Cluster.pm" || !-f $header;
        open(my $fh, '<', $header) or die "cannot read $header: $!\n";
        my @ops = map { /^#define (CFS_IPC_\w+)\s+(\d+)/ ? "$1 => $2," : () } <$fh>;
        close($fh);
        return "package PVE::Cluster::IPCConst;\nuse base 'Exporter';\nmy %ops;\n"
            . "BEGIN { %ops = (@ops) }\nuse constant \\%ops;\nour \@EXPORT = keys %ops;\n1;\n";
    }
    die
        "PVE::Cluster::IPCConst stand-in: no pmxcfs/cfs-ipc-ops.h beside a PVE/Cluster.pm in \@INC\n";
}

unshift @INC, sub {
    my (undef, $file) = @_;
    my $source;
    if ($file eq 'PVE/Cluster/IPCConst.pm') {
        $source = ipc_const_source();
    } elsif ($file =~ $compiled) {
        (my $package = $file) =~ s/\.pm$//;
        $package =~ s{/}{::}g;
        $source = compiled_source($package);
    } else {
        return;
    }
    open(my $fh, '<', \$source) or die "in-memory module: $!\n";
    return $fh;
};

1;
