package MTunnelCompiledStandIns;

# Stand-ins for the compiled parts of PVE's Perl stack, so that upstream's Perl trees load on a
# plain Debian machine: PVE::RS::* and Proxmox::RS::* (Rust, proxmox-perl-rs), PVE::IPCC (XS,
# pve-cluster), PVE::RADOS (XS, librados2-perl) and PVE::Cluster::IPCConst (generated at build
# time from pmxcfs's header). Loaded with -MMTunnelCompiledStandIns, before anything else.
# Every function of a compiled stand-in dies naming itself: neither the migration suite nor
# the lab harness may depend on one. One exception, in a PVE lab (lab/upstream/README.md:
# MTUNNEL_LAB_PVE=1, a lab node's /etc/pve): PVE::IPCC answers pmxcfs's requests from
# /etc/pve's plain files, so that PVE::Cluster runs as it is (see ipcc_send_rec below).

use strict;
use warnings;

use POSIX ();

# The upstream trees are written for Perl 5.40 (Debian 13, Proxmox VE 9), where `for my ($a,
# $b) (...)` is stable; Debian 12's Perl 5.36 warns that it is experimental on every load of
# the modules that use it (PVE::LXC): that one warning is dropped, nothing else.
my $previous_warn = $SIG{__WARN__};
$SIG{__WARN__} = sub {
    return if $_[0] =~ /^for my \(\.\.\.\) is experimental at /;
    return $previous_warn->(@_) if ref($previous_warn) eq 'CODE';
    print STDERR $_[0];
};

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

# PVE::IPCC of a PVE lab: the package with the functions below.
my sub lab_ipcc_source {
    return <<'END';
package PVE::IPCC;
use strict;
use warnings;
sub ipcc_send_rec { return MTunnelCompiledStandIns::lab_ipcc_send_rec(@_) }
sub sendfd { die "PVE::IPCC::sendfd: not available on the lab (MTunnelCompiledStandIns)\n" }
1;
END
}

