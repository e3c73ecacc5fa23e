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
# unreachable) the source stays paused and the verdict says what to run where. Post-copy
# (PVE::MTunnel::Postcopy) tightens it from the moment its switch is sent: see its allows().
# INT, TERM, QUIT, HUP and PIPE are deferred while a migration runs and become "interrupted by
# signal" at the next safe point (as PVE's AbstractMigrate); after completion or the switch to
# post-copy the migration is finished instead, and signals during cleanup only get noted.
# Where is the VM after a failure, and what settles it: PVE::MTunnel::Check.

use strict;
use warnings;

use POSIX qw(strftime);
use Errno qw(ESRCH);
use Fcntl qw(O_RDONLY O_WRONLY O_CREAT O_EXCL O_NOFOLLOW);
use JSON::PP ();
use Socket qw(inet_aton);
use Time::HiRes qw(usleep time);

use PVE::MTunnel;
use PVE::MTunnel::Check;
use PVE::MTunnel::Postcopy;

# Statuses during which QEMU is still working on the migration. Anything not final counts as
# running, so a status added by a newer QEMU does not abort a migration.
my %FINAL = map { $_ => 1 } qw(completed failed cancelled);

# QEMU's largest downtime-limit (2000 s); PVE never doubles past it.
my $MAX_DOWNTIME_MS = 2000 * 1000;

my $JSON = JSON::PP->new->canonical;

