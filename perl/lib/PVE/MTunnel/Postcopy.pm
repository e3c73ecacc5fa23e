package PVE::MTunnel::Postcopy;

# Post-copy for PVE::MTunnel::Migrate (docs/postcopy.md): what both QEMUs must offer, the
# target's QEMU set up through the tunnel, when to switch, the switch, the target's resume, and
# everything after the switch until the migration completed or ended with a verdict: recovery
# of a paused or hung channel, a source or target QEMU that died, signals.
#
# The rule (allows()): from the moment migrate-start-postcopy is sent, before its reply, the
# source is continued only if the target is known never to have run the guest: no resume was
# ever sent to it, and its QEMU is gone, stopped first. Otherwise nothing continues the source,
# cancels the migration or stops the target, whatever QEMU, the network or a signal says.

use strict;
use warnings;

use JSON::PP ();
use Scalar::Util qw(weaken);
use Time::HiRes qw(time usleep);

use PVE::MTunnel;

# What a target's `qm mtunnel` must announce (qemu-server patch 0009) to drive its QEMU's
# post-copy: `qm monitor` and `qm status` there load the VM's config, which is still on the
# source's node during a migration.
our @TARGET_COMMANDS = qw(postcopy-capabilities postcopy-status postcopy-pause postcopy-recover);

# 'auto': the passes pre-copy gets before the switch, converging or not.
our $MAX_PASSES = 8;
# 'auto': switch when the smallest pass so far did not shrink by a tenth for this many passes.
our $STALLED_PASSES = 2;

my $JSON = JSON::PP->new->canonical;

# $m: the PVE::MTunnel::Migrate driver (not kept alive by us). State, all also in the record:
# sent (migrate-start-postcopy sent), target_ran (a resume was sent to the target),
# recover_path (where the target was last asked to listen for a recovery).
sub new {
    my ($class, $m, %state) = @_;
    my $self = bless {
        m => $m,
        sent => 0,
        target_ran => 0,
        resumed => 0,
        recovered => 0,
        attempts => 0,
        recover_path => undef,
        passes => [],
        sync_seen => 0,
        %state,
    }, $class;
    weaken($self->{m});
    return $self;
}

# ------------------------------------------------------------ the rule

# The one rule, for the live driver and for --check alike. $state: {postcopy_sent,
# target_resume_sent} (the driver's or its record's); $action: 'stop target', 'cancel' or
# 'continue source'; $target_gone: the target's QEMU was confirmed gone after it was stopped.
# Returns (1) or (0, why not).
sub allows {
    my ($state, $action, $target_gone) = @_;
    return (1) if !$state || !$state->{postcopy_sent};
    return (0,
        "the VM may have run on the target since the switch to post-copy (a resume was sent): "
            . "its newest state is there")
        if $state->{target_resume_sent};
    return (1) if $action eq 'stop target' || $target_gone;
    return (0,
        "the switch to post-copy was sent and the target's QEMU is not confirmed gone: it may "
            . "hold part of the VM's memory");
}

# What the rule sees now.
sub rule_state {
    my ($self) = @_;
    return { postcopy_sent => $self->{sent}, target_resume_sent => $self->{target_ran} };
}

# ------------------------------------------------------------ before anything starts

