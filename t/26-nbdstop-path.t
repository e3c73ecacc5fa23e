#!/usr/bin/perl
# Which way the driver stops the target's NBD server before it resumes the VM there, without a
# lab (the lab's runs are in t/45): `nbdstop VMID` through the open tunnel where the target's
# `qm start` announced it, else `qm nbdstop` over ssh, also when the tunnel answers that it
# does not know the command, gives no answer in time or is gone; then the tunnel is closed, as
# a late answer would be read as the reply to `resume`. A failure on the target is a warning
# and never fails the migration (upstream's `qm nbdstop` only warns).

use strict;
use warnings;
use Test::More;

use PVE::MTunnel;
use PVE::MTunnel::Migrate;

# A tunnel with scripted answers: a string is the reply, [kind, text] the error the binding
# dies with (its text and $PVE::MTunnel::last_error_code, as the library sets them).
package StubTunnel {

    sub new {
        my ($class, @answers) = @_;
        return bless { answers => [@answers], sent => [], closed => 0 }, $class;
    }

    sub command {
        my ($self, $line, %opts) = @_;
        push @{ $self->{sent} }, "$line ($opts{timeout_ms} ms)";
        my $answer = shift @{ $self->{answers} } // die "no answer scripted for '$line'\n";
        if (ref $answer) {
            $PVE::MTunnel::last_error_code = $PVE::MTunnel::ERROR_CODE{ $answer->[0] };
            die "$answer->[1]\n";
        }
        $PVE::MTunnel::last_error_code = 0;
        return $answer;
    }

    sub close { $_[0]{closed}++; return }
}

# `qm ...` on the target is recorded; it fails where the case says so
package StubMigrate {
    our @ISA = ('PVE::MTunnel::Migrate');

    sub remote {
        my ($self, $cmd, %opts) = @_;
        push @{ $self->{ran} }, "qm @$cmd ($opts{timeout_ms} ms)";
        die $self->{remote_error} if $self->{remote_error};
        return { exit_code => 0, stdout => '', stderr => '' };
    }
}

my $vmid = 410;
my $no_reply = "no reply from tunnel to root\@198.18.0.2 within 30000 ms while waiting for the "
    . "reply to 'nbdstop $vmid'";

# stop_target_nbd on a driver whose target announced @commands and whose tunnel answers
# @answers (no tunnel: undef); returns the driver, the tunnel and the log lines
sub stop_nbd {
    my (%case) = @_;
    my @log;
    my $tunnel = exists $case{answers} ? StubTunnel->new(@{ $case{answers} }) : undef;
    my $m = StubMigrate->new(
        vmid => $vmid,
        node => 'node1',
        target => 'node2',
        ssh => ['ssh', 'root@198.18.0.2'],
        log => sub { push @log, "$_[0]: $_[1]" },
        tunnel => $tunnel,
        target_commands => $case{commands},
        remote_error => $case{remote_error},
        ran => [],
    );
    eval { $m->stop_target_nbd() };
    is($@, '', "$case{name}: stop_target_nbd does not die");
    # the time stamps are not what is checked
    s/^(\w+): \S+ \S+ /$1: / for @log;
    return ($m, $tunnel, \@log);
}

{
    my ($m, $t, $log) = stop_nbd(
        name => 'announced',
        commands => [qw(nbdstop postcopy-status)],
        answers => ['OK']
    );
    is_deeply(
        $t->{sent},
        ["nbdstop $vmid (30000 ms)"],
        'announced: nbdstop through the tunnel, with resume\'s deadline'
    );
    is_deeply($m->{ran}, [], 'announced: no qm over ssh');
    is_deeply($log, [], 'announced: nothing logged beyond phase 3\'s own line');
    ok($m->{tunnel} && !$t->{closed}, 'announced: the tunnel stays open for resume');
}

