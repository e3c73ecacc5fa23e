#!/usr/bin/perl
# Post-copy's rule against scripted sequences (docs/postcopy.md): the driver runs whole
# migrations against a scripted source monitor (what QEMU answers, step by step) and a
# scripted target (its qm mtunnel's post-copy commands, its qm commands, the tunnels), for the
# cases a real QEMU will not produce on cue. From the moment migrate-start-postcopy is sent,
# the source is never continued, the migration never cancelled and the target never stopped
# unless the target never ran and its QEMU is confirmed gone; a live post-copy channel is
# never closed; a source that dies is found within seconds; recovery copes with the leftovers
# of earlier attempts; 'auto' cannot stall.

use strict;
use warnings;
use Test::More;
use File::Temp qw(tempdir);
use JSON::PP ();
use Time::HiRes qw(time);

use ScriptedQMP;
use PVE::MTunnel::Migrate;

my $tmp = tempdir(CLEANUP => 1);
my $M = 1 << 20;
my $T = JSON::PP::true;
my $F = JSON::PP::false;

# ---------------------------------------------------------------- the scripted target

# What the target does, set per case: a sub that answers one command line of its qm mtunnel
# (its decoded JSON, 'OK', or dies with the tunnel's error), and every call the driver made
# towards the target, in order.
our ($target, @calls, $on_resume);

package FakeTunnel {

    sub new { my ($class, $forwards) = @_; return bless { forwards => $forwards }, $class }

    sub command {
        my ($self, $line) = @_;
        push @main::calls, "tunnel: $line";
        if ($line =~ /^resume /) {
            $main::on_resume->() if $main::on_resume;
            die "tunnel replied 'ERR: resume failed' to command '$line'\n"
                if $main::target_resume_fails;
            return 'OK';
        }
        my $r = $main::target->($line);
        return ref $r ? JSON::PP->new->canonical->encode($r) : $r;
    }

    sub close { push @main::calls, 'tunnel closed' }
}

our $target_resume_fails;
our $source_pid;

package SeqMigrate {
    our @ISA = ('PVE::MTunnel::Migrate');

    sub start_target {
        my ($self) = @_;
        push @main::calls, 'qm start';
        return {
            uri => "unix:$self->{socket_dir}/600.migrate",
            socket => "$self->{socket_dir}/600.migrate",
            nbd => [],
            commands => $main::announced // [
                qw(nbdstop postcopy-capabilities postcopy-status postcopy-pause postcopy-recover)],
            messages => []
        };
    }

    sub tunnel_to_target {
        my ($self, $forwards) = @_;
        push @main::calls, "tunnel open: @$forwards";
        return FakeTunnel->new($forwards);
    }

    sub remote {
        my ($self, $argv) = @_;
        push @main::calls, "qm @$argv";
        $main::target->("qm @$argv");
        return { stdout => '', stderr => '', exit_code => 0 };
    }

    sub remote_command {
        my ($self, $argv) = @_;
        push @main::calls, "ssh @$argv";
        return { stdout => '' };
    }
    sub stale_target_sockets { return [] }
    sub remove_target_sockets { }
    sub wait_target_start_gone { }
    sub source_pid { return $main::source_pid }
    sub stop_source { push @main::calls, 'stop source' }
}

our $announced;

