package MTunnelPVEStandIns;

# Stand-ins for the parts of a Proxmox VE node a lab node lacks, so that upstream's code runs
# there unchanged. Two kinds of lab, two sets; install() picks by MTUNNEL_LAB_PVE.
#
# A PVE lab (MTUNNEL_LAB_PVE=1; lab.sh up with MTUNNEL_LAB_PVE, lab/upstream/README.md): every
# node runs PVE's own qm, pvesm and pvecm; PVE::Cluster works on the lab's /etc/pve (pmxcfs's
# IPC: MTunnelCompiledStandIns), PVE::Storage on dir storages, PVE's vm_start and vm_stop start
# and stop QEMU. Stood in here only what needs a daemon or hardware the lab lacks:
# - PVE::INotify::nodename: the lab node's name (MTUNNEL_LAB_NODE): the nodes share this host's
#   UTS namespace, uname says the host's name on all of them.
# - PVE::Systemd's D-Bus calls (enter_systemd_scope, wait_for_unit_removed, is_unit_active):
#   no systemd on the lab. QEMU stays where qm started it, and daemonizes as it does there.
#   So a VM has no scope's cgroup (qemu.slice/VMID.scope) either: its memory and pressure
#   figures (PVE::CGroup::get_memory_stat, PVE::ProcFSTools::read_cgroup_pressure of that
#   cgroup, read by vmstatus: qm status, qm list) are zeros, not warnings.
# - QEMU's argv for Debian's QEMU (config_to_command's result): the "+pveN" of the machine
#   type in -machine and the "-id VMID" option exist only in Proxmox's QEMU; Debian's gets the
#   same machine without the suffix, and no -id (its -name vmVMID,... names the VM).
# - query-machines' "is-current" (PVE::QemuServer::Machine::get_current_qemu_machine): only
#   Proxmox's QEMU marks the machine a VM runs; without it upstream takes QEMU's default
#   machine, so a VM pinned to an older one would be migrated as the newest and mirrored
#   with blockdev-mirror. The running machine is then QOM's type of /machine (the same name
#   with "-machine" appended), marked "is-current" before upstream reads the list.
# - query-proxmox-support (PVE::QMPClient::queue_cmd): a QMP command only Proxmox's QEMU has.
#   vmstatus queues it first of the commands that fill in 'running-qemu', 'running-machine'
#   and the block stats, and a failed command aborts the ones queued after it: on Debian's
#   QEMU `qm status --verbose` would never say 'running-qemu' (which the series' 0004 needs
#   to trust 'qmpstatus'). It is answered {} (none of Proxmox's additions) without asking.
# - PVE::SafeSyslog::initlog: no syslog daemon (no /dev/log) on the lab; PVE's syslog() calls
#   then fail, which PVE ignores (without this initlog warns on every command).
#
# The lab's own nodes (no MTUNNEL_LAB_PVE; make bench's): the target is the lab's qm (lab/qm),
# and the cluster, config and storage layers of a Proxmox VE node are stood in on the source,
# so that upstream's PVE::QemuMigrate runs there unchanged: with PVE's own monitor code talking
# to the real QEMU, the lab's sshd and `qm` on the target, and (with the series) libmtunnel.
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

# the lab's own nodes: what their stand-ins use (loaded by install_lab_nodes)
my @LAB_NODE_MODULES = qw(
    LabStorage
    PVE::AccessControl PVE::Cluster PVE::HA::Config PVE::INotify PVE::Network PVE::QemuConfig
    PVE::QemuServer PVE::ReplicationConfig PVE::SSHInfo PVE::Storage PVE::Storage::Plugin
    PVE::Tools
);

my $LAB = $ENV{MTUNNEL_LAB_DIR} or die "MTunnelPVEStandIns: MTUNNEL_LAB_DIR not set\n";
my $NODE = $ENV{MTUNNEL_LAB_NODE} or die "MTunnelPVEStandIns: MTUNNEL_LAB_NODE not set\n";

# In a PVE lab the node's name is in place as soon as this module is loaded, before anything
# else of PVE: its modules take it into lexicals of their own when they are loaded, and the
# programs PVE runs on its own (QEMU's tap script pve-bridge) load this by PERL5OPT
# (lab/upstream/pve-node) and nothing else of the lab.
if ($ENV{MTUNNEL_LAB_PVE}) {
    require PVE::INotify;
    no warnings 'redefine';
    *PVE::INotify::nodename = sub { $NODE };
}

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
    no warnings qw(redefine prototype);
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

