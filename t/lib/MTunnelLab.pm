package MTunnelLab;

# Test helper: brings up the multi-node lab (lab/lab.sh) for prove tests and
# always tears it down again (explicit down, DESTROY, END, SIGINT/SIGTERM).
#
#   use lib 't/lib';
#   use MTunnelLab;
#   my $lab = MTunnelLab->up(nodes => 2, name => 'mig');   # dies with lab.sh's output
#   $lab->write_vm_config(100, memory => 256);   # on node1 (or where its config is now)
#   $lab->move_vm_config(100, 'node2');           # as a migration's source moves it
#   $lab->run_ok('node1', qw(qm start 100));
#   my ($rc, $out, $err) = $lab->run('node2', qw(qm status 100 --verbose));
#   my $rem_ssh = $lab->ssh_prefix('node2');   # ['/usr/bin/ssh', ..., 'root@198.18.0.2']
#   $lab->enter('node1');   # this process now lives in node1's net + mount namespaces
#   ...                     # e.g. PVE::MTunnel->open(ssh => $rem_ssh, ...)
#   $lab->leave;
#   $lab->down;
#
# Options of up(): nodes (default 2), name (default: derived from the test
# file's name, so that `prove -j` runs distinct labs), accel (auto|kvm|tcg:
# the default accelerator of lab/qm's VMs), qemu (the nodes' QEMU: "10.0", "7.2" or a comma
# list, one per node, as lab.sh's MTUNNEL_LAB_QEMU; default: MTUNNEL_LAB_QEMU, else 10.0), pve
# (a Proxmox VE lab: the program the nodes' qm, pvesm and pvecm run, as lab.sh's
# MTUNNEL_LAB_PVE; lab/upstream/README.md).
# Needs root. Only core modules.

use strict;
use warnings;

use Carp qw(croak);
use Cwd qw(getcwd abs_path);
use Fcntl qw(O_WRONLY O_CREAT O_EXCL O_NOFOLLOW);
use File::Basename qw(dirname basename);
use File::Temp ();
use POSIX ();
use Scalar::Util qw(weaken);
use Config;

my $LABSH = abs_path(dirname(abs_path(__FILE__)) . '/../../lab/lab.sh');

use constant {
    CLONE_NEWNS => 0x00020000,
    CLONE_NEWNET => 0x40000000,
};
my %SYS_SETNS = ('x86_64' => 308, 'aarch64' => 268, 'i386' => 346, 'i686' => 346);

my %LIVE;    # name => weak ref to every lab this process brought up

sub _default_name {
    my $n = basename($0);
    $n =~ s/\.t\z//;
    $n =~ s/[^A-Za-z0-9_]/_/g;
    $n = substr("t_$n", 0, 20);
    return $n;
}

sub up {
    my ($class, %opt) = @_;
    my $nodes = $opt{nodes} // 2;
    my $name = $opt{name} // _default_name();
    croak "invalid lab name '$name'" if $name !~ /^[A-Za-z0-9_]{1,20}$/;
    croak "invalid node count '$nodes'" if $nodes !~ /^[1-9][0-9]*$/;
    croak "lab.sh not found next to t/lib" if !$LABSH || !-x $LABSH;
    croak "the lab needs root" if $> != 0;

    my $self = bless {
        name => $name,
        nodes => $nodes,
        dir => "/run/mtunnel-lab/$name",
        owner => $$,
        up => 0,
    }, $class;
    # register before lab.sh runs: a half-built lab is torn down too
    $LIVE{$name} = $self;
    weaken($LIVE{$name});
    _install_signal_handlers();

    my ($rc, $out, $err) =
        $self->_lab_sh({ accel => $opt{accel}, qemu => $opt{qemu}, pve => $opt{pve} }, 'up',
        $nodes);
    if ($rc != 0) {
        delete $LIVE{$name};
        die "lab up failed (exit $rc):\n$out$err";
    }
    $self->{up} = 1;
    $self->{env} = $self->_read_env;
    return $self;
}