# A target whose VM runs in post-copy: postcopy-status answers from %$t (status, qmpstatus,
# migration), 'qm stop' stops it, the post-copy commands are noted.
sub target_with {
    my ($t) = @_;
    return sub {
        my ($line) = @_;
        if ($line =~ /^postcopy-capabilities /) {
            return [map { { capability => $_, state => $T } } qw(postcopy-ram events)];
        }
        if ($line =~ /^postcopy-status /) {
            return { status => 'stopped' } if $t->{stopped};
            # a stuck state that falls back to postcopy-paused after that many looks
            $t->{migration} = 'postcopy-paused'
                if defined $t->{fall_back_after} && $t->{fall_back_after}-- <= 0;
            return {
                status => 'running',
                qmpstatus => $t->{qmpstatus} // 'running',
                migration =>
                    { status => $t->{migration} // 'postcopy-active', %{ $t->{extra} // {} } }
            };
        }
        if ($line =~ /^qm stop /) {
            $t->{stopped} = 1;
            return;
        }
        return $t->{on}->($line) if $t->{on};
        $t->{migration} = 'postcopy-paused' if $line =~ /^postcopy-pause /;
        return 'OK';
    };
}

# ---------------------------------------------------------------- the scripted source

my $qmp = "$tmp/600.qmp";
my $flag = "$tmp/flags";

# a mark the parent sets for the monitor (a forked child): e.g. "resumed" once the target was
sub mark { open(my $fh, '>', "$flag.$_[0]") or die; close($fh) }
sub marked { -e "$flag.$_[0]" }

my @CAPS = map { { capability => $_, state => $F } }
    qw(xbzrle auto-converge events postcopy-ram postcopy-preempt);
my $SCHEMA = [
    {
        name => '123',
        'meta-type' => 'object',
        members => [{ name => 'postcopy-bytes', type => 'int' }]
    }
];

# The source: pre-copy passes of $o{passes} (remaining at each pass's start, in MiB) until the
# switch, then $o{after} answers query-migrate (a code ref getting the answer count since the
# switch, its own state hash).
sub source {
    my (%o) = @_;
    unlink(glob("$flag.*"));
    my ($sync, $switched, $n, %st) = (0, 0, 0);
    my @passes = @{ $o{passes} // [512, 64, 64, 64] };
    my $status = 'running';
    return ScriptedQMP->monitor(
        $qmp,
        {
            'query-status' => sub {
                return { status => $switched ? ($o{run_state} // 'finish-migrate') : $status };
            },
            'query-machines' => [{ name => 'pc-i440fx-7.2', 'is-current' => $T }],
            'query-migrate-capabilities' => \@CAPS,
            'query-qmp-schema' => $o{schema} // $SCHEMA,
            'migrate-set-capabilities' => {},
            'migrate-set-parameters' => {},
            'query-memory-size-summary' => { 'base-memory' => 128 * $M },
            'query-block-jobs' => [],
            'migrate' => sub {
                my ($args) = @_;
                return $o{on_migrate}->($args, \%st) if $args->{resume} && $o{on_migrate};
                return {};
            },
            'migrate-start-postcopy' => sub {
                $o{on_switch}->() if $o{on_switch};
                $switched = 1;
                return {};
            },
            'migrate-pause' => sub { return $o{on_pause} ? $o{on_pause}->(\%st) : {} },
            'cont' => sub { $status = 'running'; return {} },
            'migrate_cancel' => {},
            'stop' => sub { $status = 'paused'; return {} },
            'quit' => {},
            'query-migrate' => sub {
                if (!$switched) {
                    my $k = $sync < $#passes ? $sync : $#passes;
                    $sync++;
                    return {
                        status => 'active',
                        ram => {
                            'dirty-sync-count' => $sync,
                            remaining => $passes[$k] * $M,
                            transferred => $sync * 64 * $M,
                            total => 128 * $M
                        }
                    };
                }
                return $o{after}->(++$n, \%st);
            },
        }
    );
}

# post-copy under way, its side of the switch through
sub active {
    my ($bytes, %more) = @_;
    return {
        status => 'postcopy-active',
        ram => { 'postcopy-bytes' => 4096, transferred => $bytes // 1, %more }
    };
}

# ---------------------------------------------------------------- one migration

sub driver {
    my (%param) = @_;
    return SeqMigrate->new(
        vmid => 600,
        node => 'node1',
        target => 'node2',
        ssh => ['false'],
        qmp_socket => $qmp,
        socket_dir => $tmp,
        local_qm => ['sh', '-c', 'printf "memory: 128\n"', 'qm'],
        postcopy => 'always',
        hold_ms => 20,
        postcopy_stall_ms => 2000,
        qmp_timeout_ms => 1000,
        postcopy_recover_timeout_ms => 30_000,
        log => sub { push @main::log, $_[1] },
        %param,
    );
}
our @log;

# Runs a migration; returns its error (undef when it succeeded), the source monitor's
# commands with arguments, and the seconds it took.
sub run_migration {
    my ($mon, %param) = @_;
    (@calls, @log) = ();
    $source_pid = $mon->pid;
    unlink("$tmp/600.mtunnel");
    my $m = driver(%param);
    my $t0 = time();
    eval { $m->migrate() };
    my $err = $@ || undef;
    my $took = time() - $t0;
    my $asked = [grep { $_->[0] ne 'qmp_capabilities' } @{ $mon->received_args }];
    return ($err, $asked, $took, $m);
}

sub asked_for {
    my ($asked, $name) = @_;
    return grep { $_->[0] eq $name } @$asked;
}

# what the rule forbids once the target may have run, each with the call that would do it
sub undone {
    my ($asked) = @_;
    return ((map { "source: $_->[0]" } grep { $_->[0] =~ /^(cont|migrate_cancel)$/ } @$asked),
        (grep { /^qm stop / } @calls));
}

# ---------------------------------------------------------------- cases

{
    # postcopy-active, the target resumed, then 'failed' (QEMU 7.2 when the return path breaks
    # during post-copy's completion): no cont, no cancel, no stop
    local $on_resume = sub { mark('resumed') };
    local $target = target_with({ migration => 'postcopy-paused' });
    my $mon = source(
        run_state => 'postmigrate',
        after => sub {
            return marked('resumed')
                ? { status => 'failed', 'error-desc' => 'Detected IO failure for postcopy' }
                : active();
        }
    );
    my ($err, $asked) = run_migration($mon);
    $mon->stop;
    ok(
        grep({ $_ eq 'tunnel: resume 600' } @calls),
        'failed after resume: the target had been resumed'
    );
    is_deeply([undone($asked)], [], 'failed after resume: nothing continued, cancelled or stopped');
    like(
        $err,
        qr/^post-copy migration failed - Detected IO failure for postcopy after VM 600 ran on node 'node2' - VM 600 is paused on node 'node1' \(source, postmigrate\) with incomplete memory: .* it is running on 'node2' \(incoming migration postcopy-paused\)\. Nothing is continued or stopped automatically.*Decide by hand/,
        'failed after resume: the verdict says paused on the source with incomplete memory, where the rest is, what to do'
    );
    ok(-e "$tmp/600.mtunnel", 'failed after resume: the record stays for --check');
}

{
    # the reply to migrate-start-postcopy lost (the monitor busy past the deadline): counted as
    # sent; the migration switches after all and completes
    local $target = target_with({});
    my $mon = source(
        on_switch => sub { sleep(2) },
        after =>
            sub { my ($n) = @_; return $n < 10 ? active($n) : { status => 'completed', ram => {} } }
    );
    my ($err, $asked) = run_migration($mon);
    $mon->stop;
    is($err, undef, 'switch reply lost: the migration completes') or diag(join("\n", @log));
    ok(grep({ /switching to post-copy: no answer/ } @log), 'switch reply lost: said so');
    is_deeply([undone($asked)], [], 'switch reply lost: no cancel, no cont, no stop');
}

{
    # the reply lost, and the migration fails before the target ran: it is stopped there,
    # confirmed gone, and only then the source continued
    my $t = {};
    local $target = target_with($t);
    my $mon = source(
        run_state => 'postmigrate',
        on_switch => sub { sleep(2) },
        after => sub { return { status => 'failed', 'error-desc' => 'Unable to write to socket' } }
    );
    my ($err, $asked) = run_migration($mon);
    $mon->stop;
    my @stop = grep { /^qm stop 600 / } @calls;
    is(scalar @stop, 1, 'failed before the target ran: the target is stopped');
    my @conts = asked_for($asked, 'cont');
    is(scalar @conts, 1, 'failed before the target ran: then the source is continued');
    ok(!grep({ /^tunnel: resume/ } @calls), 'failed before the target ran: it was never resumed');
    like(
        $err,
        qr/^post-copy migration failed - Unable to write to socket before VM 600 ran on node 'node2'/,
        'failed before the target ran: the error says so'
    );
}

{
    # exceptions after the switch: queries that fail, a resume through the tunnel that fails:
    # the channel stays open, the resume goes over ssh, the migration completes
    local $target_resume_fails = 1;
    local $target = target_with({});
    my $mon = source(
        after => sub {
            my ($n) = @_;
            return ScriptedQMP::error('GenericError', 'busy') if $n <= 3;
            return $n < 20 ? active($n) : { status => 'completed', ram => {} };
        }
    );
    my ($err, $asked) = run_migration($mon);
    $mon->stop;
    is($err, undef, 'failures after the switch: the migration completes') or diag(join("\n", @log));
    my ($closed) = grep { $calls[$_] eq 'tunnel closed' } 0 .. $#calls;
    my ($resumed) = grep { $calls[$_] =~ /^qm resume 600/ } 0 .. $#calls;
    ok(defined $resumed, "failures after the switch: the resume went over ssh ('qm resume')");
    ok(!defined $closed || $closed > $resumed,
        'failures after the switch: the tunnel is not closed while post-copy runs');
    is_deeply([undone($asked)], [], 'failures after the switch: nothing undone');
}

{
    # the source's QEMU dies after the switch: found within seconds, the verdict says lost
    my $mon;
    local $on_resume = sub { kill('KILL', $mon->pid) };
    local $target = target_with({ migration => 'postcopy-paused' });
    $mon = source(after => sub { return active() });
    my ($err, $asked, $took) = run_migration($mon);
    $mon->stop;
    like(
        $err,
        qr/^the QEMU of VM 600 on node 'node1' \(source\) is gone after the switch to post-copy \(the incoming migration on node 'node2' is postcopy-paused\) - VM 600 is lost: its QEMU on node 'node1' \(source\) is gone after the switch to post-copy, and 'node2' \(running, incoming migration postcopy-paused\) lacks the part of its memory that was only on 'node1'/,
        'source gone: the verdict says lost, and why'
    );
    cmp_ok(scalar(grep { /query migrate failed/ } @log),
        '<=', 1, 'source gone: no stream of failed queries');
    ok(!grep({ /^qm stop/ } @calls), 'source gone: the target is not stopped');
    diag(sprintf("source gone: found after %.1f s", $took));
}

{
    # ... unless the target's incoming migration had completed: the VM is whole there
    my $mon;
    local $on_resume = sub { kill('KILL', $mon->pid) };
    local $target = target_with({ migration => 'completed' });
    $mon = source(after => sub { return active() });
    my ($err) = run_migration($mon);
    $mon->stop;
    is($err, undef, 'source gone after the target got everything: the migration is finished');
}

# A channel that breaks after the resume, then recovery; %o: target (its status script),
# source_after_resume (what the source reports after each resume: a list of statuses, the
# last one repeated), source_paused (the statuses before the first resume, after the break).
sub broken_then_recovered {
    my (%o) = @_;
    my $t = { migration => 'postcopy-paused', %{ $o{target} // {} } };
    local $on_resume = sub { mark('resumed') };
    local $target = target_with($t);
    my $mon = source(
        on_migrate => sub {
            my ($args, $st) = @_;
            $st->{resumes}++;
            $st->{uri} = $args->{uri};
            @$st{qw(k paused)} = (0, 0);
            return {};
        },
        on_pause => sub {
            my ($st) = @_;
            return ScriptedQMP::error('GenericError',
                'migrate-pause is currently only supported during postcopy-active state')
                if !$o{source_pausable};
            $st->{paused} = 1;
            return {};
        },
        after => sub {
            my ($n, $st) = @_;
            return active() if !marked('resumed');
            if (!$st->{resumes}) {
                my @before = @{ $o{source_paused} // ['postcopy-paused'] };
                my $b =
                    $st->{paused}
                    ? 'postcopy-paused'
                    : $before[$st->{b}++ < $#before ? $st->{b} - 1 : $#before];
                return { status => $b };
            }
            # paused (migrate-pause) until the next resume
            return { status => 'postcopy-paused' } if $st->{paused};
            my @seq = @{ $o{source_after_resume}[$st->{resumes} - 1]
                    // ['postcopy-recover', 'postcopy-active'] };
            my $k = $st->{k}++;
            my $status = $seq[$k < $#seq ? $k : $#seq];
            $st->{after_resume}++ if $status eq 'postcopy-active';
            return { status => 'completed', ram => {} } if ($st->{after_resume} // 0) >= 5;
            return $status eq 'postcopy-active' ? active() : { status => $status };
        }
    );
    my @r = run_migration($mon, %{ $o{param} // {} });
    $mon->stop;
    return (@r, $t);
}

sub resumed_into {
    my ($asked) = @_;
    return map { $_->[1]{uri} } grep { $_->[1]{resume} } asked_for($asked, 'migrate');
}

{
    # the channel breaks: the target is paused and listens on a new socket of this run, the
    # source resumed into it
    my ($err, $asked) = broken_then_recovered();
    is($err, undef, 'a broken channel: recovered') or diag(join("\n", @log));
    my ($listen) = grep { /^tunnel: postcopy-recover 600 / } @calls;
    my ($path) = ($listen // '') =~ m{ (\S+)$};
    like(
        $path // '',
        qr{/600_recover${$}00\d\.migrate$},
        'recovery sockets are named by the driver\'s pid (unique per run)'
    );
    is_deeply([resumed_into($asked)],
        ["unix:$path"], 'a broken channel: the source resumed into it');
    ok(grep({ /^tunnel open: \Q$path\E$/ } @calls), 'a broken channel: a new tunnel forwards it');
}

{
    # the target's end of a recovery whose handshake hangs (postcopy-recover; QEMU before 8.2
    # cannot pause it): once the hung tunnel is gone it falls back to postcopy-paused, then it
    # listens again
    my $asks = 0;
    my ($err, $asked) = broken_then_recovered(
        target => {
            migration => 'postcopy-recover',
            fall_back_after => 3,
            on => sub {
                my ($line) = @_;
                die
                    "tunnel replied 'ERR: postcopy-pause failed - migrate-pause is currently only supported during postcopy-active state' to command '$line'\n"
                    if $line =~ /^postcopy-pause /;
                return 'OK';
            },
        },
        param => { postcopy_recover_timeout_ms => 60_000 },
    );
    is($err, undef, 'a target stuck in postcopy-recover: recovered once it fell back')
        or diag(join("\n", @log));
    ok(
        grep({ /pausing the incoming migration on node 'node2': .*postcopy-pause failed/ } @log),
        'a target stuck in postcopy-recover: a pause was tried (refused, as QEMU before 8.2 does)'
    );
    ok(grep({ /^tunnel: postcopy-recover 600 / } @calls),
        'a target stuck in postcopy-recover: asked to listen again once paused');
}

{
    # the source's resume hangs (postcopy-recover for 30 s; QEMU 8.2 and later can pause it
    # there): kicked, paused, recovered
    my ($err, $asked) = broken_then_recovered(
        source_after_resume => [['postcopy-recover'], ['postcopy-recover', 'postcopy-active']],
        source_pausable => 1,
        param => { postcopy_recover_timeout_ms => 60_000 },
    );
    is($err, undef, 'a resume that hangs: recovered') or diag(join("\n", @log));
    ok(
        grep(
            { /the migration is postcopy-recover for \d+ s: kicking it|the resumed migration is postcopy-recover/
            } @log),
        'a resume that hangs: noticed'
    );
    ok(asked_for($asked, 'migrate-pause'),
        'a resume that hangs: the source paused (migrate-pause)');
}

{
    # a failed attempt is noticed as soon as the source falls back to postcopy-paused after its
    # recovery began; before it began (QEMU before 9.1 stays paused while it connects) it is not
    my ($err, $asked) = broken_then_recovered(
        source_after_resume => [
            ['postcopy-recover', 'postcopy-paused'],
            [
                'postcopy-paused', 'postcopy-paused', 'postcopy-paused', 'postcopy-recover',
                'postcopy-active'
            ]
        ]
    );
    is($err, undef, 'a failed attempt: recovered at the next one') or diag(join("\n", @log));
    is(scalar(resumed_into($asked)), 2, 'a failed attempt: two resumes');
    ok(grep({ /recovery attempt 1 failed: the resumed migration is postcopy-paused/ } @log),
        'a failed attempt: the fall back is what failed it');
    ok(
        !grep({ /recovery attempt 2 failed/ } @log),
        'a resume still connecting (postcopy-paused before postcopy-recover) is not taken for a failure'
    );
}

{
    # the source paused, the target's incoming migration completed (the last acknowledgement
    # lost): finished, not recovered for ever
    my ($err, $asked) = broken_then_recovered(target => { migration => 'completed' });
    is($err, undef, 'paused, but complete on the target: finished') or diag(join("\n", @log));
    ok(!resumed_into($asked), 'paused, but complete on the target: nothing resumed');
    is(scalar(grep { /^tunnel open: / } @calls),
        2, 'paused, but complete on the target: one recovery tunnel, not a loop');
}

{
    # the source's QEMU dies while its migration is being recovered: found at the next attempt
    my $mon;
    local $on_resume = sub { mark('resumed') };
    my $t = {
        migration => 'postcopy-paused',
        on => sub { kill('KILL', $mon->pid) if $_[0] =~ /^postcopy-recover /; return 'OK' }
    };
    local $target = target_with($t);
    $mon = source(
        after => sub { return marked('resumed') ? { status => 'postcopy-paused' } : active() });
    my ($err, $asked, $took) = run_migration($mon, postcopy_recover_timeout_ms => 120_000);
    $mon->stop;
    like(
        $err,
        qr/^the QEMU of VM 600 on node 'node1' \(source\) is gone after the switch to post-copy/,
        'the source dies during recovery: found, not retried until the deadline'
    );
    diag(sprintf("the source dies during recovery: found after %.1f s", $took));
}

{
    # QEMU 8.x and later continue the source by themselves after a failed post-copy: paused
    # again at once, nothing else (the target ran)
    local $on_resume = sub { mark('resumed') };
    local $target = target_with({ migration => 'postcopy-paused' });
    my $mon = source(
        run_state => 'running',
        after => sub {
            return marked('resumed') ? { status => 'failed', 'error-desc' => 'x' } : active();
        }
    );
    my ($err, $asked) = run_migration($mon);
    $mon->stop;
    ok(asked_for($asked, 'stop'),
        'QEMU continued the source after a failed post-copy: paused again');
    ok(
        grep(
            { /QEMU continued VM 600 on node 'node1' by itself after post-copy failed: paused it again/
            } @log),
        'QEMU continued the source: said so'
    );
    is_deeply([undone($asked)], [],
        'QEMU continued the source: nothing continued, cancelled or stopped by the driver');
}

{
    # 'auto' with passes whose sizes oscillate, as mid-pass samples of a stalled pre-copy do
    local $target = target_with({});
    my $mon = source(
        passes => [512, 64, 50, 64, 50, 64, 50, 64, 50, 64, 50, 64],
        after =>
            sub { my ($n) = @_; return $n < 5 ? active() : { status => 'completed', ram => {} } }
    );
    my ($err, $asked) = run_migration($mon, postcopy => 'auto');
    $mon->stop;
    is($err, undef, 'oscillating passes: the migration completes');
    my ($why) = grep { /switching to post-copy/ } @log;
    like($why // '', qr/pre-copy is not converging/, 'oscillating passes: auto switched');
    ok(
        scalar(asked_for($asked, 'migrate-start-postcopy')),
        'oscillating passes: migrate-start-postcopy sent'
    );
}

{
    # a target whose qm mtunnel does not announce the post-copy commands gets no post-copy:
    # refused before the migration starts, the VM stays on the source
    local $announced = ['nbdstop'];
    local $target = target_with({});
    my $mon = source(after => sub { return active() });
    my ($err, $asked) = run_migration($mon);
    $mon->stop;
    like(
        $err,
        qr/^--postcopy always: node 'node2' does not drive post-copy through its tunnel \('qm mtunnel' there does not announce postcopy-capabilities postcopy-status postcopy-pause postcopy-recover: qemu-server without mtunnel's patch 0009\) - refused before the migration started/,
        'a target without the commands: refused, saying why'
    );
    ok(!asked_for($asked, 'migrate'), 'a target without the commands: nothing migrated');
    ok(grep({ /^qm stop 600/ } @calls),
        'a target without the commands: its incoming VM is stopped');
}

{
    # a source QEMU that does not report postcopy-bytes (before 7.0) cannot tell when the
    # target may be resumed: refused before anything starts
    local $target = target_with({});
    my $mon = source(schema =>
            [{ name => '1', 'meta-type' => 'object', members => [{ name => 'transferred' }] }]);
    my ($err, $asked) = run_migration($mon);
    $mon->stop;
    like(
        $err,
        qr/does not report when its side of the switch is through .* - nothing was done/,
        'a source without postcopy-bytes: refused before anything starts'
    );
    ok(!grep({ /^qm start/ } @calls),
        'a source without postcopy-bytes: the target is never started');
}

{
    # --check --fix refuses while the driver that wrote the record runs
    local $target = target_with({});
    my $mon = source(after => sub { return active() });
    $source_pid = $mon->pid;
    my $m = driver();
    $m->write_state(
        phase => 'postcopy',
        postcopy_sent => 1,
        target_resume_sent => 1,
        target_commands => ['postcopy-status']
    );
    @calls = ();
    my $d = $m->check(fix => 1);
    like(
        $d->{state},
        qr/^VM 600 is being migrated to 'node2' by process $$, which is still running/,
        '--fix while the driver runs: refused, naming its pid'
    );
    ok(!grep({ /^qm |^tunnel: postcopy-(pause|recover)/ } @calls),
        '--fix while the driver runs: nothing done');
    my $rec = $m->read_state();
    $rec->{driver}[1] .= '0';    # another process with that pid
    $m->{state} = $rec;
    $m->write_state();
    $d = $m->check();
    unlike(
        $d->{state},
        qr/being migrated/,
        '--check: a pid with another start time is not the driver'
    );
    $m->remove_state();
    $mon->stop;
}

done_testing();
