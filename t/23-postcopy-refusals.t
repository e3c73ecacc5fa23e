#!/usr/bin/perl
# Post-copy that cannot be had is refused before anything starts: --postcopy with a value the
# driver does not know (also through the CLI), with --with-local-disks, and against a source
# QEMU that does not offer the 'postcopy-ram' capability (a scripted monitor answers as such a
# QEMU does). The target is never contacted: its ssh command is one that would fail loudly.

use strict;
use warnings;
use Test::More;
use Cwd qw(abs_path);
use File::Basename qw(dirname);
use File::Temp qw(tempdir);

use ScriptedQMP;
use PVE::MTunnel::Migrate;

my $top = abs_path(dirname(__FILE__) . '/..');
my $tmp = tempdir(CLEANUP => 1);
my $qmp = "$tmp/100.qmp";
# the target's ssh: leaves a mark if anything ever runs it
my $mark = "$tmp/ssh-was-run";
my @ssh = ('sh', '-c', "touch $mark; exit 255", 'ssh');

sub caps {
    return [map { { capability => $_, state => JSON::PP::false } } @_];
}

sub migrate_against {
    my ($caps, %param) = @_;
    my $mon = ScriptedQMP->monitor(
        $qmp,
        {
            'query-status' => { status => 'running', running => JSON::PP::true },
            'query-machines' => [{ name => 'pc-i440fx-7.2', 'is-current' => JSON::PP::true }],
            'query-migrate-capabilities' => $caps,
        }
    );
    my @log;
    my $m = PVE::MTunnel::Migrate->new(
        vmid => 100,
        node => 'node1',
        target => 'node2',
        ssh => \@ssh,
        qmp_socket => $qmp,
        local_qm => ['sh', '-c', 'printf "memory: 64\n"', 'qm'],
        log => sub { push @log, $_[1] },
        %param
    );
    eval { $m->migrate() };
    my $err = $@;
    my $asked = $mon->received;
    $mon->stop;
    return ($err, [grep { $_ ne 'qmp_capabilities' } @$asked], \@log);
}

{
    my ($err, $asked) = migrate_against(caps(qw(xbzrle auto-converge events)), postcopy => 'auto');
    is(
        $err,
        "--postcopy auto: the QEMU of VM 100 on node 'node1' does not offer post-copy (no migration capability 'postcopy-ram')"
            . " - nothing was done: VM 100 is left as it was on node 'node1'\n",
        'a source QEMU without postcopy-ram: refused by name, nothing done'
    );
    is_deeply(
        $asked,
        ['query-status', 'query-machines', 'query-migrate-capabilities'],
        'without postcopy-ram: only asked, nothing set on the source'
    );
    ok(!-e $mark, 'without postcopy-ram: the target was never contacted');
}

{
    my ($err, $asked) =
        migrate_against(caps(qw(xbzrle auto-converge events postcopy-ram)), postcopy => 'off');
    ok(
        !grep({ $_ eq 'query-migrate-capabilities' } @$asked),
        '--postcopy off: the source is not asked about post-copy'
    );
}

for my $bad ('sometimes', 'on', '') {
    eval {
        PVE::MTunnel::Migrate->new(
            vmid => 100,
            node => 'node1',
            target => 'node2',
            ssh => \@ssh,
            postcopy => $bad
        );
    };
    is(
        $@,
        "invalid postcopy '$bad' (off, auto or always)\n",
        "--postcopy '$bad' is refused by name"
    );
}

{
    # through the CLI, as a user types it: refused before anything runs
    unlink($mark);
    my $ssh_file = "$tmp/ssh";
    open(my $fh, '>', $ssh_file) or die;
    print $fh "$_\n" for @ssh;
    close($fh);
    my $out =
        `MTUNNEL_PVE_DIR=$tmp/none $^X -I$top/perl/lib $top/perl/bin/mtunnel-migrate 100 node2 --node node1 --ssh-file $ssh_file --postcopy sometimes 2>&1`;
    isnt($?, 0, 'CLI: an unknown --postcopy fails');
    like($out, qr/invalid postcopy 'sometimes' \(off, auto or always\)/,
        'CLI: and names the value');
    ok(!-e $mark, 'CLI: the target was never contacted');
}

done_testing();
