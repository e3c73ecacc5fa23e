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
# target_resume_sent} (the driver's and its record's); $action: 'stop target', 'cancel',
# 'continue source' or 'stop source'; %facts: target_gone (the target's QEMU confirmed gone),
# completed (every page reached the target: the source's or the target's migration completed).
# Returns (1) or (0, why not).
sub allows {
    my ($state, $action, %facts) = @_;
    return (1) if !$state || !$state->{postcopy_sent};
    if ($action eq 'stop source') {
        return (1) if $facts{completed};
        return (0,
                  "the migration did not complete after the switch to post-copy: the source holds "
                . "pages the target lacks");
    }
    return (0,
        "the VM may have run on the target since the switch to post-copy (a resume was sent): "
            . "its newest state is there")
        if $state->{target_resume_sent};
    return (1) if $action eq 'stop target' || $facts{target_gone};
    return (0,
        "the switch to post-copy was sent and the target's QEMU is not confirmed gone: it may "
            . "hold part of the VM's memory");
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
    my ($mode, $passes, $pass) = @_;
    return undef if $mode eq 'off' || !@$passes;
    return 'the first pass is done' if $mode eq 'always';
    # the pass under way: QEMU's count where known (a look may miss a pass), else the samples'
    $pass //= @$passes + 1;
    my $shown = sub {
        join(', ', map { PVE::MTunnel::Migrate::render_bytes($_) } grep { defined } @_);
    };
    return sprintf("pre-copy did not converge in %d passes (the last ones: %s)",
        $pass, $shown->(@$passes[-3 .. -1]))
        if $pass >= $MAX_PASSES;
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
    return reason($self->{m}{postcopy}, $self->{passes}, $sync);
}

# ------------------------------------------------------------ the switch

# migrate-start-postcopy. The rule holds from before it is sent, in the record too (no record,
# no switch: a killed driver's --check must know): a reply that is lost may hide a switch that
# happened. Only QEMU's own refusal (an error reply: it did nothing) takes it back.
sub switch {
    my ($self, $why) = @_;
    my $m = $self->{m};
    $m->log('info', "switching to post-copy: $why");
    $m->write_state(phase => 'postcopy', postcopy_sent => 1)
        or die "not switching to post-copy: the migration's record cannot be kept, and after "
        . "the switch it is what tells --check what may be undone\n";
    $self->{sent} = 1;
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
            return $self->complete_on_target() if $self->recover('its channel broke');
            ($last, $last_trans, $last_progress) = ('', -1, time());
            next;
        }
        if ($status =~ /^postcopy-recover/) {
            # a resume under way (left by a recovery or a driver before us): stuck, it is kicked
            my $stuck = time() - $last_progress;
            next if $stuck * 1000 <= $m->{postcopy_stall_ms};
            $m->log('warn', sprintf("the migration is $status for %.0f s: kicking it", $stuck));
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
        return $self->complete_on_target()
            if $self->recover(sprintf("no progress for %.0f s", $stalled));
        ($last, $last_trans, $last_progress) = ('', -1, time());
    }
}

