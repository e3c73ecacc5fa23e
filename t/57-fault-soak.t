#!/usr/bin/perl
# A seeded randomized fault soak (docs/faults.md). Each round migrates a fresh VM (VMID
# 700 + round) between two lab nodes (odd rounds between node1 and node2 on QEMU 10.0, even
# rounds between node3 and node4 on 7.2, each pair in turn both ways) and
# hits it with one fault at one moment, both picked at random (uniform over the pairs that
# make sense, the filled cells of the fault x moment table); about a third of the VMs (two
# thirds of the SIGKILL rounds) have a local disk that is mirrored with --with-local-disks.
# Faults: the tunnel's ssh killed or stopped,
# the target QEMU killed, the target's link cut, the target's `qm mtunnel` killed, SIGTERM,
# SIGINT or SIGKILL of the driver. Moments, read from the task log: the target start, the
# tunnel coming up, mid-RAM (or mid-mirror for disk VMs, both under --bwlimit), the
# switchover, after completion; for SIGKILL also two moments of disk VMs only: the mirror
# ready (RAM about to start) and mid-RAM after the mirror; and postcopy-active (RAM VMs with
# --postcopy always: half a second after the target was resumed in post-copy) for every
# fault but the target QEMU killed (that loses the VM by the fault itself, as post-copy's
# risk is documented). Post-copy's rounds run in their own mode (MTUNNEL_SOAK_MODE=postcopy,
# t/59-postcopy-soak.t): every fault once at postcopy-active, the source QEMU killed too, on
# nodes whose qm is qemu-server with the series (the post-copy commands); each round says
# whether a recovery must happen (kill ssh, SIGSTOP ssh, cut link, SIGKILL then --fix) and
# checks that it happened, and exactly then; a QEMU killed there loses the VM: the verdict
# must say lost, and the source must never be continued. After each round, once settled (a
# SIGKILLed driver or a source left paused settled with `mtunnel-migrate --check --fix`):
#   - the fault fired (a round whose fault never came fails);
#   - QEMU's own events show that the source never resumed after the target first ran;
#   - the driver ended in bounded time; --check --fix, where needed, exits 0;
#   - the verdict matches where the VM runs;
#   - exactly one node runs the VM, and according to both nodes' run-state logs the two
#     never ran it at the same moment;
#   - the guest's memory (and disk) is intact;
#   - nothing is left: no block job where the VM runs, no socket file, ssh process, zombie,
#     QEMU, migration record, nor a volume of the VM on a node where it does not run (nor
#     the source's volume once the VM runs on the target). Expected, and named in the
#     round's line: what a verdict "node X cannot be reached" says is left there (the
#     incoming QEMU, its new volume and listening sockets, removed by the test once X is
#     reachable, and the migration's record that names them).
# The seed is printed first; MTUNNEL_SOAK_SEED=N repeats a run, MTUNNEL_SOAK_N sets the
# number of rounds (default 12; the post-copy mode runs each of its pairs once), MTUNNEL_SOAK_ROUNDS=3,7 runs only those rounds of the seed's
# plan, MTUNNEL_SOAK_LOGS=DIR keeps each round's task log there (DIR/round-N.log),
# MTUNNEL_SOAK_ONLY=REGEX draws only from the pairs "FAULT at MOMENT" it matches (moments:
# start, tunnel, mid, switchover, after, ready, midram; e.g. 'SIGKILL at (mid|after)').
#
# "After completion" means: RAM migration completed, the target holds the complete state
# paused, and the driver's `resume` has not been acted upon yet. That window is a few ms
# wide, so the target's `qm mtunnel` is held (SIGSTOP) from the start of the RAM migration
# until the fault is in; then it is continued (faults that leave the tunnel working) or
# killed (faults that break it). The same hold protects "kill the target QEMU at the
# switchover": killing a target that already runs the VM would lose it by the fault
# itself, not by the driver.

use strict;
use warnings;
use Test::More;
use Cwd qw(abs_path);
use File::Basename qw(dirname);
use POSIX qw(:sys_wait_h);
use Time::HiRes qw(time sleep);

use MTunnelLab;

my $seed = $ENV{MTUNNEL_SOAK_SEED} // int(time());
die "MTUNNEL_SOAK_SEED must be a non-negative integer\n" if $seed !~ /^[0-9]{1,15}$/;
diag("soak seed: $seed (re-run: MTUNNEL_SOAK_SEED=$seed prove t/57-fault-soak.t)");
srand($seed);
my $mode = $ENV{MTUNNEL_SOAK_MODE} // 'draw';
die "MTUNNEL_SOAK_MODE must be draw or postcopy\n" if $mode !~ /^(draw|postcopy)$/;
my $rounds = $ENV{MTUNNEL_SOAK_N} // 12;
die "MTUNNEL_SOAK_N must be a positive integer\n" if $rounds !~ /^[1-9][0-9]{0,3}$/;