# A lab someone else brought up (lab.sh up; e.g. make bench's): used, never torn down.
sub attach {
    my ($class, $name) = @_;
    croak "invalid lab name '$name'" if !defined $name || $name !~ /^[A-Za-z0-9_]{1,20}$/;
    my $dir = "/run/mtunnel-lab/$name";
    croak "lab '$name' is not up" if !-f "$dir/env";
    opendir(my $dh, $dir) or croak "cannot read $dir: $!";
    my $nodes = grep { /^node[1-9][0-9]*\z/ && -d "$dir/$_" } readdir($dh);
    closedir($dh);
    my $self =
        bless { name => $name, nodes => $nodes, dir => $dir, owner => 0, up => 1, down_done => 1 },
        $class;
    $self->{env} = $self->_read_env;
    return $self;
}

sub name { $_[0]->{name} }
sub dir { $_[0]->{dir} }

sub nodes {
    map { "node$_" } 1 .. $_[0]->{nodes};
}
sub lab_sh { $LABSH }

sub _node {
    my ($self, $node) = @_;
    croak "invalid node '" . ($node // 'undef') . "'"
        if !defined $node || $node !~ /^node([1-9][0-9]*)\z/ || $1 > $self->{nodes};
    return $node;
}

sub _read_env {
    my ($self) = @_;
    my %env;
    open(my $fh, '<', "$self->{dir}/env") or die "cannot read $self->{dir}/env: $!\n";
    while (my $line = <$fh>) {
        $env{$1} = $2 if $line =~ /^([A-Za-z_][A-Za-z0-9_]*)='?([^']*?)'?\s*$/;
    }
    close $fh;
    return \%env;
}

sub ip {
    my ($self, $node) = @_;
    return $self->{env}->{"LAB_${\ $self->_node($node)}_IP"};
}

# the QEMU version NODE runs ("10.0", "7.2"), as lab.sh up chose it
sub qemu_version {
    my ($self, $node) = @_;
    return $self->{env}->{"LAB_${\ $self->_node($node)}_QEMU"} // '7.2';
}

# The id of the mirror job of disk KEY (ide0) of a VM that runs NODE's default machine: its
# QEMU attaches the disk with -drive on 7.2 (drive-mirror, job drive-KEY) and with -blockdev on
# 10.0, as qemu-server 9 does (blockdev-mirror, job mirror-KEY).
sub mirror_job {
    my ($self, $node, $key) = @_;
    return ($self->qemu_version($node) eq '7.2' ? 'drive-' : 'mirror-') . $key;
}

sub netns {
    my ($self, $node) = @_;
    return $self->{env}->{"LAB_${\ $self->_node($node)}_NETNS"};
}

# arrayref: the ssh argv prefix a client on another node uses to reach $node
sub ssh_prefix {
    my ($self, $node) = @_;
    my $path = "$self->{dir}/ssh_prefix_" . $self->_node($node);
    open(my $fh, '<', $path) or die "cannot read $path: $!\n";
    chomp(my @argv = <$fh>);
    close $fh;
    return \@argv;
}

# ------------------------------------------------------------ VM configs (the lab's pmxcfs)

# As pmxcfs keeps them: a VM's config is in the directory of the node that owns the VM,
# $LAB/pve/nodes/NODE/qemu-server/VMID.conf, and only a rename moves it to another node (what a
# migration's source does when the migration completed). lab/qm loads it where upstream's qm
# does (lab/README.md).