# How far a migration got, as its record says (see write_state).
my %PHASES = map { $_ => 1 }
    qw(starting started mirroring migrating finishing-mirrors mirrors-finished mirrors-failed resumed
    postcopy);

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

    die
        "invalid postcopy_bwlimit '$param{postcopy_bwlimit}' (KiB/s, a whole number; 0 = no limit)\n"
        if defined $param{postcopy_bwlimit} && $param{postcopy_bwlimit} !~ /^[0-9]{1,12}$/;
    for my $k (qw(postcopy_recover_timeout_ms postcopy_stall_ms qmp_timeout_ms)) {
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
        # KiB/s after the switch (max-postcopy-bandwidth); 0 = no limit: the VM's memory is
        # split between the nodes until the last page arrived, so the window is kept short,
        # as libvirt's default
        postcopy_bwlimit => 0,
        # each QMP call of post-copy's (the monitor may be busy for a while)
        qmp_timeout_ms => 10_000,
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
        # post-copy's rule: after the switch only what its run did may be undone
        return $self->fail($err) if $self->postcopy_sent();
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
    $self->remove_state();
    my $pc = $self->{pc};
    $self->remove_recovery_sockets() if $pc && $pc->{attempts};
    $self->log('info', "post-copy migration recovered $pc->{recovered} time(s)")
        if $pc && $pc->{recovered};
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
    $self->postcopy->check_source() if $self->{postcopy} ne 'off';
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

# At a safe point: a deferred signal ends the phase. Not once the switch to post-copy was
# sent: the VM's memory may be split between the nodes, and only finishing the migration puts
# it back together.
sub check_interrupt {
    my ($self) = @_;
    return if !$self->{signal};
    die "interrupted by signal SIG$self->{signal}\n" if !$self->postcopy_sent();
    $self->log('info',
        "received signal SIG$self->{signal} during post-copy: the VM's memory is split between "
            . "the nodes, the migration is finished, not cancelled")
        if !$self->{signal_noted}++;
}

# The post-copy part of this migration (PVE::MTunnel::Postcopy), made on first use.
sub postcopy {
    my ($self) = @_;
    return $self->{pc} //= PVE::MTunnel::Postcopy->new($self);
}

# Whether migrate-start-postcopy was sent (answered or not): post-copy's rule holds from then.
sub postcopy_sent {
    my ($self) = @_;
    return $self->{pc} && $self->{pc}{sent} ? 1 : 0;
}

# What post-copy's rule sees: the migration's record (this driver's, or the one --check read)
# together with the live post-copy state; either one saying so is enough.
sub rule_state {
    my ($self) = @_;
    my ($st, $pc) = ($self->{state} // {}, $self->{pc} // {});
    return {
        postcopy_sent => $st->{postcopy_sent} || $pc->{sent} ? 1 : 0,
        target_resume_sent => $st->{target_resume_sent} || $pc->{target_ran} ? 1 : 0,
    };
}

# Whether post-copy's rule lets $action ('stop target', 'cancel', 'continue source', 'stop
# source') be done now. Says why not when it does not.
sub undo_allowed {
    my ($self, $action) = @_;
    my ($ok, $why) = PVE::MTunnel::Postcopy::allows(
        $self->rule_state(), $action,
        target_gone => $self->{target_gone},
        completed => $self->{completed}
    );
    $self->log('err', "not done: $action for VM $self->{vmid} - $why") if !$ok;
    return $ok;
}

# A resume is about to be sent to the target: from now on it may run the guest (the record
# says so first; returns whether it could be written).
sub note_resume {
    my ($self) = @_;
    $self->{pc}{target_ran} = 1 if $self->{pc};
    return $self->write_state(target_resume_sent => 1);
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
# ({} when it cannot be read). With pve_dir the file itself, wherever it is now (a --fix may
# find it moved to the target already, where this node's `qm config` cannot read it).
sub source_config {
    my ($self) = @_;
    return $self->{source_config} if $self->{source_config};
    my %conf;
    # a host without qm: no config (and no "Can't exec" warning)
    no warnings 'exec';
    my $fh;
    my $ok =
        defined $self->{pve_dir}
        ? open($fh, '<', $self->config_path($self->config_node()))
        : open($fh, '-|', @{ $self->{local_qm} }, 'config', $self->{vmid});
    if ($ok) {
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
    my %record;
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
        $record{target_volumes_before} = $before;
    }
    $self->write_state(phase => 'starting', %record);
    $self->check_interrupt();
    my $listen = eval { $self->start_target() };
    if (my $err = $@) {
        # its answer may be lost (ssh killed or timed out) while it goes on there
        $self->{start_failed} = 1 if $self->{target_started};
        die $err;
    }
    # new volumes on the target: freed by the cleanup unless the migration completes
    $self->{target_volumes} = [map { ($_->{volume} =~ /^([^,]+)/)[0] } @{ $listen->{nbd} }];
    # what its qm mtunnel takes beyond resume and quit (a patched target announces it)
    $self->{target_commands} = $listen->{commands} // [];
    $self->write_state(
        phase => 'started',
        target_volumes => $self->{target_volumes},
        target_commands => $self->{target_commands}
    );
    # the target's listening sockets: the tunnel's close removes them, else the cleanup
    $self->{target_sockets} =
        [grep { defined } $listen->{socket}, map { $_->{socket} } @{ $listen->{nbd} }];
    $self->check_interrupt();
    $self->check_listen($listen);
    my $postcopy = $self->{postcopy} ne 'off';
    $self->postcopy->check_target($self->{target_commands}) if $postcopy;
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
    $self->{tunnel_opened} = 1;
    my $t0 = time();
    $self->open_tunnel(\@forwards, timeout_ms => 70_000);
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
    if ($postcopy) {
        # both sides need it; preempt only where both take it
        my $preempt = $self->postcopy->setup_target();
        # throttling the guest is what post-copy spares it
        $caps->{'auto-converge'} = 0;
        $caps->{'postcopy-preempt'} = $preempt;
        # after the switch: 0 = no limit, the split ends soonest (as libvirt's default)
        $params->{'max-postcopy-bandwidth'} = int($self->{postcopy_bwlimit} * 1024);
    }
    my $applied = PVE::MTunnel::qmp_migrate_setup($self->{qmp_socket},
        { capabilities => $caps, parameters => $params, postcopy => $postcopy ? 1 : 0 });
    my $set = $applied->{parameters};
    if ($postcopy) {
        $self->log('info',
            "post-copy: $self->{postcopy}"
                . ($applied->{capabilities}{'postcopy-preempt'} ? ' (with postcopy-preempt)' : ''));
        my $pcbw = $set->{'max-postcopy-bandwidth'} // 0;
        $self->log('info',
            "post-copy speed limit: " . ($pcbw ? render_bytes($pcbw) . "/s" : 'none'));
    }
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
    $self->write_state(phase => 'migrating');
    PVE::MTunnel::qmp_migrate($self->{qmp_socket}, $self->{ruri}, { setup => 0 });
    $self->wait_for_completion($set->{'downtime-limit'});
}

# A ready tunnel to the target's `qm mtunnel` forwarding @$forwards (none: commands only); the
# driver's tunnel from now on (the caller closed the one before).
sub open_tunnel {
    my ($self, $forwards, %opts) = @_;
    $self->{tunnel} = $self->tunnel_to_target($forwards, %opts);
    return $self->{tunnel};
}

sub tunnel_to_target {
    my ($self, $forwards, %opts) = @_;
    my $tunnel = PVE::MTunnel->open(
        ssh => $self->{ssh},
        forwards => $forwards,
        command => [@{ $self->{qm} }, 'mtunnel'],
        socket_dir => $self->{socket_dir},
        log => sub { my ($level, $msg) = @_; $self->log($level, $msg) if $level ne 'debug' },
        %{ $self->{ssh_options} },
        %{ $self->{tunnel_options} },
    );
    $tunnel->wait_ready(timeout_ms => $opts{timeout_ms} // 70_000);
    return $tunnel;
}

# Whether the target's `qm mtunnel` announced $command (its `qm start`'s `mtunnel commands:`).
sub target_offers {
    my ($self, $command) = @_;
    return scalar grep { $_ eq $command } @{ $self->{target_commands} // [] };
}

# One command to the target's `qm mtunnel` that returns data (its post-copy commands, patch
# 0009): through the driver's tunnel, or (fresh => 1, or none open) a tunnel of its own for
# it. Returns the answer decoded ('OK' for none). Dies with the tunnel's error.
sub target_request {
    my ($self, $line, %opts) = @_;
    my $own;
    my $tunnel = $opts{fresh} ? undef : $self->{tunnel};
    $own = $tunnel = $self->tunnel_to_target([], timeout_ms => 30_000) if !$tunnel;
    my $reply = eval { $tunnel->command($line, timeout_ms => $opts{timeout_ms} // 30_000) };
    my $err = $@;
    if ($own) {
        eval { $own->close(quit_timeout_ms => 2000, exit_timeout_ms => 2000) };
    }
    die $err if $err;
    return $reply eq 'OK' ? 'OK' : $JSON->decode($reply);
}

# Mirror each exported drive into its NBD export and wait until every job is ready; the jobs
# stay ready (guest writes keep being mirrored) while RAM migrates. The library mirrors as
# BlockJob.pm does for what the VM has attached: drive-mirror on a -drive BlockBackend,
# blockdev-mirror below a -blockdev disk's top node (machine versions >= 10.0).
sub storage_migration {
    my ($self, $nbd) = @_;
    my $vmid = $self->{vmid};
    $self->log('info', "starting storage migration");
    # the disks come from the running QEMU: every export must name one of its drives, a
    # BlockBackend drive-KEY or, with -blockdev, a device whose top node is drive-KEY (its qdev
    # id says less: virtio disks are /machine/peripheral/virtio0/virtio-backend)
    my $blocks = PVE::MTunnel::qmp_execute($self->{qmp_socket}, 'query-block');
    my %device;
    for my $b (grep { $_->{inserted} } @$blocks) {
        my $name = $b->{device} // '';
        $name = $b->{inserted}{'node-name'} // '' if $name eq '';
        $device{$name} = $b if $name ne '';
    }
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
        my $job = eval {
            PVE::MTunnel::qmp_mirror_start($self->{qmp_socket}, $device, $export->{uri}, \%opts);
        };
        if (my $err = $@) {
            # not QEMU's refusal (a timeout, a lost connection): the job may have started
            # anyway, under the id the library gives it (drive-mirror: the device; blockdev:
            # mirror-KEY); the abort path must not leave it running
            push @{ $self->{mirror_jobs} }, $device, "mirror-$export->{drive}"
                if !grep { $PVE::MTunnel::last_error_code == $PVE::MTunnel::ERROR_CODE{$_} }
                qw(qmp invalid_argument);
            die $err;
        }
        push @{ $self->{mirror_jobs} }, $job;
        $self->write_state(phase => 'mirroring', mirror_jobs => $self->{mirror_jobs});
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
# notice the end only at their next look: the guest stays paused meanwhile. With post-copy
# the looks also wake when a new pass begins, where the switch is decided; after the switch
# PVE::MTunnel::Postcopy's run takes over.
sub wait_for_completion {
    my ($self, $downtime) = @_;
    my $mode = $self->{completion_wait};
    my $pc = $self->{postcopy} ne 'off' ? $self->postcopy : undef;
    my $usleep = $self->{poll_interval_ms} * 1000;
    my ($lasttrans, $lastrem, $downtimecounter, $errors, $i, $laststatus) =
        (-1, undef, 0, 0, 0, '');
    my $start = time();
    my ($last_progress, $last_look) = ($start, 0);
    while (1) {
        my $stat;
        if ($mode eq 'events') {
            $stat = eval {
                PVE::MTunnel::qmp_wait_migration(
                    $self->{qmp_socket},
                    hold_ms => $self->{hold_ms},
                    ($pc ? (pass => 1) : ())
                );
            };
        } else {
            usleep($usleep);
            $stat = eval { PVE::MTunnel::qmp_query_migrate($self->{qmp_socket}) };
        }
        if (my $err = $@) {
            $self->log('info', "query migrate failed: $err");
            die "too many query migrate failures - aborting\n" if ++$errors > 5;
            usleep($self->{poll_interval_ms} * 1000) if $mode eq 'events';
            next;
        }
        $errors = 0;
        my $status = $stat->{status} // 'none';
        my $ram = $stat->{ram} // {};
        return $self->completed($stat, $start) if $status eq 'completed';
        if ($FINAL{$status}) {
            $self->{timing}{noticed} = time();
            my $message = $stat->{'error-desc'} ? "$status - $stat->{'error-desc'}" : $status;
            $self->log('info', "migration status error: $message");
            die "aborting phase 2 - $message\n";
        }
        if ($pc && $status eq 'active') {
            if (defined(my $why = $pc->decide($stat))) {
                $pc->switch($why);
                return $pc->run($start);
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
        # as upstream, also under 'auto' until it switches
        if ($downtimecounter > 5 && $downtime < $MAX_DOWNTIME_MS) {
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

# The RAM migration completed ($stat: query-migrate's answer; $start: when the wait began):
# noted with upstream's lines; returns $stat.
sub completed {
    my ($self, $stat, $start) = @_;
    my $ram = $stat->{ram} // {};
    $self->{timing}{noticed} = time();
    $self->{timing}{qemu_downtime_ms} = $stat->{downtime};
    $self->{completed} = 1;
    $self->{timing}{migration} = time() - $start;
    $self->{timing}{qemu_total_ms} = $stat->{'total-time'};
    $self->{completed_stat} = $stat;
    $self->log(
        'info',
        sprintf(
            "average migration speed: %s/s - downtime %s ms",
            render_bytes(($ram->{total} // 0) / ((time() - $start) || 1)),
            $stat->{downtime} // 0
        )
    );
    $self->log('info',
        "migration completed, transferred " . render_bytes($ram->{transferred}) . " VM-state")
        if $ram->{transferred};
    $self->log('info', "migration status: completed");
    return $stat;
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

# Once RAM migration completed: the complete state is on both nodes, paused. Forward only.
sub phase3 {
    my ($self) = @_;
    my $vmid = $self->{vmid};
    if (my $jobs = $self->{mirror_jobs}) {
        # As upstream: block-job-cancel on a ready mirror syncs the target, then ends the job
        # without switching the source over to it; the source lets go of the NBD connection.
        $self->log('info', "$_: Completing block job...") for @$jobs;
        # a job that ends without error from here on synced the target with the paused source
        $self->write_state(phase => 'finishing-mirrors');
        my $finished = eval {
            PVE::MTunnel::qmp_mirror_finish(
                $self->{qmp_socket}, $jobs,
                mode => 'cancel',
                timeout_ms => 600_000
            );
        };
        $self->warn_detach_errors($finished);
        if (my $err = $@) {
            # the target's disks may lack the last writes: it must not run
            $self->{target_disks_incomplete} = 1;
            $self->write_state(phase => 'mirrors-failed');
            die "Failed to complete storage migration: $err";
        }
        $self->write_state(phase => 'mirrors-finished');
        $self->log('info', "$_: Completed successfully.") for @$jobs;
        $self->log('info', "$_: mirror-job finished") for @$jobs;
        $self->{mirror_done} = 1;
        # upstream: the target's NBD server must stop before it resumes
        $self->log('info', "stopping NBD storage migration server on target.");
        $self->stop_target_nbd();
    }
    # As upstream: the VM belongs to the target from here on, then it may run there.
    $self->move_config($self->{target});
    # From here on the target may run the VM (after post-copy it runs already: a no-op).
    $self->note_resume();
    eval {
        die "no tunnel\n" if !$self->{tunnel};
        $self->{tunnel}->command("resume $vmid", timeout_ms => 30_000);
    };
    $self->{timing}{resumed} //= time();
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
    $self->write_state(phase => 'resumed');
    $self->finish_source();
}

# The target's NBD server, stopped while the guest is paused on both nodes: through the open
# tunnel where the target's qm announced nbdstop (patch 0005), which saves a new ssh
# connection and qm process, else with `qm nbdstop` over ssh, also when the tunnel does not
# know the command, took too long or is gone. A failure never fails the migration, as
# upstream's `qm nbdstop` only warns: the mirrors are finished, the target's disks complete.
sub stop_target_nbd {
    my ($self) = @_;
    my $vmid = $self->{vmid};
    if ($self->{tunnel} && $self->target_offers('nbdstop')) {
        eval { $self->{tunnel}->command("nbdstop $vmid", timeout_ms => 30_000) };
        my $err = $@ or return;
        chomp $err;
        if ($PVE::MTunnel::last_error_code != $PVE::MTunnel::ERROR_CODE{remote}) {
            # no answer in time, or none at all: a late one would be read as resume's
            $self->log('warn', "nbdstop through tunnel failed: $err - using 'qm nbdstop' over ssh");
            $self->close_tunnel_quickly(broken => 1);
        } elsif ($err =~ /^tunnel replied 'ERR: unknown command/) {
            $self->log('info', "tunnel does not know nbdstop, using 'qm nbdstop'");
        } else {
            # as `qm nbdstop`, which warns and exits 0
            $self->log('warn', "stopping NBD server on target failed: $err");
            return;
        }
    }
    eval { $self->remote(['nbdstop', $vmid], timeout_ms => 30_000) };
    $self->log('err', "stopping NBD server on target failed: $@") if $@;
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
        $self->{target_gone} = 1;
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
    if ($self->{migration_started} && $self->undo_allowed('cancel')) {
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
                    . "run 'qm stop $vmid --skiplock --migratedfrom $self->{node}' there once it is reachable"
            );
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

# After the switch to post-copy, before the target ran (the rule allows it then): the target's
# QEMU is stopped and confirmed gone, then the source continued; otherwise it stays paused.
sub undo_to_source {
    my ($self) = @_;
    my ($vmid, $node, $target) = @$self{qw(vmid node target)};
    eval { $self->stop_target() };
    $self->log('err', "stopping target VM failed: $@") if $@;
    my $state = $self->target_state();
    for (1 .. 15) {
        last if ($state // '') eq 'stopped';
        usleep(1_000_000);
        $state = $self->target_state();
    }
    if (($state // '') ne 'stopped') {
        $self->log('err',
                  "VM $vmid on node '$target' could not be confirmed stopped ("
                . ($state // 'unreachable')
                . "): it stays paused on node '$node'");
        return;
    }
    $self->{target_gone} = $self->{target_stopped} = 1;
    $self->cont_source();
}

# Stops the incoming VM on the target: with `--migratedfrom` while the config is on the
# source (upstream's vm_stop asserts it is there), as a plain stop once it moved there. Only
# where post-copy's rule allows it.
sub stop_target {
    my ($self) = @_;
    my ($vmid, $node, $target) = @$self{qw(vmid node target)};
    die "the rule of post-copy forbids it\n" if !$self->undo_allowed('stop target');
    my @how = $self->config_node() eq $target ? () : ('--migratedfrom', $node);
    # taken before: the stop removes the pid file while QEMU may still exit
    my $pid = $self->target_qemu_pid();
    $self->remote(['stop', $vmid, '--skiplock', @how]);
    die "the QEMU of VM $vmid (pid $pid) on node '$target' is still there 15 s after 'qm stop'\n"
        if $pid && !$self->wait_target_pid_gone($pid, 15);
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

# Continue the source if the migration left it paused (postmigrate; finish-migrate or paused
# after a switch to post-copy that failed before the target ran), where post-copy's rule
# allows it.
sub cont_source {
    my ($self) = @_;
    my $status = eval { PVE::MTunnel::qmp_execute($self->{qmp_socket}, 'query-status')->{status} };
    $self->log('err', "query-status error: $@") if $@;
    return if ($status // '') !~ /^(?:postmigrate|finish-migrate|paused)$/;
    return if !$self->undo_allowed('continue source');
    eval { PVE::MTunnel::qmp_execute($self->{qmp_socket}, 'cont') };
    $self->log('err', "resuming VM failed: $@") if $@;
}

sub cancel_mirrors {
    my ($self) = @_;
    my $jobs = $self->{mirror_jobs};
    return if !$jobs || $self->{mirror_done};
    $self->log('info', "$_: Cancelling block job") for @$jobs;
    my $cancelled =
        eval { PVE::MTunnel::qmp_mirror_cancel($self->{qmp_socket}, $jobs, timeout_ms => 10_000) };
    if (!$@) {
        $self->warn_detach_errors($cancelled);
        return;
    }
    # NBD writes stuck in a stopped ssh hold the cancel: closing the tunnel breaks them
    $self->log('info', "block jobs still running: closing the tunnel first");
    $self->close_tunnel_quickly();
    $cancelled =
        eval { PVE::MTunnel::qmp_mirror_cancel($self->{qmp_socket}, $jobs, timeout_ms => 60_000) };
    $self->log('err', "cancelling block jobs failed: $@") if $@;
    $self->warn_detach_errors($cancelled);
}

# A blockdev-mirror's NBD target node that the library could not detach from the source once
# its job was gone (the data is where it belongs; the node is left): a warning, as upstream's
# qemu_handle_concluded_blockjob gives.
sub warn_detach_errors {
    my ($self, $result) = @_;
    return if ref $result ne 'HASH';
    $self->log('warn', "unable to delete blockdev node - $_")
        for @{ $result->{detach_errors} // [] };
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

# The tunnel is broken or idle by now: do not wait long for its 'quit'. broken => 1: a tunnel
# known broken or hung (a stopped ssh never answers): shorter waits, and its failures are
# expected (info, not an error).
sub close_tunnel_quickly {
    my ($self, %opts) = @_;
    my $tunnel = delete $self->{tunnel} or return;
    my $broken = $opts{broken};
    eval {
        $tunnel->close(
            quit_timeout_ms => $broken ? 500 : 5000,
            exit_timeout_ms => $broken ? 500 : 2000
        );
    };
    $self->log($broken ? 'info' : 'err',
        ($broken ? 'closing the broken tunnel' : 'closing tunnel failed') . ": $@")
        if $@;
}

# As upstream's phase3_cleanup: the migrated disks' source volumes go once the VM runs on
# the target (a failure only warns: the migration itself succeeded).
sub free_source_volumes {
    my ($self) = @_;
    my $volumes = $self->source_volumes();
    for my $job (@{ $self->{mirror_jobs} }) {
        # the library's job ids: the drive (drive-mirror) or mirror-KEY (blockdev-mirror)
        my ($drive) = $job =~ /^(?:drive|mirror)-(.+)$/ or next;
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

# As vm_stop on the source: QMP quit, then wait until the process is gone. Only where
# post-copy's rule allows it (after a switch: once every page reached the target).
sub stop_source {
    my ($self) = @_;
    my $vmid = $self->{vmid};
    die "the rule of post-copy forbids it\n" if !$self->undo_allowed('stop source');
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

# Every migration keeps a record on the source node, next to the VM's pid file and monitor, of
# what a `--check` after the driver's death cannot ask QEMU: the driver (pid and start time:
# --fix refuses while it runs), the target, the source QEMU migrated (its pid), what the
# target's qm mtunnel takes, the target's volumes of the VM before its start, the new volumes
# the target named, the mirror jobs and how far they got (phase: starting, started,
# mirroring, migrating, finishing-mirrors, mirrors-finished, mirrors-failed, postcopy,
# resumed), and post-copy's facts (postcopy_sent, target_resume_sent, recover_path: written
# before they happen). It is removed once the VM runs on one node and nothing is left.
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
    # the process that writes it drives the migration now (a --fix takes it over)
    $st->{driver} = [$$, PVE::MTunnel::Check::process_start($$)]
        if !$st->{driver} || $st->{driver}[0] != $$;
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

# The target's run state (running, paused, inmigrate, prelaunch, postmigrate, … or stopped;
# 'present' when only its QEMU's presence can be told); undef when it cannot be told.
sub target_state {
    my ($self) = @_;
    return $self->target_status()->{state};
}

# The target's {state => as target_state, migration => its incoming migration's status where
# its qm mtunnel tells it}. Asked through its `qm mtunnel` (postcopy-status) where announced:
# that needs no config. Else `qm status --verbose`, which loads the config from the target's
# own node: while it is still on the source (a migration that did not complete) only whether
# the VM's QEMU runs there can be told.
sub target_status {
    my ($self) = @_;
    my $vmid = $self->{vmid};
    if ($self->target_offers('postcopy-status')) {
        my $t = eval {
            $self->target_request("postcopy-status $vmid", fresh => 1, timeout_ms => 20_000);
        };
        if (ref $t eq 'HASH') {
            return { state => 'stopped' } if ($t->{status} // '') eq 'stopped';
            return { state => $t->{qmpstatus}, migration => $t->{migration}{status} // 'none' };
        }
    }
    my $res = eval {
        $self->remote(
            ['status', $vmid, '--verbose'],
            timeout_ms => 20_000,
            connect_timeout_s => 5,
            connect_retries => 1
        );
    };
    if (!$res) {
        return { state => $self->target_qemu_state() }
            if "$@" =~ /does not exist|unable to find configuration file/;
        return { state => undef };
    }
    my $out = $res->{stdout} // '';
    return { state => $1 } if $out =~ /^qmpstatus: (\S+)$/m;
    return { state => $1 } if $out =~ /^status: (\S+)$/m;
    return { state => undef };
}

# Whether the VM's QEMU runs on the target, as upstream's vm_running_locally tells it (its pid
# file names a process whose command line has that pid file): 'present' or 'stopped'; undef
# when the target cannot be asked.
sub target_qemu_state {
    my ($self) = @_;
    my $pid = $self->target_qemu_pid();
    return defined $pid ? ($pid ? 'present' : 'stopped') : undef;
}

# The pid of the VM's QEMU on the target (as vm_running_locally finds it), 0 when none runs,
# undef when the target cannot be asked.
sub target_qemu_pid {
    my ($self) = @_;
    my $pidfile = "$self->{socket_dir}/$self->{vmid}.pid";
    # upstream names it /var/run/qemu-server/VMID.pid in QEMU's argv (/var/run is /run)
    my $named = $pidfile =~ m{^/run/} ? "/var$pidfile" : $pidfile;
    my $script =
          'pid=$(cat "$1" 2>/dev/null) || { echo 0; exit 0; }; '
        . 'if [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] '
        . '&& tr "\\000" "\\n" <"/proc/$pid/cmdline" | grep -qxF -e "$1" -e "$2"; '
        . 'then echo "$pid"; else echo 0; fi';
    my $res = eval {
        $self->remote_command(
            ['sh', '-c', $script, 'sh', $pidfile, $named],
            timeout_ms => 20_000,
            connect_timeout_s => 5,
            connect_retries => 1
        );
    } or return undef;
    return ($res->{stdout} // '') =~ /^([0-9]+)$/m ? $1 : undef;
}

# Waits (up to $limit_s) until process $pid on the target is gone (or a zombie): upstream's
# `qm stop --migratedfrom` only sends SIGTERM, and removes the pid file while QEMU still
# exits. Returns whether it is gone; undef when the target cannot be asked.
sub wait_target_pid_gone {
    my ($self, $pid, $limit_s) = @_;
    my $script =
        'i=0; while [ -e "/proc/$1" ] && ! grep -q "^State:[[:space:]]*Z" "/proc/$1/status" 2>/dev/null; do '
        . 'i=$((i+1)); if [ "$i" -ge "$2" ]; then echo running; exit 0; fi; sleep 0.1; done; echo gone';
    my $res = eval {
        $self->remote_command(['sh', '-c', $script, 'sh', $pid, $limit_s * 10],
            timeout_ms => ($limit_s + 20) * 1000);
    } or return undef;
    return ($res->{stdout} // '') =~ /^gone$/m ? 1 : 0;
}

# (PVE::MTunnel::Check)
sub inspect { my ($self, %opts) = @_; return PVE::MTunnel::Check::inspect($self, %opts) }

sub disks_complete {
    my ($self, @args) = @_;
    return PVE::MTunnel::Check::disks_complete($self, @args);
}

sub diagnose { my ($self, $seen) = @_; return PVE::MTunnel::Check::diagnose($self, $seen) }

sub check { my ($self, %opts) = @_; return PVE::MTunnel::Check::check($self, %opts) }

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

=item C<postcopy> (C<off>), C<postcopy_bwlimit> (0), C<postcopy_recover_timeout_ms> (600000), C<postcopy_stall_ms> (10000), C<qmp_timeout_ms> (10000)

C<auto>: switch to post-copy, decided at each pass's start, when the smallest pass so far did
not shrink by a tenth for two passes or after eight passes (the downtime is doubled as
upstream's until then); C<always>: once the first pass is done. The source's QEMU must offer
C<postcopy-ram> and report C<postcopy-bytes>; the target's C<qm mtunnel> must announce the
post-copy commands (qemu-server patch 0009); not with C<with_local_disks> yet.
C<postcopy_bwlimit>: KiB/s after the switch (0: no limit, which ends the split soonest). A
paused post-copy migration is recovered through new tunnels until
C<postcopy_recover_timeout_ms>; one without progress for C<postcopy_stall_ms> is paused first
(a hung link never fails by itself). C<qmp_timeout_ms>: each QMP call after the switch.

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

=head2 stop_target_nbd()

Method: stops the target's NBD server (storage migration) before its C<resume>: C<nbdstop VMID>
through the tunnel where the target's C<qm start> announced it (C<mtunnel commands:>), else
C<qm nbdstop> over ssh, also when the tunnel answers C<ERR: unknown command>, gives no answer
within 30 s (the tunnel is then closed: a late answer would be taken for the next command's)
or is gone. Never dies, as upstream's C<qm nbdstop> only warns: the target's
C<ERR: nbdstop failed - ...> is logged as a warning, C<qm nbdstop> failing (ssh) as an error,
and the migration goes on.

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
arrived; once the switch to post-copy was sent only notes it (the migration is finished).

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
and doubles the downtime limit when the migration does not converge, as QemuMigrate.pm; with
C<postcopy> its looks also wake at each pass's start, where C<PVE::MTunnel::Postcopy> decides
the switch, and after the switch that module's C<run> drives the migration to its end.
C<completion_wait> C<events> waits on QEMU's C<MIGRATION> event (C<qmp_wait_migration>,
holding the monitor at most C<hold_ms>); C<poll> and C<pve> query every
C<poll_interval_ms>, 100 ms near the end.

=head2 completed($stat, $start)

Method: the RAM migration completed (C<$stat>: C<query-migrate>'s answer): timings and
upstream's lines (average speed, downtime, C<migration status: completed>); returns C<$stat>.

=head2 postcopy(), postcopy_sent(), undo_allowed($action)

Methods: the migration's L<PVE::MTunnel::Postcopy> part (made on first use); whether
C<migrate-start-postcopy> was sent (answered or not); whether post-copy's rule
(C<PVE::MTunnel::Postcopy::allows>, asked with the live state, or with the record's under
C<--check>) lets C<$action> (C<stop target>, C<cancel>, C<continue source>) be done now,
logging why not when it does not. C<phase2_cleanup>, C<cont_source>, C<stop_target> and
C<--check>'s fix steps ask it.

=head2 rule_state(), note_resume()

Methods: what post-copy's rule sees (C<postcopy_sent>, C<target_resume_sent> of the record and
of the live post-copy, either one counting); a resume about to be sent to the target, written
to the record first (returns whether it could be).

=head2 undo_to_source()

Method: after a switch to post-copy that failed before the target ran (the rule allows it
then): stops the target, waits until it is confirmed gone (15 s at most), then continues the
source; else the source stays paused.

=head2 open_tunnel(\@forwards, timeout_ms =E<gt> N), tunnel_to_target(\@forwards, timeout_ms =E<gt> N)

Methods: a ready tunnel to the target's C<qm mtunnel> forwarding C<@forwards> (none: commands
only), as the driver's tunnel from now on (C<open_tunnel>), or just returned.

=head2 target_offers($command), target_request($line, fresh =E<gt> 0|1, timeout_ms =E<gt> N)

Methods: whether the target's C<qm start> announced C<$command> (C<mtunnel commands:>); one
command through the driver's tunnel, or (C<fresh>, or none open) a tunnel of its own, its
C<OK JSON> answer decoded (C<'OK'> for a bare one). Dies with the tunnel's error.

=head2 remove_recovery_sockets()

Method: every stale migration socket of the VM removed on both nodes after a recovered
post-copy migration.

=head2 cont_source()

Method: continues the source VM if the migration left it paused (C<postmigrate>; after a
switch to post-copy that failed before the target ran also C<finish-migrate> or C<paused>),
where post-copy's rule allows it.

=head2 cancel_mirrors()

Method: cancels the disk mirrors (unless they were finished); when NBD writes stuck in a
stopped ssh hold the cancel, closes the tunnel first and tries again.

=head2 stop_source()

Method: as C<vm_stop> on the source: QMP C<quit>, wait up to 10 s for the process to be gone,
then SIGKILL.

=head2 warn_detach_errors($result)

Method: one warning per C<detach_errors> entry of a C<qmp_mirror_finish> or
C<qmp_mirror_cancel> result (a blockdev-mirror's NBD target node left on the source).

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

Methods: the migration's record on the source node, F<SOCKET_DIR/VMID.mtunnel> (JSON:
C<vmid>, C<node>, C<target>, C<source_pid>, C<driver> (pid and start time of the process that
writes it: C<--check --fix> refuses while it runs), C<started>, C<phase>, C<target_commands>,
C<target_volumes_before>, C<target_volumes>, C<mirror_jobs>, and post-copy's
C<postcopy_sent>, C<target_resume_sent> and C<recover_path>, each written before it happens),
which a C<--check> after the driver's death reads. C<phase> is one of C<starting> (before the
target's C<qm start>), C<started>, C<mirroring>, C<migrating>, C<postcopy>,
C<finishing-mirrors> (C<block-job-cancel> of the ready mirrors after RAM completed),
C<mirrors-finished>, C<mirrors-failed>, C<resumed>. C<write_state> merges C<%set> into it and
writes it through a temp file of its own renamed over the path (a failure only warns);
C<read_state> returns it (C<undef>: none, invalid, or another VM's); C<remove_state> removes
it (a plain file only). Written for every migration; removed after success, and after a
failure once the VM runs on one node with nothing left behind.

=head2 close_tunnel_quickly(broken =E<gt> 0|1)

Method: closes the tunnel with short deadlines (5 s for C<quit>, 2 s for ssh to exit; with
C<broken>, a tunnel known broken or hung, 0.5 s each and its failures logged as info).

=head2 config_path($node), config_node(), move_config($node)

Methods (with C<pve_dir>): the path of the VM's config on C<$node> in pmxcfs's layout; the
node that holds it (the source unless it moved to the target); moving it to C<$node> by one
rename, as upstream's C<move_config_to_node> (dies naming the node when the rename fails; a
no-op where it is already, and without C<pve_dir>).

=head2 stop_target()

Method: C<qm stop VMID --skiplock> on the target, with C<--migratedfrom SOURCE> while the
config is on the source (upstream's C<vm_stop> asserts that), without it once the config moved
there, then waits until the QEMU process that ran is gone. Only where post-copy's rule allows
it. Dies when the stop fails or the process stays.

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
when it cannot be read), read once; with C<pve_dir> the config file itself, on whichever node
it is now.

=head2 remote(\@qm_args, %opts), remote_command(\@argv, %opts)

Methods: run C<qm ARGS> (resp. any command) on the target over ssh with
C<PVE::MTunnel::ssh_run> (default timeout 120 s, plus C<ssh_options>); return its
C<{ exit_code, stdout, stderr }>; die when it fails.

=head2 target_state(), target_status(), target_qemu_state(), target_qemu_pid(), wait_target_pid_gone($pid, $seconds)

Methods: the VM's state on the target (C<running>, C<paused>, C<inmigrate>, C<prelaunch>,
C<postmigrate>, ..., C<stopped>, or C<present> when only its QEMU's presence can be told;
C<undef> when it cannot be told); C<target_status> adds its incoming migration's status
(C<< { state, migration } >>). Asked through the target's C<qm mtunnel> (C<postcopy-status>)
where it announced that, which needs no config; else C<qm status --verbose>, which loads the
config from the target's own node: while it is still on the source, C<target_qemu_state>
tells only whether the VM's QEMU runs there (C<target_qemu_pid>: its pid file naming a process
whose command line has it, as upstream's C<vm_running_locally>). C<wait_target_pid_gone>
waits until that process is gone: C<stop_target> takes the pid before the stop and waits
for it (upstream's C<qm stop --migratedfrom> only sends SIGTERM and removes the pid file at
once).

=head2 inspect(volumes =E<gt> 0|1), disks_complete($record, \@jobs), diagnose($seen), check(fix =E<gt> 0|1)

Methods: L<PVE::MTunnel::Check>'s functions of the same names for this migration: both nodes'
view, whether the target's disks are shown complete, what the view means and what would settle
it, and C<mtunnel-migrate --check [--fix]>.

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

L<mtunnel-migrate(1)>, L<PVE::MTunnel>, L<PVE::MTunnel::Tunnel>, L<PVE::MTunnel::Postcopy>,
L<PVE::MTunnel::Check>

=cut