# Every page reached the target (its incoming migration completed) while the source's
# migration could not say so: finished as a completed migration.
sub complete_on_target {
    my ($self) = @_;
    my $m = $self->{m};
    $m->log('info', "VM $m->{vmid} has all its memory on node '$m->{target}': finishing");
    $m->{completed} = 1;
    return $m->{completed_stat} = { status => 'completed', ram => {} };
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
    # from here the target may run the guest: in the record before it is sent (a record that
    # cannot be written is only logged: the guest would wait paused for a file otherwise, and
    # this driver holds the rule itself)
    $m->note_resume()
        or $m->log('err',
              "the record cannot say that VM $vmid is resumed on node '$target': "
            . "a --check after this driver's death will not know it");
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

    if ((time() - $since) * 1000 > $m->{postcopy_recover_timeout_ms}) {
        # still streaming to the target: ending the driver would end its tunnel
        my $t = eval { $self->postcopy_status(fresh => 1) };
        my $tmig = ref $t eq 'HASH' ? $t->{migration}{status} // 'none' : 'unknown';
        if ($tmig eq 'postcopy-active') {
            $m->log('warn',
                      "the source's monitor does not answer, the incoming migration "
                    . "on node '$m->{target}' goes on: waiting");
            $_[2] = time();
        } else {
            die "the source's monitor did not answer for "
                . PVE::MTunnel::Migrate::render_duration(time() - $since)
                . " during post-copy ($err; the incoming migration on node '$m->{target}' is "
                . "$tmig): nothing was stopped or continued\n";
        }
    }
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
    my $t = eval { $self->postcopy_status() };
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

# A final 'failed' or 'cancelled' after the switch. QEMU 8.x and later continue the source by
# themselves there (migration_iteration_finish: its run state before the switch was
# 'running'): it is paused again at once, whatever follows. A target that never ran is
# stopped, then the source continued; one that may have run keeps the VM: nothing is
# touched, unless its incoming migration completed (the VM is whole there: finished as a
# completed migration).
sub ended {
    my ($self, $stat) = @_;
    my $m = $self->{m};
    my ($vmid, $node, $target) = @$m{qw(vmid node target)};
    my $status = $stat->{status};
    my $what = $stat->{'error-desc'} ? "$status - $stat->{'error-desc'}" : $status;
    $m->log('info', "migration status error: $what");
    $self->pause_source_vm();
    if (!$self->{target_ran}) {
        $m->log('info',
                  "VM $vmid never ran on node '$target': stopping it there, then "
                . "continuing VM $vmid on node '$node'");
        $m->close_tunnel_quickly(broken => 1);
        $m->undo_to_source();
        die "post-copy migration $what before VM $vmid ran on node '$target'\n";
    }
    my $t = eval { $self->postcopy_status() };
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

# The source's guest run again (QEMU continued it after a failed post-copy): paused at once,
# before anything else is decided (pausing never loses state).
sub pause_source_vm {
    my ($self) = @_;
    my $m = $self->{m};
    my $run = eval {
        PVE::MTunnel::qmp_execute($m->{qmp_socket}, 'query-status', undef, timeout_ms => 5000)
            ->{status};
    } // '';
    return if $run ne 'running';
    eval { PVE::MTunnel::qmp_execute($m->{qmp_socket}, 'stop', undef, timeout_ms => 5000) };
    $m->log('err',
        "QEMU continued VM $m->{vmid} on node '$m->{node}' by itself after post-copy failed: "
            . ($@ ? "pausing it failed: $@" : "paused it again (the target may have run it)"));
}

# ------------------------------------------------------------ recovery

# A paused post-copy migration, recovered through new tunnels until
# postcopy_recover_timeout_ms. Returns 1 when it turned out complete on the target (its
# incoming migration completed: every page is there), else once it runs again. Dies when the
# VM is lost or the deadline passed.
sub recover {
    my ($self, $why) = @_;
    my $m = $self->{m};
    my $deadline = time() + $m->{postcopy_recover_timeout_ms} / 1000;
    $m->log('warn', "post-copy migration paused ($why): recovering it through a new tunnel");
    my $attempt = 0;
    while (1) {
        $attempt++;
        # the old tunnel is broken; closing it also fails a resume that hangs in it
        $m->close_tunnel_quickly(broken => 1);
        my $pid = $self->{source_pid};
        if ($pid && PVE::MTunnel::Migrate::process_gone($pid)) {
            $self->source_gone("its process $pid is gone");
            return 1;
        }
        my $done = eval { $self->recover_once() };
        if (defined $done) {
            return 1 if $done eq 'complete on the target';
            $self->{recovered}++ if $done eq 'recovered';
            $m->log('info', "post-copy migration recovered (attempt $attempt)")
                if $done eq 'recovered';
            return 0;
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

# A recovery socket of this run: VMID_recoverN.migrate, N = pid * 1000 + attempt (its last
# three digits), unique per driver run: a --fix after a killed driver never reuses its names.
sub next_recover_path {
    my ($self) = @_;
    my $m = $self->{m};
    my $n = $$ * 1000 + (++$self->{attempts} % 1000);
    return "$m->{socket_dir}/$m->{vmid}_recover$n.migrate";
}

# One recovery: the source paused; a new tunnel forwarding a new recovery socket; the target
# paused too and listening there (QEMU releases a listener of an earlier attempt); the source
# resumed into it. Returns 'recovered', 'running' (an earlier resume got through after all)
# or 'complete on the target'; dies with why it failed (postcopy_lost set when the target's
# QEMU is gone).
sub recover_once {
    my ($self) = @_;
    my $m = $self->{m};
    my ($vmid, $node, $target, $qmp) = @$m{qw(vmid node target qmp_socket)};
    my $src = $self->source_status();
    if ($src =~ /^postcopy-recover/) {
        # a resume that hangs: its tunnel is closed (its connection fails, QEMU 7.2 falls back
        # to postcopy-paused, 9.1 from postcopy-recover-setup too); QEMU 8.2 and later can also
        # be paused in postcopy-recover
        $src = $self->wait_source(5, 'postcopy-paused', 'postcopy-active');
        if ($src eq 'postcopy-recover') {
            $self->pause_source();
            $src = $self->wait_source(5, 'postcopy-paused', 'postcopy-active');
        }
    }
    return 'running' if $src eq 'completed' || $src eq 'postcopy-active';
    die "the migration on node '$node' is $src, not postcopy-paused\n" if $src ne 'postcopy-paused';

    my $path = $self->next_recover_path();
    $m->open_tunnel([$path], timeout_ms => 30_000);
    my $t = $self->postcopy_status();
    if ($t->{status} eq 'stopped') {
        # the verdict (PVE::MTunnel::Check) says what that means
        $m->{postcopy_lost} = 1;
        die "the QEMU of VM $vmid on node '$target' (target) is gone after the switch to "
            . "post-copy\n";
    }
    my $dst = $t->{migration}{status} // 'none';
    return 'complete on the target' if $dst eq 'completed';
    if ($dst eq 'postcopy-active' || $dst =~ /^postcopy-recover/) {
        # its end of a hung channel, or of a recovery's handshake that hangs, never fails by
        # itself (QEMU before 8.2 cannot pause the latter: its channel breaks with the tunnel)
        eval { $m->target_request("postcopy-pause $vmid") };
        $m->log('info', "pausing the incoming migration on node '$target': $@") if $@;
        $t = $self->wait_target(5, 'postcopy-paused');
        $dst = $t->{migration}{status} // 'none';
    }
    die "the incoming migration on node '$target' is $dst, not postcopy-paused\n"
        if $dst ne 'postcopy-paused';
    # where it listens, in the record before it is asked to
    $self->{recover_path} = $path;
    $m->write_state(recover_path => $path);
    $m->target_request("postcopy-recover $vmid $path");
    $m->log('info', "node '$target' listens for the recovery on unix:$path");
    PVE::MTunnel::qmp_migrate_resume($qmp, "unix:$path", timeout_ms => $m->{qmp_timeout_ms});
    # a resume without an answer for postcopy_stall_ms hangs as a stalled channel does
    $src = $self->wait_resumed($m->{postcopy_stall_ms} / 1000);
    die "the resumed migration is $src\n" if $src ne 'postcopy-active' && $src ne 'completed';
    return 'recovered';
}

# After `migrate` with resume: the source's status once it runs again (postcopy-active,
# completed), fails (a final status, or postcopy-paused again: QEMU goes to postcopy-recover
# (postcopy-recover-setup on 9.1+) once connected, and back when that fails), or after
# $limit_s. QEMU before 9.1 stays postcopy-paused while it connects, which through a ready
# forward takes milliseconds, and a look may miss the short postcopy-recover in between: a
# postcopy-paused counts as the fall back once a recovery status was seen, or 2 s after the
# resume.
sub wait_resumed {
    my ($self, $limit_s) = @_;
    my $began = 0;
    return $self->watch_source(
        $limit_s,
        sub {
            my ($status, $since) = @_;
            $began = 1 if $status =~ /^postcopy-recover/;
            return $status =~ /^(postcopy-active|completed|failed|cancelled)$/
                || ($status eq 'postcopy-paused' && ($began || $since >= 2));
        }
    );
}

# The target's postcopy-status answer (a hash: {status} at least); dies on anything else.
sub postcopy_status {
    my ($self, %opts) = @_;
    my $m = $self->{m};
    my $t = $m->target_request("postcopy-status $m->{vmid}", %opts);
    die "node '$m->{target}' answered postcopy-status with "
        . (ref $t ? JSON::PP->new->canonical->encode($t) : "'$t'") . "\n"
        if ref $t ne 'HASH' || !defined $t->{status};
    return $t;
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
    my %want = map { $_ => 1 } @want, qw(completed failed cancelled);
    return $self->watch_source($limit_s, sub { $want{ $_[0] } });
}

# The source's migration status, looked at (qmp_wait_migration: woken by its events) until
# $done->($status, $seconds_since_start) is true or $limit_s passed; returns the last status.
sub watch_source {
    my ($self, $limit_s, $done) = @_;
    my $m = $self->{m};
    my $start = time();
    my $status = 'none';
    while (time() < $start + $limit_s) {
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
        last if $done->($status, time() - $start);
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
        my $t = $self->postcopy_status();
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
    # without a record the target may have run: counted as resumed
    @$self{qw(sent target_ran recover_path source_pid)} = (
        1,
        $st ? $st->{target_resume_sent} : 1,
        $st ? $st->{recover_path} : undef,
        $m->source_pid()
    );
    $m->{target_commands} //= $st->{target_commands} if $st;
    $self->run();
    $m->move_config($m->{target});
    $m->note_resume();
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

=head2 allows($state, $action, target_gone =E<gt> 0|1, completed =E<gt> 0|1)

Function. From the moment C<migrate-start-postcopy> is sent (C<$state-E<gt>{postcopy_sent}>,
set before it is sent), C<$action> (C<stop target>, C<cancel>, C<continue source>) is allowed
only while no resume was ever sent to the target (C<$state-E<gt>{target_resume_sent}>), and
C<cancel> or C<continue source> only once the target's QEMU is confirmed gone
(C<target_gone>); C<stop source> only once every page reached the target (C<completed>).
Returns C<(1)> or C<(0, $why)>. The driver's C<undo_allowed> (its C<cont_source>,
C<phase2_cleanup>'s cancel, C<stop_target>, C<stop_source>) and C<--check>'s fix steps all
ask it.

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
hung one (no progress for C<postcopy_stall_ms>), kicks a resume stuck in C<postcopy-recover>
as long,
notes signals, ends at once when the source's QEMU is gone (by its pid or its monitor), and on
a final C<failed>/C<cancelled> pauses a source QEMU continued by itself and undoes the
migration only when the target never ran.

=head2 recover($why), recover_once(), next_recover_path(), wait_resumed($seconds), postcopy_status(fresh =E<gt> 0|1)

Methods of the recovery: retried through new tunnels until C<postcopy_recover_timeout_ms>
(C<recover> returns 1 when the migration turned out complete on the target, and ends at once
when the source's QEMU is gone); one attempt lets a resume that hangs fail (its tunnel
closed; C<migrate-pause> where QEMU takes it), pauses the target's end where it still runs,
asks it to listen on a new C<VMID_recoverN.migrate> (N = pid * 1000 + attempt: unique per
run; QEMU releases an earlier listener) and resumes the source into it. C<wait_resumed>
notices a fall back to C<postcopy-paused> once a recovery status was seen or 2 s after the
resume (QEMU before 9.1 stays paused while it connects). C<postcopy_status> is the target's
C<postcopy-status> answer, checked.

=head2 complete_on_target(), pause_source_vm()

Methods: every page reached the target while the source's migration could not say so:
finished as completed; a source guest that QEMU continued by itself after a failed post-copy
(QEMU 8.x and later) paused again at once.

=head2 switch_pending($stat), resume_target(), pause_source(), source_unanswered($err, $since), source_gone($err), ended($stat)

Methods: the steps of C<run>.

=head2 source_status(), wait_source($seconds, @statuses), watch_source($seconds, $done), wait_target($seconds, $status)

Methods: the source's migration status; waiting for one of the source's statuses (or a final
one), through C<watch_source>, the one loop that looks at the source until C<$done> says so;
asking the target until its migration is C<$status> (or its QEMU is gone).

=head2 finish($record)

Method: C<--check --fix> of a post-copy migration whose driver is gone: C<run>, then the
config moves to the target, the target is resumed (a no-op when it runs) and the source is
stopped.

=head1 SEE ALSO

L<PVE::MTunnel::Migrate>, F<docs/postcopy.md>

=cut