my $top = abs_path(dirname(__FILE__) . '/..');
my $mem = 128;
my $bwlimit = 4096;
# fast failure detection when the link is cut
my @fast = (
    '--ssh-option', 'server_alive_interval_s=1', '--ssh-option', 'server_alive_count_max=3',
    '--ssh-option', 'connect_timeout_s=2', '--ssh-option', 'connect_retries=0'
);

*slurp = \&MTunnelLab::slurp;

# ---------------------------------------------------------------- the plan

my @all_moments = qw(start tunnel mid switchover after);
my %moments_of = (
    'kill ssh' => [qw(tunnel mid switchover after postcopy)],
    'SIGSTOP ssh' => [qw(mid after postcopy)],
    'kill target QEMU' => [@all_moments, 'postcopy'],
    # after the switch only: before it the source runs the VM, and its loss is no migration's
    'kill source QEMU' => ['postcopy'],
    'cut link' => [@all_moments, 'postcopy'],
    'kill qm mtunnel' => [qw(tunnel mid switchover after postcopy)],
    'SIGTERM' => [@all_moments, 'postcopy'],
    # post-copy: SIGINT takes SIGTERM's path (one deferred-signal handler): SIGTERM's round covers it
    'SIGINT' => [@all_moments],
    # and two moments of disk VMs only: the mirror ready, mid-RAM after the mirror
    'SIGKILL' => [@all_moments, 'ready', 'midram', 'postcopy'],
);
my %disk_only = map { $_ => 1 } qw(ready midram);
my @faults = (
    'kill ssh',
    'SIGSTOP ssh',
    'kill target QEMU',
    'kill source QEMU',
    'cut link',
    'kill qm mtunnel',
    'SIGTERM',
    'SIGINT',
    'SIGKILL'
);
my @pairs = map {
    my $f = $_;
    map { [$f, $_] } @{ $moments_of{$f} }
} @faults;
# post-copy's pairs each once in their own mode, the others drawn
@pairs = grep { ($_->[1] eq 'postcopy') == ($mode eq 'postcopy') } @pairs;
# post-copy: whether the fault must be recovered from (the tunnel's ssh gone or stuck, the link
# cut, the driver killed: its ssh dies with it); 'lost' when it loses the VM by itself
my %postcopy_expects = (
    'kill ssh' => 'recovery',
    'SIGSTOP ssh' => 'recovery',
    'cut link' => 'recovery',
    'SIGKILL' => 'recovery',
    'kill qm mtunnel' => 'no recovery',
    'SIGTERM' => 'no recovery',
    'SIGINT' => 'no recovery',
    'kill target QEMU' => 'lost',
    'kill source QEMU' => 'lost',
);
if (defined(my $re = $ENV{MTUNNEL_SOAK_ONLY})) {
    # a regex on "FAULT at MOMENT" (moment as in @all_moments), to soak some pairs only
    @pairs = grep { "$_->[0] at $_->[1]" =~ /$re/ } @pairs;
    die "MTUNNEL_SOAK_ONLY='$re' matches no fault at moment\n" if !@pairs;
}