# The source's QEMU must offer post-copy, and report in query-migrate when its side of the
# switch is through (ram.postcopy-bytes, QEMU 7.0 and later): the target is resumed only then.
# Both are read from what QEMU says it supports, never from its version.
sub check_source {
    my ($self) = @_;
    my $m = $self->{m};
    my ($vmid, $node, $mode, $qmp) = @$m{qw(vmid node postcopy qmp_socket)};
    my $caps = PVE::MTunnel::qmp_execute($qmp, 'query-migrate-capabilities');
    my %offered = map { $_->{capability} => 1 } @$caps;
    die "--postcopy $mode: the QEMU of VM $vmid on node '$node' does not offer post-copy "
        . "(no migration capability 'postcopy-ram')\n"
        if !$offered{'postcopy-ram'};
    $self->{source_preempt} = $offered{'postcopy-preempt'} ? 1 : 0;
    my $schema = PVE::MTunnel::qmp_execute($qmp, 'query-qmp-schema');
    my $reports = grep {
        ($_->{'meta-type'} // '') eq 'object'
            && grep { ($_->{name} // '') eq 'postcopy-bytes' }
            @{ $_->{members} // [] }
    } @$schema;
    die "--postcopy $mode: the QEMU of VM $vmid on node '$node' does not report when its side "
        . "of the switch is through (no 'postcopy-bytes' in query-migrate: QEMU before 7.0), so "
        . "the target could not be resumed safely\n"
        if !$reports;
}

# After the target's start: its `qm mtunnel` must take the post-copy commands ($commands: what
# its `qm start` announced).
sub check_target {
    my ($self, $commands) = @_;
    my $m = $self->{m};
    my %has = map { $_ => 1 } @{ $commands // [] };
    my @missing = grep { !$has{$_} } @TARGET_COMMANDS;
    die "--postcopy $m->{postcopy}: node '$m->{target}' does not drive post-copy through its "
        . "tunnel ('qm mtunnel' there does not announce @missing: qemu-server without mtunnel's "
        . "patch 0009) - refused before the migration started\n"
        if @missing;
}

# Post-copy on the target's QEMU through the tunnel, before `migrate` (QEMU wants postcopy-ram
# on both sides): postcopy-preempt too where both offer it and the target takes it (QEMU 8.1
# and later refuse it on an '-incoming unix:' target). Returns whether preempt is on.
sub setup_target {
    my ($self) = @_;
    my $m = $self->{m};
    my ($vmid, $target) = @$m{qw(vmid target)};
    my $caps;
    if ($self->{source_preempt}) {
        $caps = eval { $m->target_request("postcopy-capabilities $vmid postcopy-preempt") };
        if (my $err = $@) {
            chomp $err;
            $m->log('info', "postcopy-preempt not taken on node '$target' ($err): without it");
        }
    }
    $caps //= $m->target_request("postcopy-capabilities $vmid");
    my %on = map { $_->{capability} => $_->{state} } @{ ref $caps eq 'ARRAY' ? $caps : [] };
    die "--postcopy $m->{postcopy}: post-copy could not be turned on for VM $vmid on node "
        . "'$target' (its capabilities: "
        . $JSON->encode($caps) . ")\n"
        if !$on{'postcopy-ram'};
    return $on{'postcopy-preempt'} ? 1 : 0;
}

# ------------------------------------------------------------ when to switch

# Why to switch now, or undef: 'always' once the first pass is done; 'auto' once the smallest
# pass so far did not shrink by a tenth for $STALLED_PASSES passes, or after $MAX_PASSES
# passes. $passes: what each pass started with, from the second pass on.
sub reason {
    my ($mode, $passes) = @_;
    return undef if $mode eq 'off' || !@$passes;
    return 'the first pass is done' if $mode eq 'always';
    my $shown = sub {
        join(', ', map { PVE::MTunnel::Migrate::render_bytes($_) } @_);
    };
    return sprintf(
        "pre-copy did not converge in %d passes (the last ones: %s)",
        @$passes + 1,
        $shown->(@$passes[-3 .. -1])
    ) if @$passes + 1 >= $MAX_PASSES;
    return undef if @$passes <= $STALLED_PASSES;
    my ($min, $since) = ($passes->[0], 0);
    for my $k (1 .. $#$passes) {
        if ($passes->[$k] < 0.9 * $min) {
            ($min, $since) = ($passes->[$k], 0);
        } else {
            $min = $passes->[$k] if $passes->[$k] < $min;
            $since++;
        }
    }
    return undef if $since < $STALLED_PASSES;
    return sprintf(
        "pre-copy is not converging (remaining at the start of the last %d passes: %s)",
        $STALLED_PASSES + 1,
        $shown->(@$passes[-($STALLED_PASSES + 1) .. -1])
    );
}

# A look at the pre-copy migration ($stat, query-migrate's): at a pass boundary (its
# dirty-sync-count went up: with the 'pass' wake the look comes at the pass's start) the pass's
# size is noted; returns why to switch now, or undef.
sub decide {
    my ($self, $stat) = @_;
    my $ram = $stat->{ram} // {};
    my $sync = $ram->{'dirty-sync-count'} // 0;
    return undef if $self->{sent} || $sync <= $self->{sync_seen};
    $self->{sync_seen} = $sync;
    push @{ $self->{passes} }, $ram->{remaining} // 0 if $sync >= 2;
    return reason($self->{m}{postcopy}, $self->{passes});
}

# ------------------------------------------------------------ the switch

# migrate-start-postcopy. The rule holds from before it is sent (also in the record): a reply
# that is lost may hide a switch that happened. Only QEMU's own refusal (an error reply: it did
# nothing) takes it back.
sub switch {
    my ($self, $why) = @_;
    my $m = $self->{m};
    $m->log('info', "switching to post-copy: $why");
    $self->{sent} = 1;
    $m->write_state(phase => 'postcopy', postcopy_sent => 1);
    $m->{timing}{switched} = time();
    eval {
        PVE::MTunnel::qmp_migrate_start_postcopy($m->{qmp_socket},
            timeout_ms => $m->{qmp_timeout_ms});
    };
    if (my $err = $@) {
        chomp $err;
        if ($PVE::MTunnel::last_error_code == $PVE::MTunnel::ERROR_CODE{qmp}) {
            $self->{sent} = 0;
            $m->write_state(phase => 'migrating', postcopy_sent => 0);
            die "switching to post-copy failed: $err\n";
        }
        # no answer: it may have switched; the looks tell
        $m->log('warn', "switching to post-copy: no answer ($err) - watching what QEMU does");
    }
    $self->{switch_sent_at} = time();
}

# ------------------------------------------------------------ after the switch

# Drives the migration after the switch until it completed (returns query-migrate's answer),
# or dies with what ended it. Never cancels, never continues the source while the target may
# have run, never closes a live channel: every call is guarded, and a failure leads to a retry
# at the next look, a recovery or a verdict.
sub run {
    my ($self, $start) = @_;
    my $m = $self->{m};
    $start //= time();
    my ($last, $last_trans, $last_progress, $last_look, $looks, $unanswered) =
        ('', -1, time(), 0, 0, undef);
    $self->{source_pid} //= $m->source_pid();
    while (1) {
        my $stat = eval {
            PVE::MTunnel::qmp_wait_migration(
                $m->{qmp_socket},
                hold_ms => $m->{hold_ms},
                timeout_ms => $m->{qmp_timeout_ms}
            );
        };
        if (my $err = $@) {
            $unanswered //= time();
            my $done = $self->source_unanswered($err, $unanswered);
            return $done if $done;
            next;
        }
        $unanswered = undef;
        my $status = $stat->{status} // 'none';
        if ($status ne $last && $status ne 'completed') {
            $m->log('info', "migration status: $status");
            ($last, $last_progress) = ($status, time());
        }
        return $m->completed($stat, $start) if $status eq 'completed';
        return $self->ended($stat) if $status eq 'failed' || $status eq 'cancelled';
        return $self->source_gone("its migration status is 'none'") if $status eq 'none';
        # signals are noted: only finishing the migration puts the VM back in one piece
        $m->check_interrupt();
        if ($status !~ /^postcopy-/) {
            $self->switch_pending($stat);
            next;
        }
        if ($status eq 'postcopy-paused') {
            $self->recover('its channel broke');
            ($last, $last_trans, $last_progress) = ('', -1, time());
            next;
        }
        if ($status =~ /^postcopy-recover/) {
            # a resume under way (left by a recovery or a driver before us): stuck, it is kicked
            next if time() - $last_progress < 30;
            $m->log('warn', "the migration is $status for 30 s: kicking it");
            $m->close_tunnel_quickly(broken => 1);
            $self->pause_source();
            $last_progress = time();
            next;
        }
        # postcopy-active, or a post-copy status of a newer QEMU
        $self->resume_target() if !$self->{resumed};
        next if time() - $last_look < 1;
        ($last_look, $looks) = (time(), $looks + 1);
        my $ram = $stat->{ram} // {};
        my $trans = $ram->{transferred} // 0;
        if ($trans != $last_trans) {
            ($last_trans, $last_progress) = ($trans, time());
            $m->log(
                'info',
                sprintf("post-copy active, transferred %s of %s VM-state, %s remaining",
                    map { PVE::MTunnel::Migrate::render_bytes($_ // 0) }
                        @$ram{qw(transferred total remaining)})
            ) if $looks % 10 == 0;
            next;
        }
        my $stalled = time() - $last_progress;
        next if $stalled * 1000 <= $m->{postcopy_stall_ms};
        # a hung channel (a stopped ssh, a cut link) never fails by itself
        $self->pause_source();
        $self->recover(sprintf("no progress for %.0f s", $stalled));
        ($last, $last_trans, $last_progress) = ('', -1, time());
    }
}

# The switch was sent and QEMU still runs pre-copy: its answer was lost, or the migration
# thread did not act on it yet. Sent again after 10 s (QEMU only sets a flag).
sub switch_pending {
    my ($self, $stat) = @_;
    my $m = $self->{m};
    return if time() - ($self->{switch_sent_at} // 0) < 10;
    $m->log('info', "the migration is still " . ($stat->{status} // 'none') . ": switching again");
    eval {
        PVE::MTunnel::qmp_migrate_start_postcopy($m->{qmp_socket},
            timeout_ms => $m->{qmp_timeout_ms});
    };
    $m->log('info', "migrate-start-postcopy: $@") if $@;
    $self->{switch_sent_at} = time();
}

# Resumes the target once the source's side of the switch is through: 'cont' on an incoming
# VM takes its disks at once (QEMU 7.2), while the source holds them until it stopped and let
# them go, right before it sends its devices; pages sent in post-copy (postcopy-bytes) come
# after that. Anything that fails leaves the resume pending for the next look.
sub resume_target {
    my ($self) = @_;
    my $m = $self->{m};
    my ($vmid, $target) = @$m{qw(vmid target)};
    my $end = time() + $m->{postcopy_stall_ms} / 1000;
    while (1) {
        my $stat = eval { PVE::MTunnel::qmp_query_migrate($m->{qmp_socket}, timeout_ms => 2000) }
            or return;
        my $status = $stat->{status} // 'none';
        return if $status ne 'postcopy-active' && $status ne 'completed';
        last if $status eq 'completed' || ($stat->{ram}{'postcopy-bytes'} // 0) > 0;
        # a channel that hangs at the switch: the stall check pauses and recovers it
        return if time() > $end;
        usleep(2000);
    }
    # from here the target may run the guest: in the record before it is sent
    $self->{target_ran} = 1;
    $m->write_state(target_resume_sent => 1);
    eval {
        die "no tunnel\n" if !$m->{tunnel};
        $m->{tunnel}->command("resume $vmid", timeout_ms => 30_000);
    };
    if (my $err = $@) {
        chomp $err;
        $m->log('warn', "resume through tunnel failed: $err - trying 'qm resume' over ssh");
        eval { $m->remote(['resume', $vmid, '--skiplock', '--nocheck'], timeout_ms => 30_000) };
        if (my $err2 = $@) {
            chomp $err2;
            $m->log('warn', "resuming VM $vmid on node '$target' failed: $err2 - tried again");
            return;
        }
    }
    $m->{timing}{resumed} = time();
    $self->{resumed} = 1;
    $m->log('info', "VM $vmid resumed on node '$target' (post-copy)");
}

# Pauses the source's side (migrate-pause): from a hung channel, or a resume stuck in
# postcopy-recover (QEMU 8.2 and later; QEMU 7.2 falls back to postcopy-paused by itself once
# the tunnel carrying the connection is closed). What fails is noted; the looks go on.
sub pause_source {
    my ($self) = @_;
    my $m = $self->{m};
    eval { PVE::MTunnel::qmp_migrate_pause($m->{qmp_socket}, timeout_ms => $m->{qmp_timeout_ms}) };
    $m->log('info', "pausing the migration on node '$m->{node}': $@") if $@;
}

# The source's monitor did not answer ($err) since $since. Its QEMU gone (by its pid, or its
# monitor refusing or gone for 2 s) ends the migration at once: completed if the target got
# everything, else the VM is lost. A monitor that stays silent, with its QEMU there, ends it
# after postcopy_recover_timeout_ms with nothing touched. Returns the completed answer, or
# undef to look again.
sub source_unanswered {
    my ($self, $err, $since) = @_;
    my $m = $self->{m};
    chomp $err;
    my $pid = $self->{source_pid};
    my $gone = $pid && PVE::MTunnel::Migrate::process_gone($pid);
    $gone ||= time() - $since >= 2 && $err =~ /Connection refused|No such file or directory/;
    return $self->source_gone($err) if $gone;
    $m->log('info', "query migrate failed: $err") if !$self->{unanswered_noted}++;
    die "the source's monitor did not answer for "
        . PVE::MTunnel::Migrate::render_duration(time() - $since)
        . " during post-copy ($err): nothing was stopped or continued\n"
        if (time() - $since) * 1000 > $m->{postcopy_recover_timeout_ms};
    usleep(200_000);
    return undef;
}

# The source's QEMU is gone after the switch: the target has the VM only if its incoming
# migration completed.
sub source_gone {
    my ($self, $err) = @_;
    my $m = $self->{m};
    my ($vmid, $node, $target) = @$m{qw(vmid node target)};
    $m->log('err', "the QEMU of VM $vmid on node '$node' is gone during post-copy ($err)");
    $m->close_tunnel_quickly(broken => 1);
    my $t = eval { $m->target_request("postcopy-status $vmid") };
    my $tmig = ref $t eq 'HASH' ? ($t->{migration}{status} // 'none') : 'unknown';
    if ($tmig eq 'completed') {
        $m->log('info',
                  "the incoming migration on node '$target' completed before: VM $vmid "
                . "has all its memory there");
        $m->{completed} = 1;
        return { status => 'completed', ram => {} };
    }
    # the verdict (PVE::MTunnel::Check) says what that means
    $m->{postcopy_lost} = 1;
    die "the QEMU of VM $vmid on node '$node' (source) is gone after the switch to post-copy "
        . "(the incoming migration on node '$target' is $tmig)\n";
}

# A final 'failed' or 'cancelled' after the switch. A target that never ran is stopped, then the
# source continued; one that may have run keeps the VM: nothing is touched, unless its incoming
# migration completed (then the VM is whole there: finished as a completed migration).
sub ended {
    my ($self, $stat) = @_;
    my $m = $self->{m};
    my ($vmid, $node, $target) = @$m{qw(vmid node target)};
    my $status = $stat->{status};
    my $what = $stat->{'error-desc'} ? "$status - $stat->{'error-desc'}" : $status;
    $m->log('info', "migration status error: $what");
    if (!$self->{target_ran}) {
        $m->log('info',
                  "VM $vmid never ran on node '$target': stopping it there, then "
                . "continuing VM $vmid on node '$node'");
        $m->close_tunnel_quickly(broken => 1);
        $m->undo_to_source();
        die "post-copy migration $what before VM $vmid ran on node '$target'\n";
    }
    my $t = eval { $m->target_request("postcopy-status $vmid") };
    if (ref $t eq 'HASH' && ($t->{migration}{status} // '') eq 'completed') {
        $m->log('info',
                  "the incoming migration on node '$target' completed: VM $vmid has all "
                . "its memory there");
        @$m{qw(completed completed_stat)} = (1, $stat);
        return $stat;
    }
    $m->close_tunnel_quickly(broken => 1);
    die "post-copy migration $what after VM $vmid ran on node '$target'\n";
}

# ------------------------------------------------------------ recovery

# A paused post-copy migration, recovered through new tunnels until
# postcopy_recover_timeout_ms. Dies when the VM is lost or the deadline passed.
sub recover {
    my ($self, $why) = @_;
    my $m = $self->{m};
    my $deadline = time() + $m->{postcopy_recover_timeout_ms} / 1000;
    $m->log('warn', "post-copy migration paused ($why): recovering it through a new tunnel");
    my $attempt = 0;
    while (1) {
        $attempt++;
        $m->close_tunnel_quickly(broken => 1);
        my $ok = eval { $self->recover_once(); 1 };
        if ($ok) {
            $self->{recovered}++;
            $m->log('info', "post-copy migration recovered (attempt $attempt)");
            return;
        }
        my $err = $@;
        chomp $err;
        die "$err\n" if $m->{postcopy_lost};
        die "post-copy recovery failed for "
            . PVE::MTunnel::Migrate::render_duration($m->{postcopy_recover_timeout_ms} / 1000)
            . " ($attempt attempts), the last one: $err\n"
            if time() >= $deadline;
        $m->log('warn', "post-copy recovery attempt $attempt failed: $err - retrying");
        usleep(1_000_000);
    }
}

# A recovery socket of this run: VMID_recoverN.migrate, N = pid * 1000 + attempt, unique per
# driver run (a --fix after a killed driver never reuses its names).
sub next_recover_path {
    my ($self) = @_;
    my $m = $self->{m};
    my $n = $$ * 1000 + (++$self->{attempts} % 1000);
    return "$m->{socket_dir}/$m->{vmid}_recover$n.migrate";
}

# Whether $path names one of this VM's recovery sockets.
sub is_recover_path {
    my ($self, $path) = @_;
    my $m = $self->{m};
    return defined $path
        && $path =~ m{^\Q$m->{socket_dir}/$m->{vmid}\E_recover[1-9][0-9]{0,9}\.migrate\z};
}

# Where the target listens for a recovery (it is in postcopy-recover or
# postcopy-recover-setup): the last of this VM's recovery sockets QEMU reports listening on.
sub target_listens_on {
    my ($self, $t) = @_;
    my @unix = map { $_->{path} }
        grep { ($_->{type} // '') eq 'unix' } @{ $t->{migration}{'socket-address'} // [] };
    my ($path) = grep { $self->is_recover_path($_) } reverse @unix;
    return $path;
}

# One recovery: the source paused; a new tunnel forwarding a new recovery socket (and the one
# the target may still listen on); the target paused too and listening; the source resumed
# into it. Dies with why it failed (postcopy_lost set when the target's QEMU is gone).
sub recover_once {
    my ($self) = @_;
    my $m = $self->{m};
    my ($vmid, $node, $target, $qmp) = @$m{qw(vmid node target qmp_socket)};
    my $src = $self->source_status();
    if ($src =~ /^postcopy-recover/) {
        # a resume that never got through: closing its tunnel fails it (QEMU 7.2), or a pause
        $src = $self->wait_source(5, 'postcopy-paused');
        if ($src =~ /^postcopy-recover/) {
            $self->pause_source();
            $src = $self->wait_source(5, 'postcopy-paused');
        }
    }
    # an earlier attempt's resume got through after all
    return if $src eq 'completed' || $src eq 'postcopy-active';
    die "the migration on node '$node' is $src, not postcopy-paused\n" if $src ne 'postcopy-paused';

    my $path = $self->next_recover_path();
    my @forwards = ($path, grep { $self->is_recover_path($_) } $self->{recover_path});
    $m->open_tunnel(\@forwards, timeout_ms => 30_000);
    my $t = $m->target_request("postcopy-status $vmid");
    if ($t->{status} eq 'stopped') {
        # the verdict (PVE::MTunnel::Check) says what that means
        $m->{postcopy_lost} = 1;
        die "the QEMU of VM $vmid on node '$target' (target) is gone after the switch to "
            . "post-copy\n";
    }
    my $dst = $t->{migration}{status} // 'none';
    return if $dst eq 'completed';
    if ($dst eq 'postcopy-active') {
        # its end of a hung channel never fails by itself
        $m->target_request("postcopy-pause $vmid");
        $t = $self->wait_target(5, 'postcopy-paused');
        $dst = $t->{migration}{status} // 'none';
    }
    my $into;
    if ($dst =~ /^postcopy-recover/) {
        # still listening from an earlier attempt (QEMU before 8.2 cannot be paused there)
        my $listening = $self->target_listens_on($t);
        if ($listening && grep { $_ eq $listening } @forwards) {
            $into = $listening;
        } else {
            eval { $m->target_request("postcopy-pause $vmid") };
            $t = $self->wait_target(5, 'postcopy-paused');
            $dst = $t->{migration}{status} // 'none';
            if ($dst =~ /^postcopy-recover/ && ($listening = $self->target_listens_on($t))) {
                # forwarded by a tunnel of its own
                $m->open_tunnel([$listening], timeout_ms => 30_000);
                $into = $listening;
            }
        }
    }
    if (!$into) {
        die "the incoming migration on node '$target' is $dst, not postcopy-paused\n"
            if $dst ne 'postcopy-paused';
        # where it listens, in the record before it is asked to
        $self->{recover_path} = $path;
        $m->write_state(recover_path => $path);
        $m->target_request("postcopy-recover $vmid $path");
        $m->log('info', "node '$target' listens for the recovery on unix:$path");
        $into = $path;
    }
    PVE::MTunnel::qmp_migrate_resume($qmp, "unix:$into", timeout_ms => $m->{qmp_timeout_ms});
    # a failed attempt falls back to postcopy-paused: noticed at once
    $src = $self->wait_source(30, 'postcopy-active', 'completed', 'postcopy-paused');
    die "the resumed migration is $src\n" if $src ne 'postcopy-active' && $src ne 'completed';
}

# The source's migration status ('none' when it cannot be asked).
sub source_status {
    my ($self) = @_;
    my $m = $self->{m};
    my $stat = eval {
        PVE::MTunnel::qmp_query_migrate($m->{qmp_socket}, timeout_ms => $m->{qmp_timeout_ms});
    };
    return $stat ? $stat->{status} // 'none' : 'none';
}

# Waits up to $limit_s for the source's migration to reach one of @want (or a final status);
# returns the last status.
sub wait_source {
    my ($self, $limit_s, @want) = @_;
    my $m = $self->{m};
    my %want = map { $_ => 1 } @want, qw(completed failed cancelled);
    my $end = time() + $limit_s;
    my $status = 'none';
    while (time() < $end) {
        my $stat = eval {
            PVE::MTunnel::qmp_wait_migration(
                $m->{qmp_socket},
                hold_ms => 250,
                timeout_ms => $m->{qmp_timeout_ms}
            );
        };
        if (!$stat) {
            usleep(100_000);
            next;
        }
        $status = $stat->{status} // 'none';
        last if $want{$status};
    }
    return $status;
}

# Asks the target's status every 100 ms for up to $limit_s until its migration is $want;
# returns the last answer.
sub wait_target {
    my ($self, $limit_s, $want) = @_;
    my $m = $self->{m};
    my $end = time() + $limit_s;
    while (1) {
        my $t = $m->target_request("postcopy-status $m->{vmid}");
        return $t if ($t->{migration}{status} // '') eq $want || $t->{status} eq 'stopped';
        return $t if time() >= $end;
        usleep(100_000);
    }
}

# --check --fix of a post-copy migration whose driver is gone ($st: its record): drives it to
# its end as the driver would (recovering it, resuming the target), then finishes as phase 3.
sub finish {
    my ($self, $st) = @_;
    my $m = $self->{m};
    @$self{qw(sent target_ran recover_path source_pid)} = (
        1,
        $st ? $st->{target_resume_sent} : 1,
        $st ? $st->{recover_path} : undef,
        $m->source_pid()
    );
    $m->{target_commands} //= $st->{target_commands} if $st;
    $self->run();
    $m->move_config($m->{target});
    $m->remote(['resume', $m->{vmid}, '--skiplock', '--nocheck'], timeout_ms => 30_000);
    $m->{target_resumed} = 1;
    $m->finish_source();
    $m->remove_state();
}

1;

__END__

=encoding utf8

=head1 NAME

PVE::MTunnel::Postcopy - post-copy for PVE::MTunnel::Migrate: the switch, recovery and the rule

=head1 SYNOPSIS

  # inside PVE::MTunnel::Migrate (postcopy => 'auto' or 'always')
  my $pc = PVE::MTunnel::Postcopy->new($migrate);
  $pc->check_source();                       # prepare: the source's QEMU
  $pc->check_target($listen->{commands});    # after the target's start
  my $preempt = $pc->setup_target();         # through the tunnel, before migrate
  ...
  if (defined(my $why = $pc->decide($stat))) {   # at each pass boundary
      $pc->switch($why);
      return $pc->run();                     # completed, or dies with what ended it
  }

  my ($ok, $why) = PVE::MTunnel::Postcopy::allows($state, 'continue source', $target_gone);

=head1 DESCRIPTION

Everything post-copy adds to the driver (see F<docs/postcopy.md>). The target's QEMU is driven
through its C<qm mtunnel>'s post-copy commands (C<postcopy-capabilities>, C<postcopy-status>,
C<postcopy-pause>, C<postcopy-recover>, qemu-server patch 0009), which need no VM config: during
a migration the config is on the source's node, where the target's C<qm monitor> and C<qm
status> cannot find it. Their answers are QMP's JSON.

=head1 THE RULE

=head2 allows($state, $action, $target_gone)

Function. From the moment C<migrate-start-postcopy> is sent (C<$state-E<gt>{postcopy_sent}>,
set before it is sent), C<$action> (C<stop target>, C<cancel>, C<continue source>) is allowed
only while no resume was ever sent to the target (C<$state-E<gt>{target_resume_sent}>), and
C<cancel> or C<continue source> only once the target's QEMU is confirmed gone
(C<$target_gone>). Returns C<(1)> or C<(0, $why)>. The driver's C<undo_allowed> and
C<--check>'s C<diagnose> both ask it.

=head2 rule_state()

Method: C<{postcopy_sent, target_resume_sent}> of this migration.

=head1 METHODS

=head2 new($migrate, %state)

Class method: the post-copy part of one migration (C<$migrate> is not kept alive by it).

=head2 check_source(), check_target(\@commands), setup_target()

Methods. The source's QEMU must offer C<postcopy-ram> and report C<postcopy-bytes> (read from
its capabilities and its QAPI schema); the target's C<qm start> must have announced the
post-copy commands; C<setup_target> turns post-copy on in the target's QEMU through the tunnel
(C<postcopy-preempt> too where both take it) and returns whether preempt is on. Each dies with
a message that says what is missing; nothing has been migrated then.

=head2 reason($mode, \@passes), decide($stat)

C<reason> (function): why to switch now, or undef: C<always> once the first pass is done;
C<auto> once the smallest pass so far did not shrink by a tenth for C<$STALLED_PASSES> (2)
passes, or after C<$MAX_PASSES> (8) passes. C<decide> (method) feeds it each pass's size at
the pass's boundary (C<dirty-sync-count>; the driver wakes on QEMU's C<MIGRATION_PASS>).

=head2 switch($why)

Method: C<migrate-start-postcopy>, recorded as sent before it is sent. A lost reply counts as
sent; only QEMU's error reply takes it back (then it dies).

=head2 run()

Method: after the switch, until the migration completed (returns C<query-migrate>'s answer)
or ended (dies). Resumes the target once C<postcopy-bytes> shows the source's side of the
switch through (recorded before it is sent), recovers a paused channel, pauses and recovers a
hung one (no progress for C<postcopy_stall_ms>), kicks a resume stuck in C<postcopy-recover>,
notes signals, ends at once when the source's QEMU is gone (by its pid or its monitor), and on
a final C<failed>/C<cancelled> undoes the migration only when the target never ran.

=head2 recover($why), recover_once(), next_recover_path(), is_recover_path($path), target_listens_on($status)

Methods of the recovery: retried through new tunnels until C<postcopy_recover_timeout_ms>; one
attempt pauses what still runs, reuses the socket a target still listens on (in
C<postcopy-recover>), else asks it to listen on a new C<VMID_recoverN.migrate> (N = pid * 1000
+ attempt: unique per run) and resumes the source into it; a fall back to C<postcopy-paused>
fails the attempt at once.

=head2 switch_pending($stat), resume_target(), pause_source(), source_unanswered($err, $since), source_gone($err), ended($stat)

Methods: the steps of C<run>.

=head2 source_status(), wait_source($seconds, @statuses), wait_target($seconds, $status)

Methods: the source's migration status; waiting for one of the source's statuses (or a final
one); asking the target until its migration is C<$status> (or its QEMU is gone).

=head2 finish($record)

Method: C<--check --fix> of a post-copy migration whose driver is gone: C<run>, then the
config moves to the target, the target is resumed (a no-op when it runs) and the source is
stopped.

=head1 SEE ALSO

L<PVE::MTunnel::Migrate>, F<docs/postcopy.md>

=cut