{
    my ($m, $t, $log) = stop_nbd(
        name => 'not announced',
        commands => ['postcopy-status'],
        answers => []
    );
    is_deeply($t->{sent}, [], 'not announced: nothing sent through the tunnel');
    is_deeply($m->{ran}, ["qm nbdstop $vmid (30000 ms)"], 'not announced: qm nbdstop over ssh');
    is_deeply($log, [], 'not announced: nothing logged');
    ok($m->{tunnel} && !$t->{closed}, 'not announced: the tunnel stays open for resume');
}

{
    my ($m, $t, $log) = stop_nbd(name => 'no announcement line', commands => undef, answers => []);
    is_deeply($t->{sent}, [], 'no announcement line: nothing sent through the tunnel');
    is_deeply(
        $m->{ran},
        ["qm nbdstop $vmid (30000 ms)"],
        'no announcement line: qm nbdstop over ssh'
    );
}

{
    my ($m, undef, $log) = stop_nbd(name => 'announced, no tunnel', commands => ['nbdstop']);
    is_deeply(
        $m->{ran},
        ["qm nbdstop $vmid (30000 ms)"],
        'announced, no tunnel: qm nbdstop over ssh'
    );
    is_deeply($log, [], 'announced, no tunnel: nothing logged');
}

{
    my ($m, $t, $log) = stop_nbd(
        name => 'unknown command',
        commands => ['nbdstop'],
        answers => [
            [
                remote => "tunnel replied 'ERR: unknown command 'nbdstop $vmid'' to command "
                    . "'nbdstop $vmid'"
            ]
        ]
    );
    is_deeply($m->{ran}, ["qm nbdstop $vmid (30000 ms)"], 'unknown command: qm nbdstop over ssh');
    is_deeply(
        $log,
        ["info: tunnel does not know nbdstop, using 'qm nbdstop'"],
        'unknown command: said as upstream says it'
    );
    ok($m->{tunnel} && !$t->{closed},
        'unknown command: the tunnel answered in step and stays open for resume');
}

{
    my $err = "tunnel replied 'ERR: nbdstop failed - QMP error: NBD server not running' to "
        . "command 'nbdstop $vmid'";
    my ($m, $t, $log) = stop_nbd(
        name => 'nbdstop failed',
        commands => ['nbdstop'],
        answers => [[remote => $err]]
    );
    is_deeply($m->{ran}, [], 'nbdstop failed: not tried again over ssh');
    is_deeply(
        $log,
        ["warn: stopping NBD server on target failed: $err"],
        'nbdstop failed: a warning naming the target\'s answer, as qm nbdstop warns'
    );
    ok($m->{tunnel} && !$t->{closed}, 'nbdstop failed: the tunnel stays open for resume');
}

for my $case (
    [timeout => $no_reply],
    [ssh_exited => "ssh to root\@198.18.0.2 exited with code 255 while waiting for the reply"],
    [protocol => "tunnel replied 'frobnicated' to command 'nbdstop $vmid'"],
    )
{
    my ($kind, $err) = @$case;
    my ($m, $t, $log) = stop_nbd(
        name => $kind,
        commands => ['nbdstop'],
        answers => [[$kind => $err]]
    );
    is_deeply($m->{ran}, ["qm nbdstop $vmid (30000 ms)"], "$kind: qm nbdstop over ssh");
    is(
        $log->[0],
        "warn: nbdstop through tunnel failed: $err - using 'qm nbdstop' over ssh",
        "$kind: a warning that names the tunnel's error"
    );
    is($t->{closed}, 1, "$kind: the tunnel is closed (a late answer would be taken for resume's)");
    ok(!$m->{tunnel}, "$kind: resume does not go through it (phase 3 falls back to qm resume)");
}

{
    my ($m, undef, $log) = stop_nbd(
        name => 'qm nbdstop fails',
        commands => [],
        answers => [],
        remote_error => "ssh: connect to host 198.18.0.2 port 22: Connection refused\n"
    );
    is_deeply(
        $log,
        [
            'err: ERROR: stopping NBD server on target failed: ssh: connect to host 198.18.0.2 '
                . 'port 22: Connection refused'
        ],
        'qm nbdstop fails: an error line, the migration goes on'
    );
}

done_testing();
