package PVE::MTunnel::Migrate;

# A QemuMigrate.pm-style live migration driver on PVE::MTunnel: phase2 (start the target,
# tunnel, mirror local disks into the target's NBD exports, migrate RAM, poll), phase3 (once
# RAM completed: finish the mirrors, stop the target's NBD server, resume on the target,
# close, stop the source, free the source's migrated volumes) and phase2_cleanup (before
# completion: cancel, cont the source, cancel the mirrors, stop the target, free its new
# volumes, close). The control flow is PVE's; sockets, processes and QMP are the library's.
#
# The rule everything rests on: the VM runs on exactly one node. The target QEMU waits
# paused (-S) until it is told to resume, so before `resume` is sent the source may always be
# continued. Once RAM migration completed, the source is continued only when the target is
# known not to run (its QEMU confirmed stopped or gone); when that cannot be known (target
# unreachable) the source stays paused and the verdict says what to run where.
# INT, TERM, QUIT, HUP and PIPE are deferred while a migration runs and become "interrupted by
# signal" at the next safe point (as PVE's AbstractMigrate); after completion the migration is
# finished instead, and signals during cleanup only get noted.

use strict;
use warnings;

use POSIX qw(strftime);
use Errno qw(ESRCH);
use Fcntl qw(O_RDONLY O_WRONLY O_CREAT O_EXCL O_NOFOLLOW);
use JSON::PP ();
use Socket qw(inet_aton);
use Time::HiRes qw(usleep time);

use PVE::MTunnel;

# Statuses during which QEMU is still working on the migration. Anything not final counts as
# running, so a status added by a newer QEMU does not abort a migration.
my %FINAL = map { $_ => 1 } qw(completed failed cancelled);

# QEMU's largest downtime-limit (2000 s); PVE never doubles past it.
my $MAX_DOWNTIME_MS = 2000 * 1000;

my $JSON = JSON::PP->new->canonical;

# How far a storage migration got, as its record says (see write_state); from
# 'mirrors-finished' on the target's disks are complete (every mirror ended without error
# after the RAM migration completed, the source paused).
my %PHASES = map { $_ => 1 }
    qw(starting started mirroring migrating finishing-mirrors mirrors-finished mirrors-failed resumed
    postcopy);
my %DISKS_COMPLETE = map { $_ => 1 } qw(mirrors-finished resumed);

sub new {
    my ($class, %param) = @_;
    for my $k (qw(vmid node target ssh)) {
        die "PVE::MTunnel::Migrate->new: missing '$k'\n" if !defined($param{$k});
    }
    die "invalid VMID '$param{vmid}'\n" if $param{vmid} !~ m/^[1-9][0-9]{0,8}$/;
    # as upstream's migrate_vm
    die "target is local node ('$param{target}')\n" if $param{target} eq $param{node};
    for my $k (qw(stall_timeout_ms mirror_timeout_ms mirror_poll_ms poll_interval_ms downtime_ms)) {
        die "invalid $k '$param{$k}' (a whole number of milliseconds, more than 0)\n"
            if defined $param{$k} && $param{$k} !~ /^[1-9][0-9]{0,11}$/;
    }
    die "invalid hold_ms '$param{hold_ms}' (a whole number of milliseconds)\n"
        if defined $param{hold_ms} && $param{hold_ms} !~ /^[0-9]{1,12}$/;
    die "invalid bwlimit '$param{bwlimit}' (KiB/s, a whole number; 0 = no limit)\n"
        if defined $param{bwlimit} && $param{bwlimit} !~ /^[0-9]{1,12}$/;
    my $type = $param{migration_type} // 'secure';
    die "invalid migration type '$type' (secure or insecure)\n" if $type !~ /^(secure|insecure)$/;
    my $wait = $param{completion_wait} // 'events';
    die "invalid completion wait '$wait' (events, poll or pve)\n" if $wait !~ /^(events|poll|pve)$/;
    die "invalid migration network '$param{migration_network}' (want an IPv4 CIDR)\n"
        if defined $param{migration_network} && !parse_cidr($param{migration_network});
    my $postcopy = $param{postcopy} // 'off';
    die "invalid postcopy '$postcopy' (off, auto or always)\n"
        if $postcopy !~ /^(off|auto|always)$/;
    die "--postcopy $postcopy with --with-local-disks is not supported yet: "
        . "migrate VMs with local disks with --postcopy off\n"
        if $postcopy ne 'off' && $param{with_local_disks};

    for my $k (qw(postcopy_recover_timeout_ms postcopy_stall_ms)) {
        die "invalid $k '$param{$k}' (a whole number of milliseconds, more than 0)\n"
            if defined $param{$k} && $param{$k} !~ /^[1-9][0-9]{0,11}$/;
    }
    my $vmid = $param{vmid};
    my $self = bless {
        qm => ['qm'],
        socket_dir => '/run/qemu-server',
        # as PVE's set_migration_caps: these on, every other capability off
        capabilities => { 'auto-converge' => 1, xbzrle => 1 },
        parameters => {},
        downtime_ms => 100,
        # KiB/s, as PVE's bwlimit; undef = no limit (max-bandwidth 16 GiB/s)
        bwlimit => undef,
        # qm start's --machine: default is the machine type the source QEMU runs, as PVE's
        # forcemachine; --force-cpu, --targetstorage and a spice ticket (sent on stdin) if given
        machine => undef,
        force_cpu => undef,
        targetstorage => undef,
        spice_ticket => undef,
        # qm migrate's --with-local-disks: mirror the disks the target exports over NBD
        with_local_disks => 0,
        # secure: RAM and NBD through the ssh tunnel's UNIX socket forwards; insecure: straight
        # over TCP to the target's address in migration_network, the tunnel carries commands only
        migration_type => 'secure',
        migration_network => undef,
        # abort when the mirrors are not all ready after this long (undef: no limit; a stalled
        # mirror is caught by stall_timeout_ms either way)
        mirror_timeout_ms => undef,
        # one short QMP connection per look (other monitor clients are never starved)
        mirror_poll_ms => 200,
        # the source's volume of each migrated drive (drive => volid), freed after success;
        # default: from the source's `qm config`
        source_volumes => undef,
        local_qm => ['qm'],
        pvesm => ['pvesm'],
        # what the verdict tells to run when the VM's state cannot be settled (the CLI fills in
        # its own command line)
        check_command => undef,
        # how the end of the RAM migration is noticed (see wait_for_completion): events, poll, pve
        completion_wait => 'events',
        # events: the longest the source's monitor is held at a time (other clients wait behind)
        hold_ms => 250,
        poll_interval_ms => 1000,
        # abort when RAM transfer makes no progress this long (a stopped ssh, a dead link)
        stall_timeout_ms => 60_000,
        # post-copy: off; auto (switch when pre-copy stops converging, instead of doubling the
        # downtime); always (switch once the first pass is done)
        postcopy => 'off',
        # a paused post-copy migration is recovered through new tunnels until this long
        postcopy_recover_timeout_ms => 600_000,
        # in post-copy a channel without progress this long is paused, then recovered (a hung
        # link or a stopped ssh never fails by itself)
        postcopy_stall_ms => 10_000,
        tunnel_options => {},
        # the cluster's config tree in pmxcfs's layout (/etc/pve on a node; the lab's copy):
        # the VM's config DIR/nodes/NODE/qemu-server/VMID.conf moves to the target by rename
        # once the migration completed, before the target resumes, as upstream's phase 3 moves
        # it; undef: configs are not this driver's business (a host that is no PVE node)
        pve_dir => undef,
        # handshake_slots, connect_retries, connect_timeout_s, …: for every ssh call
        ssh_options => {},
        %param,
    }, $class;
    $self->{qmp_socket} //= "$self->{socket_dir}/$vmid.qmp";
    $self->{log} //= sub { my ($level, $msg) = @_; print "$msg\n" };
    return $self;
}

# PVE's task log style: "2026-11-26 23:00:00 message", "… ERROR: message" for errors.
sub log {
    my ($self, $level, $msg) = @_;
    chomp $msg;
    my $prefix = strftime("%F %H:%M:%S", localtime) . ($level eq 'err' ? ' ERROR:' : '');
    for my $line (split /\n/, $msg) {
        $self->{log}->($level, "$prefix $line");
    }
}

# As PVE::Format::render_bytes($v, 1): "25.6 MiB", "0.0 B".
sub render_bytes {
    my ($v) = @_;
    my @units = qw(B KiB MiB GiB TiB PiB);
    my $i = $v > 1023 ? int(CORE::log($v) / CORE::log(1024)) : 0;
    $i = $#units if $i > $#units;
    return sprintf("%.1f %s", $v / 1024**$i, $units[$i]);
}

# The machine type the source QEMU runs, for the target's --machine, as upstream's
# PVE::QemuServer::Machine::current_from_query_machines builds it: Proxmox's QEMU marks the
# entry 'is-current' in query-machines and gives that entry a 'pve-version' ("pve1") when the
# machine is pinned to one, sent as "pc-i440fx-9.2+pve1" (else the plain name). A stock QEMU
# marks none: the QOM type of /machine names it.
sub current_machine {
    my ($self) = @_;
    my $machines = PVE::MTunnel::qmp_execute($self->{qmp_socket}, 'query-machines');
    my ($current) = grep { $_->{'is-current'} } @$machines;
    if ($current) {
        my $name = $current->{name};
        $name .= "+$current->{'pve-version'}" if $current->{'pve-version'};
        return $name;
    }
    my $type = PVE::MTunnel::qmp_execute($self->{qmp_socket}, 'qom-get',
        { path => '/machine', property => 'type' });
    die "cannot tell which machine type VM $self->{vmid} runs ('$type')\n"
        if !defined($type) || $type !~ /^([A-Za-z0-9_.,+-]+)-machine$/;
    return $1;
}

# As PVE::Format::render_duration: "45s", "1m 05s", "2h 01m 05s".
sub render_duration {
    my ($s) = @_;
    $s = int($s);
    return "${s}s" if $s < 60;
    return sprintf("%dm %02ds", int($s / 60), $s % 60) if $s < 3600;
    return sprintf("%dh %02dm %02ds", int($s / 3600), int($s / 60) % 60, $s % 60);
}

# "198.19.0.0/24" -> (network, mask) as integers; undef if it is no IPv4 CIDR
sub parse_cidr {
    my ($cidr) = @_;
    my ($ip, $bits) = $cidr =~ m{^([0-9.]+)/([0-9]{1,2})$} or return;
    return if $bits > 32;
    my $packed = inet_aton($ip) or return;
    my $mask = $bits == 0 ? 0 : (0xffffffff << (32 - $bits)) & 0xffffffff;
    return (unpack('N', $packed) & $mask, $mask);
}

sub ip_in_network {
    my ($ip, $cidr) = @_;
    my ($net, $mask) = parse_cidr($cidr) or return 0;
    return 0 if $ip !~ /^[0-9]+(?:\.[0-9]+){3}$/;
    my $packed = inet_aton($ip) or return 0;
    return (unpack('N', $packed) & $mask) == $net;
}

# `qm …` on the target
sub remote {
    my ($self, $cmd, %opts) = @_;
    return $self->remote_command([@{ $self->{qm} }, @$cmd], %opts);
}

sub remote_command {
    my ($self, $cmd, %opts) = @_;
    return PVE::MTunnel::ssh_run(
        ssh => $self->{ssh},
        command => $cmd,
        timeout_ms => 120_000,
        %{ $self->{ssh_options} }, %opts
    );
}

# The signals PVE's migration base class defers.
my @DEFERRED_SIGNALS = qw(INT TERM QUIT HUP PIPE);

