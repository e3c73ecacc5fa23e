package MTunnelPVEStandIns;

# The cluster, config and storage layers of a Proxmox VE node, on a lab node, so that
# upstream's PVE::QemuMigrate runs there unchanged: with PVE's own monitor code talking to the
# real QEMU, the lab's sshd and `qm` on the target, and (with the series) libmtunnel.
#
# What stands in for what (everything else is upstream's code as it is):
# - pmxcfs (PVE::Cluster): cfs_read_file/cfs_write_file of the VM's config (the lab's
#   $LAB/pve/nodes/NODE/qemu-server/VMID.conf, pmxcfs's layout, seen by all nodes as
#   /etc/pve is, parsed and written by PVE::QemuServer's own parser and writer; the lab's own
#   keys 'guest' and 'accel' are kept), the vmlist (which node's directory holds each
#   config), storage.cfg (the lab's storages as PVE "dir" storages, from lab/LabStorage.pm),
#   datacenter.cfg, replication.cfg and the resource mappings (empty), user.cfg (root@pam,
#   the task's user); quorum; the node list and addresses.
# - the config's node and lock files: config_file (the node's directory in the lab's tree,
#   so upstream's move_config_to_node renames the config into the target's directory) and
#   config_file_lock (a lock file of this node, as /var/lock is per node).
# - PVE::SSHInfo: the target's address (in the migration network, if given) and the lab's
#   ssh argv prefix, instead of pvecm mtunnel and the cluster's known_hosts.
# - vm_stop and vm_stop_cleanup: the lab's `qm stop` (a lab node has no systemd scope, tap
#   devices or swtpm for PVE's own to tear down); vm_stop's nocheck (phase 3 stops the source
#   after its config moved away) as MTUNNEL_LAB_QM_NOCHECK=1, since the CLI has no such option.
# - PVE::HA::Config::vm_is_ha_managed: no HA on the lab.
#
# Environment: MTUNNEL_LAB_DIR, MTUNNEL_LAB_NODE (as lab/qm gets them). Call install() once
# upstream's modules are loaded: it replaces the imported copies of each function too.

use strict;
use warnings;

use Fcntl qw(O_WRONLY O_CREAT O_EXCL O_NOFOLLOW);
use File::Basename qw(dirname);

use lib dirname(__FILE__) . '/../..';    # lab/
use LabStorage;

use PVE::AccessControl;
use PVE::Cluster;
use PVE::HA::Config;
use PVE::INotify;
use PVE::Network;
use PVE::QemuConfig;
use PVE::QemuServer;
use PVE::ReplicationConfig;
use PVE::SSHInfo;
use PVE::Storage;
use PVE::Storage::Plugin;
use PVE::Tools;

my $LAB = $ENV{MTUNNEL_LAB_DIR} or die "MTunnelPVEStandIns: MTUNNEL_LAB_DIR not set\n";
my $NODE = $ENV{MTUNNEL_LAB_NODE} or die "MTunnelPVEStandIns: MTUNNEL_LAB_NODE not set\n";

# the lab's keys of a VM config that PVE does not know
my $LAB_KEYS = qr/^(?:guest|accel)$/;

my sub slurp {
    my ($path) = @_;
    open(my $fh, '<', $path) or return undef;
    local $/;
    my $text = <$fh>;
    close($fh);
    return $text;
}

# written to a temp file of ours, then renamed: never through a path someone else made
my sub write_file {
    my ($path, $text) = @_;
    my $tmp = "$path.tmp.$$";
    unlink($tmp);
    sysopen(my $fh, $tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, 0644)
        or die "cannot write $tmp: $!\n";
    print $fh $text;
    close($fh) or die "cannot write $tmp: $!\n";
    rename($tmp, $path) or die "cannot rename $tmp: $!\n";
}

my %env;

my sub lab_env {
    if (!%env) {
        my $text = slurp("$LAB/env") // die "MTunnelPVEStandIns: no $LAB/env\n";
        %env = $text =~ /^([A-Za-z_][A-Za-z0-9_]*)='?([^'\n]*?)'?$/mg;
    }
    return \%env;
}