unshift @INC, sub {
    my (undef, $file) = @_;
    my $source;
    if ($file eq 'PVE/Cluster/IPCConst.pm') {
        $source = ipc_const_source();
    } elsif ($file eq 'PVE/IPCC.pm' && $ENV{MTUNNEL_LAB_PVE}) {
        $source = lab_ipcc_source();
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

# ---- pmxcfs's IPC in a PVE lab
#
# pmxcfs serves /etc/pve (a FUSE file system replicated by corosync) and answers requests on
# a local socket (PVE::IPCC, XS). A PVE lab has no pmxcfs: its /etc/pve is one plain directory
# of the lab, bind-mounted into every node (lab/lab.sh), which is what pmxcfs makes it look
# like. PVE::Cluster writes, renames and locks (mkdir in priv/lock) there itself; the
# requests are answered here from those files, as pmxcfs answers them from its database:
#   GET_CONFIG       the file's content (ENOENT if there is none)
#   GET_FS_VERSION   {starttime, clinfo, vmlist}: the vmlist's version changes with the set of
#                    configs and their nodes; no per-file versions, so every read is fresh
#   GET_CLUSTER_INFO pmxcfs's .members: the lab's nodes (LAB_NODE_NAMES, LAB_nodeI_IP)
#   GET_GUEST_LIST   pmxcfs's .vmlist: nodes/NODE/qemu-server/VMID.conf
#   GET_GUEST_CONFIG_PROPERTY/PROPERTIES  the top section's lines of those configs
#   SET_STATUS, LOG_CLUSTER_MSG  accepted and dropped (node kv store, task list, cluster log)
#   GET_STATUS       nothing stored;  VERIFY_TOKEN  ENOENT (no API tokens)
# The constants are pmxcfs's (cfs-ipc-ops.h).

my %IPC = (
    GET_FS_VERSION => 1,
    GET_CLUSTER_INFO => 2,
    GET_GUEST_LIST => 3,
    SET_STATUS => 4,
    GET_STATUS => 5,
    GET_CONFIG => 6,
    LOG_CLUSTER_MSG => 7,
    GET_GUEST_CONFIG_PROPERTY => 11,
    VERIFY_TOKEN => 12,
    GET_GUEST_CONFIG_PROPERTIES => 13,
);
my %IPC_NAME = reverse %IPC;

my $PVE_DIR = '/etc/pve';

my sub read_text {
    my ($path) = @_;
    open(my $fh, '<', $path) or return undef;
    local $/;
    my $text = <$fh> // '';
    close($fh);
    return $text;
}

# $LAB/env (lab.sh up): KEY=VALUE lines
my sub lab_env {
    my $lab = $ENV{MTUNNEL_LAB_DIR} // die "MTunnelCompiledStandIns: MTUNNEL_LAB_DIR not set\n";
    my $text = read_text("$lab/env") // die "MTunnelCompiledStandIns: no $lab/env\n";
    return { $text =~ /^([A-Za-z_][A-Za-z0-9_]*)='?([^'\n]*?)'?$/mg };
}

# { VMID => { node, type, version } } of the configs in /etc/pve/nodes/*/qemu-server
my sub guest_list {
    my %ids;
    opendir(my $dh, "$PVE_DIR/nodes") or return \%ids;
    for my $node (sort grep { !/^\./ } readdir($dh)) {
        opendir(my $vh, "$PVE_DIR/nodes/$node/qemu-server") or next;
        for my $entry (readdir($vh)) {
            $ids{$1} = { node => $node, type => 'qemu', version => 1 } if $entry =~ /^(\d+)\.conf$/;
        }
        closedir($vh);
    }
    closedir($dh);
    return \%ids;
}

# a version that changes whenever a config is added, removed or moved (a checksum of the list)
my sub guest_list_version {
    my ($ids) = @_;
    my $text = join(',', map { "$_:$ids->{$_}->{node}" } sort keys %$ids);
    return 1 + unpack('%32C*', $text) + 65536 * scalar(keys %$ids);
}

# the lines before the first section ([snapshot] or [PENDING]) of VMID's config
my sub guest_properties {
    my ($vmid, $props) = @_;
    my $ids = guest_list();
    my %res;
    for my $id (defined($vmid) && $vmid ? ($vmid) : keys %$ids) {
        my $guest = $ids->{$id} or next;
        my $text = read_text("$PVE_DIR/nodes/$guest->{node}/qemu-server/$id.conf") // next;
        for my $line (split(/\n/, $text)) {
            last if $line =~ /^\[/;
            next if $line !~ /^([a-z][a-z0-9_-]*):\s*(.*?)\s*$/;
            $res{$id}->{$1} = $2 if grep { $_ eq $1 } @$props;
        }
    }
    return \%res;
}

my sub json { require JSON; return JSON->new->canonical->encode($_[0]) }

sub lab_ipcc_send_rec {
    my ($msgid, $data) = @_;
    my $name = $IPC_NAME{$msgid}
        // die "PVE::IPCC::ipcc_send_rec($msgid): no lab stand-in (MTunnelCompiledStandIns)\n";
    $! = 0;
    if ($name eq 'GET_CONFIG') {
        my ($path) = unpack('Z*', $data);
        die "GET_CONFIG: invalid path '$path'\n" if $path =~ m!(?:^|/)\.\.(?:/|$)!;
        my $text = read_text("$PVE_DIR/$path");
        if (!defined($text)) {
            $! = POSIX::ENOENT();
            return undef;
        }
        $! = 0;
        return $text;
    } elsif ($name eq 'GET_FS_VERSION') {
        my $start = (stat("$PVE_DIR/nodes"))[10] // 1;
        return json(
            {
                version => 1,
                starttime => $start,
                clinfo => 1,
                vmlist => guest_list_version(guest_list()),
                kvstore => {},
            }
        );
    } elsif ($name eq 'GET_CLUSTER_INFO') {
        my $env = lab_env();
        my @nodes = split(/ /, $env->{LAB_NODE_NAMES});
        my %list;
        for my $i (0 .. $#nodes) {
            $list{ $nodes[$i] } = {
                id => $i + 1,
                online => 1,
                ip => $env->{"LAB_$nodes[$i]_IP"},
            };
        }
        return json(
            {
                version => 1,
                cluster => {
                    name => 'mtunnel-lab',
                    version => 1,
                    nodes => scalar(@nodes),
                    quorate => 1,
                },
                nodelist => \%list,
            }
        );
    } elsif ($name eq 'GET_GUEST_LIST') {
        my $ids = guest_list();
        return json({ version => guest_list_version($ids), ids => $ids });
    } elsif ($name eq 'GET_GUEST_CONFIG_PROPERTY') {
        my ($vmid, $prop) = unpack('VZ*', $data);
        return json(guest_properties($vmid, [$prop]));
    } elsif ($name eq 'GET_GUEST_CONFIG_PROPERTIES') {
        my ($vmid, $n, @rest) = unpack('VC(Z*)*', $data);
        return json(guest_properties($vmid, [@rest[0 .. $n - 1]]));
    } elsif ($name eq 'SET_STATUS' || $name eq 'LOG_CLUSTER_MSG') {
        return '';
    } elsif ($name eq 'GET_STATUS') {
        return undef;
    } elsif ($name eq 'VERIFY_TOKEN') {
        $! = POSIX::ENOENT();
        return undef;
    }
    die "PVE::IPCC::ipcc_send_rec($name): no lab stand-in (MTunnelCompiledStandIns)\n";
}

1;
