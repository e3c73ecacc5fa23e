package PVE::MTunnel::Migrate;

# A QemuMigrate.pm-style live migration driver on PVE::MTunnel: phase2 (start the target,
# tunnel, mirror local disks into the target's NBD exports, migrate RAM, poll, finish the
# mirrors), phase3 (stop the target's NBD server, resume on the target, close, stop the
# source, free the source's migrated volumes) and phase2_cleanup (cancel, cont the source,
# cancel the mirrors, stop the target, free its new volumes, close). The control flow is
# PVE's; sockets, processes and QMP are the library's.

use strict;
use warnings;

use POSIX qw(strftime);
use Socket qw(inet_aton);
use Time::HiRes qw(usleep time);

use PVE::MTunnel;

# Statuses during which QEMU is still working on the migration. Anything not final counts as
# running, so a status added by a newer QEMU does not abort a migration.
my %FINAL = map { $_ => 1 } qw(completed failed cancelled);

# QEMU's largest downtime-limit (2000 s); PVE never doubles past it.
my $MAX_DOWNTIME_MS = 2000 * 1000;

sub new {
    my ($class, %param) = @_;
    for my $k (qw(vmid node target ssh)) {
	die "PVE::MTunnel::Migrate->new: missing '$k'\n" if !defined($param{$k});
    }
    die "invalid VMID '$param{vmid}'\n" if $param{vmid} !~ m/^[1-9][0-9]{0,8}$/;
    my $type = $param{migration_type} // 'secure';
    die "invalid migration type '$type' (secure or insecure)\n" if $type !~ /^(secure|insecure)$/;
    die "invalid migration network '$param{migration_network}' (want an IPv4 CIDR)\n"
	if defined $param{migration_network} && !parse_cidr($param{migration_network});
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
	poll_interval_ms => 1000,
	# abort when RAM transfer makes no progress this long (a stopped ssh, a dead link)
	stall_timeout_ms => 60_000,
	tunnel_options => {},
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

# The machine type the source QEMU runs, for the target's --machine: Proxmox's QEMU marks it
# 'is-current' in query-machines; a stock QEMU names it in the QOM type of /machine.
sub current_machine {
    my ($self) = @_;
    my $machines = PVE::MTunnel::qmp_execute($self->{qmp_socket}, 'query-machines');
    my ($current) = grep { $_->{'is-current'} } @$machines;
    return $current->{name} if $current;
    my $type = PVE::MTunnel::qmp_execute($self->{qmp_socket}, 'qom-get', { path => '/machine', property => 'type' });
    die "cannot tell which machine type VM $self->{vmid} runs ('$type')\n" if !defined($type) || $type !~ /^([A-Za-z0-9_.,+-]+)-machine$/;
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
    return $self->remote_command([@{$self->{qm}}, @$cmd], %opts);
}

sub remote_command {
    my ($self, $cmd, %opts) = @_;
    return PVE::MTunnel::ssh_run(ssh => $self->{ssh}, command => $cmd, timeout_ms => 120_000,
	%{$self->{ssh_options}}, %opts);
}

sub migrate {
    my ($self) = @_;
    my $vmid = $self->{vmid};
    $self->log('info', "starting migration of VM $vmid to node '$self->{target}'");
    my $start = time();
    eval { $self->phase2(); $self->phase3(); };
    if (my $err = $@) {
	$self->log('err', "migration failed: $err");
	$self->phase2_cleanup($err);
	die $err;
    }
    $self->log('info', sprintf("migration finished successfully (duration %s)", strftime("%H:%M:%S", gmtime(time() - $start))));
    return $self;
}

# As QemuMigrate.pm phase2_start_local_cluster: the target's `qm start`, with upstream's
# options and stdin lines (secrets on stdin, never argv).
sub start_target {
    my ($self) = @_;
    my ($vmid, $node, $type) = @$self{qw(vmid node migration_type)};
    my @cmd = ('start', $vmid, '--skiplock', '--migratedfrom', $node, '--migration_type', $type);
    push @cmd, '--migration_network', $self->{migration_network} if defined $self->{migration_network};
    push @cmd, '--stateuri', $type eq 'insecure' ? 'tcp' : 'unix';
    push @cmd, '--machine', $self->{machine} // $self->current_machine();
    push @cmd, '--force-cpu', $self->{force_cpu} if defined $self->{force_cpu};
    push @cmd, '--targetstorage', $self->{targetstorage} // '1' if $self->{with_local_disks};
    # version 1: NBD over UNIX sockets
    my $input = "nbd_protocol_version: 1\n";
    $input .= "spice_ticket: $self->{spice_ticket}\n" if defined $self->{spice_ticket};
    my $res = $self->remote(\@cmd, input => $input);
    $self->log('info', "[$self->{target}] $_") for grep { length } split /\n/, $res->{stderr} // '';
    my $listen = PVE::MTunnel::migrate_listen_parse($res->{stdout}, $vmid);
    $self->log('info', "[$self->{target}] $_") for @{$listen->{messages}};
    return $listen;
}

# The addresses the target answered must fit the migration type: UNIX sockets (forwarded)
# for secure; for insecure TCP, inside the migration network when one is given.
sub check_listen {
    my ($self, $listen) = @_;
    my @uris = ($listen->{uri}, map { $_->{uri} } @{$listen->{nbd}});
    if ($self->{migration_type} eq 'secure') {
	for my $uri (@uris) {
	    die "target answered '$uri' for a secure migration: only UNIX sockets can go through the tunnel\n"
		if $uri !~ /^(?:nbd:)?unix:/;
	}
	return;
    }
    for my $uri (@uris) {
	my ($host) = $uri =~ /^(?:tcp|nbd):([0-9.]+|localhost|\[[0-9a-fA-F:.]+\]):[0-9]+/
	    or die "target answered '$uri' for an insecure migration: expected a TCP address\n";
	next if !defined $self->{migration_network};
	die "target address $host in '$uri' is outside the migration network $self->{migration_network} - refusing to migrate over it\n"
	    if !ip_in_network($host, $self->{migration_network});
    }
}

# drive => volid of the source's config, from `qm config` on this (the source) node
sub source_volumes {
    my ($self) = @_;
    return $self->{source_volumes} if $self->{source_volumes};
    my %vol;
    if (open(my $fh, '-|', @{$self->{local_qm}}, 'config', $self->{vmid})) {
	while (my $line = <$fh>) {
	    $vol{$1} = $2 if $line =~ /^((?:ide|scsi|sata|virtio|efidisk|tpmstate)[0-9]+): ([^,\s]+)/;
	}
	close($fh);
    }
    return $self->{source_volumes} = \%vol;
}

sub phase2 {
    my ($self) = @_;
    my $vmid = $self->{vmid};

    $self->log('info', "starting VM $vmid on remote node '$self->{target}'");
    # From here on the target may be running; cleanup must stop it.
    $self->{target_started} = 1;
    my $listen = $self->start_target();
    # new volumes on the target: freed by the cleanup unless the migration completes
    $self->{target_volumes} = [ map { ($_->{volume} =~ /^([^,]+)/)[0] } @{$listen->{nbd}} ];
    $self->check_listen($listen);
    $self->{ruri} = $listen->{uri};
    my @nbd = @{$listen->{nbd}};
    die "target exported disks for storage migration (" . join(', ', map { "drive-$_->{drive}" } @nbd)
	. ") but --with-local-disks was not given\n" if @nbd && !$self->{with_local_disks};

    $self->log('info', "start remote tunnel");
    # insecure: no forwards, the tunnel carries the commands (resume) only
    my @forwards = $self->{migration_type} eq 'secure' ? ($listen->{socket}, map { $_->{socket} } @nbd) : ();
    $self->{tunnel} = PVE::MTunnel->open(
	ssh => $self->{ssh},
	forwards => \@forwards,
	command => [@{$self->{qm}}, 'mtunnel'],
	socket_dir => $self->{socket_dir},
	log => sub { my ($level, $msg) = @_; $self->log($level, $msg) if $level ne 'debug' },
	%{$self->{ssh_options}},
	%{$self->{tunnel_options}},
    );
    my $t0 = time();
    $self->{tunnel}->wait_ready(timeout_ms => 70_000);
    $self->{timing}{open_to_ready} = time() - $t0;

    $self->storage_migration(\@nbd) if @nbd;

    $self->log('info', "starting online/live migration on $self->{ruri}");
    my $params = { 'downtime-limit' => int($self->{downtime_ms}), %{$self->{parameters}} };
    $params->{'max-bandwidth'} = int($self->{bwlimit} * 1024) if $self->{bwlimit};
    $self->log('info', "set migration capabilities");
    my $applied = PVE::MTunnel::qmp_migrate_setup($self->{qmp_socket}, { capabilities => $self->{capabilities}, parameters => $params });
    my $set = $applied->{parameters};
    $self->log('info', "migration speed limit: " . render_bytes($set->{'max-bandwidth'}) . "/s") if $self->{bwlimit};
    $self->log('info', "capping downtime limit to maximum possible: $set->{'downtime-limit'} ms")
	if $set->{'downtime-limit'} < $params->{'downtime-limit'};
    $self->log('info', "migration downtime limit: $set->{'downtime-limit'} ms");
    $self->log('info', "migration cachesize: " . render_bytes($set->{'xbzrle-cache-size'})) if defined $set->{'xbzrle-cache-size'};
    $self->log('info', "set migration parameters");

    $self->log('info', "start migrate command to $self->{ruri}");
    $self->{migration_started} = 1;
    PVE::MTunnel::qmp_migrate($self->{qmp_socket}, $self->{ruri}, { setup => 0 });
    $self->wait_for_completion($set->{'downtime-limit'});

    if (my $jobs = $self->{mirror_jobs}) {
	# As upstream: block-job-cancel on a ready mirror syncs the target, then ends the job
	# without switching the source over to it; the source lets go of the NBD connection.
	$self->log('info', "$_: Completing block job...") for @$jobs;
	eval { PVE::MTunnel::qmp_mirror_finish($self->{qmp_socket}, $jobs, mode => 'cancel', timeout_ms => 600_000) };
	die "Failed to complete storage migration: $@" if $@;
	$self->log('info', "$_: Completed successfully.") for @$jobs;
	$self->log('info', "$_: mirror-job finished") for @$jobs;
	$self->{mirror_done} = 1;
    }
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
	my $source = $volumes->{$export->{drive}} // $device{$device}{inserted}{file};
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
	    $self->log('info', "drive mirror is starting for $device with bandwidth limit: $self->{bwlimit} KiB/s");
	} else {
	    $self->log('info', "drive mirror is starting for $device");
	}
	push @{$self->{mirror_jobs}}, PVE::MTunnel::qmp_mirror_start($self->{qmp_socket}, $device, $export->{uri}, \%opts);
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
	for my $job (@{$st->{jobs}}) {
	    $offset += $job->{offset} // 0;
	    next if $was_ready{$job->{id}} || !($log_now || $job->{ready});
	    my $len = $job->{len} || 0;
	    my $line = sprintf("%s: transferred %s of %s (%.2f%%) in %s", $job->{id}, render_bytes($job->{offset} // 0),
		render_bytes($len), $len ? ($job->{offset} // 0) * 100 / $len : 0, render_duration($now - $start));
	    $line .= $job->{busy} ? ", still busy" : ", ready" if $job->{ready};
	    $self->log('info', $line);
	    $was_ready{$job->{id}} = 1 if $job->{ready};
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
	    die sprintf("storage migration made no progress for %.0f s - aborting\n", $now - $last_progress);
	}
	die sprintf("storage migration not ready after %.0f s (mirror timeout) - aborting\n", $now - $start)
	    if defined $self->{mirror_timeout_ms} && ($now - $start) * 1000 > $self->{mirror_timeout_ms};
	usleep($self->{mirror_poll_ms} * 1000);
    }
}

sub wait_for_completion {
    my ($self, $downtime) = @_;
    my $usleep = $self->{poll_interval_ms} * 1000;
    my ($lasttrans, $lastrem, $downtimecounter, $errors, $i, $laststatus) = (-1, undef, 0, 0, 0, '');
    my $start = time();
    my $last_progress = $start;
    while (1) {
	$i++;
	usleep($usleep);
	my $stat = eval { PVE::MTunnel::qmp_query_migrate($self->{qmp_socket}) };
	if (my $err = $@) {
	    $self->log('info', "query migrate failed: $err");
	    die "too many query migrate failures - aborting\n" if ++$errors > 5;
	    next;
	}
	$errors = 0;
	my $status = $stat->{status} // 'none';
	my $ram = $stat->{ram} // {};
	if ($status eq 'completed') {
	    $self->{timing}{migration} = time() - $start;
	    $self->{timing}{qemu_total_ms} = $stat->{'total-time'};
	    $self->{completed_stat} = $stat;
	    my $delay = time() - $start;
	    $self->log('info', sprintf("average migration speed: %s/s - downtime %s ms",
		render_bytes(($ram->{total} // 0) / ($delay || 1)), $stat->{downtime} // 0));
	    $self->log('info', "migration completed, transferred " . render_bytes($ram->{transferred}) . " VM-state")
		if $ram->{transferred};
	    $self->log('info', "migration status: completed");
	    return $stat;
	}
	if ($FINAL{$status}) {
	    my $message = $stat->{'error-desc'} ? "$status - $stat->{'error-desc'}" : $status;
	    $self->log('info', "migration status error: $message");
	    die "aborting phase 2 - $message\n";
	}
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
	# Poll faster near the end, so completion is noticed quickly; log less often then.
	$usleep = 100_000 if $speed && $rem < $speed;
	if ($usleep > 100_000 || $i % 10 == 0) {
	    my $progress = sprintf("transferred %s of %s VM-state, %s/s", render_bytes($trans), render_bytes($ram->{total} // 0), render_bytes($speed));
	    $progress .= ", VM dirties lots of memory: " . render_bytes($dirty) . "/s" if $dirty > $speed;
	    $self->log('info', "migration active, $progress");
	}
	$downtimecounter++ if ($lastrem && $rem > $lastrem) || $rem == 0;
	$lastrem = $rem;
	if ($downtimecounter > 5 && $downtime < $MAX_DOWNTIME_MS) {
	    $downtimecounter = 0;
	    $downtime *= 2;
	    $downtime = $MAX_DOWNTIME_MS if $downtime > $MAX_DOWNTIME_MS;
	    $self->log('info', "auto-increased downtime to continue migration: $downtime ms");
	    eval { PVE::MTunnel::qmp_execute($self->{qmp_socket}, 'migrate-set-parameters', { 'downtime-limit' => int($downtime) }) };
	    $self->log('info', "migrate-set-parameters error: $@") if $@;
	}
	$lasttrans = $trans;
    }
}

sub phase3 {
    my ($self) = @_;
    my $vmid = $self->{vmid};
    if ($self->{mirror_jobs}) {
	# upstream: the target's NBD server must stop before it resumes
	$self->log('info', "stopping NBD storage migration server on target.");
	eval { $self->remote(['nbdstop', $vmid], timeout_ms => 30_000) };
	$self->log('err', "stopping NBD server on target failed: $@") if $@;
    }
    eval { $self->{tunnel}->command("resume $vmid", timeout_ms => 30_000) };
    if (my $err = $@) {
	$self->log('warn', "resume through tunnel failed: $err - trying 'qm resume' over ssh");
	$self->remote(['resume', $vmid, '--skiplock', '--nocheck']);
    }
    # From here on the VM runs on the target; the source must never be continued.
    $self->{target_resumed} = 1;
    my $tunnel = delete $self->{tunnel};
    eval { $tunnel->close() };
    $self->log('warn', "closing tunnel: $@") if $@;
    $self->stop_source();
    $self->free_source_volumes() if $self->{mirror_jobs};
}

# As upstream's phase3_cleanup: the migrated disks' source volumes go once the VM runs on
# the target (a failure only warns: the migration itself succeeded).
sub free_source_volumes {
    my ($self) = @_;
    my $volumes = $self->source_volumes();
    for my $job (@{$self->{mirror_jobs}}) {
	my ($drive) = $job =~ /^drive-(.+)$/;
	my $volid = $volumes->{$drive} // next;
	my $ok = open(my $fh, '-|', @{$self->{pvesm}}, 'free', $volid);
	if ($ok) { local $/; <$fh>; $ok = close($fh) }
	if (!$ok) {
	    $self->log('warn', "removing local copy of '$volid' failed: " . ($! ? "$!" : "exit code " . ($? >> 8)));
	} else {
	    $self->log('info', "removed local copy of '$volid'");
	}
    }
}

# As vm_stop on the source: QMP quit, then wait for the process to go away.
sub stop_source {
    my ($self) = @_;
    my $vmid = $self->{vmid};
    my $pidfile = "$self->{socket_dir}/$vmid.pid";
    my $pid = -f $pidfile ? do { open(my $fh, '<', $pidfile); my $p = <$fh>; chomp $p if defined $p; $p } : undef;
    eval { PVE::MTunnel::qmp_execute($self->{qmp_socket}, 'quit') };
    $self->log('warn', "stopping source VM: $@") if $@;
    if ($pid && $pid =~ /^\d+$/) {
	for (1 .. 100) { last if !kill(0, $pid); usleep(100_000) }
	if (kill(0, $pid)) { kill('KILL', $pid); $self->log('warn', "source VM $vmid did not quit, killed") }
    }
    $self->log('info', "stopped VM $vmid on source node '$self->{node}'");
}

sub phase2_cleanup {
    my ($self, $err) = @_;
    my $vmid = $self->{vmid};
    return if $self->{target_resumed};
    $self->log('info', "aborting phase 2 - cleanup resources");
    if ($self->{migration_started}) {
	$self->log('info', "migrate_cancel");
	eval { PVE::MTunnel::qmp_migrate_cancel($self->{qmp_socket}, timeout_ms => 30_000) };
	$self->log('info', "migrate_cancel error: $@") if $@;
    }
    # The source ends in postmigrate if the failure came after convergence: continue it.
    my $status = eval { PVE::MTunnel::qmp_execute($self->{qmp_socket}, 'query-status')->{status} };
    $self->log('err', "query-status error: $@") if $@;
    if (($status // '') eq 'postmigrate') {
	eval { PVE::MTunnel::qmp_execute($self->{qmp_socket}, 'cont') };
	$self->log('err', "resuming VM failed: $@") if $@;
    }
    if (my $jobs = $self->{mirror_jobs}) {
	if (!$self->{mirror_done}) {
	    $self->log('info', "$_: Cancelling block job") for @$jobs;
	    eval { PVE::MTunnel::qmp_mirror_cancel($self->{qmp_socket}, $jobs, timeout_ms => 60_000) };
	    $self->log('err', "cancelling block jobs failed: $@") if $@;
	}
    }
    my $target_stopped;
    if ($self->{target_started}) {
	eval { $self->remote(['stop', $vmid, '--skiplock', '--migratedfrom', $self->{node}]) };
	if (my $err = $@) {
	    $self->log('err', "stopping target VM failed: $err");
	    $self->log('err', "VM $vmid may be left waiting for incoming migration on node '$self->{target}': "
		. "run 'qm stop $vmid' there once it is reachable");
	} else {
	    $target_stopped = 1;
	}
    }
    # As upstream's cleanup_remotedisks: the target's new volumes, once its QEMU is gone
    for my $volid (@{$self->{target_volumes} // []}) {
	if (!$target_stopped) {
	    $self->log('err', "volume '$volid' left on node '$self->{target}': run 'pvesm free $volid' there");
	    next;
	}
	eval { $self->remote_command([@{$self->{pvesm}}, 'free', $volid], timeout_ms => 60_000) };
	$self->log('err', "removing volume '$volid' on node '$self->{target}' failed: $@") if $@;
    }
    # Only after the target is stopped, as PVE does. The tunnel is broken or idle by now: do
    # not wait long for its 'quit'.
    if (my $tunnel = delete $self->{tunnel}) {
	eval { $tunnel->close(quit_timeout_ms => 5000, exit_timeout_ms => 2000) };
	$self->log('err', "closing tunnel failed: $@") if $@;
    }
}

1;
