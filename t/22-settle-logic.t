#!/usr/bin/perl
# The driver's judgement after a failure or a killed driver, without a lab: which of the
# target's volumes are the migration's own (new since the listing before the start, never one
# that existed before; on storages not listed, what the target named), which storages a start
# allocates on (targetstorage mapped as upstream's map_id), when the target's disks count as
# complete after RAM migration completed (only with the record of mirrors finished, or of
# mirrors ended without error after block-job-cancel), and what --check --fix then does: finish
# on the target, or stop the target, free its new volumes, cancel the source's block jobs and
# continue the source.

use strict;
use warnings;
use Test::More;

use PVE::MTunnel::Migrate;
use PVE::MTunnel::Postcopy;

# the target's listing is a table here (undef: the listing fails); nothing runs over ssh
package StubMigrate {
    our @ISA = ('PVE::MTunnel::Migrate');
    our ($listing, @listed);

    sub list_target_volumes {
        my ($self, @stores) = @_;
        push @listed, [@stores];
        return undef if !defined $listing;
        return { map { $_ => [@{ $listing->{$_} // [] }] } @stores };
    }
}

sub driver {
    return StubMigrate->new(
        vmid => 600,
        node => 'node1',
        target => 'node2',
        ssh => ['ssh', 'root@198.18.0.2'],
        log => sub { },
        @_
    );
}

my $d0 = 'local:600/vm-600-disk-0.raw';
my $d1 = 'local:600/vm-600-disk-1.raw';
my $small = 'small:600/vm-600-disk-0.raw';

# ---------------------------------------------------------------- new_target_volumes
{
    my $m = driver();
    local $StubMigrate::listing = { local => [$d0, $d1] };
    is_deeply($m->new_target_volumes({ local => [$d0] }, []),
        [$d1], 'new: listed now and not before, named or not');
    is_deeply($m->new_target_volumes({ local => [$d0] }, [$d0, $d1]),
        [$d1], 'new: a named volume that existed before is never new');
    local $StubMigrate::listing = undef;
    is_deeply($m->new_target_volumes({ local => [$d0] }, [$d0, $d1]),
        [$d1], 'new: when listing now fails, the named ones not listed before');
    is_deeply($m->new_target_volumes(undef, [$d0]),
        [$d0], 'new: without a listing before, what the target named (as upstream)');
    local @StubMigrate::listed;
    is_deeply($m->new_target_volumes({}, [$small]),
        [$small], 'new: a named volume on a storage not listed before');
    is_deeply(\@StubMigrate::listed, [], 'new: no storage listed before, none listed now');
    local $StubMigrate::listing = { local => [$d0] };
    is_deeply(
        $m->new_target_volumes({ local => [] }, [$small]),
        [$d0, $small],
        'new: the listed storage and a named volume elsewhere'
    );
    is_deeply($StubMigrate::listed[-1], ['local'], 'new: only the storages listed before');
}

# ---------------------------------------------------------------- target_storages
{
    my %vols = (ide0 => $d0, ide1 => 'shared:600/vm-600-disk-0.raw', ide2 => 'none');
    for my $case (
        [undef, [qw(local shared)]],
        ['1', [qw(local shared)]],
        ['small', ['small']],
        ['local:small', [qw(shared small)]],
        ['local:small,other', [qw(other small)]],
        )
    {
        my ($map, $want) = @$case;
        my $m = driver(source_volumes => \%vols, targetstorage => $map);
        is_deeply([$m->target_storages()],
            $want, 'target storages with --targetstorage ' . ($map // '(none)') . ": @$want");
    }
}

# ---------------------------------------------------------------- disks_complete
{
    my $m = driver();
    my $rec =
        sub { return { phase => $_[0], mirror_jobs => ['drive-ide0'], target_volumes => [$d1] } };
    my $job = sub { return { device => 'drive-ide0', status => $_[0], ready => 1, @_[1 .. $#_] } };
    my @cases = (
        ['no disk mirrored, no record', undef, [], 1],
        [
            'a mirror job, no record', undef,
            [$job->('ready')], 0,
            qr/^no record of its disk mirrors$/
        ],
        ['record: mirrors finished', $rec->('mirrors-finished'), [], 1],
        ['record: resumed', $rec->('resumed'), [], 1],
        [
            'record: being finished, the job ended without error', $rec->('finishing-mirrors'),
            [$job->('concluded')], 1
        ],
        [
            'record: being finished, the job ended with an error',
            $rec->('finishing-mirrors'),
            [$job->('concluded', error => 'Input/output error')],
            0,
            qr/^drive-ide0: Input\/output error$/
        ],
        [
            'record: being finished, the job is gone',
            $rec->('finishing-mirrors'),
            [], 0, qr/^the disk mirrors were not finished \(drive-ide0: gone\)$/
        ],
        [
            'record: migrating, the job still ready', $rec->('migrating'),
            [$job->('ready')], 0,
            qr/^the disk mirrors were not finished \(drive-ide0: ready\)$/
        ],
        [
            'record: migrating, the job ended without error (not after completion)',
            $rec->('migrating'), [$job->('concluded')],
            0, qr/not finished/
        ],
        ['record: mirrors failed', $rec->('mirrors-failed'), [], 0, qr/^the disk mirrors failed$/],
        [
            'record: new volumes, no mirror ever started',
            { phase => 'started', target_volumes => [$d1] },
            [], 0, qr/never mirrored/
        ],
    );
    for my $c (@cases) {
        my ($name, $st, $jobs, $want, $why) = @$c;
        my ($got, $reason) = $m->disks_complete($st, $jobs);
        is($got ? 1 : 0, $want, "complete disks? $name: " . ($want ? 'yes' : 'no'));
        like($reason // '', $why, "$name: the reason") if $why;
    }
}

# ---------------------------------------------------------------- diagnose
sub seen {
    my (%o) = @_;
    return {
        source =>
            { state => $o{s}, migration => $o{mig} // 'none', jobs => $o{jobs} // [], pid => 1 },
        target => { state => $o{t}, (exists $o{new} ? (new_volumes => $o{new}) : ()) },
        ($o{st} ? (state => $o{st}) : ()),
    };
}

sub steps {
    return [map { $_->[0] } @{ $_[0]->{fix} }];
}

{
    my $m = driver();
    my $ready = { device => 'drive-ide0', status => 'ready', ready => 1 };
    my $rec = { phase => 'migrating', mirror_jobs => ['drive-ide0'], target_volumes => [$d1] };

    my $d = $m->diagnose(
        seen(
            s => 'postmigrate',
            t => 'paused',
            mig => 'completed',
            jobs => [$ready],
            st => $rec,
            new => [$d1]
        )
    );
    like(
        $d->{state},
        qr/cannot be shown complete \(the disk mirrors were not finished \(drive-ide0: ready\)\): the copy on 'node2' must not run$/,
        'completed, the mirror still ready: the target cannot be shown complete'
    );
    ok(!$d->{ok} && !$d->{undecided}, 'completed, the mirror still ready: a fix exists');
    is_deeply(
        steps($d),
        [
            "stop the incoming VM 600 on 'node2'",
            "free the volumes allocated for this migration on 'node2': $d1",
            "cancel the block jobs on 'node1': drive-ide0",
            "continue VM 600 on 'node1'"
        ],
        'completed, the mirror still ready: stop the target, free, cancel, continue the source, in that order'
    );
    is_deeply(
        $d->{left},
        [
            "block jobs on 'node1': drive-ide0 (ready)",
            "volumes allocated for this migration on 'node2': $d1"
        ],
        'completed, the mirror still ready: the block job and the new volume are named as left'
    );

    $d = $m->diagnose(
        seen(
            s => 'postmigrate',
            t => 'paused',
            mig => 'completed',
            st => { %$rec, phase => 'mirrors-finished' },
            new => [$d1]
        )
    );
    is(
        $d->{state},
        'VM 600 is paused on both nodes after its migration completed: the target was never resumed',
        'completed, mirrors finished: the target gets the VM'
    );
    is_deeply(
        steps($d),
        [
            "stop the NBD server on 'node2'",
            "resume VM 600 on 'node2'",
            "stop its copy on 'node1' and free the migrated volumes there"
        ],
        'completed, mirrors finished: nbdstop, resume the target, stop the source and free its volumes'
    );
    is_deeply($d->{left}, [],
        'completed, mirrors finished: the new volume is the VM\'s disk now, not left');

    $d = $m->diagnose(seen(s => 'postmigrate', t => 'paused', mig => 'completed'));
    is_deeply(
        steps($d),
        ["resume VM 600 on 'node2'", "stop its copy on 'node1'"],
        'completed, RAM only: resume the target, stop the source'
    );

    $d = $m->diagnose(
        seen(
            s => 'running',
            t => 'stopped',
            jobs => [{ %$ready, status => 'concluded', error => 'Input/output error' }],
            st => $rec,
            new => [$d1]
        )
    );
    is(
        $d->{state},
        "VM 600 runs on node 'node1' (source) only",
        'source only: the verdict\'s words'
    );
    ok($d->{ok}, 'source only: ok');
    is(scalar @{ $d->{left} }, 2, 'source only: but the block job and the new volume are left');
    is_deeply(
        steps($d),
        [
            "free the volumes allocated for this migration on 'node2': $d1",
            "cancel the block jobs on 'node1': drive-ide0"
        ],
        'source only: the fix frees them and cancels the job'
    );

    $d = $m->diagnose(
        seen(
            s => 'running',
            t => 'inmigrate',
            st => { phase => 'starting', target_volumes_before => { local => [$d0] } },
            new => []
        )
    );
    is_deeply(
        steps($d),
        [
            "stop the incoming VM 600 on 'node2'",
            "free the volumes allocated for this migration on 'node2'"
        ],
        'a start under way when the driver died: stop it, then free what is new by then'
    );

    $d = $m->diagnose(seen(s => 'running', t => 'inmigrate'));
    is_deeply(
        steps($d),
        ["stop the incoming VM 600 on 'node2'"],
        'no record: the incoming copy is stopped, nothing freed'
    );
    like(
        $d->{state},
        qr/new volumes it got for local disks, if any, stay/,
        'no record: the state says volumes may stay'
    );
}

# ---------------------------------------------------------------- post-copy
{
    my $m = driver();
    my $d = $m->diagnose(seen(s => 'finish-migrate', t => undef, mig => 'postcopy-paused'));
    ok($d->{undecided} && !@{ $d->{fix} }, 'post-copy, target unreachable: nothing is touched');
    like(
        $d->{state},
        qr/^VM 600 is in post-copy \(postcopy-paused\): its memory is split between node 'node1' and node 'node2', which cannot be reached\. Nothing may be stopped or continued/,
        'post-copy, target unreachable: the state says the memory is split'
    );

    $d = $m->diagnose(seen(s => 'finish-migrate', t => 'stopped', mig => 'postcopy-paused'));
    ok($d->{lost} && $d->{undecided} && !@{ $d->{fix} },
        'post-copy, the target QEMU gone: lost, and no fix pretends otherwise');
    like(
        $d->{state},
        qr/^VM 600 is lost: in post-copy \(postcopy-paused\) its memory was split between node 'node1' and node 'node2', and its QEMU on 'node2' is gone/,
        'post-copy, the target QEMU gone: the verdict says lost, and why'
    );

    for my $mig (qw(postcopy-paused postcopy-active postcopy-recover)) {
        $d = $m->diagnose(seen(s => 'finish-migrate', t => 'running', mig => $mig));
        like(
            $d->{state},
            qr/^VM 600 runs on node 'node2' \(target\) in post-copy \($mig\)/,
            "$mig, the target runs: said so"
        );
        is_deeply(
            steps($d),
            [
                "finish the post-copy migration (recovered through a new tunnel if it is paused), then stop VM 600 on 'node1'"
            ],
            "$mig, the target runs: the fix finishes the migration, never continues the source"
        );
    }
}

# ---------------------------------------------------------------- when to switch to post-copy
{
    my $M = 1 << 20;
    eval { driver(postcopy => 'sometimes') };
    is(
        $@,
        "invalid postcopy 'sometimes' (off, auto or always)\n",
        'an unknown --postcopy is refused by name'
    );
    eval { driver(postcopy => 'auto', with_local_disks => 1) };
    like(
        $@,
        qr/^--postcopy auto with --with-local-disks is not supported yet/,
        'post-copy with local disks is refused, not half done'
    );
    eval { driver(postcopy => 'auto', postcopy_bwlimit => '10M') };
    like($@, qr/^invalid postcopy_bwlimit '10M'/, 'a bad post-copy bandwidth is refused by name');
    my $reason = \&PVE::MTunnel::Postcopy::reason;
    my @mib = sub {
        map { $_ * $M } @_;
    };
    is($reason->('off', [64 * $M, 64 * $M, 64 * $M]), undef, 'off: never');
    is($reason->('always', []), undef, 'always: not during the first pass');
    is(
        $reason->('always', [300 * $M]),
        'the first pass is done',
        'always: once the first pass is done'
    );
    is($reason->('auto', [64 * $M, 63 * $M]), undef, 'auto: two passes are not enough to tell');
    like(
        $reason->('auto', [64 * $M, 62 * $M, 64 * $M]),
        qr/^pre-copy is not converging \(remaining at the start of the last 3 passes: 64\.0 MiB, 62\.0 MiB, 64\.0 MiB\)$/,
        'auto: the smallest pass did not shrink by a tenth for two passes'
    );
    is($reason->('auto', [64 * $M, 40 * $M, 39 * $M]),
        undef, 'auto: a pass that shrank by more than a tenth is progress');
    is($reason->('auto', [64 * $M, 50 * $M, 40 * $M, 30 * $M]),
        undef, 'auto: converging: no switch');
    # sampled mid-pass the sizes of a stalled migration oscillate: each pair looks like progress
    my @osc = map { $_ % 2 ? 50 * $M : 64 * $M } 0 .. 3;
    like(
        $reason->('auto', \@osc),
        qr/^pre-copy is not converging/,
        'auto: oscillating passes (64, 50, 64, 50 MiB) switch: the smallest one did not shrink'
    );
    my @slow = map { (100 - 9 * $_) * $M } 0 .. 6;    # shrinking by a tenth each pass
    is($reason->('auto', [@slow[0 .. 5]]),
        undef, 'auto: seven passes shrinking by a tenth: no switch yet');
    like(
        $reason->('auto', \@slow),
        qr/^pre-copy did not converge in 8 passes/,
        'auto: after eight passes it switches, converging or not (it cannot stall)'
    );

    # decide(): only at pass boundaries (dirty-sync-count going up), only once
    my $m = driver(postcopy => 'auto');
    my $pc = PVE::MTunnel::Postcopy->new($m);
    my @said;
    my $look = sub {
        my ($sync, $rem) = @_;
        push @said,
            $pc->decide(
            { status => 'active', ram => { 'dirty-sync-count' => $sync, remaining => $rem * $M } });
        return $said[-1];
    };
    $look->(1, 500);
    $look->(2, 64);
    $look->(2, 30);    # mid-pass: not a sample
    $look->(3, 50);
    $look->(3, 10);
    $look->(4, 64);
    is_deeply(
        $pc->{passes},
        [64 * $M, 50 * $M, 64 * $M],
        'decide: one sample per pass, at its start'
    );
    like($look->(5, 50), qr/not converging/, 'decide: the switch once the passes stall');
    $pc->{sent} = 1;
    is($look->(6, 64), undef, 'decide: never again after the switch was sent');
}

# ---------------------------------------------------------------- post-copy's rule
{
    my $allows = \&PVE::MTunnel::Postcopy::allows;
    for my $action ('stop target', 'cancel', 'continue source') {
        is(($allows->({}, $action))[0], 1, "rule: before the switch, $action is allowed");
        my ($ok, $why) =
            $allows->({ postcopy_sent => 1, target_resume_sent => 1 }, $action, target_gone => 1);
        ok(!$ok, "rule: the target may have run: never $action, even with its QEMU gone");
        like($why, qr/its newest state is there/, "rule: $action: says why");
    }
    is(($allows->({ postcopy_sent => 1 }, 'stop target'))[0],
        1, 'rule: the switch sent, the target never ran: it may be stopped');
    ok(!($allows->({ postcopy_sent => 1 }, 'continue source'))[0],
        'rule: ... but the source is continued only once its QEMU is confirmed gone');
    is(($allows->({ postcopy_sent => 1 }, 'continue source', target_gone => 1))[0],
        1, 'rule: ... and then it is');
    my $ran = { postcopy_sent => 1, target_resume_sent => 1 };
    ok(!($allows->($ran, 'stop source'))[0],
        'rule: the source is not stopped while pages may be only there');
    is(($allows->($ran, 'stop source', completed => 1))[0],
        1, 'rule: ... only once every page reached the target');
    is(($allows->({}, 'stop source'))[0],
        1, 'rule: before the switch stopping the source is pre-copy\'s business');
}

# ---------------------------------------------------------------- post-copy's verdicts
{
    my $m = driver();
    my $ran = { phase => 'postcopy', postcopy_sent => 1, target_resume_sent => 1 };
    my $seen_pc = sub {
        my (%o) = @_;
        my $seen = seen(%o);
        $seen->{target}{migration} = $o{tmig} if exists $o{tmig};
        $seen->{old_state} = delete $seen->{state} if $o{s} eq 'stopped';
        return $seen;
    };

    # the source failed after the target ran: nothing undone, the verdict says where the rest is
    for my $s (qw(postmigrate finish-migrate)) {
        my $d = $m->diagnose(
            $seen_pc->(
                s => $s,
                t => 'running',
                mig => 'failed',
                st => $ran,
                tmig => 'postcopy-paused'
            )
        );
        ok($d->{undecided} && !@{ $d->{fix} },
            "failed post-copy ($s) after the target ran: no fix (no cont, no stop)");
        like(
            $d->{state},
            qr/^VM 600 is paused on node 'node1' \(source, $s\) with incomplete memory: post-copy failed after VM 600 ran on 'node2', which holds the rest of its memory; it is running on 'node2' \(incoming migration postcopy-paused\)\. Nothing is continued or stopped automatically.*Decide by hand/,
            "failed post-copy ($s): paused on the source with incomplete memory, where the rest is, what to do"
        );
    }
    my $d =
        $m->diagnose($seen_pc->(s => 'postmigrate', t => 'stopped', mig => 'failed', st => $ran));
    ok($d->{lost} && !@{ $d->{fix} }, 'failed post-copy, the target gone: lost, no fix');
    $d = $m->diagnose(
        $seen_pc->(
            s => 'postmigrate',
            t => 'running',
            mig => 'failed',
            st => $ran,
            tmig => 'completed'
        )
    );
    is_deeply(steps($d), ["stop its copy on 'node1'"],
        'failed post-copy, but the target\'s incoming migration completed: whole there, the source goes'
    );
    $d = $m->diagnose(
        $seen_pc->(
            s => 'postmigrate',
            t => 'paused',
            mig => 'failed',
            st => { phase => 'postcopy', postcopy_sent => 1 }
        )
    );
    is_deeply(
        steps($d),
        ["stop the incoming VM 600 on 'node2'", "continue VM 600 on 'node1'"],
        'failed post-copy before the target ran: stop it there, then continue the source'
    );
    $d = $m->diagnose($seen_pc->(s => 'postmigrate', t => 'paused', mig => 'failed'));
    ok(!grep({ /continue|resume/ } @{ steps($d) }),
        'a failed migration with no record and no post-copy set up: as before');
    my $seen = seen(s => 'postmigrate', t => 'paused', mig => 'failed');
    $seen->{source}{postcopy_ram} = 1;
    $d = $m->diagnose($seen);
    ok($d->{undecided} && !@{ $d->{fix} },
        'a failed migration that could switch to post-copy, without a record: decided by hand');

    # the source's QEMU gone after the switch
    $d = $m->diagnose(
        $seen_pc->(s => 'stopped', t => 'running', st => $ran, tmig => 'postcopy-paused'));
    ok($d->{lost} && !$d->{ok} && !@{ $d->{fix} },
        'source gone, target running in post-copy: lost, not "ok"');
    like(
        $d->{state},
        qr/^VM 600 is lost: its QEMU on node 'node1' \(source\) is gone after the switch/,
        'source gone, target running: the verdict says lost, and why'
    );
    $d = $m->diagnose(
        $seen_pc->(s => 'stopped', t => 'paused', st => $ran, tmig => 'postcopy-paused'));
    ok($d->{lost} && !@{ $d->{fix} },
        'source gone, target paused in post-copy: lost, never "resume VM on target"');
    $d = $m->diagnose($seen_pc->(s => 'stopped', t => 'running', st => $ran, tmig => 'completed'));
    ok($d->{ok},
        'source gone, the target\'s incoming migration completed: the VM runs whole there');
    $d = $m->diagnose($seen_pc->(s => 'stopped', t => 'paused', tmig => 'postcopy-active'));
    ok($d->{lost}, 'no record, but the target says it is in post-copy: lost');
    $d = $m->diagnose($seen_pc->(s => 'stopped', t => 'running', st => $ran));
    ok($d->{undecided} && !$d->{ok},
        'source gone, the target cannot tell its migration: decided by hand');
}

done_testing();