# Drawn before anything runs: the plan depends on the seed only. The pairs are dealt from
# shuffled decks of all of them (a new deck when one is used up): each round's pair is
# uniform over the pairs, and a run of N rounds covers min(N, pairs) distinct ones, so the
# slow pairs (a stopped ssh waits out the driver's 30 s and 60 s deadlines, a cut link its
# ssh timeouts, 15 to 50 s each) come at most once per deck. In the draw mode a run of the
# default length takes at most $MAX_SLOW of them: a slow pair drawn beyond that goes back
# under the deck (it comes in a later run), so `make test` keeps its time bound whatever the
# seed; MTUNNEL_SOAK_N=N runs take what they draw.
my $MAX_SLOW = defined $ENV{MTUNNEL_SOAK_N} ? $rounds : 3;
my $slow = sub { $_[0][0] eq 'cut link' || $_[0][0] eq 'SIGSTOP ssh' };
my (@plan, @deck);
$rounds = @pairs if $mode eq 'postcopy';
my $slow_drawn = 0;
for my $i (1 .. $rounds) {
    if (!@deck || ($slow_drawn >= $MAX_SLOW && !grep { !$slow->($_) } @deck)) {
        @deck = @pairs;
        for my $k (reverse 1 .. $#deck) { my $j = int(rand($k + 1)); @deck[$k, $j] = @deck[$j, $k] }
    }
    if ($mode eq 'draw' && $slow_drawn >= $MAX_SLOW) {
        push @deck, shift @deck while $slow->($deck[0]);
    }
    $slow_drawn++ if $slow->($deck[0]);
    my ($fault, $moment) = @{ shift @deck };
    my $disk = rand() < ($fault eq 'SIGKILL' ? 2 / 3 : 1 / 3) ? 1 : 0;
    $disk = 1 if $disk_only{$moment};
    # post-copy does not take local disks (yet)
    $disk = 0 if $moment eq 'postcopy';
    # the rounds are spread across the two QEMUs, not doubled: odd rounds between node1 and
    # node2 (QEMU 10.0), even ones between node3 and node4 (7.2), each pair both ways
    my ($src, $dst) =
        @{ [[qw(node4 node3)], [qw(node1 node2)], [qw(node3 node4)], [qw(node2 node1)]]->[$i % 4] };
    push @plan,
        {
        i => $i,
        v => 700 + $i,
        fault => $fault,
        moment => $moment,
        disk => $disk,
        src => $src,
        dst => $dst
        };
}
my %only = map { $_ => 1 } split /,/, ($ENV{MTUNNEL_SOAK_ROUNDS} // '');

sub moment_name {
    my ($r) = @_;
    return {
        start => 'target start',
        tunnel => 'tunnel up',
        mid => $r->{disk} ? 'mid-mirror' : 'mid-RAM',
        switchover => 'switchover',
        after => 'after completion',
        ready => 'mirror ready',
        midram => 'mid-RAM after the mirror',
        postcopy => 'postcopy-active',
    }->{ $r->{moment} };
}

# ---------------------------------------------------------------- the lab

# node1 and node2 run QEMU 10.0, node3 and node4 Debian 12's 7.2 (MTUNNEL_LAB_QEMU: all alike)
my $lab = MTunnelLab->up(nodes => 4, qemu => $ENV{MTUNNEL_LAB_QEMU} // '10.0,10.0,7.2,7.2');
my $dir = $lab->dir;
# post-copy drives the target through its qm mtunnel's post-copy commands (patch 0009)
$lab->qemu_server_series($_, 1) for $mode eq 'postcopy' ? $lab->nodes : ();
my $t_start = time();

sub link_set {
    my ($node, $state) = @_;
    system('ip', '-n', $lab->netns($node), 'link', 'set', 'eth0', $state) == 0
        or die "ip link set eth0 $state in $node failed\n";
}

sub procs_matching {
    my ($node, $re) = @_;
    return grep { slurp("/proc/$_/cmdline") =~ $re } $lab->procs_in($node);
}

# the qm mtunnel process itself, not the sh around it that removes the sockets when it ended
# normally (the library's remote command): a crash of qm leaves that sh running
sub mtunnel_pids { return procs_matching($_[0], qr/^(?!sh\0-c\0).*\bqm\0mtunnel\b/s) }

sub qm_start_pids { my ($node, $v) = @_; return procs_matching($node, qr/\bqm\0start\0$v\0/) }

# VMID's live QEMU on $node (from qm's pid file), undef if none
sub qemu_pid {
    my ($node, $v) = @_;
    my ($pid) = slurp("$dir/$node/qemu-$v.pid") =~ /^\s*([0-9]+)/ or return undef;
    return undef if !MTunnelLab::alive($pid) || index(slurp("/proc/$pid/cmdline"), "$dir/") < 0;
    return $pid;
}

sub qmp {
    my ($node, $v, @cmd) = @_;
    my ($rc, $out, $err) = $lab->run($node, 'qmp', $v, @cmd);
    return $rc == 0 ? $out : undef;
}

sub lab_volumes {
    my ($node, $v) = @_;
    return grep { m{^local:$v/} } $lab->volumes($node, 'local');
}

sub wait_until {
    my ($cond, $timeout, $step) = @_;
    my $deadline = time() + $timeout;
    while (1) {
        my @r = $cond->();
        return @r if @r && $r[0];
        return () if time() >= $deadline;
        sleep($step // 0.05);
    }
}

sub dump_events {
    my ($node, $v) = @_;
    return "$node events:\n"
        . join('',
        map { "  $_->{t} $_->{pid} $_->{kind} $_->{detail}\n" } @{ $lab->vm_events($node, $v) });
}

# ---------------------------------------------------------------- one round

my %tally;    # "fault × moment" => { outcome => count }
my @lines;

sub run_round {
    my ($r) = @_;
    my ($i, $v, $fault, $src, $dst) = @$r{qw(i v fault src dst)};
    my $moment = moment_name($r);
    my $kind = $r->{disk} ? 'disk' : 'RAM';
    my $label = "round $i ($fault at $moment)";
    my $log = "$dir/soak-$v.log";
    my @notes;
    my $check = sub {
        my ($ok, $property, $observed) = @_;
        ok($ok, "$label: $property")
            or diag(
            "FAILED: seed $seed, round $i, $fault at $moment ($kind VM $v, $src -> $dst): $property\n"
                . "observed: "
                . ($observed // '?')
                . "\n--- task log ---\n"
                . slurp($log));
        return $ok;
    };

    my $volid = "local:$v/vm-$v-disk-0.raw";
    $lab->write_vm_config(
        $v,
        memory => $mem,
        accel => 'tcg',
        $r->{disk} ? (guest => 'disk', ide0 => "$volid,size=32M") : (guest => 'dirty')
    );
    $lab->move_vm_config($v, $src);
    $lab->run_ok($src, 'qm', 'start', $v);
    $lab->run_ok($src, "$top/lab/guest-check", '--wait', $v);

    my @args =
        ($v, $dst, '--node', $src, '--ssh-file', "$dir/ssh_prefix_$dst", '--pve-dir', "$dir/pve");
    push @args, '--with-local-disks' if $r->{disk};
    push @args, '--bwlimit', $bwlimit if $r->{moment} eq 'mid';
    # the mirror's 32 MiB in 2 s, then RAM slow enough to be hit mid-way
    push @args, '--bwlimit', 4 * $bwlimit if $r->{moment} eq 'midram';
    push @args, '--stall-timeout', 4000 if $fault eq 'SIGSTOP ssh';
    # the switch once the first pass is done: the post-copy phase then moves all the RAM the
    # guest dirtied meanwhile (its whole RAM) at the limit, seconds to hit it in
    # (the first pass at twice that: the window after the switch is what the faults need)
    push @args, '--postcopy', 'always', '--bwlimit', 16 * $bwlimit, '--postcopy-bwlimit',
        8 * $bwlimit
        if $r->{moment} eq 'postcopy';
    push @args, @fast if $fault eq 'cut link';
    my $hold =
        $r->{moment} eq 'after' || ($r->{moment} eq 'switchover' && $fault eq 'kill target QEMU');

    unlink $log;
    my $t0 = time();
    my $pid = fork() // die "fork: $!\n";
    if (!$pid) {
        $ENV{MTUNNEL_LAB} = $lab->name;
        open(STDOUT, '>', $log) or POSIX::_exit(127);
        open(STDERR, '>&', \*STDOUT) or POSIX::_exit(127);
        # lab.sh exec execs all the way down: $pid becomes the driver's pid
        exec("$top/lab/lab.sh", "exec", $src, "$top/perl/bin/mtunnel-migrate", @args)
            or POSIX::_exit(127);
    }
    my ($done, $status, $t_end) = (0, undef, undef);
    my $reap = sub {
        if (!$done && waitpid($pid, WNOHANG) == $pid) { ($done, $status, $t_end) = (1, $?, time()) }
        return $done;
    };
    my $wait_log = sub {
        my ($re, $timeout) = @_;
        my $deadline = time() + ($timeout // 60);
        while (time() < $deadline) {
            return 1 if slurp($log) =~ $re;
            return 0 if $reap->();
            sleep(0.01);
        }
        return 0;
    };
    # pids that $find returns, waited for while the driver runs
    my $wait_pids = sub {
        my ($find, $timeout) = @_;
        my $deadline = time() + $timeout;
        while (time() < $deadline) {
            my @p = grep { defined } $find->();
            return @p if @p;
            last if $reap->();
            sleep(0.01);
        }
        return ();
    };

    # the process the fault hits: once the tunnel is up it is found before the moment, so
    # that the fault follows the moment's log line within milliseconds
    my $find = {
        'kill ssh' => sub { $lab->ssh_pids($src, $v) },
        'SIGSTOP ssh' => sub { $lab->ssh_pids($src, $v) },
        'kill target QEMU' => sub { qemu_pid($dst, $v) },
        'kill source QEMU' => sub { qemu_pid($src, $v) },
        'kill qm mtunnel' => sub { mtunnel_pids($dst) },
    }->{$fault};
    my @victims;
    @victims = $wait_pids->($find, 5)
        if $find && $r->{moment} =~ /^(?:mid|switchover|after)$/ && $wait_log->(qr/ssh tunnel ver/);

    # the hold: the target's `qm mtunnel` stopped from the start of the RAM migration
    my @held;
    if ($hold) {
        if ($wait_log->(qr/start migrate command/)) {
            @held = $wait_pids->(sub { mtunnel_pids($dst) }, 5);
            kill('STOP', @held);
        }
        push @notes, 'hold missed: no qm mtunnel at the start of the RAM migration' if !@held;
    }

    my $trigger = {
        start => qr/starting VM $v on remote node/,
        tunnel => qr/start remote tunnel/,
        mid => $r->{disk}
        ? qr/\Q${\ $lab->mirror_job($src, 'ide0')}\E: transferred/
        : qr/migration active/,
        switchover => qr/migration active|migration status: completed/,
        after => qr/migration status: completed/,
        ready => qr/all 'mirror' jobs are ready/,
        midram => qr/migration active/,
        postcopy => qr/VM $v resumed on node '$dst' \(post-copy\)/,
    }->{ $r->{moment} };
    my ($missed, @stopped, $cut);
    if (!$wait_log->($trigger)) {
        $missed = 'the moment never came';
    } else {
        if ($r->{moment} eq 'after') {
            # the target holds the complete state once its incoming migration is done
            wait_until(sub { $lab->qmpstatus($dst, $v) eq 'paused' }, 10)
                or push @notes, "$dst never showed paused";
        }
        # the page requests flowing: the fault lands in post-copy proper, not at its switch
        sleep(0.5) if $r->{moment} eq 'postcopy';
        if ($find) {
            @victims = grep { MTunnelLab::alive($_) } @victims;
            @victims = $wait_pids->($find, $fault eq 'kill target QEMU' ? 10 : 5) if !@victims;
        }
        if ($find && !@victims) {
            $missed = {
                'kill target QEMU' => 'no target QEMU',
                'kill source QEMU' => 'no source QEMU',
                'kill qm mtunnel' => 'no qm mtunnel'
            }->{$fault} // 'no tunnel ssh';
        } elsif ($fault eq 'SIGSTOP ssh') {
            kill('STOP', @victims);
            @stopped = @victims;
        } elsif ($find) {
            kill('KILL', @victims);
        } elsif ($fault eq 'cut link') {
            link_set($dst, 'down');
            $cut = 1;
            if ($r->{moment} eq 'postcopy') {
                # post-copy is recovered once the link is back, not given up: it comes back
                # while the driver retries
                sleep(5);
                link_set($dst, 'up');
            }
        } else {
            my ($sig) = $fault =~ /^SIG(\w+)$/;
            kill($sig, $pid);
        }
    }
    if (@held) {
        # faults that leave the tunnel working let it go on; the others end it
        my $ends_tunnel =
            grep { $fault eq $_ } ('kill ssh', 'cut link', 'SIGKILL', 'kill qm mtunnel');
        kill($ends_tunnel ? 'KILL' : 'CONT', @held);
    }
    if (!$missed && $r->{moment} eq 'mid' && $fault eq 'kill qm mtunnel') {
        # the migration goes on without its command channel: no need to wait for it at 4 MiB/s
        qmp($src, $v, 'block-job-set-speed',
            qq({"device":"${\ $lab->mirror_job($src, 'ide0')}","speed":0}))
            if $r->{disk};
        $wait_log->(qr/start migrate command/) if $r->{disk};
        qmp($src, $v, 'migrate-set-parameters', '{"max-bandwidth":17179869184}') if !$done;
    }

    for (1 .. 1200) { last if $reap->(); sleep(0.1) }
    my $ended = $check->(
        $done,
        'the driver ended within 2 min',
        sprintf('still running after %.0f s', time() - $t0)
    );
    if (!$done) {
        kill('KILL', $pid);
        waitpid($pid, 0);
        ($done, $status, $t_end) = (1, $?, time());
    }
    my $secs = $t_end - $t0;
    my $out = slurp($log);
    my ($verdict) = $out =~ /^(TASK (?:OK|ERROR: .*))$/m;
    $check->(!$missed, 'the fault fired', $missed);
    my $expects = $r->{moment} eq 'postcopy' ? $postcopy_expects{$fault} : '';
    # nothing runs after SIGKILL (the fault's, or ours after 2 min): no verdict to expect
    my $sigkilled = ($status & 127) == 9;
    my $killed = $sigkilled && !defined $verdict;
    my $seen = { $src => $lab->qmpstatus($src, $v), $dst => $lab->qmpstatus($dst, $v) };
    my $seen_text = "$src: $seen->{$src}, $dst: $seen->{$dst}";

    # what the verdict says, and whether the nodes agree
    my $class;
    if ($killed) {
        $class = 'killed';
    } elsif (!defined $verdict) {
        $check->(0, 'the driver gave a verdict', "no verdict; exit status $status");
        $class = 'none';
    } else {
        my $exit = $status & 127 ? 128 + ($status & 127) : $status >> 8;
        $check->(
            $exit == ($verdict eq 'TASK OK' ? 0 : 1),
            'the exit code matches the verdict',
            "exit $exit, $verdict"
        ) if !$sigkilled;
        my $reach = qr/node '$dst' cannot be reached/;
        if ($expects eq 'lost') {
            # the fault itself loses the VM: the verdict says so, and nothing is undone
            $class = 'lost';
            $check->(
                $verdict =~ /^TASK ERROR: .* - VM $v is lost: /,
                'the verdict says the VM is lost',
                "$verdict; $seen_text"
            );
            $check->(
                $seen->{$src} ne 'running',
                'the source was not continued',
                "$verdict; $seen_text"
            );
        } elsif ($verdict eq 'TASK OK') {
            $class = 'target';
            $check->(
                $seen->{$src} eq 'stopped' && $seen->{$dst} eq 'running',
                'the verdict matches where the VM runs',
                "$verdict; $seen_text"
            );
        } elsif ($verdict =~ /^TASK ERROR: .+ - VM $v runs on node '$src' \(source\) only$/) {
            $class = 'source';
            $check->(
                $seen->{$src} eq 'running' && $seen->{$dst} eq 'stopped',
                'the verdict matches where the VM runs',
                "$verdict; $seen_text"
            );
        } elsif ($verdict =~
            /^TASK ERROR: .+ - VM $v runs on node '$src' \(source\); $reach to confirm that its incoming copy is gone/
            )
        {
            $class = 'source, target unreachable';
            $check->(
                $seen->{$src} eq 'running' && $seen->{$dst} ne 'running',
                'the verdict matches where the VM runs',
                "$verdict; $seen_text"
            );
        } elsif ($verdict =~
            /^TASK ERROR: .+ - VM $v is paused on node '$src' \(source, postmigrate\) after its migration completed, and $reach/
            )
        {
            $class = 'paused';
            $check->(
                $seen->{$src} eq 'postmigrate',
                'the verdict matches where the VM runs',
                "$verdict; $seen_text"
            );
        } else {
            $class = 'unexpected';
            $check->(
                0,
                'the verdict matches where the VM runs',
                "a verdict of no known form: $verdict; $seen_text"
            );
        }
    }

    # restore the fault
    kill('CONT', grep { MTunnelLab::alive($_) } @stopped);
    kill('KILL', grep { MTunnelLab::alive($_) } @held);
    if ($cut) {
        link_set($dst, 'up');
        # the target's end of a cut session cannot know the client is gone
        my @left = mtunnel_pids($dst);
        if (@left) {
            kill('KILL', @left);
            push @notes, "killed the cut tunnel's qm mtunnel on $dst";
        }
    }
    # remote commands of a killed driver or a cut session end by themselves
    wait_until(sub { !qm_start_pids($dst, $v) }, 20)
        or push @notes, "qm start still running on $dst";

    my ($fixed, $fix_log);
    if ($class eq 'killed' || $class eq 'paused') {
        # the killed driver's ssh die with it; the source's migration fails once they are gone
        wait_until(sub { !$lab->ssh_pids($src) }, 5);
        wait_until(
            sub {
                (qmp($src, $v, 'query-migrate') // '') !~
                    /"status":"(active|setup|device|pre-switchover)"/;
            },
            10
        );
        my ($rc, $fix_out, $fix_err) = $lab->run($src, "$top/perl/bin/mtunnel-migrate",
            '--check', $v, $dst, '--node', $src, '--ssh-file', "$dir/ssh_prefix_$dst", '--pve-dir',
            "$dir/pve", '--fix');
        $check->(
            $rc == 0,
            'mtunnel-migrate --check --fix settles it (exit 0)',
            "exit $rc:\n$fix_out$fix_err"
                . "now: $src: "
                . $lab->qmpstatus($src, $v)
                . ', block jobs '
                . (qmp($src, $v, 'query-block-jobs') // "?\n")
                . "$dst: "
                . $lab->qmpstatus($dst, $v)
        );
        $fix_log = "--- mtunnel-migrate --check --fix (exit $rc) ---\n$fix_out$fix_err";
        my @st = $fix_out =~ /state: (.*)$/mg;
        $fixed = $st[-1] // 'no state';
    }
    if ($class eq 'source, target unreachable') {
        my $left = $lab->qmpstatus($dst, $v);
        if ($left ne 'stopped' && $left ne 'running') {
            $lab->run($dst, 'qm', 'stop', $v, '--migratedfrom', $src);
            push @notes, "stopped the incoming QEMU left $left on $dst";
        }
        if ($lab->qmpstatus($dst, $v) eq 'stopped') {
            for my $vol (lab_volumes($dst, $v)) {
                $lab->run($dst, 'pvesm', 'free', $vol);
                push @notes, "freed $vol left on $dst";
            }
            # its listening sockets: the tunnel's close would have removed them
            for my $sock (grep { m{/${v}(_nbd)?\.migrate$} } $lab->socket_files($dst)) {
                $lab->run($dst, 'rm', '-f', $sock);
                push @notes, "removed $sock left on $dst";
            }
        }
    }

    if ($cut && $out =~ /removing (?:remote )?sockets.* failed/) {
        # the driver could not reach the target to remove them: its log says so
        for my $sock (grep { m{/${v}(_nbd)?\.migrate$} } $lab->socket_files($dst)) {
            $lab->run($dst, 'rm', '-f', $sock);
            push @notes, "removed $sock left on the unreachable $dst";
        }
    }

    # where the VM runs now
    my %st = ($src => $lab->qmpstatus($src, $v), $dst => $lab->qmpstatus($dst, $v));
    my @on = grep { $st{$_} eq 'running' } ($src, $dst);
    my $on = @on == 1 && $class ne 'lost' ? $on[0] : undef;
    my $where = @on == 2 ? 'both' : @on ? $on[0] : 'none';
    $check->(@on == 1, 'exactly one node runs the VM', "$src: $st{$src}, $dst: $st{$dst}")
        if $class ne 'lost';
    $check->($st{$src} ne 'running', "the source does not run the lost VM", "$src: $st{$src}")
        if $class eq 'lost';
    my @rollback = $lab->resumed_after_target($src, $dst, $v);
    $check->(
        !@rollback,
        'the source never resumed after the target ran (QEMU\'s STOP/RESUME events)',
        scalar(@rollback)
            . " RESUME on $src after ${dst}'s first:\n"
            . dump_events($src, $v)
            . dump_events($dst, $v)
    );

    if ($expects =~ /recovery/) {
        my $recovered = ($out . ($fix_log // '')) =~ /post-copy migration recovered \(attempt/;
        $check->(
            ($recovered ? 1 : 0) == ($expects eq 'recovery' ? 1 : 0),
            $expects eq 'recovery'
            ? 'the post-copy migration was recovered'
            : 'no recovery was needed',
            $recovered ? 'recovered' : 'not recovered'
        );
    }
    my $expect = { target => $dst, source => $src, 'source, target unreachable' => $src }->{$class};
    $check->(
        $where eq $expect,
        "the VM runs where the verdict says ($expect)",
        "runs on $where; $src: $st{$src}, $dst: $st{$dst}"
    ) if defined $expect;

    if ($on) {
        my $jobs = qmp($on, $v, 'query-block-jobs') // '?';
        $check->($jobs eq "[]\n", "no block job left on $on, where the VM runs", $jobs);
        my ($crc, $gc_out, $gc_err) = $lab->run($on, "$top/lab/guest-check", $v, $mem);
        $check->($crc == 0, "the guest's memory is intact on $on", "exit $crc: $gc_out$gc_err");
        $check->(
            $gc_out =~ /^guest disk ok:/m,
            "the guest's disk is intact on $on",
            "$gc_out$gc_err"
        ) if $r->{disk};
        $lab->run($on, 'qm', 'stop', $v);
    }
    my @runs = ($lab->run_intervals($src, $v), $lab->run_intervals($dst, $v));
    my @both = MTunnelLab::overlaps(@runs);
    $check->(
        !@both,
        'the VM never ran on both nodes at once',
        scalar(@both) . " overlapping runs:\n" . dump_events($src, $v) . dump_events($dst, $v)
    );

    if ($class eq 'lost') {
        # nothing settles a lost VM: its QEMUs are ended here, as an admin would
        $lab->run($dst, 'qm', 'stop', $v, '--migratedfrom', $src)
            if $lab->qmpstatus($dst, $v) ne 'stopped';
        $lab->run($src, 'qm', 'stop', $v, '--skiplock') if $lab->qmpstatus($src, $v) ne 'stopped';
        $lab->run($src, 'rm', '-f', "/run/qemu-server/$v.mtunnel");
        push @notes, 'lost as the fault makes it: its QEMUs stopped here';
    }

    # nothing left
    my %qemu = map { $_ => [$lab->qemu_pids($_)] } ($src, $dst);
    $check->(
        !@{ $qemu{$_} },
        "no QEMU left on $_",
        "QEMU @{$qemu{$_}}; qm status: " . $lab->qmpstatus($_, $v)
    ) for ($src, $dst);
    my %sock = map { $_ => [$lab->socket_files($_)] } ($src, $dst);
    $check->(!@{ $sock{$_} }, "no socket file left on $_", "@{$sock{$_}}") for ($src, $dst);
    my %ssh = map { $_ => [$lab->ssh_pids($_)] } ($src, $dst);
    $check->(
        !@{ $ssh{$_} },
        "no ssh process left in $_",
        join('; ',
            map { my $c = slurp("/proc/$_/cmdline"); $c =~ s/\0/ /g; "$_: $c" } @{ $ssh{$_} })
    ) for ($src, $dst);
    my @z = MTunnelLab::zombies_since($t0);
    $check->(!@z, 'no zombie left', "@z");
    my ($rrc) = $lab->run($src, 'test', '-e', "/run/qemu-server/$v.mtunnel");

    if ($class eq 'source, target unreachable' && $rrc == 0) {
        push @notes, "the migration's record kept on $src (it names what $dst was left with)";
    } else {
        $check->($rrc != 0, "no migration record left on $src", "/run/qemu-server/$v.mtunnel");
    }

    if ($r->{disk} && defined $on) {
        my %vols = map { $_ => [lab_volumes($_, $v)] } ($src, $dst);
        my $other = $on eq $src ? $dst : $src;
        $check->(
            "@{$vols{$on}}" eq $volid,
            "the volume is kept where the VM runs ($on)",
            "volumes on $on: @{$vols{$on}}"
        );
        if ($other eq $src) {
            $check->(
                !@{ $vols{$src} },
                "the source volume was freed after the migration",
                "volumes on $src: @{$vols{$src}}"
            );
        } else {
            $check->(
                !@{ $vols{$dst} },
                "no volume left on $dst, where the VM does not run",
                "volumes on $dst: @{$vols{$dst}}"
            );
        }
    }

    # a clean slate for the next round, whatever happened
    for my $node ($src, $dst) {
        $lab->run($node, 'qm', 'stop', $v, '--skiplock') if $lab->qmpstatus($node, $v) ne 'stopped';
        $lab->run($node, 'pvesm', 'free', $_) for lab_volumes($node, $v);
        kill('CONT', $lab->ssh_pids($node));
        kill('KILL', $lab->ssh_pids($node), mtunnel_pids($node));
        $lab->run($node, 'sh', '-c',
            "rm -f /run/qemu-server/*.migrate /run/qemu-server/$v.mtunnel");
    }

    my $outcome =
        $class eq 'killed' || $class eq 'paused'
        ? "$class -> fix -> " . ($where eq $src ? 'source' : $where eq $dst ? 'target' : $where)
        : $class;
    $outcome .= " (fault missed: $missed)" if $missed;
    $tally{"$fault × $moment"}{$outcome}++;
    my $line = sprintf(
        "round %d: %s at %s (%s, %s -> %s, QEMU %s) -> %s (%.1f s) -> %s%s",
        $i,
        $fault,
        $moment,
        $kind,
        $src,
        $dst,
        $lab->qemu_version($src),
        $verdict // ($killed ? 'killed, no verdict' : 'no verdict'),
        $secs,
        $where eq 'none' || $where eq 'both'
        ? $where
        : "$where" . (defined $fixed ? ' after --check --fix' : ''),
        @notes ? ' [' . join('; ', @notes) . ']' : ''
    );
    diag($line);
    push @lines, $line;
    if (my $keep = $ENV{MTUNNEL_SOAK_LOGS}) {
        # the task logs, kept past the lab's teardown
        if (open(my $fh, '>', "$keep/round-$i.log")) {
            print $fh "$line\n", slurp($log), $fix_log // '';
            close($fh);
        }
    }
}

for my $r (@plan) {
    next if %only && !$only{ $r->{i} };
    run_round($r);
}

my @summary;
for my $key (sort keys %tally) {
    push @summary,
        "  $key: " . join(', ', map { "$tally{$key}{$_} × $_" } sort keys %{ $tally{$key} });
}
diag(
    sprintf(
        "soak seed %d: %d rounds in %.0f s; outcomes per fault × moment:\n%s",
        $seed, scalar(@lines),
        time() - $t_start,
        join("\n", @summary)
    )
);

$lab->down;
done_testing();