# Call once upstream's modules are loaded (PVE::QemuMigrate, PVE::CLI::qm and what they use).
sub install {
    return $ENV{MTUNNEL_LAB_PVE} ? install_pve() : install_lab_nodes();
}

# ---- a PVE lab

# QEMU's argv for Debian's QEMU: the "+pveN" suffix dropped from -machine's type, and no
# "-id VMID"; both exist only in Proxmox's QEMU
my sub debian_qemu_argv {
    my ($cmd) = @_;
    my @argv;
    for (my $i = 0; $i < @$cmd; $i++) {
        if ($cmd->[$i] eq '-id') {
            $i++;
            next;
        }
        push @argv, $cmd->[$i];
        push @argv, $cmd->[++$i] =~ s/(^|,)(type=[^,]*?)\+pve\d+(?=,|$)/$1$2/r
            if $cmd->[$i] eq '-machine' && $i < $#$cmd;
    }
    @$cmd = @argv;
    return $cmd;
}

sub install_pve {
    require PVE::INotify;
    stand_in('PVE::INotify', 'nodename', sub { $NODE });

    require PVE::SafeSyslog;
    stand_in('PVE::SafeSyslog', 'initlog', sub { return });

    require PVE::Systemd;
    stand_in('PVE::Systemd', 'enter_systemd_scope', sub { return 1 });
    stand_in('PVE::Systemd', 'wait_for_unit_removed', sub { return 1 });
    stand_in('PVE::Systemd', 'is_unit_active', sub { return 0 });

    if (defined(&PVE::CGroup::get_memory_stat)) {
        stand_in('PVE::CGroup', 'get_memory_stat', sub { return { mem => 0, swap => 0 } });
    }
    if (defined(&PVE::ProcFSTools::read_cgroup_pressure)) {
        my $read_cgroup_pressure = \&PVE::ProcFSTools::read_cgroup_pressure;
        my $zero = { avg10 => 0, avg60 => 0, avg300 => 0, total => 0 };
        stand_in(
            'PVE::ProcFSTools',
            'read_cgroup_pressure',
            sub {
                my ($path) = @_;
                return $read_cgroup_pressure->(@_) if $path !~ m!^qemu\.slice/\d+\.scope$!;
                return { map { $_ => { some => {%$zero}, full => {%$zero} } } qw(cpu memory io) };
            },
        );
    }

    if (defined(&PVE::QemuServer::Machine::get_current_qemu_machine)) {
        stand_in(
            'PVE::QemuServer::Machine',
            'get_current_qemu_machine',
            sub {
                my ($vmid) = @_;
                my $machines = PVE::QemuServer::Monitor::mon_cmd($vmid, 'query-machines');
                if (!grep { $_->{'is-current'} } @$machines) {
                    my $type = PVE::QemuServer::Monitor::mon_cmd(
                        $vmid, 'qom-get',
                        path => '/machine',
                        property => 'type',
                    );
                    $type =~ s/-machine$//;
                    $_->{'is-current'} = JSON::true() for grep { $_->{name} eq $type } @$machines;
                }
                return PVE::QemuServer::Machine::current_from_query_machines($machines);
            },
        );
    }

    if (defined(&PVE::QMPClient::queue_cmd)) {
        my $queue_cmd = \&PVE::QMPClient::queue_cmd;
        stand_in(
            'PVE::QMPClient',
            'queue_cmd',
            sub {
                my ($self, $peer, $callback, $execute, @params) = @_;
                return $queue_cmd->(@_) if $execute ne 'query-proxmox-support';
                $callback->(ref($peer) ? $peer->{id} : $peer, { return => {} }) if $callback;
                return;
            },
        );
    }

    if (defined(&PVE::QemuServer::config_to_command)) {
        my $config_to_command = \&PVE::QemuServer::config_to_command;
        stand_in(
            'PVE::QemuServer',
            'config_to_command',
            sub {
                return debian_qemu_argv(scalar($config_to_command->(@_))) if !wantarray;
                my ($cmd, @rest) = $config_to_command->(@_);
                return (debian_qemu_argv($cmd), @rest);
            },
        );
    }
}

# ---- the lab's own nodes

sub install_lab_nodes {
    for my $module (@LAB_NODE_MODULES) {
        (my $file = "$module.pm") =~ s!::!/!g;
        require $file;
    }
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