my sub node_ip {
    my ($node, $cidr) = @_;
    my $e = lab_env();
    my $ip = $e->{"LAB_${node}_IP"} // die "no node '$node' in the lab\n";
    return $ip if !defined($cidr);
    for my $candidate ($ip, $e->{"LAB_${node}_MIGRATION_IP"} // ()) {
        return $candidate if PVE::Network::is_ip_in_cidr($candidate, $cidr);
    }
    die "failed to get ip for node '$node' in network '$cidr'\n";
}

# a node name as PVE's pve-node format allows it: never a path of its own
my $NODE_NAME = qr/[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?/;

# pmxcfs's nodes/NODE/qemu-server/VMID.conf in the lab's tree
my sub vm_config_path {
    my ($vmid, $node) = @_;
    $node //= $NODE;
    die "invalid node name '$node'\n" if $node !~ /^$NODE_NAME$/;
    return "$LAB/pve/nodes/$node/qemu-server/$vmid.conf";
}

# the lab's storages (lab/LabStorage.pm) as PVE dir storages
my sub storage_cfg_text {
    my $text = '';
    for my $store (LabStorage::ids()) {
        $text .= "dir: $store\n\tpath $LAB/" . LabStorage::storage($store)->{dir} . "\n";
        $text .= "\tcontent images\n";
        $text .= "\tshared 1\n" if LabStorage::is_shared($store);
        $text .= "\n";
    }
    return $text;
}

my sub storage_cfg {
    my $cfg = PVE::Storage::Plugin->parse_config('storage.cfg', storage_cfg_text());
    # PVE pins 'local' to /var/lib/vz; the lab's node-local storage of that name is elsewhere
    $cfg->{ids}->{local}->{path} = "$LAB/" . LabStorage::storage('local')->{dir};
    $cfg->{ids}->{local}->{content} = { images => 1 };
    return $cfg;
}

my %cfs_read = (
    'storage.cfg' => \&storage_cfg,
    'datacenter.cfg' => sub { {} },
    'replication.cfg' => sub { PVE::ReplicationConfig->parse_config('replication.cfg', '') },
    # root@pam alone, as on a fresh node: the task's user
    'user.cfg' =>
        sub { PVE::AccessControl::parse_user_config('user.cfg', "user:root\@pam:1:0::::::\n") },
    # resource mappings (PCI, USB, directories): none on the lab
    map {
        ("mapping/$_.cfg" => sub { { ids => {}, order => {} } })
    } qw(pci usb directory),
);

my sub cfs_read_file {
    my ($file) = @_;
    if (my ($node, $vmid) = $file =~ m!^nodes/($NODE_NAME)/qemu-server/(\d+)\.conf$!) {
        my $text = slurp(vm_config_path($vmid, $node)) // return undef;
        my $pve = join('', grep { !/^\s*([a-z]+)\s*:/ || $1 !~ $LAB_KEYS } split(/^/, $text));
        return PVE::QemuServer::parse_vm_config("/qemu-server/$vmid.conf", $pve);
    }
    my $reader = $cfs_read{$file} or die "cfs_read_file: '$file' has no stand-in on the lab\n";
    return $reader->();
}

my sub cfs_write_file {
    my ($file, $conf) = @_;
    my ($node, $vmid) = $file =~ m!^nodes/($NODE_NAME)/qemu-server/(\d+)\.conf$!
        or die "cfs_write_file: '$file' has no stand-in on the lab\n";
    my $path = vm_config_path($vmid, $node);
    my $old = slurp($path) // '';
    my $lab = join('', grep { /^\s*([a-z]+)\s*:/ && $1 =~ $LAB_KEYS } split(/^/, $old));
    write_file($path, PVE::QemuServer::write_vm_config("/qemu-server/$vmid.conf", $conf) . $lab);
}

my sub run_lab_qm {
    my (@args) = @_;
    PVE::Tools::run_command(['qm', @args], outfunc => sub { }, errfunc => sub { warn "$_[0]\n" });
}

# Replaces PACKAGE::NAME, and every imported alias of it in the loaded packages.
my sub stand_in {
    my ($package, $name, $code) = @_;
    no strict 'refs';
    no warnings 'redefine';
    my $original = defined(&{"${package}::${name}"}) ? \&{"${package}::${name}"} : undef;
    *{"${package}::${name}"} = $code;
    return if !$original;
    for my $file (keys %INC) {
        next if $file !~ m/\.pm$/;
        (my $other = $file) =~ s/\.pm$//;
        $other =~ s!/!::!g;
        my $glob = "${other}::${name}";
        *{$glob} = $code if defined(&{$glob}) && \&{$glob} == $original;
    }
}

# Call once upstream's modules are loaded (PVE::QemuMigrate and what it uses).
sub install {
    stand_in('PVE::INotify', 'nodename', sub { $NODE });

    stand_in('PVE::Cluster', 'cfs_read_file', \&cfs_read_file);
    stand_in('PVE::Cluster', 'cfs_write_file', \&cfs_write_file);
    stand_in('PVE::Cluster', 'cfs_update', sub { });
    stand_in('PVE::Cluster', 'check_cfs_quorum', sub { 1 });
    stand_in(
        'PVE::Cluster',
        'check_node_exists',
        sub {
            my ($node, $noerr) = @_;
            return 1 if defined(lab_env()->{"LAB_${node}_IP"});
            die "no such cluster node '$node'\n" if !$noerr;
            return undef;
        },
    );
    stand_in('PVE::Cluster', 'get_nodelist', sub { [split(/ /, lab_env()->{LAB_NODE_NAMES})] });
    stand_in('PVE::Cluster', 'remote_node_ip', sub { node_ip($_[0]) });
    stand_in(
        'PVE::Cluster',
        'get_vmlist',
        sub {
            my $ids = {};
            for my $node (split(/ /, lab_env()->{LAB_NODE_NAMES})) {
                opendir(my $dh, "$LAB/pve/nodes/$node/qemu-server") or next;
                for my $entry (readdir($dh)) {
                    $ids->{$1} = { node => $node, type => 'qemu', version => 1 }
                        if $entry =~ /^(\d+)\.conf$/;
                }
                closedir($dh);
            }
            return { ids => $ids };
        },
    );

    stand_in('PVE::QemuConfig', 'config_file', sub { vm_config_path($_[1], $_[2]) });
    stand_in(
        'PVE::QemuConfig',
        'config_file_lock',
        sub {
            my $dir = "$LAB/$NODE/lock";
            mkdir($dir, 0700);
            return "$dir/lock-$_[1].conf";
        },
    );

    stand_in(
        'PVE::SSHInfo',
        'get_ssh_info',
        sub {
            my ($node, $cidr) = @_;
            return { ip => node_ip($node, $cidr), name => $node, network => $cidr };
        },
    );
    stand_in(
        'PVE::SSHInfo',
        'ssh_info_to_command',
        sub {
            my ($info, @extra) = @_;
            my $prefix = slurp("$LAB/ssh_prefix_$info->{name}")
                // die "no ssh prefix for $info->{name}\n";
            my @ssh = grep { length } split(/\n/, $prefix);
            # the destination: in the migration network, if one was given
            return [@ssh[0 .. $#ssh - 1], @extra, "root\@$info->{ip}"];
        },
    );

    stand_in(
        'PVE::QemuServer',
        'vm_stop',
        sub {
            my ($storecfg, $vmid, $skiplock, $nocheck) = @_;
            # nocheck: no config check (the config may have moved to the target already)
            local %ENV = %ENV;
            $ENV{MTUNNEL_LAB_QM_NOCHECK} = 1 if $nocheck;
            run_lab_qm('stop', $vmid, ($skiplock ? ('--skiplock') : ()));
        },
    );
    stand_in('PVE::QemuServer', 'vm_stop_cleanup', sub { });

    stand_in('PVE::HA::Config', 'vm_is_ha_managed', sub { 0 });
}

1;