sub _vmid {
    my ($vmid) = @_;
    croak "invalid vmid '" . ($vmid // 'undef') . "'"
        if !defined $vmid || $vmid !~ /^[1-9][0-9]*\z/;
    return $vmid;
}

sub _config_path {
    my ($self, $vmid, $node) = @_;
    return
          "$self->{dir}/pve/nodes/"
        . $self->_node($node)
        . "/qemu-server/"
        . _vmid($vmid) . '.conf';
}

# The node whose directory holds VMID's config, undef if none does.
sub vm_config_node {
    my ($self, $vmid) = @_;
    my @on = grep { -f $self->_config_path($vmid, $_) } $self->nodes;
    croak "the config of VM $vmid is on several nodes (@on)" if @on > 1;
    return $on[0];
}

# The path of VMID's config where it is now, undef if there is none.
sub vm_config_path {
    my ($self, $vmid) = @_;
    my $node = $self->vm_config_node($vmid) // return undef;
    return $self->_config_path($vmid, $node);
}

# Writes VMID's config ("key: value" lines, sorted) where it is now, on node1 for a new VM
# (a temp file of ours, renamed over it). Returns its path.
sub write_vm_config {
    my ($self, $vmid, %conf) = @_;
    my $path = $self->_config_path($vmid, $self->vm_config_node($vmid) // 'node1');
    my $tmp = "$path.tmp.$$";
    unlink($tmp);
    sysopen(my $fh, $tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, 0644)
        or die "cannot write $tmp: $!\n";
    print $fh "$_: $conf{$_}\n" for sort keys %conf;
    close($fh) or die "cannot write $tmp: $!\n";
    rename($tmp, $path) or die "cannot rename $tmp to $path: $!\n";
    return $path;
}

# Moves VMID's config to $node by rename, as a migration's source does (nothing if it is
# there already; dies without one). Returns its new path.
sub move_vm_config {
    my ($self, $vmid, $node) = @_;
    my $dst = $self->_config_path($vmid, $node);
    my $from = $self->vm_config_node($vmid) // croak "VM $vmid has no config to move";
    return $dst if $from eq $node;
    my $src = $self->_config_path($vmid, $from);
    rename($src, $dst) or die "cannot move $src to $dst: $!\n";
    return $dst;
}

# Removes VMID's config wherever it is; whether there was one.
sub remove_vm_config {
    my ($self, $vmid) = @_;
    my $path = $self->vm_config_path($vmid) // return 0;
    unlink($path) or die "cannot remove $path: $!\n";
    return 1;
}

# Whether $node's qm behaves as qemu-server with mtunnel's series (patches/qemu-server/), as
# lab/qm's qm_patched reads it: the marker $LAB/NODE/qemu-server-series. Else it is qemu-server
# as released.
sub qemu_server_series {
    my ($self, $node, $on) = @_;
    my $marker = "$self->{dir}/" . $self->_node($node) . '/qemu-server-series';
    if (!$on) {
        unlink($marker) or $!{ENOENT} or die "cannot remove $marker: $!\n";
    } elsif (sysopen(my $fh, $marker, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, 0644)) {
        close($fh);
    } elsif (!$!{EEXIST}) {
        die "cannot create $marker: $!\n";
    }
    return $self;
}

# ------------------------------------------------------------ running commands

# fork + exec with stdin </dev/null, stdout/stderr captured in temp files;
# the child first returns to the host namespaces if this process entered a node.
sub _capture {
    my ($self, $env, @cmd) = @_;
    my $out = File::Temp->new(TMPDIR => 1);
    my $err = File::Temp->new(TMPDIR => 1);
    local $SIG{CHLD} = 'DEFAULT';    # a test's 'IGNORE' would eat our child's status
    my $pid = fork() // die "fork: $!\n";
    if (!$pid) {
        eval {
            if ($self->{entered}) {
                my $cwd = getcwd() // '/';
                $self->_setns_host;
                chdir($cwd) or chdir('/');
            }
            open(STDIN, '<', '/dev/null') or die "stdin: $!\n";
            open(STDOUT, '>&', $out) or die "stdout: $!\n";
            open(STDERR, '>&', $err) or die "stderr: $!\n";
            $ENV{$_} = $env->{$_} for keys %$env;
            exec { $cmd[0] } @cmd or die "exec $cmd[0]: $!\n";
        };
        print STDERR $@;
        POSIX::_exit(127);    # no END blocks, no DESTROY in the child
    }
    my $r;
    do { $r = waitpid($pid, 0) } while ($r == -1 && $!{EINTR});
    die "waitpid: $!\n" if $r != $pid;
    my $status = $?;
    my $rc = ($status & 127) ? 128 + ($status & 127) : $status >> 8;
    return ($rc, _slurp($out->filename), _slurp($err->filename));
}

sub _slurp {
    my ($path) = @_;
    open(my $fh, '<:raw', $path) or return '';
    local $/;
    my $s = <$fh> // '';
    close $fh;
    return $s;
}

sub _lab_sh {
    my ($self, $opt, @args) = @_;
    my %env = (MTUNNEL_LAB => $self->{name});
    $env{MTUNNEL_LAB_ACCEL} = $opt->{accel} if $opt && $opt->{accel};
    $env{MTUNNEL_LAB_QEMU} = $opt->{qemu} if $opt && $opt->{qemu};
    $env{MTUNNEL_LAB_PVE} = $opt->{pve} if $opt && $opt->{pve};
    return $self->_capture(\%env, $LABSH, @args);
}

# NODE's sshd with extra sshd_config options (lab.sh sshd), e.g. ('MaxStartups', '2:50:4');
# none: the stock lab config. Dies if sshd refuses them.
sub sshd {
    my ($self, $node, @options) = @_;
    my ($rc, $out, $err) = $self->_lab_sh(undef, 'sshd', $self->_node($node), @options);
    die "lab.sh sshd $node @options failed (exit $rc):\n$out$err" if $rc != 0;
    return 1;
}

# ($exit_code, $stdout, $stderr) of CMD run in NODE (lab.sh exec)
sub run {
    my ($self, $node, @cmd) = @_;
    croak "run: no command" if !@cmd;
    return $self->_lab_sh(undef, 'exec', $self->_node($node), @cmd);
}

# CMD in NODE in the background, stdout and stderr into $log, for tests that act at a moment
# its output shows. lab.sh exec execs all the way down, so $bg->pid is CMD's own pid.
#   my $bg = $lab->background('node1', $log, CMD...);
#   $bg->wait_for(qr/migration active/, 30);   # 1 once seen; 0 if CMD ended or time ran out
#   $bg->finish(120);                          # 1 once CMD ended; $bg->status is then its $?
sub background {
    my ($self, $node, $log, @cmd) = @_;
    croak "background: no command" if !@cmd;
    unlink $log;
    my $pid = fork() // die "fork: $!\n";
    if (!$pid) {
        eval {
            $self->_setns_host if $self->{entered};
            $ENV{MTUNNEL_LAB} = $self->{name};
            open(STDIN, '<', '/dev/null') or die "stdin: $!\n";
            open(STDOUT, '>', $log) or die "$log: $!\n";
            open(STDERR, '>&', \*STDOUT) or die "stderr: $!\n";
            exec($LABSH, 'exec', $self->_node($node), @cmd) or die "exec $LABSH: $!\n";
        };
        print STDERR $@;
        POSIX::_exit(127);
    }
    return bless { pid => $pid, log => $log }, 'MTunnelLab::Background';
}

# like run, dies on a non-zero exit; returns stdout (list context: stdout, stderr)
sub run_ok {
    my ($self, $node, @cmd) = @_;
    my ($rc, $out, $err) = $self->run($node, @cmd);
    die "'@cmd' on $node failed (exit $rc):\n$out$err" if $rc != 0;
    return wantarray ? ($out, $err) : $out;
}

# ------------------------------------------------------------ namespaces

sub _setns {
    my ($fh, $type, $what) = @_;
    my $arch = (split /-/, $Config{archname})[0];
    my $nr = $SYS_SETNS{$arch} // die "setns: unknown syscall number on $arch\n";
    my $r = syscall($nr, fileno($fh), $type);
    die "setns($what): $!\n" if $r != 0;
}

sub _setns_host {
    my ($self) = @_;
    my $e = $self->{entered} or return;
    _setns($e->{host_mnt}, CLONE_NEWNS, 'host mnt');
    _setns($e->{host_net}, CLONE_NEWNET, 'host net');
}

# make THIS process live in $node's network and mount namespaces
sub enter {
    my ($self, $node) = @_;
    $self->_node($node);
    croak "already entered $self->{entered}->{node}" if $self->{entered};
    croak "lab is not up" if !$self->{up};
    my $cwd = getcwd() // '/';
    my %e = (node => $node, cwd => $cwd);
    open($e{host_net}, '<', '/proc/self/ns/net') or die "open /proc/self/ns/net: $!\n";
    open($e{host_mnt}, '<', '/proc/self/ns/mnt') or die "open /proc/self/ns/mnt: $!\n";
    my $netns = '/run/netns/' . $self->netns($node);
    open(my $net, '<', $netns) or die "open $netns: $!\n";
    open(my $mnt, '<', "$self->{dir}/$node/mnt") or die "open $self->{dir}/$node/mnt: $!\n";
    _setns($net, CLONE_NEWNET, "$node net");

    if (!eval { _setns($mnt, CLONE_NEWNS, "$node mnt"); 1 }) {
        my $err = $@;
        _setns($e{host_net}, CLONE_NEWNET, 'host net');
        die $err;
    }
    close $net;
    close $mnt;
    $self->{entered} = \%e;
    chdir($cwd) or chdir('/');    # setns(mnt) reset cwd to the namespace's root
    return $self;
}

sub leave {
    my ($self) = @_;
    my $e = $self->{entered} or return $self;
    return $self if $self->{owner} != $$;
    my $cwd = getcwd() // $e->{cwd};
    $self->_setns_host;
    delete $self->{entered};
    chdir($cwd) or chdir($e->{cwd}) or chdir('/');
    return $self;
}

sub entered { $_[0]->{entered} ? $_[0]->{entered}->{node} : undef }

# ------------------------------------------------------------ inspection

# live QEMU pids that lab/qm started on $node
sub qemu_pids {
    my ($self, $node) = @_;
    my $dir = "$self->{dir}/" . $self->_node($node);
    my @pids;
    for my $f (sort glob("$dir/qemu-*.pid")) {
        open(my $fh, '<', $f) or next;
        my $pid = <$fh>;
        close $fh;
        next if !defined $pid || $pid !~ /^\s*([0-9]+)/;
        $pid = $1;
        next if !kill(0, $pid);
        my $stat = _slurp("/proc/$pid/stat");
        next if $stat =~ /^\d+ \(.*\) [ZX] /s;
        # the pid may have been reused: it must be a QEMU of this lab (the lab qm's names a
        # file of the lab; qemu-server's, in a PVE lab, is VM VMID's in the node's namespace)
        my $cmdline = _slurp("/proc/$pid/cmdline");
        if (index($cmdline, "$self->{dir}/") < 0) {
            my ($vmid) = $f =~ /qemu-([0-9]+)\.pid$/;
            my ($ino) = (stat("$dir/mnt"))[1];
            next
                if !defined($vmid)
                || index($cmdline, "\0-name\0vm$vmid,") < 0
                || !defined($ino)
                || (readlink("/proc/$pid/ns/mnt") // '') ne "mnt:[$ino]";
        }
        push @pids, $pid + 0;
    }
    return @pids;
}

# QEMU's run state of VMID on $node (running, paused, postmigrate, …), 'stopped' without a
# QEMU, 'unknown' if its monitor does not answer. Asks QEMU itself, not `qm status`: that one
# needs the VM's config on $node (as upstream's), which a migration moves.
sub qmpstatus {
    my ($self, $node, $vmid) = @_;
    _vmid($vmid);
    my $pid =
        _slurp("$self->{dir}/" . $self->_node($node) . "/qemu-$vmid.pid") =~ /^([0-9]+)/ ? $1 : 0;
    # the lab qm's QEMU has "-name vmVMID", qemu-server's "-name vmVMID,debug-threads=on"
    my $cmdline = $pid ? _slurp("/proc/$pid/cmdline") : '';
    return 'stopped'
        if !$pid
        || !alive($pid)
        || (index($cmdline, "\0-name\0vm$vmid\0") < 0 && index($cmdline, "\0-name\0vm$vmid,") < 0);
    # 5 s, as `qm status --verbose` waits for the monitor
    my ($rc, $out) = $self->run($node, 'timeout', '5', 'qmp', $vmid, 'query-status');
    return $rc == 0 && $out =~ /"status"\s*:\s*"([^"]+)"/ ? $1 : 'unknown';
}

# volume ids on $node's storage $store (pvesm list)
sub volumes {
    my ($self, $node, $store) = @_;
    my (undef, $out) = $self->run($node, 'pvesm', 'list', $store);
    return map { /^(\S+:\S+)/ ? $1 : () } split /\n/, $out;
}

# ssh processes in $node's network namespace; with $vmid only the tunnels forwarding its socket
sub ssh_pids {
    my ($self, $node, $vmid) = @_;
    return grep {
        my $c = _slurp("/proc/$_/cmdline");
        $c =~ /^\/usr\/bin\/ssh\0/
            && (!defined $vmid || $c =~ /\0-L\0\/run\/qemu-server\/$vmid\.migrate:/);
    } $self->procs_in($node);
}

# paths of *.migrate files in $node's /run/qemu-server
sub socket_files {
    my ($self, $node) = @_;
    my ($rc, $out, $err) = $self->run(
        $node, 'find', '/run/qemu-server', '-mindepth',
        '1', '-maxdepth', '1', '-name',
        '*.migrate'
    );
    die "socket_files($node): $err" if $rc != 0;
    return sort split /\n/, $out;
}

# pids living in $node's network namespace (without this process)
sub procs_in {
    my ($self, $node) = @_;
    my ($rc, $out, $err) = $self->_capture({}, 'ip', 'netns', 'pids', $self->netns($node));
    die "procs_in($node): $err" if $rc != 0;
    return grep { $_ != $$ } map { $_ + 0 } grep { /^[0-9]+$/ } split /\n/, $out;
}

# Programs a lab test starts, directly or through the lab.
my %LAB_COMM = map { $_ => 1 }
    qw(ssh sshd qemu-system-x86 perl mtunnel-migrate qm lab.sh bash sh nsenter
    guest-check ip find cat);

# zombies (as "pid(comm)") of the lab's programs that were started at or after epoch second
# $since: the ones a test may have caused. Older zombies of the machine's non-reaping pid 1
# and other people's processes are not ours.
sub zombies_since {
    my ($since) = @_;
    # A process that just exited is a zombie until its reaper (lab/reap-run, as systemd on a
    # PVE host) collects it: only one that stays for 2 s is left behind.
    my @z;
    for (1 .. 20) {
        @z = _zombies_since($since);
        last if !@z;
        select(undef, undef, undef, 0.1);
    }
    return @z;
}

# the parent pid of PID (/proc/PID/stat), 0 if gone
sub _ppid {
    my ($pid) = @_;
    my ($rest) = _slurp("/proc/$pid/stat") =~ /^\d+ \(.*\) (.*)$/s or return 0;
    return (split / /, $rest)[1] // 0;
}

# Under lab/reap-run (MTUNNEL_REAPER): only the processes below that reaper are this test's
# (tests in two lanes at once, each under its reaper: lab/prove-lanes).
sub _ours {
    my ($pid) = @_;
    my $reaper = $ENV{MTUNNEL_REAPER} or return 1;
    for (1 .. 64) {
        $pid = _ppid($pid) or return 0;
        return 1 if $pid == $reaper;
        return 0 if $pid == 1;
    }
    return 0;
}

sub _zombies_since {
    my ($since) = @_;
    my ($btime) = _slurp('/proc/stat') =~ /^btime (\d+)$/m;
    my $hz = POSIX::sysconf(POSIX::_SC_CLK_TCK()) || 100;
    my @z;
    for my $f (glob('/proc/[0-9]*/stat')) {
        my $stat = _slurp($f);
        my ($pid, $comm, $rest) = $stat =~ /^(\d+) \((.*)\) (.*)$/s or next;
        my @f = split / /, $rest;    # $f[0] = state, $f[19] = starttime
        next if $f[0] ne 'Z' || !$LAB_COMM{$comm};
        push @z, "$pid($comm)" if $btime + $f[19] / $hz >= $since - 1 && _ours($pid);
    }
    return @z;
}

# ------------------------------------------------------------ process inspection for tests

# A file's content, '' if unreadable.
sub slurp { return _slurp($_[0]) }

# Open fds of this process.
sub fd_count {
    opendir(my $d, '/proc/self/fd') or die "opendir /proc/self/fd: $!\n";
    return scalar grep { /^\d+$/ } readdir($d);
}

# Pids whose parent is this process (zombies included).
sub children {
    return grep { _slurp("/proc/$_/stat") =~ /^\d+ \(.*\) \S+ $$ /s }
        map { m{/proc/(\d+)/} ? $1 : () } glob('/proc/[0-9]*/stat');
}

# Whether $pid exists and is not a zombie.
sub alive {
    my $st = _slurp("/proc/$_[0]/stat");
    return $st ne '' && $st !~ /^\d+ \(.*\) [ZX] /s;
}

# ------------------------------------------------------------ run-state event log

# Records of $node's $LAB/NODE/events-VMID.log (written by lab/qmp-eventlog), in file order:
# [{ t => ns, pid => QEMU pid, kind => 'status'|'EOF'|event name, detail => '...' }, ...];
# [] when there is no log. A last line without its newline (being written) is left out.
sub vm_events {
    my ($self, $node, $vmid) = @_;
    croak "invalid vmid '$vmid'" if !defined $vmid || $vmid !~ /^[1-9][0-9]*\z/;
    my $text = _slurp("$self->{dir}/" . $self->_node($node) . "/events-$vmid.log");
    my @rec;
    while ($text =~ /^([0-9]+) ([0-9]+) (\S+) ([^\n]*)\n/mg) {
        push @rec, { t => $1 + 0, pid => $2 + 0, kind => $3, detail => $4 };
    }
    return \@rec;
}

# The intervals during which VMID's vCPUs ran on $node, from its event log, sorted by start:
# [{ start => ns, end => ns or undef (still running), pid => QEMU pid }, ...].
# Per QEMU (pid; one log may hold several QEMUs, the VM started again on the node): an initial
# status 'running' runs from that record's time, RESUME starts a run, STOP, SHUTDOWN and EOF
# end it. A run still open at the end of the log: if a later QEMU appears in the log it ended
# before that one's first record (qm starts no second QEMU of a VM on a node while one runs),
# else it is still running (end undef: "now").
# Resolution: event times are QEMU's timestamps (µs), status and EOF times the logger's clock
# reads. A plain start's run really began a little before its first record (QEMU starts the
# guest before qm starts the logger, ~tens of ms); a target started for migration is
# 'inmigrate' until its RESUME, which is exact.
sub run_intervals {
    my ($self, $node, $vmid) = @_;
    my $rec = $self->vm_events($node, $vmid);
    my (%open, %first, @order, @runs);
    for my $r (@$rec) {
        my $pid = $r->{pid};
        if (!exists $first{$pid}) {
            $first{$pid} = $r->{t};
            push @order, $pid;
        }
        my $k = $r->{kind};
        if (($k eq 'status' && $r->{detail} eq 'running') || $k eq 'RESUME') {
            $open{$pid} //= $r->{t};
        } elsif ($k eq 'STOP' || $k eq 'SHUTDOWN' || $k eq 'EOF') {
            my $start = delete $open{$pid};
            next if !defined $start;
            # an event read with the status reply may carry an earlier QEMU time: no negative run
            push @runs,
                { start => $start, end => ($r->{t} < $start ? $start : $r->{t}), pid => $pid };
        }
    }
    for my $i (0 .. $#order) {
        my $pid = $order[$i];
        my $start = delete $open{$pid};
        next if !defined $start;
        my $end;
        for my $later (@order[$i + 1 .. $#order]) {
            $end = $first{$later}
                if $first{$later} >= $start && (!defined $end || $first{$later} < $end);
        }
        push @runs, { start => $start, end => $end, pid => $pid };
    }
    return [sort { $a->{start} <=> $b->{start} } @runs];
}

# A rollback: the RESUME events of VMID on $src (the migration's source) that came after its
# target $dst first ran it (its first RESUME), from QEMU's own events in both nodes' logs, the
# records from $since_ns on only. () when the source never resumed after the target ran.
sub resumed_after_target {
    my ($self, $src, $dst, $vmid, $since_ns) = @_;
    $since_ns //= 0;
    my ($first) =
        grep { $_->{kind} eq 'RESUME' && $_->{t} >= $since_ns } @{ $self->vm_events($dst, $vmid) };
    return () if !$first;
    return
        grep { $_->{kind} eq 'RESUME' && $_->{t} > $first->{t} } @{ $self->vm_events($src, $vmid) };
}

# Now as the event logs' times (CLOCK_REALTIME in ns): the $since_ns of resumed_after_target.
sub now_ns {
    require Time::HiRes;
    my $t = Time::HiRes::clock_gettime(Time::HiRes::CLOCK_REALTIME());
    return int($t) * 1_000_000_000 + int(($t - int($t)) * 1e9);
}

# MTunnelLab::overlaps(\@a, \@b): the pairs [$x, $y] of an interval $x of @a and $y of @b that
# overlap in time; () = never both at once. Intervals are { start => ns, end => ns|undef } (as
# run_intervals returns them) or [start, end]; an undef end is "now". Half-open: touching
# intervals (one's end == the other's start) do not overlap. Times are ns, but QEMU's event
# timestamps only have µs resolution: two runs less than 1 µs apart are not told apart.
sub overlaps {
    my ($list_a, $list_b) = @_;
    my $now;
    my $norm = sub {
        my ($i) = @_;
        my ($s, $e) = ref $i eq 'HASH' ? ($i->{start}, $i->{end}) : @$i;
        croak "overlaps: interval without a start" if !defined $s;
        if (!defined $e) {
            if (!defined $now) {
                require Time::HiRes;
                my $t = Time::HiRes::clock_gettime(Time::HiRes::CLOCK_REALTIME());
                $now = int($t) * 1_000_000_000 + int(($t - int($t)) * 1e9);
            }
            $e = $now;
        }
        return ($s, $e);
    };
    my @pairs;
    for my $x (@$list_a) {
        my ($xs, $xe) = $norm->($x);
        for my $y (@$list_b) {
            my ($ys, $ye) = $norm->($y);
            push @pairs, [$x, $y] if $xs < $ye && $ys < $xe;
        }
    }
    return @pairs;
}

# pids of the lab/qmp-eventlog processes of $node (they live in its mount namespace, in a
# network namespace of their own)
sub eventlog_pids {
    my ($self, $node) = @_;
    my ($ino) = (stat("$self->{dir}/" . $self->_node($node) . "/mnt"))[1];
    my @pids;
    for my $d (glob('/proc/[0-9]*')) {
        my ($pid) = $d =~ m{^/proc/([0-9]+)$} or next;
        my $cmd = _slurp("$d/cmdline");
        next if $cmd !~ m{/qmp-eventlog\0};
        my $mnt = readlink("$d/ns/mnt") // next;
        next if !defined $ino || $mnt ne "mnt:[$ino]";
        push @pids, $pid + 0 if alive($pid);
    }
    return sort { $a <=> $b } @pids;
}

# ------------------------------------------------------------ teardown

sub down {
    my ($self) = @_;
    return 1 if $self->{owner} != $$;    # a forked child never tears down
    $self->leave;
    return 1 if $self->{down_done};
    $self->{down_done} = 1;
    delete $LIVE{ $self->{name} };
    my ($rc, $out, $err) = $self->_lab_sh(undef, 'down');
    $self->{up} = 0;

    if ($rc != 0) {
        warn "lab down ($self->{name}) failed (exit $rc):\n$out$err";
        return 0;
    }
    return 1;
}

sub DESTROY {
    my ($self) = @_;
    local ($@, $!, $?);
    $self->down if $self->{owner} == $$;
}

my $handlers_installed;

sub _install_signal_handlers {
    return if $handlers_installed++;
    for my $sig (qw(INT TERM HUP)) {
        next if defined $SIG{$sig} && $SIG{$sig} ne '' && $SIG{$sig} ne 'DEFAULT';
        my $num = $sig eq 'INT' ? 2 : $sig eq 'TERM' ? 15 : 1;
        $SIG{$sig} = sub { exit(128 + $num) };    # exit runs END: the labs go down
    }
}

END {
    my $status = $?;
    for my $lab (grep { defined } values %LIVE) {
        $lab->down if $lab->{owner} == $$;
    }
    $? = $status;
}

package MTunnelLab::Background;

use Time::HiRes qw(time sleep);

sub pid { $_[0]->{pid} }
sub output { MTunnelLab::slurp($_[0]->{log}) }
sub status { $_[0]->{status} }

# whether the command has ended (reaped once, without blocking)
sub done {
    my ($self) = @_;
    if (!$self->{done} && waitpid($self->{pid}, POSIX::WNOHANG()) == $self->{pid}) {
        @$self{qw(done status)} = (1, $?);
    }
    return $self->{done};
}

sub wait_for {
    my ($self, $re, $secs) = @_;
    my $deadline = time + ($secs // 30);
    while (time < $deadline) {
        return 1 if $self->output =~ $re;
        return 0 if $self->done;
        sleep(0.01);
    }
    return 0;
}

# waits until the command ended; kills it (and returns 0) past the deadline
sub finish {
    my ($self, $secs) = @_;
    my $deadline = time + ($secs // 120);
    while (!$self->done) {
        if (time >= $deadline) {
            kill('KILL', $self->{pid});
            return 0;
        }
        sleep(0.1);
    }
    return 1;
}

1;
