package PVE::MTunnel::Check;

# Where is the VM? The view of both nodes after a failure or a killed driver (inspect), what
# it means and what would settle it (diagnose: one function per case, tried in order), and
# `mtunnel-migrate --check [--fix]` (check). Post-copy's cases follow its rule
# (PVE::MTunnel::Postcopy::allows): once the switch was sent and the target may have run, no
# fix continues the source or stops the target.

use strict;
use warnings;

use PVE::MTunnel;
use PVE::MTunnel::Postcopy;

# Phases of the record from which the target's disks are complete (every mirror ended without
# error after the RAM migration completed, the source paused).
my %DISKS_COMPLETE = map { $_ => 1 } qw(mirrors-finished resumed);

# ------------------------------------------------------------ inspect

# Both nodes' view: source {state, migration, jobs, pid, postcopy_ram}, target {state,
# migration} (state undef = unreachable; migration: its incoming migration's status where the
# target tells it, see Migrate's target_status), and this migration's record when it is about
# the source QEMU that runs now (state), else as old_state. With volumes => 1 (and the target
# reachable, not running the VM): target {new_volumes}, its volumes of the VM allocated for
# the migration (see Migrate's new_target_volumes).
sub inspect {
    my ($m, %opts) = @_;
    my %src = (state => 'stopped', migration => 'none', jobs => []);
    my $qmp = $m->{qmp_socket};
    my $pid = $m->source_pid();
    if ($pid && !PVE::MTunnel::Migrate::process_gone($pid)) {
        $src{pid} = $pid;
        my $st =
            eval { PVE::MTunnel::qmp_execute($qmp, 'query-status', undef, timeout_ms => 5000) };
        $src{state} = $st ? $st->{status} : 'unknown';
        $src{error} = $@ if !$st;
        my $mig = eval { PVE::MTunnel::qmp_query_migrate($qmp, timeout_ms => 5000) };
        $src{migration} = $mig->{status} // 'none' if $mig;
        my $jobs =
            eval { PVE::MTunnel::qmp_execute($qmp, 'query-block-jobs', undef, timeout_ms => 5000) };
        $src{jobs} = $jobs // [];
        my $caps = eval {
            PVE::MTunnel::qmp_execute($qmp, 'query-migrate-capabilities', undef,
                timeout_ms => 5000);
        };
        $src{postcopy_ram} =
            grep { $_->{capability} eq 'postcopy-ram' && $_->{state} } @{ $caps // [] };
    }
    my %seen = (source => \%src);
    my $st = $m->read_state();
    if ($st && $st->{node} eq $m->{node} && $st->{target} eq $m->{target}) {
        # the record is about this source QEMU only while it is the one that was migrated
        my $key = $src{pid} && ($st->{source_pid} // 0) == $src{pid} ? 'state' : 'old_state';
        $seen{$key} = $st;
        # what the target's qm mtunnel announced: how it can be asked
        $m->{target_commands} //= $st->{target_commands};
        # a fix goes on with this record (post-copy's rule reads it), never a new one
        $m->{state} //= {%$st};
    }
    # a start refused before ssh ran left nothing there (the target is not asked: it may be
    # unreachable with the same ssh command)
    my $untouched = defined $m->{target_started} && !$m->{target_started};
    $seen{target} = $untouched ? { state => 'stopped' } : $m->target_status();
    my $t = $seen{target}{state};
    $seen{target}{new_volumes} =
        $m->new_target_volumes($st->{target_volumes_before}, $st->{target_volumes})
        if $seen{state} && $opts{volumes} && defined $t && $t ne 'running';
    return \%seen;
}

# ------------------------------------------------------------ disks

# Whether the target's disks are shown complete after the RAM migration completed: (1) or
# (0, why not). Shown complete: no disk was mirrored; or the record says the mirrors were
# finished; or it says they were being finished (block-job-cancel of ready mirrors, sent
# only after completion) and every one of them ended without an error (QEMU syncs the
# target and flushes it before such a job ends). A mirror still ready proves nothing: the
# driver's death took its NBD connection, and the writes it had not copied are lost to it.
sub disks_complete {
    my ($m, $st, $jobs) = @_;
    my %job = map { $_->{device} => $_ } @$jobs;
    my @ids = $st ? @{ $st->{mirror_jobs} // [] } : ();
    my %all = map { $_ => 1 } @ids, keys %job;
    return (0, 'the disk mirrors failed')
        if $m->{target_disks_incomplete} || ($st && $st->{phase} eq 'mirrors-failed');
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

# ------------------------------------------------------------ diagnose

# What the two states mean: {state => sentence, ok => VM runs on exactly one node,
# fix => [steps] (each [description, code]), undecided => 1 when no fix is safe, lost => 1
# when no node holds the VM's current state any more, left => [what the migration left
# behind: block jobs, the target's new volumes]}.
sub diagnose {
    my ($m, $seen) = @_;
    my $c = context($m, $seen);
    for my $case (
        \&postcopy_split, \&postcopy_failed, \&postcopy_source_gone,
        \&postcopy_unknown, \&target_unreachable, \&on_one_node,
        \&both_running, \&incoming_left, \&target_runs,
        \&completed_both_paused, \&completed_target_stopped, \&source_gone_target_paused,
        \&neither,
        )
    {
        my $d = $case->($c);
        return $d if $d;
    }
}

# What every case needs: both states, the record, what is left, and the fix steps.
sub context {
    my ($m, $seen) = @_;
    my ($vmid, $node, $target, $qmp) = @$m{qw(vmid node target qmp_socket)};
    my $src = $seen->{source};
    my @jobs = @{ $src->{jobs} };
    my $st = $seen->{state};
    my $rec = $st // $seen->{old_state};
    my %c = (
        m => $m,
        vmid => $vmid,
        node => $node,
        target => $target,
        s => $src->{state},
        smig => $src->{migration},
        t => $seen->{target}{state},
        tmig => $seen->{target}{migration},
        st => $st,
        old => $seen->{old_state},
        # the post-copy rule's view: the record of this migration (or of the QEMU now gone)
        rule => {
            postcopy_sent => $rec && $rec->{postcopy_sent},
            target_resume_sent => $rec && $rec->{target_resume_sent},
        },
        postcopy_ram => $src->{postcopy_ram},
        jobs => \@jobs,
        new => $seen->{target}{new_volumes},
        check => $m->{check_command}
            // "mtunnel-migrate --check $vmid $target --node $node --ssh-file FILE --fix",
    );
    $c{completed} = $c{smig} eq 'completed' || ($c{s} eq 'postmigrate' && $c{smig} eq 'none');
    # what the fix steps' own undo_allowed() may go by: the target's QEMU seen gone, every page
    # on the target
    $m->{target_gone} = 1 if defined $c{t} && $c{t} eq 'stopped';
    $m->{completed} = 1 if $c{smig} eq 'completed' || ($c{tmig} // '') eq 'completed';

    # what the migration left: its block jobs, and (unless the VM is to run there) the
    # target's new volumes
    my @left;
    push @left,
        "block jobs on '$node': "
        . join(', ',
        map { "$_->{device} ($_->{status}" . (defined $_->{error} ? ": $_->{error}" : '') . ')' }
            @jobs)
        if @jobs;
    $c{left_jobs} = [@left];
    my ($new, $t) = @c{qw(new t)};
    push @left, "volumes allocated for this migration on '$target': @$new"
        if $new && @$new && defined $t && $t ne 'running';
    $c{left} = \@left;

    my @job_ids = map { $_->{device} } @jobs;
    $c{job_ids} = \@job_ids;
    # the migration's own mirror jobs too: a blockdev-mirror job already dismissed may have
    # left its NBD target node on the source, which cancelling the gone job detaches
    my %live = map { $_ => 1 } @job_ids;
    my @recorded = grep { !$live{$_} } @{ $st ? $st->{mirror_jobs} // [] : [] };
    $c{stop_target} = [
        "stop the incoming VM $vmid on '$target'",
        sub {
            # a start whose answer was lost may still run there
            $m->wait_target_start_gone() if $st && $st->{phase} eq 'starting';
            $m->stop_target();
            my $now = $m->target_state() // 'unreachable';
            die "VM $vmid on '$target' is $now after 'qm stop'\n" if $now ne 'stopped';
            $m->{target_gone} = 1;
        }
    ];
    # only with the record: the volumes new since the start (listed again when it runs)
    $c{free_new} = [
        $st && (($new && @$new) || $st->{phase} eq 'starting')
        ? [
            "free the volumes allocated for this migration on '$target'"
                . ($new && @$new ? ": @$new" : ''),
            sub {
                $m->free_new_target_volumes($st->{target_volumes_before}, $st->{target_volumes});
            }
            ]
        : ()
    ];
    $c{cancel_jobs} = [
        @jobs
        ? [
            "cancel the block jobs on '$node': @job_ids",
            sub {
                PVE::MTunnel::qmp_mirror_cancel($qmp, [@job_ids, @recorded], timeout_ms => 60_000);
            }
            ]
        : ()
    ];
    $c{cont} = [
        "continue VM $vmid on '$node'",
        sub {
            die "the rule of post-copy forbids it\n" if !$m->undo_allowed('continue source');
            # no NBD node of a gone mirror job may stay attached to a running source
            eval { PVE::MTunnel::qmp_mirror_cancel($qmp, \@recorded, timeout_ms => 10_000) }
                if @recorded && !@jobs;
            $m->move_config($node);
            PVE::MTunnel::qmp_execute($qmp, 'cont');
        }
    ];
    $c{resume_target} = [
        "resume VM $vmid on '$target'",
        sub {
            $m->move_config($target);
            $m->note_resume();
            $m->remote(['resume', $vmid, '--skiplock', '--nocheck']);
        }
    ];
    return \%c;
}

sub result {
    my ($c, %r) = @_;
    return { left => $c->{left}, fix => [], %r };
}

# where the VM runs, its config must be (pve_dir)
sub config_to {
    my ($c, $to) = @_;
    my $m = $c->{m};
    return () if !defined $m->{pve_dir} || $m->config_node() eq $to;
    return ["move the config of VM $c->{vmid} to node '$to'", sub { $m->move_config($to) }];
}

# the target's copy must not run: stop it (confirmed), free what it got, end the mirrors,
# and only then continue the source
sub to_source {
    my ($c) = @_;
    return [
        ($c->{t} eq 'stopped' ? () : $c->{stop_target}),
        @{ $c->{free_new} },
        @{ $c->{cancel_jobs} },
        ($c->{s} =~ /^(?:postmigrate|finish-migrate|paused)$/ ? $c->{cont} : ())
    ];
}

# stop the source's copy of a VM that runs on the target (freeing the volumes it migrated)
sub stop_source_step {
    my ($c, $what) = @_;
    my ($m, $st) = @$c{qw(m st)};
    my @migrated =
        $st && $DISKS_COMPLETE{ $st->{phase} } ? @{ $st->{mirror_jobs} // [] } : ();
    return [
        "stop $what on '$c->{node}'" . (@migrated ? " and free its migrated volumes there" : ''),
        sub {
            $m->move_config($c->{target});
            $m->stop_source();
            $m->{mirror_jobs} = \@migrated;
            $m->free_source_volumes() if @migrated;
        }
    ];
}

# Post-copy under way: the VM's memory is split between the nodes; only finishing the
# migration helps.
sub postcopy_split {
    my ($c) = @_;
    my ($vmid, $node, $target, $mig, $s, $t) = @$c{qw(vmid node target smig s t)};
    return undef if $mig !~ /^postcopy-/;
    return result(
        $c,
        state =>
            "VM $vmid is in post-copy ($mig): its memory is split between node '$node' and node '$target', which cannot be reached. Nothing may be stopped or continued: once '$target' is reachable, run on '$node': $c->{check}",
        undecided => 1
    ) if !defined $t;
    return result(
        $c,
        state =>
            "VM $vmid is lost: in post-copy ($mig) its memory was split between node '$node' and node '$target', and its QEMU on '$target' is gone. The source on '$node' holds no complete state (it is kept paused, QEMU state $s, for inspection; 'qm stop $vmid' there ends it)",
        undecided => 1,
        lost => 1
    ) if $t eq 'stopped';
    my $m = $c->{m};
    return result(
        $c,
        state => "VM $vmid "
            . ($t eq 'running' ? "runs on node '$target' (target)" : "is $t on node '$target'")
            . " in post-copy ($mig): the rest of its memory is still on '$node'",
        fix => [
            [
                "finish the post-copy migration (recovered through a new tunnel if it is paused), then stop VM $vmid on '$node'",
                sub { $m->postcopy->finish($c->{st}) }
            ]
        ]
    );
}

# The source's migration failed (or was cancelled) after the switch to post-copy.
sub postcopy_failed {
    my ($c) = @_;
    my ($vmid, $node, $target, $mig, $s, $t, $tmig) = @$c{qw(vmid node target smig s t tmig)};
    return undef if $mig ne 'failed' && $mig ne 'cancelled';
    if (!$c->{rule}{postcopy_sent}) {
        # no record: a source set up for post-copy may have switched
        return undef if !$c->{postcopy_ram} || $c->{st};
        return result(
            $c,
            state =>
                "VM $vmid is $s on node '$node' after a migration that could switch to post-copy $mig, and no record tells whether it switched or ran on '$target' ("
                . ($t // 'cannot be reached')
                . "): decide by hand",
            undecided => 1
        );
    }
    if (!$c->{rule}{target_resume_sent}) {
        # the target never ran: its copy is stopped, then the source continued
        return result(
            $c,
            state =>
                "VM $vmid is $s on node '$node' after post-copy $mig before it ran on '$target', which cannot be reached: once it is, run on '$node': $c->{check}",
            undecided => 1
        ) if !defined $t;
        return result(
            $c,
            state =>
                "VM $vmid runs on node '$target' although the record of its migration says no resume was sent there (post-copy $mig; '$node': $s): decide by hand",
            undecided => 1
        ) if $t eq 'running';
        return result(
            $c,
            state =>
                "VM $vmid is $s on node '$node' after post-copy $mig before it ran on '$target' ($t): its state is only on '$node'",
            fix => to_source($c)
        );
    }
    return whole_on_target($c, "post-copy $mig on '$node'") if ($tmig // '') eq 'completed';
    if ($s eq 'running') {
        # QEMU 8.x and later continue the source by themselves after a failed post-copy
        my $m = $c->{m};
        return result(
            $c,
            state =>
                "VM $vmid runs again on node '$node' (source): QEMU continued it by itself after post-copy $mig, although it ran on '$target' ("
                . ($t // 'cannot be reached')
                . ") since the switch, from older memory",
            fix => [
                [
                    "pause VM $vmid on '$node' (its guest must not go on from older memory)",
                    sub { PVE::MTunnel::qmp_execute($m->{qmp_socket}, 'stop') }
                ]
            ]
        );
    }
    my $where =
          !defined $t ? "node '$target' cannot be reached"
        : $t eq 'stopped' ? "its QEMU on '$target' is gone"
        : "it is $t on '$target'" . (defined $tmig ? " (incoming migration $tmig)" : '');
    return result(
        $c,
        state =>
            "VM $vmid is paused on node '$node' (source, $s) with incomplete memory: post-copy $mig after VM $vmid ran on '$target', which holds the rest of its memory; $where. Nothing is continued or stopped automatically: the guest on '$target' stops at the first page it lacks, and continuing '$node' would roll it back to older memory (and disk writes since the switch would not match it). Decide by hand: 'qm stop $vmid' on '$node' and 'qm stop $vmid --skiplock --migratedfrom $node' on '$target' (its config is on '$node'), then start it from its disks, or restore it",
        undecided => 1,
        lost => !defined $t || $t eq 'stopped' ? 1 : 0
    );
}

# The source's QEMU is gone after the switch to post-copy (its record says so, or the target's
# incoming migration is in post-copy).
sub postcopy_source_gone {
    my ($c) = @_;
    my ($vmid, $node, $target, $s, $t, $tmig) = @$c{qw(vmid node target s t tmig)};
    return undef if $s ne 'stopped';
    return undef if !$c->{rule}{postcopy_sent} && ($tmig // '') !~ /^postcopy-/;
    return result(
        $c,
        state =>
            "VM $vmid is stopped on node '$node' after the switch to post-copy, and node '$target' cannot be reached: once it is, run on '$node': $c->{check}",
        undecided => 1
    ) if !defined $t;
    return whole_on_target($c, "its QEMU on '$node' is gone") if ($tmig // '') eq 'completed';
    return result(
        $c,
        state =>
            "VM $vmid is lost: after the switch to post-copy its QEMU on node '$node' is gone and so is its QEMU on '$target'",
        undecided => 1,
        lost => 1
    ) if $t eq 'stopped';
    return result(
        $c,
        state =>
            "VM $vmid is $t on node '$target', but whether its incoming migration got all its memory cannot be asked there: its QEMU on node '$node' is gone after the switch to post-copy. Decide by hand",
        undecided => 1
    ) if !defined $tmig;
    return result(
        $c,
        state =>
            "VM $vmid is lost: its QEMU on node '$node' (source) is gone after the switch to post-copy, and '$target' ($t, incoming migration $tmig) lacks the part of its memory that was only on '$node'. 'qm stop $vmid --skiplock --migratedfrom $node' on '$target' ends it; start it again from its disks",
        undecided => 1,
        lost => 1
    );
}

# The switch was sent and the source's QEMU is there, but its migration says neither
# post-copy, nor an end, nor completed (its monitor did not answer, or a newer QEMU's status):
# nothing can be decided safely.
sub postcopy_unknown {
    my ($c) = @_;
    my ($vmid, $node, $target, $mig, $s, $t) = @$c{qw(vmid node target smig s t)};
    return undef if !$c->{rule}{postcopy_sent} || $mig eq 'completed';
    return result(
        $c,
        state =>
            "VM $vmid switched to post-copy, and its migration on node '$node' ($s) says '$mig' ('$target': "
            . ($t // 'cannot be reached')
            . "): whether every page reached '$target' cannot be told. Nothing may be stopped or continued: run on '$node' again: $c->{check}",
        undecided => 1
    );
}

# The target's incoming migration completed: the VM is whole there.
sub whole_on_target {
    my ($c, $why) = @_;
    my ($vmid, $node, $target, $s, $t) = @$c{qw(vmid node target s t)};
    my @stop = $s eq 'stopped' ? () : (stop_source_step($c, "its copy"));
    return result(
        $c,
        state =>
            "VM $vmid has all its memory on node '$target' ($t), whose incoming migration completed ($why)",
        ok => $t eq 'running' && !@stop && !config_to($c, $target),
        fix => [config_to($c, $target), ($t eq 'running' ? () : $c->{resume_target}), @stop]
    );
}

sub target_unreachable {
    my ($c) = @_;
    my ($vmid, $node, $target, $s, $t) = @$c{qw(vmid node target s t)};
    return undef if defined $t;
    return result(
        $c,
        state =>
            "VM $vmid runs on node '$node' (source); node '$target' cannot be reached to confirm that its incoming copy is gone (run 'qm stop $vmid --skiplock --migratedfrom $node' there once it is reachable)",
        undecided => 1
    ) if $s eq 'running';
    my ($complete) = disks_complete($c->{m}, $c->{st}, $c->{jobs});
    return result(
        $c,
        state =>
            "VM $vmid is paused on node '$node' (source, $s) after its migration completed, and node '$target' cannot be reached. Its copy there has incomplete disks and must never be resumed: once '$target' is reachable, run 'qm stop $vmid --skiplock --migratedfrom $node' there (or without --migratedfrom where its config moved), then 'qm resume $vmid' on '$node'",
        undecided => 1
    ) if $c->{completed} && $c->{m}{target_disks_incomplete};
    return result(
        $c,
        state =>
            "VM $vmid is paused on node '$node' (source, $s) after its migration completed, and node '$target' cannot be reached: "
            . (
            $complete
            ? 'it holds the migrated state and may run it'
            : 'its copy there must not run (its disks cannot be shown complete)'
            )
            . ". Once '$target' is reachable, run on '$node': $c->{check}",
        undecided => 1
    ) if $c->{completed};
    return result(
        $c,
        state =>
            "VM $vmid is $s on node '$node' (source); node '$target' cannot be reached: run on '$node' once it is: $c->{check}",
        undecided => 1
    );
}

# Runs on exactly one node: only its config may be elsewhere, and leftovers.
sub on_one_node {
    my ($c) = @_;
    my ($vmid, $node, $target, $s, $t) = @$c{qw(vmid node target s t)};
    if ($s eq 'running' && $t eq 'stopped') {
        my @config = config_to($c, $node);
        return result(
            $c,
            state => "VM $vmid runs on node '$node' (source) only"
                . (@config ? ", but its config is on '$target'" : ''),
            ok => !@config,
            fix => [@config, @{ $c->{free_new} }, @{ $c->{cancel_jobs} }]
        );
    }
    if ($t eq 'running' && $s eq 'stopped') {
        my @config = config_to($c, $target);
        return result(
            $c,
            state => "VM $vmid runs on node '$target' (target) only"
                . (@config ? ", but its config is on '$node'" : ''),
            ok => !@config,
            fix => \@config
        );
    }
    return undef;
}

sub both_running {
    my ($c) = @_;
    my ($vmid, $node, $target, $s, $t) = @$c{qw(vmid node target s t)};
    return undef if $s ne 'running' || $t ne 'running';
    return result(
        $c,
        state =>
            "VM $vmid runs on BOTH nodes '$node' and '$target': stop the copy whose guest is not the current one by hand",
        undecided => 1
    );
}

# An incoming copy waits on the target while the source runs (the target never resumed).
sub incoming_left {
    my ($c) = @_;
    my ($vmid, $node, $target, $s, $t) = @$c{qw(vmid node target s t)};
    my %incoming = map { $_ => 1 } qw(inmigrate prelaunch paused present);
    return undef if $s ne 'running' || !$incoming{$t};
    return result(
        $c,
        state => "VM $vmid runs on node '$node' (source); an incoming copy is left $t on '$target'"
            . (
            $c->{st}
            ? ''
            : " (new volumes it got for local disks, if any, stay: see 'pvesm list' there)"
            ),
        fix => to_source($c)
    );
}

# The target runs its new volumes: the source's copies go, as after a migration.
sub target_runs {
    my ($c) = @_;
    my ($vmid, $node, $target, $s, $t) = @$c{qw(vmid node target s t)};
    return undef if $t ne 'running';
    return result(
        $c,
        state => "VM $vmid runs on node '$target' (target); its copy on '$node' is left $s",
        fix => [stop_source_step($c, "VM $vmid")]
    );
}

sub completed_both_paused {
    my ($c) = @_;
    my ($vmid, $node, $target, $s, $t, $st, $m) = @$c{qw(vmid node target s t st m)};
    return undef if !$c->{completed} || ($t ne 'paused' && $t ne 'present');
    my ($complete, $why) = disks_complete($m, $st, $c->{jobs});
    return result(
        $c,
        state =>
            "VM $vmid is paused on both nodes after its migration completed, but its disks on '$target' cannot be shown complete ($why): the copy on '$target' must not run",
        fix => to_source($c)
    ) if !$complete;
    my @mirrored = $st ? @{ $st->{mirror_jobs} // [] } : ();
    my @job_ids = @{ $c->{job_ids} };
    my @fix;
    push @fix, [
        "dismiss the ended disk mirrors on '$node'",
        sub {
            PVE::MTunnel::qmp_execute($m->{qmp_socket}, 'job-dismiss', { id => $_ }) for @job_ids;
        }
    ] if @job_ids;
    push @fix, [
        "stop the NBD server on '$target'",
        sub {
            # it may be stopped already (the driver got that far): not an error
            eval { $m->remote(['nbdstop', $vmid], timeout_ms => 30_000) };
            $m->log('warn', "stopping the NBD server on '$target': $@") if $@;
        }
    ] if @mirrored;
    push @fix, $c->{resume_target}, [
        "stop its copy on '$node'" . (@mirrored ? " and free the migrated volumes there" : ''),
        sub {
            $m->stop_source();
            # as phase 3: the mirrored disks' source volumes go once the VM runs on the target
            $m->{mirror_jobs} = \@mirrored;
            $m->free_source_volumes() if @mirrored;
        }
    ];
    return result(
        $c,
        state =>
            "VM $vmid is paused on both nodes after its migration completed: the target was never resumed",
        fix => \@fix,
        # its new volumes are the VM's disks from now on
        left => $c->{left_jobs}
    );
}

sub completed_target_stopped {
    my ($c) = @_;
    my ($vmid, $node, $target, $s, $t) = @$c{qw(vmid node target s t)};
    return undef if !$c->{completed} || $t ne 'stopped';
    return result(
        $c,
        state =>
            "VM $vmid is paused on node '$node' (source, $s) and stopped on '$target': its state is only on '$node'",
        fix => to_source($c)
    );
}

# The source's QEMU is gone (its record cannot be tied to it): a completed incoming
# migration on the target.
sub source_gone_target_paused {
    my ($c) = @_;
    my ($vmid, $node, $target, $s, $t, $old) = @$c{qw(vmid node target s t old)};
    return undef if $s ne 'stopped' || $t ne 'paused';
    # a storage migration whose mirrors were not finished leaves the target's disks unproven
    return result(
        $c,
        state =>
            "VM $vmid is stopped on node '$node' and paused on '$target' with a completed incoming migration, but the disk mirrors of that migration were not finished ($old->{phase}): its disks on '$target' may be incomplete, decide by hand (the disks on '$node' are intact; the VM's memory is only on '$target')",
        undecided => 1
        )
        if $old
        && @{ $old->{mirror_jobs} // [] }
        && !$DISKS_COMPLETE{ $old->{phase} };
    return result(
        $c,
        state =>
            "VM $vmid is stopped on node '$node' and paused on '$target' with a completed incoming migration",
        fix => [$c->{resume_target}]
    );
}

sub neither {
    my ($c) = @_;
    my ($vmid, $node, $target, $s, $t) = @$c{qw(vmid node target s t)};
    return result(
        $c,
        state => "VM $vmid runs on neither node ('$node': $s, '$target': $t)"
            . (
            $t eq 'inmigrate' ? "; the incoming VM on '$target' never got the complete state" : ''
            ),
        undecided => 1
    ) if $s ne 'running' && $t ne 'running';
    return result(
        $c,
        state => "VM $vmid is $s on node '$node' and $t on '$target'",
        undecided => 1
    );
}

# ------------------------------------------------------------ check

# The start time of process $pid (clock ticks since boot, /proc/PID/stat), or undef when it is
# gone: a pid with another start time is another process.
sub process_start {
    my ($pid) = @_;
    open(my $fh, '<', "/proc/$pid/stat") or return undef;
    my $stat = <$fh> // '';
    close($fh);
    # the command name may hold spaces and parentheses: fields after the last ')'
    my ($rest) = $stat =~ /\)\s+(.*)\z/s or return undef;
    my @f = split /\s+/, $rest;
    return $f[19];
}

# The driver that wrote $record, when it is still alive: its pid, else undef.
sub owner_alive {
    my ($record) = @_;
    my ($pid, $start) = @{ $record->{driver} // [] };
    return undef if !$pid || PVE::MTunnel::Migrate::process_gone($pid);
    my $now = process_start($pid);
    return defined $now && defined $start && $now eq $start ? $pid : undef;
}

# mtunnel-migrate --check: say what is where; with $fix, apply the fix that diagnose found
# (a step that fails ends the fix; the state is looked at again either way) and, once the VM
# runs on exactly one node with nothing left, remove the migration's stale sockets of both
# nodes and its record. A fix is refused while the driver that wrote the record still runs.
sub check {
    my ($m, %opts) = @_;
    my ($vmid, $node, $target) = @$m{qw(vmid node target)};
    my $seen = inspect($m, volumes => 1);
    my $src = $seen->{source};
    $m->log(
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
    my $tgt = $seen->{target};
    $m->log('info',
              "node '$target' (target): "
            . (defined $tgt->{state} ? "VM $vmid $tgt->{state}" : 'cannot be reached')
            . (defined $tgt->{migration} ? ", incoming migration $tgt->{migration}" : ''));
    my $rec = $seen->{state} // $seen->{old_state};

    if (my $st = $seen->{state}) {
        $m->log('info',
            "record of the migration to '$target': $st->{phase}"
                . (@{ $st->{mirror_jobs} // [] } ? ", mirrors @{ $st->{mirror_jobs} }" : ''));
    }
    if ($rec && (my $pid = owner_alive($rec))) {
        my $d = {
            state =>
                "VM $vmid is being migrated to '$target' by process $pid, which is still running: nothing is changed while it does (wait for it, or stop it and run this again)",
            undecided => 1,
            fix => [],
            left => []
        };
        $m->log('info', "state: $d->{state}");
        return $d;
    }
    my $d = diagnose($m, $seen);
    $m->log('info', "state: $d->{state}");
    $m->log('info', "left behind: $_") for @{ $d->{left} };
    my $todo = !$d->{undecided} && @{ $d->{fix} } && (!$d->{ok} || @{ $d->{left} });

    if ($opts{fix} && $todo) {
        # a signal ends no step half-way (a post-copy being finished goes on): noted, as the
        # driver does; a closed output (PIPE) is no reason to stop either
        local @SIG{qw(INT TERM QUIT HUP PIPE)} =
            (sub { $m->{signal} //= $_[0]; $m->{signals}++ }) x 5;
        for my $step (@{ $d->{fix} }) {
            $m->log('info', "fix: $step->[0]");
            eval { $step->[1]->() };
            if (my $err = $@) {
                chomp $err;
                $m->log('err', "fix failed: $err");
                last;
            }
        }
        $seen = inspect($m, volumes => 1);
        $d = diagnose($m, $seen);
        $m->log('info', "state: $d->{state}");
        $m->log('info', "left behind: $_") for @{ $d->{left} };
    } elsif ($todo) {
        $m->log('info',
            "to fix (run again with --fix): " . join('; ', map { $_->[0] } @{ $d->{fix} }));
    }
    # sockets left by a killed driver's ssh and by a target QEMU that is gone
    return $d
        if !$d->{ok}
        || $seen->{source}{migration} =~ /^(active|setup|device|pre-switchover|postcopy)/;
    # the VM runs on one node, no migration is under way: the migration sockets of both
    # nodes are stale (QEMU unlinks its incoming socket on accept; nbdstop leaves its own)
    my @stale = $m->stale_sockets();
    my $remote = $m->stale_target_sockets() // [];
    my $how = $opts{fix} ? 'removed' : 'left (--fix removes them)';
    $m->log('info', "stale socket files on '$node' $how: @stale") if @stale;
    $m->log('info', "stale socket files on '$target' $how: @$remote") if @$remote;
    if ($opts{fix}) {
        unlink(grep { -S $_ } @stale);
        $m->remove_target_sockets(@$remote) if @$remote;
        $m->remove_state() if !@{ $d->{left} };
    }
    return $d;
}

1;

__END__

=encoding utf8

=head1 NAME

PVE::MTunnel::Check - where a migrated VM is, what that means, and what settles it

=head1 SYNOPSIS

  use PVE::MTunnel::Check;
  my $seen = PVE::MTunnel::Check::inspect($migrate, volumes => 1);
  my $d = PVE::MTunnel::Check::diagnose($migrate, $seen);
  # {state => '...', ok => 0|1, undecided => 0|1, lost => 0|1, fix => [[what, code], ...], left => [...]}
  PVE::MTunnel::Check::check($migrate, fix => 1);    # mtunnel-migrate --check --fix

=head1 DESCRIPTION

The judgement behind C<mtunnel-migrate --check> and behind every failed migration's verdict,
for a L<PVE::MTunnel::Migrate> driver object (C<$migrate>): its parameters name the VM, the
nodes and how to reach the target. C<PVE::MTunnel::Migrate>'s C<inspect>, C<diagnose>,
C<disks_complete> and C<check> methods are these functions.

=head1 FUNCTIONS

=head2 inspect($migrate, volumes =E<gt> 0|1)

Both nodes' view: C<source> (C<state>, C<migration>, C<jobs>, C<pid>, C<postcopy_ram>),
C<target> (C<state>: its run state, C<stopped>, C<present> (a QEMU whose state cannot be asked
while the config is elsewhere) or undef (unreachable); C<migration>: its incoming migration,
where its C<qm mtunnel> tells it), the migration's record as C<state> (about the running source
QEMU) or C<old_state>; with C<volumes>, the target's new volumes.

=head2 disks_complete($migrate, $record, \@jobs)

Whether the target's disks are shown complete after completion: C<(1)> or C<(0, $why)>.

=head2 diagnose($migrate, $seen)

What C<$seen> means, one case function after the other: post-copy under way, post-copy failed
(the rule: a target that may have run keeps the VM, nothing is undone), the source's QEMU gone
after the switch (lost unless the target's incoming migration completed), the target
unreachable, the VM on one node (its config there too), on both, an incoming copy left, the
target running, completed and paused on both, completed with the target stopped, the source
gone and the target paused, neither.

=head2 context($migrate, $seen), result($context, %fields), config_to($context, $node), to_source($context), stop_source_step($context, $what), whole_on_target($context, $why)

The cases' shared parts: the states, the record, the rule's view, what is left and the fix
steps; a result; moving the config where the VM runs; settling on the source; stopping the
source's copy; a VM whole on the target.

=head2 postcopy_split, postcopy_failed, postcopy_source_gone, postcopy_unknown, target_unreachable, on_one_node, both_running, incoming_left, target_runs, completed_both_paused, completed_target_stopped, source_gone_target_paused, neither

The cases, each C<($context)>, returning a result or undef when they do not apply.

=head2 check($migrate, fix =E<gt> 0|1)

C<--check>: logs both nodes' view and the state; with C<fix>, applies the fix (refused while
the driver that wrote the record, by pid and start time, still runs), looks again, and once
the VM runs on one node with nothing left removes stale sockets and the record.

=head2 process_start($pid), owner_alive($record)

A process's start time (clock ticks since boot); the pid of the driver that wrote the record
when that very process still runs, else undef.

=head1 SEE ALSO

L<PVE::MTunnel::Migrate>, L<PVE::MTunnel::Postcopy>, F<docs/postcopy.md>, F<docs/faults.md>

=cut
