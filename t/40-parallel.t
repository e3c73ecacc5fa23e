#!/usr/bin/perl
# 48 migrations started at once from node1 to node2 (MTUNNEL_PARALLEL_ROUNDS=2: two rounds in a
# row; one by default, the round against the hardened sshd follows it), one Perl process each (as migrateall
# forks one worker per VM), against a stock sshd (MaxStartups 10:30:100): all 48 succeed,
# every VM runs on node2 only, and nothing is left behind. Then a round against a hardened or
# busy sshd (MaxStartups 2:50:4: handshakes beyond 2 are dropped, beyond 4 all): all 48 succeed
# too (the handshake window adapts, pre-authentication drops are retried until the deadline,
# the remote sockets go with the tunnel's command), and none is reported failed while its VM
# runs on node2. Then 16 insecure migrations at once over the migration network: every target
# binds port 0, so none collides with another.

use strict;
use warnings;
use Test::More;
use Cwd qw(abs_path);
use File::Basename qw(dirname);

use MTunnelLab;

my $top = abs_path(dirname(__FILE__) . '/..');
my $n = $ENV{MTUNNEL_PARALLEL_N} // 48;

my $rounds = $ENV{MTUNNEL_PARALLEL_ROUNDS} // 1;

my $lab = MTunnelLab->up(nodes => 2);
local $ENV{MTUNNEL_LAB} = $lab->name;
for my $round (1 .. $rounds) {
    my $out = `$top/lab/parallel-migrate $n --mem 64 2>&1`;
    my $rc = $? >> 8;
    my ($summary) = $out =~ /^(parallel N=.*)$/m;
    diag("round $round: " . ($summary // $out));
    is($rc, 0,
        "round $round: all $n migrations succeeded, each VM running on node2 and stopped on node1")
        or diag($out);
    like($summary // '', qr/: $n\/$n succeeded/, "round $round: $n of $n");
}

{
    $lab->sshd('node2', 'MaxStartups', '2:50:4');
    my $log = $lab->dir . '/node2/sshd.log';
    my $drops_before = () = MTunnelLab::slurp($log) =~ /drop connection/g;
    my $out = `$top/lab/parallel-migrate $n --mem 64 --vmid-base 4000 2>&1`;
    my $rc = $? >> 8;
    my ($summary) = $out =~ /^(parallel N=.*)$/m;
    my $drops = (() = MTunnelLab::slurp($log) =~ /drop connection/g) - $drops_before;
    diag("MaxStartups 2:50:4: " . ($summary // $out) . "; sshd dropped $drops handshakes");
    cmp_ok($drops, '>', 0,
        'the contended sshd did drop handshakes (the round tested what it should)');
    is($rc, 0,
        "MaxStartups 2:50:4: all $n migrations succeeded, each VM running on node2 and stopped on node1"
    ) or diag($out);
    like($summary // '', qr/: $n\/$n succeeded/, "MaxStartups 2:50:4: $n of $n");
    unlike($out, qr/exit \d+$/m, 'no migration reported failed while its VM runs on node2');
    $lab->sshd('node2');
}

my $n_insecure = $ENV{MTUNNEL_PARALLEL_INSECURE_N} // 16;
{
    my $out = `$top/lab/parallel-migrate $n_insecure --mem 64 --insecure --vmid-base 3000 2>&1`;
    my $rc = $? >> 8;
    my ($summary) = $out =~ /^(parallel N=.*)$/m;
    diag("insecure: " . ($summary // $out));
    is($rc, 0, "$n_insecure insecure migrations at once all succeeded, each VM on node2 only")
        or diag($out);
    like(
        $summary // '',
        qr/ insecure: $n_insecure\/$n_insecure succeeded/,
        "insecure: $n_insecure of $n_insecure"
    );
    my @addr = map { /^\S+ \S+ starting online\/live migration on (tcp:\S+)$/m ? $1 : () }
        map { MTunnelLab::slurp($lab->dir . "/parallel-logs/$_.log") }
        3000 .. 3000 + $n_insecure - 1;
    is(scalar(@addr), $n_insecure, 'insecure: every migration went to a TCP address');
    is(scalar(grep { /^tcp:198\.19\.0\.2:\d+$/ } @addr),
        $n_insecure, 'insecure: all on node2\'s migration network address');
}

is_deeply([$lab->socket_files($_)], [], "no socket file left on $_") for qw(node1 node2);
is_deeply([$lab->qemu_pids($_)], [], "no QEMU left on $_ (parallel-migrate stopped them)")
    for qw(node1 node2);
for my $node (qw(node1 node2)) {
    my @left = grep { my $c = `cat /proc/$_/comm 2>/dev/null`; chomp $c; $c ne 'sshd' }
        $lab->procs_in($node);
    is_deeply(\@left, [], "no ssh or other process left in $node")
        or diag(`ps -o pid,stat,args -p @{[join(',', @left)]}`);
}
is_deeply([MTunnelLab::zombies_since($^T)], [], 'no zombie left');

$lab->down;
done_testing();