sub migrate {
    my ($self) = @_;
    my $vmid = $self->{vmid};
    # Only noted here: Perl runs the handler between ops (and the library holds signals back
    # while a call runs), the driver acts on it at its next safe point.
    local @SIG{@DEFERRED_SIGNALS} =
        (sub { $self->{signal} //= $_[0]; $self->{signals}++ }) x @DEFERRED_SIGNALS;
    $self->log('info', "starting migration of VM $vmid to node '$self->{target}'");
    my $start = time();
    eval { $self->prepare() };
    if (my $err = $@) {
        chomp $err;
        $self->log('err', "migration aborted: $err");
        $self->{verdict} = "nothing was done: VM $vmid is left as it was on node '$self->{node}'";
        die "$err - $self->{verdict}\n";
    }
    eval { $self->phase2() };
    if (my $err = $@) {
        $self->log('err', "migration failed: $err");
        if ($self->{postcopy_split}) {
            # nothing may be undone: the VM's memory is split between the nodes
            $self->close_tunnel_quickly();
            return $self->fail($err);
        }
        # a cancel that came too late leaves a completed migration: finish it instead
        $self->phase2_cleanup($err);
        return $self->fail($err) if !$self->{completed};
        $self->log('info', "the migration completed before it could be cancelled: finishing it");
    }
    eval { $self->phase3() };
    if (my $err = $@) {
        $self->log('err', "migration failed after RAM migration completed: $err");
        $self->phase3_recover($err);
        return $self->fail($err) if !$self->{target_resumed};
    }
    $self->log('info',
        "received signal SIG$self->{signal} after the migration completed: it was finished")
        if $self->{signal};
    $self->remove_state() if $self->{state};
    $self->remove_recovery_sockets() if $self->{recover_seq};
    $self->log('info', "post-copy migration recovered $self->{postcopy_recovered} time(s)")
        if $self->{postcopy_recovered};
    $self->log(
        'info',
        sprintf("migration finished successfully (duration %s)",
            strftime("%H:%M:%S", gmtime(time() - $start)))
    );
    return $self;
}

# As QemuMigrate.pm prepare: what can be checked before anything happens on the target. The
# source VM must run (a paused VM would be resumed on the target: refused, not changed).
sub prepare {
    my ($self) = @_;
    my ($vmid, $node) = @$self{qw(vmid node)};
    my $status = eval { PVE::MTunnel::qmp_execute($self->{qmp_socket}, 'query-status')->{status} };
    if (my $err = $@) {
        chomp $err;
        die "VM $vmid is not running on node '$node' ($err)\n";
    }
    $status //= 'unknown';
    die "VM $vmid on node '$node' is $status, not running: only a running VM is live-migrated"
        . ($status eq 'paused' ? " (resume it first)" : " ('--check' tells what is where)") . "\n"
        if $status ne 'running';
    if (defined $self->{pve_dir}) {
        my $path = $self->config_path($node);
        die "VM $vmid has no config on node '$node' ($path does not exist)\n" if !-f $path;
    }
    $self->{machine} //= $self->target_machine();
    $self->check_postcopy_source() if $self->{postcopy} ne 'off';
    $self->check_interrupt();
}

# The task's verdict on failure: the error, then where the VM is now (asked from both nodes).
sub fail {
    my ($self, $err) = @_;
    chomp $err;
    my $d = eval { $self->diagnose($self->inspect()) };
    my $where = $d ? $d->{state} : "its state could not be determined: $@";
    chomp $where;
    # settled, nothing left: no record for a --check to use
    $self->remove_state()
        if $self->{state} && $d && $d->{ok} && !@{ $d->{left} } && !$self->{volumes_left};
    $self->{verdict} = $where;
    die "$err - $where\n";
}

# At a safe point: a deferred signal ends the phase. Not in post-copy: the VM's memory is split
# between the nodes, and only finishing the migration puts it back together.
sub check_interrupt {
    my ($self) = @_;
    return if !$self->{signal};
    die "interrupted by signal SIG$self->{signal}\n" if !$self->{postcopy_started};
    $self->log('info',
        "received signal SIG$self->{signal} during post-copy: the VM's memory is split between "
            . "the nodes, the migration is finished, not cancelled")
        if !$self->{signal_noted}++;
}

# As QemuMigrate.pm phase2_start_local_cluster: the target's `qm start`, with upstream's
# options and stdin lines (secrets on stdin, never argv).
sub start_target {
    my ($self) = @_;
    my ($vmid, $node, $type) = @$self{qw(vmid node migration_type)};
    my @cmd = ('start', $vmid, '--skiplock', '--migratedfrom', $node, '--migration_type', $type);
    push @cmd, '--migration_network', $self->{migration_network}
        if defined $self->{migration_network};
    push @cmd, '--stateuri', $type eq 'insecure' ? 'tcp' : 'unix';
    push @cmd, '--machine', $self->{machine};
    push @cmd, '--force-cpu', $self->{force_cpu} if defined $self->{force_cpu};
    push @cmd, '--targetstorage', $self->{targetstorage} // '1' if $self->{with_local_disks};
    # version 1: NBD over UNIX sockets
    my $input = "nbd_protocol_version: 1\n";
    $input .= "spice_ticket: $self->{spice_ticket}\n" if defined $self->{spice_ticket};
    my $res = eval { $self->remote(\@cmd, input => $input) };
    if (my $err = $@) {
        # refused before ssh ran (the ssh command or an option is invalid): nothing started there
        $self->{target_started} = 0
            if $PVE::MTunnel::last_error_code == $PVE::MTunnel::ERROR_CODE{invalid_argument};
        die $err;
    }
    $self->log('info', "[$self->{target}] $_") for grep { length } split /\n/, $res->{stderr} // '';
    my $listen = PVE::MTunnel::migrate_listen_parse($res->{stdout}, $vmid);
    $self->log('info', "[$self->{target}] $_") for @{ $listen->{messages} };
    return $listen;
}

# The addresses the target answered must fit the migration type: UNIX sockets (forwarded)
# for secure; for insecure TCP, inside the migration network when one is given.
sub check_listen {
    my ($self, $listen) = @_;
    my @uris = ($listen->{uri}, map { $_->{uri} } @{ $listen->{nbd} });
    if ($self->{migration_type} eq 'secure') {
        for my $uri (@uris) {
            die
                "target answered '$uri' for a secure migration: only UNIX sockets can go through the tunnel\n"
                if $uri !~ /^(?:nbd:)?unix:/;
        }
        return;
    }
    for my $uri (@uris) {
        my ($host) = $uri =~ /^(?:tcp|nbd):([0-9.]+|localhost|\[[0-9a-fA-F:.]+\]):[0-9]+/
            or die "target answered '$uri' for an insecure migration: expected a TCP address\n";
        next if !defined $self->{migration_network};
        die
            "target address $host in '$uri' is outside the migration network $self->{migration_network} - refusing to migrate over it\n"
            if !ip_in_network($host, $self->{migration_network});
    }
}

# The source's config as `qm config` on this (the source) node prints it: key => value
# ({} when it cannot be read)
sub source_config {
    my ($self) = @_;
    return $self->{source_config} if $self->{source_config};
    my %conf;
    # a host without qm: no config (and no "Can't exec" warning)
    no warnings 'exec';
    if (open(my $fh, '-|', @{ $self->{local_qm} }, 'config', $self->{vmid})) {
        while (my $line = <$fh>) {
            $conf{$1} = $2 if $line =~ /^([a-z][a-z0-9_-]*): (.*?)\s*$/i;
        }
        close($fh);
    }
    return $self->{source_config} = \%conf;
}

# drive => volid of the source's config, from `qm config` on this (the source) node
sub source_volumes {
    my ($self) = @_;
    return $self->{source_volumes} if $self->{source_volumes};
    my $conf = $self->source_config();
    my %vol;
    for my $key (keys %$conf) {
        $vol{$key} = $1
            if $key =~ /^(?:ide|scsi|sata|virtio|efidisk|tpmstate)[0-9]+$/
            && $conf->{$key} =~ /^([^,\s]+)/;
    }
    return $self->{source_volumes} = \%vol;
}

# qm start's --machine for the target, as upstream's qemu_machine_pxe: the machine the source
# runs, with '.pxe' when the config's machine type asks for the PXE ROMs
sub target_machine {
    my ($self) = @_;
    my $machine = $self->current_machine();
    my ($type) = grep { defined } map { /^type=(.+)$/ ? $1 : /=/ ? undef : $_ } split /,/,
        $self->source_config()->{machine} // '';
    $machine .= '.pxe' if defined $type && $type =~ /\.pxe$/;
    return $machine;
}

sub phase2 {
    my ($self) = @_;
    my $vmid = $self->{vmid};

    $self->log('info', "starting VM $vmid on remote node '$self->{target}'");
    # From here on the target may be running; cleanup must stop it.
    $self->{target_started} = 1;
    $self->check_interrupt();
    if ($self->{with_local_disks}) {
        # what the target has of this VM before its start allocates anything: a failure frees
        # only what is new, whether the start named it or not
        my @stores = $self->target_storages();
        my $before = @stores ? $self->list_target_volumes(@stores) : undef;
        $self->{target_volumes_before} = $before;
        my @had = $before ? map { @$_ } values %$before : ();
        $self->log('info',
            "VM $vmid already has volumes on node '$self->{target}' (kept whatever happens): @had")
            if @had;
        $self->write_state(phase => 'starting', target_volumes_before => $before);
        $self->check_interrupt();
    }
    my $listen = eval { $self->start_target() };
    if (my $err = $@) {
        # its answer may be lost (ssh killed or timed out) while it goes on there
        $self->{start_failed} = 1 if $self->{target_started};
        die $err;
    }
    # new volumes on the target: freed by the cleanup unless the migration completes
    $self->{target_volumes} = [map { ($_->{volume} =~ /^([^,]+)/)[0] } @{ $listen->{nbd} }];
    $self->write_state(phase => 'started', target_volumes => $self->{target_volumes})
        if $self->{state};
    # the target's listening sockets: the tunnel's close removes them, else the cleanup
    $self->{target_sockets} =
        [grep { defined } $listen->{socket}, map { $_->{socket} } @{ $listen->{nbd} }];
    $self->check_interrupt();
    $self->check_listen($listen);
    $self->{ruri} = $listen->{uri};
    my @nbd = @{ $listen->{nbd} };
    die "target exported disks for storage migration ("
        . join(', ', map { "drive-$_->{drive}" } @nbd)
        . ") but --with-local-disks was not given\n"
        if @nbd && !$self->{with_local_disks};

    $self->log('info', "start remote tunnel");
    # insecure: no forwards, the tunnel carries the commands (resume) only
    my @forwards =
        $self->{migration_type} eq 'secure' ? ($listen->{socket}, map { $_->{socket} } @nbd) : ();
    $self->{tunnel} = PVE::MTunnel->open(
        ssh => $self->{ssh},
        forwards => \@forwards,
        command => [@{ $self->{qm} }, 'mtunnel'],
        socket_dir => $self->{socket_dir},
        log => sub { my ($level, $msg) = @_; $self->log($level, $msg) if $level ne 'debug' },
        %{ $self->{ssh_options} },
        %{ $self->{tunnel_options} },
    );
    $self->{tunnel_opened} = 1;
    my $t0 = time();
    $self->{tunnel}->wait_ready(timeout_ms => 70_000);
    $self->{tunnel_ready} = 1;
    $self->{timing}{open_to_ready} = time() - $t0;
    $self->check_interrupt();

    $self->storage_migration(\@nbd) if @nbd;
    $self->check_interrupt();

    $self->log('info', "starting online/live migration on $self->{ruri}");
    my $params = { 'downtime-limit' => int($self->{downtime_ms}), %{ $self->{parameters} } };
    $params->{'max-bandwidth'} = int($self->{bwlimit} * 1024) if $self->{bwlimit};
    $self->log('info', "set migration capabilities");
    # 'events': QEMU's MIGRATION events wake the completion wait (and the lab's run-state log)
    my $caps = { %{ $self->{capabilities} }, events => 1 };
    my $postcopy = $self->{postcopy} ne 'off';
    if ($postcopy) {
        # both sides need it; preempt only where both offer it
        my $preempt = $self->setup_postcopy_target();
        # throttling the guest is what post-copy spares it
        $caps->{'auto-converge'} = 0;
        $caps->{'postcopy-preempt'} = $preempt;
    }
    my $applied = PVE::MTunnel::qmp_migrate_setup($self->{qmp_socket},
        { capabilities => $caps, parameters => $params, postcopy => $postcopy ? 1 : 0 });
    $self->log('info',
        "post-copy: $self->{postcopy}"
            . ($applied->{capabilities}{'postcopy-preempt'} ? ' (with postcopy-preempt)' : ''))
        if $postcopy;
    my $set = $applied->{parameters};
    $self->log('info', "migration speed limit: " . render_bytes($set->{'max-bandwidth'}) . "/s")
        if $self->{bwlimit};
    $self->log('info', "capping downtime limit to maximum possible: $set->{'downtime-limit'} ms")
        if $set->{'downtime-limit'} < $params->{'downtime-limit'};
    $self->log('info', "migration downtime limit: $set->{'downtime-limit'} ms");
    $self->log('info', "migration cachesize: " . render_bytes($set->{'xbzrle-cache-size'}))
        if defined $set->{'xbzrle-cache-size'};
    $self->log('info', "set migration parameters");

    $self->log('info', "start migrate command to $self->{ruri}");
    $self->{migration_started} = 1;
    $self->write_state(phase => 'migrating') if $self->{state};
    PVE::MTunnel::qmp_migrate($self->{qmp_socket}, $self->{ruri}, { setup => 0 });
    $self->wait_for_completion($set->{'downtime-limit'});
}

# Mirror each exported drive into its NBD export (drive-mirror, as BlockJob.pm for QEMU
# before 10.0) and wait until every job is ready; the jobs stay ready (guest writes keep
# being mirrored) while RAM migrates.
sub storage_migration {
    my ($self, $nbd) = @_;
    my $vmid = $self->{vmid};
    $self->log('info', "starting storage migration");
    # the disks come from the running QEMU: every export must name one of its drives
    my $blocks = PVE::MTunnel::qmp_execute($self->{qmp_socket}, 'query-block');
    my %device = map { $_->{device} => $_ } grep { $_->{inserted} } @$blocks;
    my $volumes = $self->source_volumes();
    for my $export (@$nbd) {
        my $device = "drive-$export->{drive}";
        die "target exported '$device', but VM $vmid has no such drive\n" if !$device{$device};
        my $source = $volumes->{ $export->{drive} } // $device{$device}{inserted}{file};
        my ($target) = $export->{volume} =~ /^([^,]+)/;
        $self->log('info', "volume '$source' is '$target' on the target");
    }
    $self->{mirror_jobs} = [];
    for my $export (@$nbd) {
        my $device = "drive-$export->{drive}";
        $self->log('info', "$export->{drive}: start migration to $export->{uri}");
        my %opts;
        if ($self->{bwlimit}) {
            $opts{speed} = int($self->{bwlimit} * 1024);
            $self->log('info',
                "drive mirror is starting for $device with bandwidth limit: $self->{bwlimit} KiB/s"
            );
        } else {
            $self->log('info', "drive mirror is starting for $device");
        }
        push @{ $self->{mirror_jobs} },
            PVE::MTunnel::qmp_mirror_start($self->{qmp_socket}, $device, $export->{uri}, \%opts);
        $self->write_state(phase => 'mirroring', mirror_jobs => $self->{mirror_jobs})
            if $self->{state};
    }
    $self->wait_mirror_ready();
}

# As BlockJob.pm's monitor with 'skip': a progress line per job each second until it is
# ready; abort on the mirror deadline or when no job made progress for stall_timeout_ms.
sub wait_mirror_ready {
    my ($self) = @_;
    my $jobs = $self->{mirror_jobs};
    my $start = time();
    my ($last_offset, $last_progress, $last_log) = (-1, $start, 0);
    my %was_ready;
    while (1) {
        my $st = PVE::MTunnel::qmp_mirror_status($self->{qmp_socket}, $jobs);
        my $now = time();
        # looks are frequent (readiness is noticed soon), progress lines once a second
        my $log_now = $st->{all_ready} || $now - $last_log >= 1;
        $last_log = $now if $log_now;
        my $offset = 0;
        for my $job (@{ $st->{jobs} }) {
            $offset += $job->{offset} // 0;
            next if $was_ready{ $job->{id} } || !($log_now || $job->{ready});
            my $len = $job->{len} || 0;
            my $line = sprintf(
                "%s: transferred %s of %s (%.2f%%) in %s",
                $job->{id}, render_bytes($job->{offset} // 0),
                render_bytes($len),
                $len ? ($job->{offset} // 0) * 100 / $len : 0,
                render_duration($now - $start)
            );
            $line .= $job->{busy} ? ", still busy" : ", ready" if $job->{ready};
            $self->log('info', $line);
            $was_ready{ $job->{id} } = 1 if $job->{ready};
        }
        if ($st->{all_ready}) {
            $self->log('info', "all 'mirror' jobs are ready");
            $self->{timing}{mirror} = $now - $start;
            $self->{timing}{mirror_bytes} = $offset;
            return $st;
        }
        if ($offset != $last_offset) {
            ($last_offset, $last_progress) = ($offset, $now);
        } elsif (($now - $last_progress) * 1000 > $self->{stall_timeout_ms}) {
            die sprintf("storage migration made no progress for %.0f s - aborting\n",
                $now - $last_progress);
        }
        die sprintf("storage migration not ready after %.0f s (mirror timeout) - aborting\n",
            $now - $start)
            if defined $self->{mirror_timeout_ms}
            && ($now - $start) * 1000 > $self->{mirror_timeout_ms};
        $self->check_interrupt();
        usleep($self->{mirror_poll_ms} * 1000);
    }
}

# Waits until QEMU reports the migration final, with upstream's loop on what it sees: progress
# lines, the stall abort and the downtime auto-increase, once per look (a second apart).
# completion_wait 'events' (default) returns within milliseconds of the end: each look is a
# qmp_wait_migration, which holds the monitor up to hold_ms waiting for QEMU's MIGRATION event;
# 'poll' is this driver before (1 s sleeps, 100 ms once the rest fits in a second's transfer),
# 'pve' is QemuMigrate.pm's (1 s, 100 ms once the rest is below the average per look). Both
# notice the end only at their next look: the guest stays paused meanwhile.
sub wait_for_completion {
    my ($self, $downtime) = @_;
    my $mode = $self->{completion_wait};
    my $usleep = $self->{poll_interval_ms} * 1000;
    my ($lasttrans, $lastrem, $downtimecounter, $errors, $i, $laststatus) =
        (-1, undef, 0, 0, 0, '');
    my ($sync_seen, @pass_rem) = (0);
    my $start = time();
    my ($last_progress, $last_look) = ($start, 0);
    while (1) {
        my $stat;
        if ($mode eq 'events') {
            $stat = eval {
                PVE::MTunnel::qmp_wait_migration($self->{qmp_socket}, hold_ms => $self->{hold_ms});
            };
        } else {
            usleep($usleep);
            $stat = eval { PVE::MTunnel::qmp_query_migrate($self->{qmp_socket}) };
        }
        if (my $err = $@) {
            $self->log('info', "query migrate failed: $err");
            die "too many query migrate failures - aborting\n"
                if ++$errors > 5 && !$self->{postcopy_split};
            usleep($self->{poll_interval_ms} * 1000) if $mode eq 'events';
            next;
        }
        $errors = 0;
        my $status = $stat->{status} // 'none';
        my $ram = $stat->{ram} // {};
        if ($FINAL{$status}) {
            $self->{timing}{noticed} = time();
            $self->{timing}{qemu_downtime_ms} = $stat->{downtime};
        }
        if ($status eq 'completed') {
            $self->{completed} = 1;
            $self->{timing}{migration} = time() - $start;
            $self->{timing}{qemu_total_ms} = $stat->{'total-time'};
            $self->{completed_stat} = $stat;
            my $delay = time() - $start;
            $self->log(
                'info',
                sprintf(
                    "average migration speed: %s/s - downtime %s ms",
                    render_bytes(($ram->{total} // 0) / ($delay || 1)),
                    $stat->{downtime} // 0
                )
            );
            $self->log('info',
                      "migration completed, transferred "
                    . render_bytes($ram->{transferred})
                    . " VM-state")
                if $ram->{transferred};
            $self->log('info', "migration status: completed");
            return $stat;
        }
        if ($FINAL{$status}) {
            # a post-copy that failed (before its devices went over) left the VM on the source
            delete $self->{postcopy_split};
            my $message = $stat->{'error-desc'} ? "$status - $stat->{'error-desc'}" : $status;
            $self->log('info', "migration status error: $message");
            die "aborting phase 2 - $message\n";
        }
        if ($status =~ /^postcopy-/) {
            $self->{postcopy_split} = 1;
            if ($status ne $laststatus) {
                $self->log('info', "migration status: $status");
                $laststatus = $status;
            }
            if ($status eq 'postcopy-paused') {
                $self->postcopy_recover('its channel broke');
                ($last_progress, $lasttrans, $laststatus) = (time(), -1, '');
                next;
            }
            $self->resume_target_in_postcopy()
                if $status eq 'postcopy-active' && $self->{target_resume_pending};
            $self->check_interrupt();
            next if $mode eq 'events' && time() - $last_look < 1;
            $last_look = time();
            $i++;
            my $trans = $ram->{transferred} // 0;
            if ($status eq 'postcopy-active' && $trans == $lasttrans) {
                my $stalled = time() - $last_progress;
                if ($stalled * 1000 > $self->{postcopy_stall_ms}) {
                    $self->postcopy_recover(sprintf("no progress for %.0f s", $stalled),
                        pause => 1);
                    ($last_progress, $lasttrans, $laststatus) = (time(), -1, '');
                }
                next;
            }
            ($last_progress, $lasttrans) = (time(), $trans);
            $self->log(
                'info',
                sprintf(
                    "post-copy active, transferred %s of %s VM-state, %s remaining",
                    render_bytes($trans),
                    render_bytes($ram->{total} // 0),
                    render_bytes($ram->{remaining} // 0)
                )
            ) if $i % 10 == 0;
            next;
        }
        if ($status eq 'active' && $self->{postcopy} ne 'off') {
            # what each pass starts with (the memory dirtied during the one before), seen
            # within a hold of the pass's start
            my $sync = $ram->{'dirty-sync-count'} // 0;
            if ($sync > $sync_seen) {
                push @pass_rem, $ram->{remaining} // 0 if $sync >= 2;
                $sync_seen = $sync;
            }
            my $why = $self->postcopy_reason(\@pass_rem);
            if (defined $why) {
                $self->switch_to_postcopy($why);
                $lasttrans = -1;
                next;
            }
        }
        # not completed: a deferred signal cancels it (completion, when seen first, wins)
        $self->check_interrupt();
        next if $mode eq 'events' && time() - $last_look < 1;
        $last_look = time();
        $i++;
        if ($status ne 'active') {
            $self->log('info', "migration status: $status") if $status ne $laststatus;
            $laststatus = $status;
            next;
        }
        $laststatus = $status;
        my $trans = $ram->{transferred} // 0;
        if ($trans == $lasttrans) {
            my $stalled = time() - $last_progress;
            die sprintf("migration made no progress for %.0f s - aborting\n", $stalled)
                if $stalled * 1000 > $self->{stall_timeout_ms};
            next;
        }
        $last_progress = time();
        my $rem = $ram->{remaining} // 0;
        my $speed = ($ram->{'pages-per-second'} // 0) * ($ram->{'page-size'} // 0);
        my $dirty = ($ram->{'dirty-pages-rate'} // 0) * ($ram->{'page-size'} // 0);
        if ($mode eq 'poll') {
            $usleep = 100_000 if $speed && $rem < $speed;
        } elsif ($mode eq 'pve') {
            $usleep = 100_000 if $rem < $trans / $i;
        }
        if ($usleep > 100_000 || $i % 10 == 0) {
            my $progress = sprintf(
                "transferred %s of %s VM-state, %s/s",
                render_bytes($trans), render_bytes($ram->{total} // 0),
                render_bytes($speed)
            );
            $progress .= ", VM dirties lots of memory: " . render_bytes($dirty) . "/s"
                if $dirty > $speed;
            $self->log('info', "migration active, $progress");
        }
        $downtimecounter++ if ($lastrem && $rem > $lastrem) || $rem == 0;
        $lastrem = $rem;
        # post-copy (auto) is the remedy instead
        if ($downtimecounter > 5 && $downtime < $MAX_DOWNTIME_MS && $self->{postcopy} eq 'off') {
            $downtimecounter = 0;
            $downtime *= 2;
            $downtime = $MAX_DOWNTIME_MS if $downtime > $MAX_DOWNTIME_MS;
            $self->log('info', "auto-increased downtime to continue migration: $downtime ms");
            eval {
                PVE::MTunnel::qmp_execute($self->{qmp_socket}, 'migrate-set-parameters',
                    { 'downtime-limit' => int($downtime) });
            };
            $self->log('info', "migrate-set-parameters error: $@") if $@;
        }
        $lasttrans = $trans;
    }
}

# How many passes in a row must fail to shrink what is left before 'auto' switches.
my $POSTCOPY_STALLED_PASSES = 2;

# Why to switch to post-copy now, or undef: 'always' once the first pass is done; 'auto' once
# what each pass starts with stopped shrinking (by a tenth) over $POSTCOPY_STALLED_PASSES
# passes. $pass_rem: the remaining bytes at the start of each pass from the second on.
sub postcopy_reason {
    my ($self, $pass_rem) = @_;
    my $mode = $self->{postcopy};
    return undef if $mode eq 'off' || $self->{postcopy_started} || !@$pass_rem;
    return 'the first pass is done' if $mode eq 'always';
    return undef if @$pass_rem <= $POSTCOPY_STALLED_PASSES;
    my @last = @$pass_rem[-($POSTCOPY_STALLED_PASSES + 1) .. -1];
    for my $k (1 .. $#last) {
        return undef if $last[$k] < 0.9 * $last[$k - 1];
    }
    return sprintf("pre-copy is not converging (remaining at the last %d passes: %s)",
        scalar(@last), join(', ', map { render_bytes($_) } @last));
}

# The source's QEMU must offer post-copy: checked before anything happens on the target.
sub check_postcopy_source {
    my ($self) = @_;
    my ($vmid, $node) = @$self{qw(vmid node)};
    my $caps = PVE::MTunnel::qmp_execute($self->{qmp_socket}, 'query-migrate-capabilities');
    my %offered = map { $_->{capability} => 1 } @$caps;
    die "--postcopy $self->{postcopy}: the QEMU of VM $vmid on node '$node' does not offer "
        . "post-copy (no migration capability 'postcopy-ram')\n"
        if !$offered{'postcopy-ram'};
    $self->{source_preempt} = $offered{'postcopy-preempt'} ? 1 : 0;
}

# HMP commands to the target's QEMU through `qm monitor VMID` (what a stock node has); returns
# what it printed. Dies when the monitor cannot be reached.
sub target_monitor {
    my ($self, @commands) = @_;
    my $res = $self->remote(
        ['monitor', $self->{vmid}],
        input => join('', map { "$_\n" } @commands, 'quit'),
        timeout_ms => 30_000,
        connect_timeout_s => 5,
        connect_retries => 1
    );
    my $out = $res->{stdout} // '';
    die "qm monitor on node '$self->{target}': $1\n" if $out =~ /^(?:qm> )*ERROR: (.*)$/m;
    return $out;
}

# Post-copy on the target's QEMU (before `migrate`, as QEMU wants it on both sides):
# postcopy-ram, and postcopy-preempt where both QEMUs offer it. Returns whether preempt is on.
sub setup_postcopy_target {
    my ($self) = @_;
    my ($vmid, $target) = @$self{qw(vmid target)};
    my @set = ('migrate_set_capability postcopy-ram on');
    push @set, 'migrate_set_capability postcopy-preempt on' if $self->{source_preempt};
    my $out = $self->target_monitor(@set, 'info migrate_capabilities');
    my %on = $out =~ /^(?:qm> )*([a-z0-9-]+): (on|off)\s*$/mg;
    die "--postcopy $self->{postcopy}: post-copy could not be turned on for VM $vmid on node "
        . "'$target' (its QEMU said: "
        . join(' ', grep { /\S/ && !/^(?:qm> )*[a-z0-9-]+: o(?:n|ff)\s*$/ } split /\n/, $out)
        . ")\n"
        if ($on{'postcopy-ram'} // '') ne 'on';
    return ($on{'postcopy-preempt'} // '') eq 'on' ? 1 : 0;
}

# Switches the running migration to post-copy. The target (waiting with -S) is resumed as soon
# as the switch is through (see resume_target_in_postcopy).
sub switch_to_postcopy {
    my ($self, $why) = @_;
    $self->log('info', "switching to post-copy: $why");
    $self->write_state(phase => 'postcopy');
    $self->{timing}{switched} = time();
    PVE::MTunnel::qmp_migrate_start_postcopy($self->{qmp_socket});
    # from here the VM's memory may be split: no cancel, no continuing the source
    $self->{postcopy_started} = 1;
    $self->{postcopy_split} = 1;
    $self->{target_resume_pending} = 1;
}

# Resumes the target once the source's side of the switch is through. Not before: QEMU's 'cont'
# on an incoming VM takes its disks at once (QEMU 7.2), while the source holds them until it
# stopped and let them go, right before it sends its devices; pages sent in post-copy
# (postcopy-bytes) come after that. A 'cont' that comes before the devices arrive makes QEMU
# run the target as soon as they do.
sub resume_target_in_postcopy {
    my ($self) = @_;
    my $vmid = $self->{vmid};
    my $end = time() + 30;
    while (1) {
        my $stat = PVE::MTunnel::qmp_query_migrate($self->{qmp_socket});
        my $status = $stat->{status} // 'none';
        return if $status ne 'postcopy-active' && $status ne 'completed';
        last if $status eq 'completed' || ($stat->{ram}{'postcopy-bytes'} // 0) > 0;
        die "the switch to post-copy did not get through in 30 s\n" if time() > $end;
        usleep(2000);
    }
    eval {
        die "no tunnel\n" if !$self->{tunnel};
        $self->{tunnel}->command("resume $vmid", timeout_ms => 30_000);
    };
    if (my $err = $@) {
        chomp $err;
        $self->log('warn', "resume through tunnel failed: $err - trying 'qm resume' over ssh");
        eval { $self->remote(['resume', $vmid, '--skiplock', '--nocheck'], timeout_ms => 30_000) };
        if (my $err2 = $@) {
            # still pending: tried again at the next look (after a recovery, if it comes to that)
            $self->log('warn', "resuming VM $vmid on node '$self->{target}' failed: $err2");
            return;
        }
    }
    $self->{timing}{resumed} = time();
    delete $self->{target_resume_pending};
    $self->log('info', "VM $vmid resumed on node '$self->{target}' (post-copy)");
}

# The target's post-copy status as `info migrate` in its monitor tells it; undef when its QEMU
# is not there (the monitor said so).
sub target_migration_status {
    my ($self) = @_;
    my $out = eval { $self->target_monitor('info migrate') };
    if (my $err = $@) {
        # whatever the monitor says: `qm status` tells whether the QEMU is there
        my $state = $self->target_state();
        return undef if defined $state && $state eq 'stopped';
        die $err;
    }
    return $out =~ /^(?:qm> )*Migration status: (\S+)/m ? $1 : 'none';
}

# A paused post-copy migration: recovered through new tunnels, retried until
# postcopy_recover_timeout_ms. pause => 1: the channel hangs; pause both sides first.
sub postcopy_recover {
    my ($self, $why, %opts) = @_;
    my ($vmid, $target) = @$self{qw(vmid target)};
    my $deadline = time() + $self->{postcopy_recover_timeout_ms} / 1000;
    $self->log('warn', "post-copy migration paused ($why): recovering it through a new tunnel");
    if ($opts{pause}) {
        eval { PVE::MTunnel::qmp_migrate_pause($self->{qmp_socket}) };
        $self->log('info', "pausing the migration on node '$self->{node}': $@") if $@;
        my $status = $self->wait_source_status(10, 'postcopy-paused');
        die
            "the stalled post-copy migration on node '$self->{node}' could not be paused ($status)\n"
            if $status ne 'postcopy-paused' && $status ne 'completed';
        return if $status eq 'completed';
    }
    $self->abandon_tunnel();
    my $attempt = 0;
    while (1) {
        $attempt++;
        my $ok = eval { $self->postcopy_recover_once($attempt); 1 };
        if ($ok) {
            $self->{postcopy_recovered}++;
            $self->log('info', "post-copy migration recovered (attempt $attempt)");
            return;
        }
        my $err = $@;
        chomp $err;
        $self->abandon_tunnel();
        die "$err\n" if $self->{postcopy_lost};
        die "post-copy recovery failed for "
            . render_duration($self->{postcopy_recover_timeout_ms} / 1000)
            . " ($attempt attempts), the last one: $err\n"
            if time() >= $deadline;
        $self->log('warn', "post-copy recovery attempt $attempt failed: $err - retrying");
        usleep(1_000_000);
    }
}

# A broken or hung tunnel (a stopped ssh never answers 'quit'): closed without waiting for it;
# what fails in the close is expected and only noted.
sub abandon_tunnel {
    my ($self) = @_;
    $self->close_tunnel_quickly(
        quit_timeout_ms => 500,
        exit_timeout_ms => 500,
        level => 'info',
        failed => 'closing the broken tunnel'
    );
}

# One recovery: the source paused; the target paused (a hung channel is paused there too) and
# listening on a new socket; a new tunnel forwarding it; the source resumed into it.
sub postcopy_recover_once {
    my ($self, $attempt) = @_;
    my ($vmid, $node, $target, $qmp) = @$self{qw(vmid node target qmp_socket)};
    my $src = PVE::MTunnel::qmp_query_migrate($qmp)->{status} // 'none';
    # an earlier attempt's resume got through after all
    return if $src eq 'completed' || $src eq 'postcopy-active';
    die "the migration on node '$node' is $src, not postcopy-paused\n" if $src ne 'postcopy-paused';
    my $dst = $self->target_migration_status();
    if (!defined $dst) {
        $self->{postcopy_lost} = 1;
        die "VM $vmid is lost: its QEMU on node '$target' is gone after the switch to "
            . "post-copy, and the part of its memory that was only there is gone with it "
            . "(the source on node '$node' holds no complete state; it is kept paused)\n";
    }
    if ($dst eq 'postcopy-active') {
        # its end of a hung channel never fails by itself
        $self->target_monitor('migrate_pause');
        for (1 .. 50) {
            $dst = $self->target_migration_status() // 'gone';
            last if $dst ne 'postcopy-active';
            usleep(100_000);
        }
    }
    die "the incoming migration on node '$target' is $dst, not postcopy-paused\n"
        if $dst ne 'postcopy-paused';
    # a new path each time: QEMU may still listen on an earlier one
    my $seq = ++$self->{recover_seq};
    my $path = "$self->{socket_dir}/${vmid}_recover$seq.migrate";
    my $out = $self->target_monitor("migrate_recover unix:$path");
    die "node '$target' did not listen for the recovery: $1\n" if $out =~ /^(?:qm> )*(Error: .*)$/m;
    $self->log('info', "node '$target' listens for the recovery on unix:$path");
    $self->{tunnel} = PVE::MTunnel->open(
        ssh => $self->{ssh},
        forwards => [$path],
        command => [@{ $self->{qm} }, 'mtunnel'],
        socket_dir => $self->{socket_dir},
        log => sub { my ($level, $msg) = @_; $self->log($level, $msg) if $level ne 'debug' },
        %{ $self->{ssh_options} },
        %{ $self->{tunnel_options} },
    );
    $self->{tunnel}->wait_ready(timeout_ms => 30_000);
    PVE::MTunnel::qmp_migrate_resume($qmp, "unix:$path");
    $src = $self->wait_source_status(30, 'postcopy-active', 'completed');
    die "the resumed migration is $src\n" if $src ne 'postcopy-active' && $src ne 'completed';
}

# --check --fix of a post-copy migration whose driver is gone: waits for its end, recovering
# it when it pauses or hangs, then resumes the target (a no-op when it runs) and stops the
# source, as phase 3.
sub postcopy_finish {
    my ($self) = @_;
    my $vmid = $self->{vmid};
    @$self{qw(postcopy_started postcopy_split)} = (1, 1);
    $self->wait_for_completion($self->{downtime_ms});
    $self->move_config($self->{target});
    $self->remote(['resume', $vmid, '--skiplock', '--nocheck'], timeout_ms => 30_000);
    $self->{target_resumed} = 1;
    $self->remove_state() if $self->read_state();
    $self->finish_source();
}

# A recovered migration's abandoned tunnels could not always remove their sockets (a cut
# link), and failed attempts leave theirs (QEMU's listener on the target, a forward whose
# tunnel never got ready): once the migration is over, every migration socket of the VM on
# both nodes is stale.
sub remove_recovery_sockets {
    my ($self) = @_;
    unlink($self->stale_sockets());
    my @remote = @{ $self->stale_target_sockets() // [] };
    $self->remove_target_sockets(@remote) if @remote;
}

# Waits up to $limit_s for the source's migration to reach one of @want (or a final status);
# returns the last status.
sub wait_source_status {
    my ($self, $limit_s, @want) = @_;
    my %want = map { $_ => 1 } @want;
    my $end = time() + $limit_s;
    my $status = 'none';
    while (time() < $end) {
        my $stat = PVE::MTunnel::qmp_wait_migration($self->{qmp_socket}, hold_ms => 250);
        $status = $stat->{status} // 'none';
        last if $want{$status} || $FINAL{$status};
    }
    return $status;
}

# Once RAM migration completed: the complete state is on both nodes, paused. Forward only.
sub phase3 {
    my ($self) = @_;
    my $vmid = $self->{vmid};
    if (my $jobs = $self->{mirror_jobs}) {
        # As upstream: block-job-cancel on a ready mirror syncs the target, then ends the job
        # without switching the source over to it; the source lets go of the NBD connection.
        $self->log('info', "$_: Completing block job...") for @$jobs;
        # a job that ends without error from here on synced the target with the paused source
        $self->write_state(phase => 'finishing-mirrors') if $self->{state};
        eval {
            PVE::MTunnel::qmp_mirror_finish(
                $self->{qmp_socket}, $jobs,
                mode => 'cancel',
                timeout_ms => 600_000
            );
        };
        if (my $err = $@) {
            # the target's disks may lack the last writes: it must not run
            $self->{target_disks_incomplete} = 1;
            $self->write_state(phase => 'mirrors-failed') if $self->{state};
            die "Failed to complete storage migration: $err";
        }
        $self->write_state(phase => 'mirrors-finished') if $self->{state};
        $self->log('info', "$_: Completed successfully.") for @$jobs;
        $self->log('info', "$_: mirror-job finished") for @$jobs;
        $self->{mirror_done} = 1;
        # upstream: the target's NBD server must stop before it resumes
        $self->log('info', "stopping NBD storage migration server on target.");
        eval { $self->remote(['nbdstop', $vmid], timeout_ms => 30_000) };
        $self->log('err', "stopping NBD server on target failed: $@") if $@;
    }
    # As upstream: the VM belongs to the target from here on, then it may run there.
    $self->move_config($self->{target});
    # From here on the target may run the VM.
    eval { $self->{tunnel}->command("resume $vmid", timeout_ms => 30_000) };
    $self->{timing}{resumed} = time();
    if (my $err = $@) {
        chomp $err;
        $self->log('warn', "resume through tunnel failed: $err - trying 'qm resume' over ssh");
        eval { $self->remote(['resume', $vmid, '--skiplock', '--nocheck'], timeout_ms => 30_000) };
        if (my $err2 = $@) {
            # the reply may be what got lost: ask the target
            my $state = $self->target_state();
            die "resuming VM $vmid on node '$self->{target}' failed: $err2"
                if ($state // '') ne 'running';
            $self->log('warn',
                "resume on node '$self->{target}' reported an error, but VM $vmid runs there");
        }
    }
    # The VM runs on the target; the source must never be continued.
    $self->{target_resumed} = 1;
    $self->write_state(phase => 'resumed') if $self->{state};
    $self->finish_source();
}

# The target runs the VM: close the tunnel, stop and clean up the source (failures only warn:
# the migration itself succeeded).
sub finish_source {
    my ($self) = @_;
    if (my $tunnel = delete $self->{tunnel}) {
        eval { $tunnel->close() };
        $self->log('warn', "closing tunnel: $@") if $@;
    }
    $self->stop_source();
    $self->free_source_volumes() if $self->{mirror_jobs};
}

# A failure after RAM migration completed. The source is continued only when the target is
# known not to run; else the target is resumed if it can be, or everything stays as it is.
sub phase3_recover {
    my ($self, $err) = @_;
    my ($vmid, $target) = @$self{qw(vmid target)};
    my $state = $self->target_state();
    if (defined $state && $state eq 'running') {
        $self->log('info', "VM $vmid runs on node '$target': finishing on the source");
        $self->move_config($target);
        $self->{target_resumed} = 1;
        $self->finish_source();
        return;
    }
    if (!defined $state) {
        $self->log('err',
            "node '$target' cannot be reached: VM $vmid stays paused on node '$self->{node}', "
                . "as it may run on '$target' once that is reachable");
        $self->close_tunnel_quickly();
        return;
    }
    # Reachable and not running: stop it (its disks may be incomplete, or its resume failed),
    # and only once it is confirmed stopped continue the source.
    if ($state ne 'stopped') {
        $self->log('info',
            "stopping VM $vmid on node '$target' (state $state), then continuing it on '$self->{node}'"
        );
        eval { $self->stop_target() };
        $self->log('err', "stopping target VM failed: $@") if $@;
        $state = $self->target_state();
    }
    if (($state // '') eq 'stopped') {
        # back where it runs; a config that cannot move back keeps the source paused
        eval { $self->move_config($self->{node}) };
        if (my $err = $@) {
            $self->log('err', "$err - VM $vmid stays paused on node '$self->{node}'");
            $self->close_tunnel_quickly();
            return;
        }
        $self->cancel_mirrors();
        $self->cont_source();
        $self->free_target_volumes();
    } else {
        $self->log('err',
                  "VM $vmid on node '$target' could not be confirmed stopped ("
                . ($state // 'unreachable')
                . "): it stays paused on node '$self->{node}'");
    }
    $self->close_tunnel_quickly();
}

# Before completion (the target was never told to resume): as upstream's phase2_cleanup.
sub phase2_cleanup {
    my ($self, $err) = @_;
    my $vmid = $self->{vmid};
    $self->log('info', "aborting phase 2 - cleanup resources");
    if ($self->{migration_started}) {
        $self->log('info', "migrate_cancel");
        my $stat =
            eval { PVE::MTunnel::qmp_migrate_cancel($self->{qmp_socket}, timeout_ms => 30_000) };
        $self->log('info', "migrate_cancel error: $@") if $@;
        if (($stat->{status} // '') eq 'completed') {
            # too late: the target has the complete state; phase 3 takes it from here
            $self->{completed} = 1;
            return;
        }
    }
    # The source ends in postmigrate if the failure came after convergence: continue it. The
    # target never resumed (it waits with -S until told), so nothing runs twice.
    $self->cont_source();
    $self->cancel_mirrors();
    if ($self->{target_started}) {
        # a start whose answer was lost may still run there: stop only what it left
        $self->wait_target_start_gone() if $self->{start_failed};
        eval { $self->stop_target() };
        if (my $err = $@) {
            $self->log('err', "stopping target VM failed: $err");
            $self->log('err',
                "VM $vmid may be left waiting for incoming migration on node '$self->{target}': "
                    . "run 'qm stop $vmid' there once it is reachable");
        } else {
            $self->{target_stopped} = 1;
        }
    }
    $self->free_target_volumes();
    # Only after the target is stopped, as PVE does.
    $self->close_tunnel_quickly();
    # a tunnel that never got ready leaves the target's listening sockets to us
    $self->remove_target_sockets() if !$self->{tunnel_ready} && $self->{target_stopped};
}

# Stops the incoming VM on the target: with `--migratedfrom` while the config is on the
# source (upstream's vm_stop asserts it is there), as a plain stop once it moved there.
sub stop_target {
    my ($self) = @_;
    my ($vmid, $node, $target) = @$self{qw(vmid node target)};
    my @how = $self->config_node() eq $target ? () : ('--migratedfrom', $node);
    $self->remote(['stop', $vmid, '--skiplock', @how]);
}

# pmxcfs's path of the VM's config on $node (see pve_dir)
sub config_path {
    my ($self, $node) = @_;
    return "$self->{pve_dir}/nodes/$node/qemu-server/$self->{vmid}.conf";
}

# The node whose directory holds the VM's config: the source, unless it moved to the target.
sub config_node {
    my ($self) = @_;
    return $self->{node} if !defined $self->{pve_dir};
    return -f $self->config_path($self->{target}) ? $self->{target} : $self->{node};
}

# As upstream's move_config_to_node: one rename in the cluster's config tree, from the node
# that holds it to $to (nothing when it is there already, or without pve_dir).
sub move_config {
    my ($self, $to) = @_;
    return if !defined $self->{pve_dir};
    my $from = $self->config_node();
    return if $from eq $to;
    my ($src, $dst) = ($self->config_path($from), $self->config_path($to));
    rename($src, $dst)
        or die "failed to move the config of VM $self->{vmid} to node '$to' - rename failed: $!\n";
    $self->log('info', "moved the config of VM $self->{vmid} to node '$to'");
}

# Without a ready tunnel, its close does not remove the target's sockets.
sub remove_target_sockets {
    my ($self, @sockets) = @_;
    # a start that failed midway named none, but its QEMU may have bound the secure ones
    @sockets =
        @{ $self->{target_sockets}
            // [$self->{migration_type} eq 'secure' ? $self->migration_sockets() : ()] }
        if !@sockets;
    return if !@sockets;
    eval {
        PVE::MTunnel::ssh_remove_sockets(
            ssh => $self->{ssh},
            sockets => \@sockets,
            socket_dir => $self->{socket_dir},
            timeout_ms => 30_000,
            %{ $self->{ssh_options} },
        );
    };
    $self->log('err', "removing sockets on node '$self->{target}' failed: $@") if $@;
}

# this VM's migration socket paths (the same on both nodes, as PVE forwards them)
sub migration_sockets {
    my ($self) = @_;
    my ($dir, $vmid) = @$self{qw(socket_dir vmid)};
    return ("$dir/$vmid.migrate", "$dir/${vmid}_nbd.migrate");
}

# forward sockets of this VM left on the source (ssh killed with its driver)
# ... and the new channels of recovered post-copy migrations (VMID_recoverN.migrate), on this
# node
sub stale_sockets {
    my ($self) = @_;
    my ($dir, $vmid) = @$self{qw(socket_dir vmid)};
    return grep { -S $_ } $self->migration_sockets(), glob("$dir/${vmid}_recover*.migrate");
}

# listening sockets of this VM left on the target (its QEMU gone); undef if unreachable
sub stale_target_sockets {
    my ($self) = @_;
    my $res = eval {
        $self->remote_command(
            [
                'sh',
                '-c',
                'for p in "$@" "$0"_recover*.migrate; do if [ -S "$p" ]; then echo "$p"; fi; done',
                "$self->{socket_dir}/$self->{vmid}",
                $self->migration_sockets()
            ],
            timeout_ms => 20_000,
            connect_timeout_s => 5,
            connect_retries => 1
        );
    } or return undef;
    return [grep { length } split /\n/, $res->{stdout} // ''];
}

# Continue the source if the migration left it paused (postmigrate).
sub cont_source {
    my ($self) = @_;
    my $status = eval { PVE::MTunnel::qmp_execute($self->{qmp_socket}, 'query-status')->{status} };
    $self->log('err', "query-status error: $@") if $@;
    return if ($status // '') ne 'postmigrate';
    eval { PVE::MTunnel::qmp_execute($self->{qmp_socket}, 'cont') };
    $self->log('err', "resuming VM failed: $@") if $@;
}

sub cancel_mirrors {
    my ($self) = @_;
    my $jobs = $self->{mirror_jobs};
    return if !$jobs || $self->{mirror_done};
    $self->log('info', "$_: Cancelling block job") for @$jobs;
    eval { PVE::MTunnel::qmp_mirror_cancel($self->{qmp_socket}, $jobs, timeout_ms => 10_000) };
    return if !$@;
    # NBD writes stuck in a stopped ssh hold the cancel: closing the tunnel breaks them
    $self->log('info', "block jobs still running: closing the tunnel first");
    $self->close_tunnel_quickly();
    eval { PVE::MTunnel::qmp_mirror_cancel($self->{qmp_socket}, $jobs, timeout_ms => 60_000) };
    $self->log('err', "cancelling block jobs failed: $@") if $@;
}

# As upstream's cleanup_remotedisks: the target's new volumes, once its QEMU is gone. New are
# the ones listed now that were not listed before the start (a start that failed or whose
# answer was lost may have allocated volumes it never named); without a listing before it,
# the ones the target named. Never one that existed before the start.
sub free_target_volumes {
    my ($self) = @_;
    my ($vmid, $target) = @$self{qw(vmid target)};
    my ($before, $named) = ($self->{target_volumes_before}, $self->{target_volumes} // []);
    return if !$self->{target_started} || (!$before && !@$named);
    if (!$self->{target_stopped} && ($self->target_state() // '') ne 'stopped') {
        $self->{volumes_left} = 1;
        $self->log('err',
            "volume '$_' left on node '$target': run 'pvesm free $_' there once VM $vmid is stopped there"
        ) for @$named;
        $self->log('err',
                  "volumes its start allocated for VM $vmid may be left on node '$target': "
                . "compare 'pvesm list STORAGE --vmid $vmid' there with what it had before ("
                . (join(', ', map { @$_ } values %$before) || 'none') . ')')
            if $before && !@$named;
        return;
    }
    $self->{target_stopped} = 1;
    $self->free_new_target_volumes($before, $named);
}

# Frees the target's volumes of this VM that are new since $before (see new_target_volumes);
# the caller made sure the target VM is stopped. Logs each one freed or left.
sub free_new_target_volumes {
    my ($self, $before, $named) = @_;
    my $target = $self->{target};
    for my $volid (@{ $self->new_target_volumes($before, $named) }) {
        eval { $self->remote_command([@{ $self->{pvesm} }, 'free', $volid], timeout_ms => 60_000) };
        if (my $err = $@) {
            $self->{volumes_left} = 1;
            $self->log('err', "removing volume '$volid' on node '$target' failed: $err");
        } else {
            $self->log('info',
                "freed volume '$volid' on node '$target' (allocated for this migration)");
        }
    }
}

# The target's volumes of this VM that are new since $before ({storage => [volids]}, the
# listing taken before its start): on the storages listed then, the ones listed now and not
# before; a volume the target named on another storage counts as new (as upstream, which
# frees what the target named). Without a listing before, the ones the target named; when
# listing now fails, the named ones that were not listed before.
sub new_target_volumes {
    my ($self, $before, $named) = @_;
    $named //= [];
    return [@$named] if !$before;
    my %old = map { $_ => 1 } map { @$_ } values %$before;
    my @listed = sort keys %$before;
    my %listed = map { $_ => 1 } @listed;
    my $store_of = sub { $_[0] =~ /^([^:\s]+):/ ? $1 : '' };
    my @elsewhere = grep { !$listed{ $store_of->($_) } } @$named;
    my $now = @listed ? $self->list_target_volumes(@listed) : {};
    my @new = $now ? map { @{ $now->{$_} } } @listed : grep { $listed{ $store_of->($_) } } @$named;
    my %seen;
    return [grep { !$old{$_} && !$seen{$_}++ } @new, @elsewhere];
}

# The storages the target allocates the local disks' new volumes on: the source's disks'
# storages mapped through targetstorage as upstream's map_id does ('1': the same storage;
# "ID": all to ID; "SRC:DST,...": per storage, a plain ID in the list is the default)
sub target_storages {
    my ($self) = @_;
    my $map = $self->{targetstorage} // '1';
    my (%entry, $default);
    for my $e (grep { length } split /[,;\s]+/, $map) {
        if ($e =~ /^([^:]+):([^:]+)$/) {
            $entry{$1} = $2;
        } else {
            $default = $e;
        }
    }
    $default = undef if defined $default && $default eq '1';
    my %stores;
    for my $volid (values %{ $self->source_volumes() }) {
        my ($store) = $volid =~ /^([a-z][a-z0-9\-_.]*[a-z0-9]):/i or next;
        $stores{ $entry{$store} // $default // $store } = 1;
    }
    return sort keys %stores;
}

# This VM's volumes on the target's storages, as `pvesm list STORAGE --vmid VMID` there tells
# them: {storage => [volids]}; undef when a listing fails (the reason is logged).
sub list_target_volumes {
    my ($self, @stores) = @_;
    my ($vmid, $target) = @$self{qw(vmid target)};
    my %list;
    for my $store (@stores) {
        my $res = eval {
            $self->remote_command([@{ $self->{pvesm} }, 'list', $store, '--vmid', $vmid],
                timeout_ms => 30_000);
        };
        if (my $err = $@) {
            chomp $err;
            $self->log('warn',
                "cannot list the volumes of VM $vmid on storage '$store' of node '$target': $err");
            return undef;
        }
        # "Volid Format Type Size VMID" (the header has no ':'), one volume a line
        $list{$store} = [
            grep { index($_, "$store:") == 0 }
                map { /^(\S+:\S+)\s/ ? $1 : () } split /\n/,
            $res->{stdout} // ''
        ];
    }
    return \%list;
}

# A `qm start` whose answer was lost (its ssh died or timed out) may still be running on the
# target: it holds the VM's config lock, allocates volumes and starts QEMU after its ssh is
# gone. Stopping the VM or listing its volumes before it ended would race with it, so wait
# (30 s at most) until no such start runs there: `qm start VMID --skiplock --migratedfrom
# NODE` (the command this driver sent) or PVE's task worker for it (qmstart:VMID).
sub wait_target_start_gone {
    my ($self) = @_;
    my ($vmid, $node, $target) = @$self{qw(vmid node target)};
    # an ERE for pgrep -f; "[q]" keeps it from matching the shell that carries it
    my $pattern = "[q]m start $vmid --skiplock --migratedfrom $node( |\$)|:[q]mstart:$vmid:";
    my $script = 'i=0; while pgrep -f -- "$1" >/dev/null; do '
        . 'i=$((i+1)); if [ "$i" -ge 300 ]; then echo "still running"; exit 1; fi; sleep 0.1; done';
    eval { $self->remote_command(['sh', '-c', $script, 'sh', $pattern], timeout_ms => 45_000); };
    $self->log('warn', "waiting for the start of VM $vmid on node '$target' to end: $@") if $@;
}

# The tunnel is broken or idle by now: do not wait long for its 'quit'.
sub close_tunnel_quickly {
    my ($self, %opts) = @_;
    my $tunnel = delete $self->{tunnel} or return;
    eval {
        $tunnel->close(
            quit_timeout_ms => $opts{quit_timeout_ms} // 5000,
            exit_timeout_ms => $opts{exit_timeout_ms} // 2000
        );
    };
    $self->log($opts{level} // 'err', ($opts{failed} // 'closing tunnel failed') . ": $@") if $@;
}

# As upstream's phase3_cleanup: the migrated disks' source volumes go once the VM runs on
# the target (a failure only warns: the migration itself succeeded).
sub free_source_volumes {
    my ($self) = @_;
    my $volumes = $self->source_volumes();
    for my $job (@{ $self->{mirror_jobs} }) {
        my ($drive) = $job =~ /^drive-(.+)$/;
        my $volid = $volumes->{$drive} // next;
        my $ok = open(my $fh, '-|', @{ $self->{pvesm} }, 'free', $volid);
        if ($ok) { local $/; <$fh>; $ok = close($fh) }
        if (!$ok) {
            $self->log('warn',
                "removing local copy of '$volid' failed: "
                    . ($! ? "$!" : "exit code " . ($? >> 8)));
        } else {
            $self->log('info', "removed local copy of '$volid'");
        }
    }
}

# A process that is gone or a zombie no longer runs anything (kill 0 succeeds on a zombie).
sub process_gone {
    my ($pid) = @_;
    return 1 if !kill(0, $pid) && $! == ESRCH;
    open(my $fh, '<', "/proc/$pid/stat") or return 1;
    my $stat = <$fh> // '';
    close($fh);
    return $stat =~ /^\d+ \(.*\) [ZX] /s ? 1 : 0;
}

sub source_pid {
    my ($self) = @_;
    open(my $fh, '<', "$self->{socket_dir}/$self->{vmid}.pid") or return undef;
    my $pid = <$fh>;
    close($fh);
    return defined $pid && $pid =~ /^\s*([0-9]+)\s*$/ ? $1 : undef;
}

# As vm_stop on the source: QMP quit, then wait until the process is gone.
sub stop_source {
    my ($self) = @_;
    my $vmid = $self->{vmid};
    my $pid = $self->source_pid();
    eval { PVE::MTunnel::qmp_execute($self->{qmp_socket}, 'quit') };
    $self->log('warn', "stopping source VM: $@") if $@;
    if ($pid) {
        for (1 .. 100) { last if process_gone($pid); usleep(100_000) }
        if (!process_gone($pid)) {
            kill('KILL', $pid);
            $self->log('warn', "source VM $vmid did not quit, killed");
        }
    }
    $self->log('info', "stopped VM $vmid on source node '$self->{node}'");
}

# ------------------------------------------------------------ the migration's record

# A storage migration keeps a record on the source node, next to the VM's pid file and
# monitor, of what a `--check` after the driver's death cannot ask QEMU: the target, the
# source QEMU migrated (its pid), the target's volumes of the VM before its start, the new
# volumes the target named, the mirror jobs and how far they got (phase: starting, started,
# mirroring, migrating, finishing-mirrors, mirrors-finished, mirrors-failed, resumed). It is
# removed once the VM runs on one node and nothing is left to clean up.
sub state_path {
    my ($self) = @_;
    return "$self->{socket_dir}/$self->{vmid}.mtunnel";
}

# Updates the record: a temp file of ours renamed over it (never written through a path we
# did not create). A failure only warns (once): the migration does not depend on it.
sub write_state {
    my ($self, %set) = @_;
    my $st = $self->{state} //= {
        vmid => $self->{vmid},
        node => $self->{node},
        target => $self->{target},
        source_pid => $self->source_pid(),
        started => int(time()),
    };
    %$st = (%$st, %set);
    my $path = $self->state_path();
    my $tmp = "$path.tmp.$$";
    my $ok = eval {
        # a leftover of a crashed process with our pid: only a plain file is removed
        unlink($tmp) if -f $tmp && !-l $tmp;
        sysopen(my $fh, $tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, 0600)
            or die "cannot create $tmp: $!\n";
        my $written = print {$fh} $JSON->encode($st), "\n";
        close($fh) && $written or die "cannot write $tmp: $!\n";
        rename($tmp, $path) or die "cannot rename $tmp to $path: $!\n";
        1;
    };
    return 1 if $ok;
    my $err = $@;
    unlink($tmp) if -f $tmp && !-l $tmp;
    $self->log('warn', "cannot keep the migration's record: $err") if !$self->{state_warned}++;
    return 0;
}

# The record of this node's last storage migration of the VM, or undef (none, unreadable,
# not this VM's).
sub read_state {
    my ($self) = @_;
    sysopen(my $fh, $self->state_path(), O_RDONLY | O_NOFOLLOW) or return undef;
    my $text = do { local $/; <$fh> };
    close($fh);
    my $st = eval { $JSON->decode($text // '') };
    return undef if ref $st ne 'HASH' || ($st->{vmid} // '') ne $self->{vmid};
    return undef if !$PHASES{ $st->{phase} // '' };
    return $st;
}

sub remove_state {
    my ($self) = @_;
    my $path = $self->state_path();
    unlink($path) if -f $path && !-l $path;
    delete $self->{state};
}

# ------------------------------------------------------------ where is the VM?

# The target's run state as `qm status --verbose` tells it (running, paused, inmigrate,
# prelaunch, postmigrate, … or stopped); undef when the node cannot be reached.
sub target_state {
    my ($self) = @_;
    my $res = eval {
        $self->remote(
            ['status', $self->{vmid}, '--verbose'],
            timeout_ms => 20_000,
            connect_timeout_s => 5,
            connect_retries => 1
        );
    };
    return undef if !$res;
    my $out = $res->{stdout} // '';
    return $1 if $out =~ /^qmpstatus: (\S+)$/m;
    return $1 if $out =~ /^status: (\S+)$/m;
    return undef;
}

# Both nodes' view: source {state, migration, jobs, pid}, target {state} (undef = unreachable),
# and this migration's record when it is about the source QEMU that runs now (state). With
# volumes => 1 (and the target reachable, not running the VM): target {new_volumes}, its
# volumes of the VM allocated for the migration (see new_target_volumes).
sub inspect {
    my ($self, %opts) = @_;
    my %src = (state => 'stopped', migration => 'none', jobs => []);
    my $pid = $self->source_pid();
    if ($pid && !process_gone($pid)) {
        $src{pid} = $pid;
        my $st = eval {
            PVE::MTunnel::qmp_execute($self->{qmp_socket}, 'query-status', undef,
                timeout_ms => 5000);
        };
        $src{state} = $st ? $st->{status} : 'unknown';
        $src{error} = $@ if !$st;
        my $mig = eval { PVE::MTunnel::qmp_query_migrate($self->{qmp_socket}, timeout_ms => 5000) };
        $src{migration} = $mig->{status} // 'none' if $mig;
        my $jobs = eval {
            PVE::MTunnel::qmp_execute($self->{qmp_socket}, 'query-block-jobs', undef,
                timeout_ms => 5000);
        };
        $src{jobs} = $jobs // [];
    }
    # a start refused before ssh ran left nothing there (the target is not asked: it may be
    # unreachable with the same ssh command)
    my $untouched = defined $self->{target_started} && !$self->{target_started};
    my %seen = (
        source => \%src,
        target => { state => $untouched ? 'stopped' : $self->target_state() }
    );
    my $st = $self->read_state();
    if ($st && $st->{node} eq $self->{node} && $st->{target} eq $self->{target}) {
        # the record is about this source QEMU only while it is the one that was migrated
        if ($src{pid} && ($st->{source_pid} // 0) == $src{pid}) {
            $seen{state} = $st;
            my $t = $seen{target}{state};
            $seen{target}{new_volumes} =
                $self->new_target_volumes($st->{target_volumes_before}, $st->{target_volumes})
                if $opts{volumes} && defined $t && $t ne 'running';
        } else {
            $seen{old_state} = $st;
        }
    }
    return \%seen;
}

# Whether the target's disks are shown complete after the RAM migration completed: (1) or
# (0, why not). Shown complete: no disk was mirrored; or the record says the mirrors were
# finished; or it says they were being finished (block-job-cancel of ready mirrors, sent
# only after completion) and every one of them ended without an error (QEMU syncs the
# target and flushes it before such a job ends). A mirror still ready proves nothing: the
# driver's death took its NBD connection, and the writes it had not copied are lost to it.
sub disks_complete {
    my ($self, $st, $jobs) = @_;
    my %job = map { $_->{device} => $_ } @$jobs;
    my @ids = $st ? @{ $st->{mirror_jobs} // [] } : ();
    my %all = map { $_ => 1 } @ids, keys %job;
    return (0, 'the disk mirrors failed')
        if $self->{target_disks_incomplete} || ($st && $st->{phase} eq 'mirrors-failed');
    return (0, 'its new volumes were never mirrored')
        if !%all && $st && @{ $st->{target_volumes} // [] };
    return (1) if !%all;
    my @failed = grep { defined $_->{error} } @$jobs;
    return (0, join(', ', map { "$_->{device}: $_->{error}" } @failed)) if @failed;
    return (0, 'no record of its disk mirrors') if !$st;
    return (1) if $DISKS_COMPLETE{ $st->{phase} };
    my @unproven =
        grep { !$job{$_} || $job{$_}{status} ne 'concluded' } sort keys %all;
    return (1) if $st->{phase} eq 'finishing-mirrors' && !@unproven;
    return (
        0,
        'the disk mirrors were not finished ('
            . join(', ',
            map { $job{$_} ? "$_: $job{$_}{status}" : "$_: gone" }
                @unproven ? @unproven : sort keys %all)
            . ')'
    );
}

# What the two states mean: {state => sentence, ok => VM runs on exactly one node,
# fix => [steps] (each [description, code]), undecided => 1 when no fix is safe,
# left => [what the migration left behind: block jobs, the target's new volumes]}.
sub diagnose {
    my ($self, $seen) = @_;
    my ($vmid, $node, $target, $qmp) = @$self{qw(vmid node target qmp_socket)};
    my ($s, $t) = ($seen->{source}{state}, $seen->{target}{state});
    my $completed = $seen->{source}{migration} eq 'completed' || $s eq 'postmigrate';
    my $check = $self->{check_command}
        // "mtunnel-migrate --check $vmid $target --node $node --ssh-file FILE --fix";
    my %incoming = map { $_ => 1 } qw(inmigrate prelaunch paused);
    my $st = $seen->{state};
    my @jobs = @{ $seen->{source}{jobs} };
    my @job_ids = map { $_->{device} } @jobs;
    my $new = $seen->{target}{new_volumes};

    # what the migration left: its block jobs, and (unless the VM is to run there) the
    # target's new volumes
    my (@left, @left_jobs);
    push @left,
        "block jobs on '$node': "
        . join(', ',
        map { "$_->{device} ($_->{status}" . (defined $_->{error} ? ": $_->{error}" : '') . ')' }
            @jobs)
        if @jobs;
    @left_jobs = @left;
    push @left, "volumes allocated for this migration on '$target': @$new"
        if $new && @$new && defined $t && $t ne 'running';

    my $stop_target = [
        "stop the incoming VM $vmid on '$target'",
        sub {
            # a start whose answer was lost may still run there
            $self->wait_target_start_gone() if $st && $st->{phase} eq 'starting';
            $self->stop_target();
            my $now = $self->target_state() // 'unreachable';
            die "VM $vmid on '$target' is $now after 'qm stop'\n" if $now ne 'stopped';
        }
    ];
    # only with the record: the volumes new since the start (listed again when it runs)
    my @free_new = (
        $st && (($new && @$new) || $st->{phase} eq 'starting')
        ? [
            "free the volumes allocated for this migration on '$target'"
                . ($new && @$new ? ": @$new" : ''),
            sub {
                $self->free_new_target_volumes($st->{target_volumes_before}, $st->{target_volumes});
            }
            ]
        : ()
    );
    my @cancel_jobs = (
        @jobs
        ? [
            "cancel the block jobs on '$node': @job_ids",
            sub { PVE::MTunnel::qmp_mirror_cancel($qmp, \@job_ids, timeout_ms => 60_000) }
            ]
        : ()
    );
    my $cont = [
        "continue VM $vmid on '$node'",
        sub {
            $self->move_config($node);
            PVE::MTunnel::qmp_execute($qmp, 'cont');
        }
    ];
    my $resume_target = [
        "resume VM $vmid on '$target'",
        sub {
            $self->move_config($target);
            $self->remote(['resume', $vmid, '--skiplock', '--nocheck']);
        }
    ];
    # where the VM runs, its config must be (pve_dir)
    my $config_to = sub {
        my ($to) = @_;
        return () if $self->config_node() eq $to;
        return ["move the config of VM $vmid to node '$to'", sub { $self->move_config($to) }];
    };
    # the target's copy must not run: stop it (confirmed), free what it got, end the mirrors,
    # and only then continue the source
    my $to_source = sub {
        return [
            ($t eq 'stopped' ? () : $stop_target), @free_new,
            @cancel_jobs, ($s eq 'postmigrate' ? $cont : ())
        ];
    };
    my $result = sub { return { left => \@left, fix => [], @_ } };

    my $mig = $seen->{source}{migration};
    if ($mig =~ /^postcopy-/) {
        # the VM's memory is split between the nodes: only finishing the migration helps
        return $result->(
            state =>
                "VM $vmid is in post-copy ($mig): its memory is split between node '$node' and node '$target', which cannot be reached. Nothing may be stopped or continued: once '$target' is reachable, run on '$node': $check",
            undecided => 1
        ) if !defined $t;
        return $result->(
            state =>
                "VM $vmid is lost: in post-copy ($mig) its memory was split between node '$node' and node '$target', and its QEMU on '$target' is gone. The source on '$node' holds no complete state (it is kept paused, QEMU state $s, for inspection; 'qm stop $vmid' there ends it)",
            undecided => 1,
            lost => 1
        ) if $t eq 'stopped';
        return $result->(
            state => "VM $vmid "
                . ($t eq 'running' ? "runs on node '$target' (target)" : "is $t on node '$target'")
                . " in post-copy ($mig): the rest of its memory is still on '$node'",
            fix => [
                [
                    "finish the post-copy migration (recovered through a new tunnel if it is paused), then stop VM $vmid on '$node'",
                    sub { $self->postcopy_finish() }
                ]
            ]
        );
    }

    if (!defined $t) {
        return $result->(
            state =>
                "VM $vmid runs on node '$node' (source); node '$target' cannot be reached to confirm that its incoming copy is gone (run 'qm stop $vmid' there once it is reachable)",
            undecided => 1
        ) if $s eq 'running';
        my ($complete) = $self->disks_complete($st, \@jobs);
        return $result->(
            state =>
                "VM $vmid is paused on node '$node' (source, $s) after its migration completed, and node '$target' cannot be reached. Its copy there has incomplete disks and must never be resumed: once '$target' is reachable, run 'qm stop $vmid' there, then 'qm resume $vmid' on '$node'",
            undecided => 1
        ) if $completed && $self->{target_disks_incomplete};
        return $result->(
            state =>
                "VM $vmid is paused on node '$node' (source, $s) after its migration completed, and node '$target' cannot be reached: "
                . (
                $complete
                ? 'it holds the migrated state and may run it'
                : 'its copy there must not run (its disks cannot be shown complete)'
                )
                . ". Once '$target' is reachable, run on '$node': $check",
            undecided => 1
        ) if $completed;
        return $result->(
            state =>
                "VM $vmid is $s on node '$node' (source); node '$target' cannot be reached: run on '$node' once it is: $check",
            undecided => 1
        );
    }
    if ($s eq 'running' && $t eq 'stopped') {
        my @config = $config_to->($node);
        return $result->(
            state => "VM $vmid runs on node '$node' (source) only"
                . (@config ? ", but its config is on '$target'" : ''),
            ok => !@config,
            fix => [@config, @free_new, @cancel_jobs]
        );
    }
    if ($t eq 'running' && $s eq 'stopped') {
        my @config = $config_to->($target);
        return $result->(
            state => "VM $vmid runs on node '$target' (target) only"
                . (@config ? ", but its config is on '$node'" : ''),
            ok => !@config,
            fix => \@config
        );
    }
    return $result->(
        state =>
            "VM $vmid runs on BOTH nodes '$node' and '$target': stop the copy whose guest is not the current one by hand",
        undecided => 1
    ) if $s eq 'running' && $t eq 'running';
    if ($s eq 'running' && $incoming{$t}) {
        return $result->(
            state =>
                "VM $vmid runs on node '$node' (source); an incoming copy is left $t on '$target'"
                . (
                $st
                ? ''
                : " (new volumes it got for local disks, if any, stay: see 'pvesm list' there)"
                ),
            fix => $to_source->()
        );
    }
    if ($t eq 'running') {
        # the target runs its new volumes: the source's copies go, as after a migration
        my @migrated = $st && $DISKS_COMPLETE{ $st->{phase} } ? @{ $st->{mirror_jobs} // [] } : ();
        return $result->(
            state => "VM $vmid runs on node '$target' (target); its copy on '$node' is left $s",
            fix => [
                [
                    "stop VM $vmid on '$node'"
                        . (@migrated ? " and free its migrated volumes there" : ''),
                    sub {
                        $self->move_config($target);
                        $self->stop_source();
                        $self->{mirror_jobs} = \@migrated;
                        $self->free_source_volumes() if @migrated;
                    }
                ]
            ]
        );
    }
    if ($completed && $t eq 'paused') {
        my ($complete, $why) = $self->disks_complete($st, \@jobs);
        return $result->(
            state =>
                "VM $vmid is paused on both nodes after its migration completed, but its disks on '$target' cannot be shown complete ($why): the copy on '$target' must not run",
            fix => $to_source->()
        ) if !$complete;
        my @mirrored = $st ? @{ $st->{mirror_jobs} // [] } : ();
        my @fix;
        push @fix, [
            "dismiss the ended disk mirrors on '$node'",
            sub {
                PVE::MTunnel::qmp_execute($qmp, 'job-dismiss', { id => $_ }) for @job_ids;
            }
        ] if @jobs;
        push @fix, [
            "stop the NBD server on '$target'",
            sub {
                # it may be stopped already (the driver got that far): not an error
                eval { $self->remote(['nbdstop', $vmid], timeout_ms => 30_000) };
                $self->log('warn', "stopping the NBD server on '$target': $@") if $@;
            }
        ] if @mirrored;
        push @fix, $resume_target, [
            "stop its copy on '$node'" . (@mirrored ? " and free the migrated volumes there" : ''),
            sub {
                $self->stop_source();
                # as phase 3: the mirrored disks' source volumes go once the VM runs on the target
                $self->{mirror_jobs} = \@mirrored;
                $self->free_source_volumes() if @mirrored;
            }
        ];
        return $result->(
            state =>
                "VM $vmid is paused on both nodes after its migration completed: the target was never resumed",
            fix => \@fix,
            # its new volumes are the VM's disks from now on
            left => \@left_jobs
        );
    }
    if ($completed && $t eq 'stopped') {
        return $result->(
            state =>
                "VM $vmid is paused on node '$node' (source, $s) and stopped on '$target': its state is only on '$node'",
            fix => $to_source->()
        );
    }
    if ($s eq 'stopped' && $t eq 'paused') {
        # the source's QEMU is gone, its record cannot be tied to it: a storage migration
        # whose mirrors were not finished leaves the target's disks unproven
        my $old = $seen->{old_state};
        return $result->(
            state =>
                "VM $vmid is stopped on node '$node' and paused on '$target' with a completed incoming migration, but the disk mirrors of that migration were not finished ($old->{phase}): its disks on '$target' may be incomplete, decide by hand (the disks on '$node' are intact; the VM's memory is only on '$target')",
            undecided => 1
            )
            if $old
            && @{ $old->{mirror_jobs} // [] }
            && !$DISKS_COMPLETE{ $old->{phase} };
        return $result->(
            state =>
                "VM $vmid is stopped on node '$node' and paused on '$target' with a completed incoming migration",
            fix => [$resume_target]
        );
    }
    return $result->(
        state => "VM $vmid runs on neither node ('$node': $s, '$target': $t)"
            . (
            $t eq 'inmigrate' ? "; the incoming VM on '$target' never got the complete state" : ''
            ),
        undecided => 1
    ) if $s ne 'running' && $t ne 'running';
    return $result->(state => "VM $vmid is $s on node '$node' and $t on '$target'", undecided => 1);
}

# mtunnel-migrate --check: say what is where; with $fix, apply the fix that diagnose found
# (a step that fails ends the fix; the state is looked at again either way) and, once the VM
# runs on exactly one node with nothing left, remove the migration's stale sockets of both
# nodes and its record.
sub check {
    my ($self, %opts) = @_;
    my ($vmid, $node, $target) = @$self{qw(vmid node target)};
    my $seen = $self->inspect(volumes => 1);
    my $src = $seen->{source};
    $self->log(
        'info',
        "node '$node' (source): VM $vmid $src->{state}"
            . ($src->{migration} ne 'none' ? ", migration $src->{migration}" : '')
            . (
            @{ $src->{jobs} }
            ? ", block jobs: "
                . join(', ',
                map { "$_->{device} $_->{status}" . ($_->{ready} ? ' ready' : '') }
                    @{ $src->{jobs} })
            : ''
            )
    );
    $self->log(
        'info',
        "node '$target' (target): "
            . (
            defined $seen->{target}{state}
            ? "VM $vmid $seen->{target}{state}"
            : 'cannot be reached'
            )
    );
    if (my $st = $seen->{state}) {
        $self->log('info',
            "record of the storage migration to '$target': $st->{phase}"
                . (@{ $st->{mirror_jobs} // [] } ? ", mirrors @{ $st->{mirror_jobs} }" : ''));
    }
    my $d = $self->diagnose($seen);
    $self->log('info', "state: $d->{state}");
    $self->log('info', "left behind: $_") for @{ $d->{left} };
    my $todo = !$d->{undecided} && @{ $d->{fix} } && (!$d->{ok} || @{ $d->{left} });

    if ($opts{fix} && $todo) {
        for my $step (@{ $d->{fix} }) {
            $self->log('info', "fix: $step->[0]");
            eval { $step->[1]->() };
            if (my $err = $@) {
                chomp $err;
                $self->log('err', "fix failed: $err");
                last;
            }
        }
        $seen = $self->inspect(volumes => 1);
        $d = $self->diagnose($seen);
        $self->log('info', "state: $d->{state}");
        $self->log('info', "left behind: $_") for @{ $d->{left} };
    } elsif ($todo) {
        $self->log('info',
            "to fix (run again with --fix): " . join('; ', map { $_->[0] } @{ $d->{fix} }));
    }
    # sockets left by a killed driver's ssh and by a target QEMU that is gone
    return $d
        if !$d->{ok}
        || $seen->{source}{migration} =~ /^(active|setup|device|pre-switchover|postcopy)/;
    # the VM runs on one node, no migration is under way: the migration sockets of both
    # nodes are stale (QEMU unlinks its incoming socket on accept; nbdstop leaves its own)
    my @stale = $self->stale_sockets();
    my $remote = $self->stale_target_sockets() // [];
    my $how = $opts{fix} ? 'removed' : 'left (--fix removes them)';
    $self->log('info', "stale socket files on '$node' $how: @stale") if @stale;
    $self->log('info', "stale socket files on '$target' $how: @$remote") if @$remote;
    if ($opts{fix}) {
        unlink(grep { -S $_ } @stale);
        $self->remove_target_sockets(@$remote) if @$remote;
        $self->remove_state() if !@{ $d->{left} };
    }
    return $d;
}

1;

__END__

=encoding utf8

=head1 NAME

PVE::MTunnel::Migrate - QemuMigrate.pm-style live migration driver on PVE::MTunnel

=head1 SYNOPSIS

  use PVE::MTunnel::Migrate;

  my $m = PVE::MTunnel::Migrate->new(
      vmid => 100, node => 'node1', target => 'node2',
      ssh => ['/usr/bin/ssh', '-e', 'none', '-o', 'BatchMode=yes', 'root@198.18.0.2'],
      with_local_disks => 1, bwlimit => 102400,
      log => sub { my ($level, $msg) = @_; print "$msg\n" },
  );
  eval { $m->migrate() };
  die "TASK ERROR: $@" if $@;     # "<what failed> - <where the VM is now>\n"

  # after a driver was killed: where is the VM, and settle it
  my $d = PVE::MTunnel::Migrate->new(%same_params)->check(fix => 1);

=head1 DESCRIPTION

The control flow of Proxmox VE's QemuMigrate.pm for a running VM, with the socket, process
and QMP work done by libmtunnel (L<PVE::MTunnel>). B<phase2>: C<qm start --migratedfrom> on
the target, the ssh tunnel forwarding the migration's sockets, disk mirrors into the target's
NBD exports (with local disks), the RAM migration and the wait for its end. B<phase3> (once
RAM completed): finish the mirrors, stop the target's NBD server, C<resume> on the target,
close the tunnel, stop the source, free the source's migrated volumes. B<phase2_cleanup>
(failure before completion): cancel, continue the source, cancel the mirrors, stop the target,
free its new volumes, close the tunnel.

The rule everything rests on: the VM runs on exactly one node. The target waits paused until
told to resume, so before C<resume> the source may always be continued; after completion the
source is continued only when the target is known not to run. SIGINT, SIGTERM, SIGQUIT,
SIGHUP and SIGPIPE are deferred during C<migrate> and end it at the next safe point.

Methods are called on the object C<new> returns; the ones below C<migrate> are its steps,
public so that a caller (or a test) can run or replace them one by one, as QemuMigrate.pm's
phases are. Every failure dies with a message ending in C<"\n">.

=head1 CONSTRUCTOR

=head2 new(%param)

Class method. Required: C<vmid> (1-9 digits), C<node> (this node's name), C<target> (the
target node's name), C<ssh> (the ssh argv prefix reaching the target, as PVE's C<rem_ssh>).
Optional, with their defaults:

=over

=item C<migration_type> (C<secure>) and C<migration_network> (an IPv4 CIDR)

C<secure>: RAM and NBD through the tunnel's UNIX socket forwards; C<insecure>: over TCP to
the target's address, which must lie in C<migration_network> when given.

=item C<with_local_disks> (0), C<targetstorage> (C<1>), C<source_volumes> (from C<qm config>)

Mirror the disks the target exports; C<targetstorage> is passed to the target's C<qm start>;
C<source_volumes> (drive => volid) names the source volumes freed after success.

=item C<bwlimit> (KiB/s, none), C<downtime_ms> (100), C<capabilities>, C<parameters>

QEMU's C<max-bandwidth> (16 GiB/s without a limit) and mirror speed; the initial
C<downtime-limit>; capabilities turned on (C<auto-converge>, C<xbzrle>; all others off) and
extra migration parameters.

=item C<machine>, C<force_cpu>, C<spice_ticket>

For the target's C<qm start> (C<machine> defaults to the type the source QEMU runs; the spice
ticket goes on stdin, never argv).

=item C<completion_wait> (C<events>), C<hold_ms> (250), C<poll_interval_ms> (1000)

How the end of the RAM migration is noticed: C<events>, C<poll> or C<pve> (see
C<wait_for_completion>).

=item C<stall_timeout_ms> (60000), C<mirror_timeout_ms> (none), C<mirror_poll_ms> (200)

Abort when no progress is made that long; abort when the mirrors are not ready in time; how
often mirror status is looked at.

=item C<postcopy> (C<off>), C<postcopy_recover_timeout_ms> (600000), C<postcopy_stall_ms> (10000)

C<auto>: switch to post-copy when what each pass starts with stopped shrinking (by a tenth)
over two passes, instead of doubling the downtime; C<always>: once the first pass is done.
Both QEMUs must offer C<postcopy-ram>; not with C<with_local_disks> yet. A paused post-copy
migration is recovered through new tunnels until C<postcopy_recover_timeout_ms>; one without
progress for C<postcopy_stall_ms> is paused first (a hung link never fails by itself).

=item C<pve_dir> (none)

The cluster's config tree in pmxcfs's layout (F</etc/pve> on a node). The VM's config
F<PVE_DIR/nodes/NODE/qemu-server/VMID.conf> must exist before anything starts; it moves to the
target's directory by rename once the migration completed, before the target resumes (as
upstream's phase 3), and back when the source is continued after that. Without it the driver
leaves configs alone.

=item C<ssh_options> ({}), C<tunnel_options> ({})

Library options for every ssh call (C<handshake_slots>, C<connect_retries>,
C<connect_timeout_s>, C<share>, ...) and for the tunnel only.

=item C<qm>, C<local_qm>, C<pvesm> (C<['qm']>, C<['qm']>, C<['pvesm']>), C<socket_dir> (F</run/qemu-server>), C<qmp_socket> (F<SOCKET_DIR/VMID.qmp>)

The commands run on the target and on this node, and where the VM's sockets are.

=item C<log> (prints to STDOUT), C<check_command>

C<log> gets C<($level, $line)> for each task log line; C<check_command> is the command a
verdict tells to run when the state cannot be settled automatically.

=back

Dies on a missing or invalid parameter.

=head1 METHODS

=head2 migrate()

Method: runs the whole migration (phase2, phase3 and the cleanup that fits) and returns the
object, with C<< $m->{timing} >> (C<open_to_ready>, C<migration>, C<qemu_total_ms>,
C<qemu_downtime_ms>, C<noticed>, C<resumed>, C<mirror>, C<mirror_bytes>) filled in. On failure
dies with C<"WHAT FAILED - WHERE THE VM IS NOW\n"> (see C<fail>).

=head2 prepare()

Method: the checks before anything happens on the target, as QemuMigrate.pm's C<prepare>: the
source VM runs (QMP C<query-status> says C<running>; a paused VM is refused, since the target
would run it), and the machine type for the target's C<--machine> is read from it
(C<target_machine>). C<migrate>
ends with C<"WHAT FAILED - nothing was done: ...\n"> when this fails.

=head2 phase2()

Method: start the target, open the tunnel and wait until it is ready, mirror local disks,
set capabilities and parameters, C<migrate>, and wait for completion. Dies on any failure;
the state it reached is kept in the object for the cleanup.

=head2 phase3()

Method: after the RAM migration completed: finish the mirrors, stop the target's NBD server,
C<resume> the target (through the tunnel, else C<qm resume> over ssh, else it asks whether
the VM runs there), then C<finish_source>. Dies when the target could not be resumed.

=head2 phase2_cleanup($err)

Method: the cleanup of a failure before completion: C<migrate_cancel> (a migration that
completed meanwhile is finished by phase3 instead), continue the source if paused, cancel
the mirrors, stop the target, free its new volumes, close the tunnel, remove the target's
sockets if the tunnel never got ready.

=head2 phase3_recover($err)

Method: a failure after completion: if the target runs the VM, finish on the source; if the
target cannot be reached, leave the source paused; else stop the target and continue the
source only once the target is confirmed stopped.

=head2 finish_source()

Method: the target runs the VM: close the tunnel, stop the source, free the source's migrated
volumes. Failures only warn.

=head2 fail($err)

Method: dies with C<"$err - WHERE THE VM IS NOW\n">, asking both nodes (C<inspect>,
C<diagnose>); the second part is kept in C<< $m->{verdict} >>.

=head2 check_interrupt()

Method: at a safe point: dies C<"interrupted by signal SIGNAME\n"> if a deferred signal
arrived.

=head2 start_target()

Method: the target's C<qm start VMID --skiplock --migratedfrom NODE --migration_type TYPE
--stateuri unix|tcp --machine M ...> with C<nbd_protocol_version: 1> (and the spice ticket) on
stdin; returns C<PVE::MTunnel::migrate_listen_parse>'s hash of what it printed.

=head2 check_listen($listen)

Method: dies unless the target's addresses fit the migration type: UNIX sockets for secure,
TCP addresses (inside C<migration_network> when given) for insecure.

=head2 storage_migration(\@nbd)

Method: one C<drive-mirror> per NBD export the target printed (each must name a drive of the
running VM), then C<wait_mirror_ready>.

=head2 wait_mirror_ready()

Method: logs each mirror's progress once a second until every job is ready and returns the
status; dies on the mirror timeout, on C<stall_timeout_ms> without progress, or on a
deferred signal.

=head2 wait_for_completion($downtime_ms)

Method: waits until QEMU reports the migration final and returns the final C<query-migrate>
answer when it completed; dies C<"aborting phase 2 - STATUS\n"> when it failed or was
cancelled, on a stall, after 5 failed queries in a row, or on a deferred signal. Logs progress
and doubles the downtime limit when the migration does not converge, as QemuMigrate.pm, or,
with C<postcopy>, switches to post-copy; in post-copy it resumes the target, recovers a
paused or hung migration, and neither a signal nor failed queries end it.
C<completion_wait> C<events> waits on QEMU's C<MIGRATION> event (C<qmp_wait_migration>,
holding the monitor at most C<hold_ms>); C<poll> and C<pve> query every
C<poll_interval_ms>, 100 ms near the end.

=head2 postcopy_reason(\@pass_remaining)

Method: why to switch to post-copy now (a sentence for the log), or C<undef>. The argument
holds the remaining bytes at the start of each pass from the second on.

=head2 check_postcopy_source(), setup_postcopy_target()

Methods: the source's QEMU must offer C<postcopy-ram> (dies naming it, before anything
starts); post-copy on the target's QEMU through C<qm monitor> (C<postcopy-preempt> where both
offer it; returns whether it is on).

=head2 switch_to_postcopy($why), resume_target_in_postcopy()

Methods: C<migrate-start-postcopy> (from then on nothing is cancelled or continued on the
source); the target resumed once the switch's devices went over (C<postcopy-bytes>), through
the tunnel, else C<qm resume> over ssh.

=head2 postcopy_recover($why, pause =E<gt> 0|1), postcopy_recover_once($attempt), postcopy_finish()

Methods: a paused (or, with C<pause>, hung) post-copy migration recovered through a new tunnel
to a new socket (F<VMID_recoverN.migrate>): the target paused and listening
(C<migrate_recover> through C<qm monitor>), the source resumed (C<qmp_migrate_resume>);
retried until C<postcopy_recover_timeout_ms>. Dies at once, saying the VM is lost, when the
target's QEMU is gone. C<postcopy_finish> is C<--check --fix>'s: the migration waited for and
recovered as needed, then the target resumed and the source stopped.

=head2 target_monitor(@hmp_commands), target_migration_status()

Methods: HMP commands through C<qm monitor VMID> on the target (its output); the target's
migration status from C<info migrate> (C<undef> when its QEMU is gone).

=head2 abandon_tunnel(), remove_recovery_sockets(), wait_source_status($seconds, @statuses)

Methods: a broken tunnel closed without waiting for its C<quit>; every stale migration socket
of the VM removed on both nodes after a recovered migration; the source's migration status
once it is one of C<@statuses> (or final, or the time is up).

=head2 cont_source()

Method: continues the source VM if the migration left it paused (C<postmigrate>).

=head2 cancel_mirrors()

Method: cancels the disk mirrors (unless they were finished); when NBD writes stuck in a
stopped ssh hold the cancel, closes the tunnel first and tries again.

=head2 stop_source()

Method: as C<vm_stop> on the source: QMP C<quit>, wait up to 10 s for the process to be gone,
then SIGKILL.

=head2 free_source_volumes(), free_target_volumes()

Methods: C<pvesm free> of the migrated disks' source volumes (after success; failures warn),
and of the target's new volumes (after a failure, only once the target VM is confirmed
stopped; else the log names the command to run there). New are the volumes of the VM that
the target lists now and did not list before its start (C<new_target_volumes>), whether the
start named them or not; a volume that existed before is never freed. The log names each
volume freed (C<freed volume 'VOLID' on node 'NODE' (allocated for this migration)>).

=head2 free_new_target_volumes(\%before, \@named)

Method: frees the volumes C<new_target_volumes> finds, logging each; the caller made sure
the target VM is stopped.

=head2 new_target_volumes(\%before, \@named)

Method: the target's volumes of the VM that are new since C<%before> (storage => [volids],
the listing taken before the start): listed now and not before. Without a listing before,
the volumes the target named (C<@named>); when listing now fails, those of them not listed
before. Returns an array ref.

=head2 target_storages()

Method: the storages the target allocates the local disks' new volumes on: the source's
disks' storages mapped through C<targetstorage> as upstream's C<map_id> does (C<1>: the same
storage; C<ID>: all to ID; C<SRC:DST,...>: per storage, a plain ID being the default).

=head2 list_target_volumes(@storages)

Method: the VM's volumes on the target's storages, from C<pvesm list STORAGE --vmid VMID>
over ssh: C<{ storage => [volids] }>; C<undef> when a listing fails (logged as a warning).

=head2 wait_target_start_gone()

Method: after a target start whose answer was lost (its ssh killed, timed out): waits (30 s
at most) until no C<qm start VMID --skiplock --migratedfrom NODE> (nor PVE's C<qmstart>
worker of the VM) runs on the target any more, so that what it leaves is stopped and freed
after it, not raced with (C<pgrep -f> there).

=head2 state_path(), write_state(%set), read_state(), remove_state()

Methods: the storage migration's record on the source node, F<SOCKET_DIR/VMID.mtunnel>
(JSON: C<vmid>, C<node>, C<target>, C<source_pid>, C<started>, C<phase>,
C<target_volumes_before>, C<target_volumes>, C<mirror_jobs>), which a C<--check> after the
driver's death reads. C<phase> is one of C<starting> (before the target's C<qm start>),
C<started>, C<mirroring>, C<migrating>, C<finishing-mirrors> (C<block-job-cancel> of the
ready mirrors after RAM completed), C<mirrors-finished>, C<mirrors-failed>, C<resumed>.
C<write_state> merges C<%set> into it and writes it through a temp file of its own renamed
over the path (a failure only warns); C<read_state> returns it (C<undef>: none, invalid, or
another VM's); C<remove_state> removes it (a plain file only). Written only with
C<with_local_disks>; removed after success, and after a failure once the VM runs on one node
with nothing left behind.

=head2 disks_complete($record, \@jobs)

Method: whether the target's disks are shown complete after RAM migration completed:
C<(1)>, or C<(0, WHY)>. Complete: no disk was mirrored; or the record says the mirrors were
finished (C<mirrors-finished>, C<resumed>); or it says they were being finished
(C<finishing-mirrors>) and every mirror job is there and ended without an error (QEMU syncs
and flushes the target before such a job ends). A mirror that is still ready proves nothing:
the driver's death took its NBD connection. Without a record, a disk mirror is never shown
complete.

=head2 close_tunnel_quickly()

Method: closes the tunnel with short deadlines (5 s for C<quit>, 2 s for ssh to exit).

=head2 config_path($node), config_node(), move_config($node)

Methods (with C<pve_dir>): the path of the VM's config on C<$node> in pmxcfs's layout; the
node that holds it (the source unless it moved to the target); moving it to C<$node> by one
rename, as upstream's C<move_config_to_node> (dies naming the node when the rename fails; a
no-op where it is already, and without C<pve_dir>).

=head2 stop_target()

Method: C<qm stop VMID --skiplock> on the target, with C<--migratedfrom SOURCE> while the
config is on the source (upstream's C<vm_stop> asserts that), without it once the config moved
there. Dies when the stop fails.

=head2 remove_target_sockets(@sockets)

Method: removes the given paths (default: the target's listening sockets) on the target if
they are sockets; anything else is logged and kept.

=head2 migration_sockets(), stale_sockets(), stale_target_sockets()

Methods: this VM's migration socket paths (F<VMID.migrate>, F<VMID_nbd.migrate>); those of
them that are sockets on this node; and on the target (array ref, C<undef> when the target
cannot be reached).

=head2 source_pid()

Method: the source QEMU's pid from F<SOCKET_DIR/VMID.pid>, or C<undef>.

=head2 source_volumes()

Method: drive => volid of the source VM's disks, from C<qm config> on this node (or the
C<source_volumes> parameter).

=head2 current_machine()

Method: the machine type the source QEMU runs, as upstream's C<current_from_query_machines>
writes it: the C<query-machines> entry marked C<is-current> (Proxmox's QEMU), with C<+pveN>
when that entry has a C<pve-version> (C<pc-i440fx-9.2+pve1>); a stock QEMU marks none, then
the QOM type of F</machine> names it.

=head2 target_machine()

Method: the target's C<qm start --machine> as upstream's C<qemu_machine_pxe>:
C<current_machine>, with C<.pxe> appended when the config's machine type ends in C<.pxe>.
C<prepare> uses it unless C<machine> was given.

=head2 source_config()

Method: the source VM's config as C<qm config> on this node prints it (key => value; C<{}>
when it cannot be read), read once.

=head2 remote(\@qm_args, %opts), remote_command(\@argv, %opts)

Methods: run C<qm ARGS> (resp. any command) on the target over ssh with
C<PVE::MTunnel::ssh_run> (default timeout 120 s, plus C<ssh_options>); return its
C<{ exit_code, stdout, stderr }>; die when it fails.

=head2 target_state()

Method: the VM's state on the target as C<qm status --verbose> tells it (C<running>,
C<paused>, C<inmigrate>, C<prelaunch>, C<postmigrate>, ... or C<stopped>); C<undef> when the
target cannot be reached.

=head2 inspect(volumes => 0|1)

Method: both nodes' view: C<< { source => { state, migration, jobs, pid }, target => { state
}, state => RECORD } >>; C<state> is the storage migration's record (C<read_state>) when it
is about this target and the source QEMU that runs now (its pid). With C<volumes> and a
reachable target that does not run the VM: C<< target => { new_volumes => [...] } >>, its
volumes allocated for the migration (C<new_target_volumes>).

=head2 diagnose($seen)

Method: what C<inspect>'s view means: C<< { state => SENTENCE, ok => 1 } >> when the VM runs
on exactly one node, C<< { state, fix => [[DESCRIPTION, CODE], ...] } >> when a safe fix
exists, C<< { state, undecided => 1 } >> when none does; C<< left => [...] >> names what the
migration left behind (the source's block jobs, the target's new volumes unless the VM is
to run there), which the fix also removes. After RAM migration completed with local disks,
the fix finishes on the target only when C<disks_complete> says so; otherwise it stops the
target (and confirms it stopped), frees its new volumes, cancels and dismisses the source's
block jobs and continues the source.

=head2 check(fix => 0|1)

Method: C<mtunnel-migrate --check>: logs both nodes' state, the record, the diagnosis and
what was left behind; with C<fix>, applies the fix (a step that fails ends it and is logged)
and, once the VM runs on one node with nothing left, removes the migration's stale sockets
of both nodes and its record. Returns the (final) diagnosis.

=head2 log($level, $msg)

Method: one task log line per line of C<$msg>, prefixed with the local time (and C<ERROR:>
for level C<err>), passed to the C<log> callback.

=head1 FUNCTIONS

=head2 render_bytes($n), render_duration($seconds)

As PVE::Format: C<"25.6 MiB">, C<"1m 05s">.

=head2 parse_cidr($cidr), ip_in_network($ip, $cidr)

C<(network, mask)> as integers of an IPv4 CIDR (empty list if it is none); whether an IPv4
address lies in it.

=head2 process_gone($pid)

True when the process no longer exists or is a zombie.

=head1 SEE ALSO

L<mtunnel-migrate(1)>, L<PVE::MTunnel>, L<PVE::MTunnel::Tunnel>

=cut
