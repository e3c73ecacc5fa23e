#!/usr/bin/perl
# Faults during the disk mirror of a storage migration, made real on the lab: the mirror
# cancelled by someone else, the tunnel's ssh killed, the target QEMU killed, the target
# storage full (a 16 MiB tmpfs), a mirror that never gets ready before its deadline; and a
# stale _nbd.migrate socket left on the source, which must not stop a migration. Each
# failure: a clear error, no block job left on the source, the target VM stopped and its new
# volume freed, the source VM running with memory and disk intact (the guest kept writing
# both), and no socket file, ssh process or zombie left.

use strict;
use warnings;
use Test::More;
use Cwd qw(abs_path);
use File::Basename qw(dirname);
use IO::Socket::UNIX;
use POSIX qw(:sys_wait_h);
use Socket qw(SOCK_STREAM);
use Time::HiRes qw(time sleep);

use MTunnelLab;

my $top = abs_path(dirname(__FILE__) . '/..');
my $lab = MTunnelLab->up(nodes => 2);
my $dir = $lab->dir;
my ($vmid, $mem) = (500, 128);
my $volid = "local:$vmid/vm-$vmid-disk-0.raw";

*slurp = \&MTunnelLab::slurp;

sub tunnel_ssh { return $lab->ssh_pids('node1', $vmid) }

sub qmpstatus { return $lab->qmpstatus($_[0], $vmid) }

sub volumes { return $lab->volumes(@_) }

sub qmp {
    my ($node, @cmd) = @_;
    my ($rc, $out, $err) = $lab->run($node, 'qmp', $vmid, @cmd);
    die "qmp @cmd on $node: $out$err" if $rc != 0;
    return $out;
}

# waits until the disk guest has written BYTES of its disk region (which starts at 1 MiB)
sub wait_disk_written {
    my ($bytes) = @_;
    for (1 .. 600) {
        my (undef, $out) = $lab->run('node1', "$top/lab/guest-check", '--wait', $vmid);
        my ($pass, $sector) = $out =~ /disk pass (\d+) sector (\d+)/;
        return if defined $pass && ($pass > 1 || ($sector - 2048) * 512 >= $bytes);
        sleep(0.1);
    }
    die "the guest did not write $bytes bytes of its disk in time\n";
}

my %scenario = (
    'cancel the mirror' => {
        args => ['--bwlimit', 4096],
        inject => sub { qmp('node1', 'block-job-cancel', '{"device":"drive-ide0","force":true}') },
        error => qr/^TASK ERROR: .*drive-ide0.*(cancel|vanished)/mi,
    },
    'kill ssh' => {
        args => ['--bwlimit', 4096],
        inject => sub { kill('KILL', tunnel_ssh()) or die "no tunnel ssh found\n" },
        error => qr/^TASK ERROR: .*drive-ide0/m,
    },
    'kill the target QEMU' => {
        args => ['--bwlimit', 4096],
        inject => sub {
            my @p = $lab->qemu_pids('node2');
            kill('KILL', @p) or die "no target QEMU (@p)\n";
        },
        error => qr/^TASK ERROR: .*drive-ide0/m,
    },
    'target storage full' => {
        # once the guest has written 2 MiB of its disk, more than the 1 MiB "small" storage holds
        prepare => sub { wait_disk_written(2 << 20) },
        args => ['--targetstorage', 'small'],
        target_store => 'small',
        error => qr/^TASK ERROR: .*drive-ide0.*(No space left|ENOSPC|nospace|error)/mi,
    },
    'mirror never ready' => {
        args => ['--bwlimit', 1024, '--mirror-timeout', 3],
        error =>
            qr/^TASK ERROR: storage migration not ready after \d+ s \(mirror timeout\) - aborting - /m,
    },
    'stale _nbd.migrate socket' => {
        prepare => sub {
            # a socket file nobody listens on any more, where the tunnel's NBD forward goes
            $lab->run_ok('node1', 'perl', '-MIO::Socket::UNIX', '-e',
                "IO::Socket::UNIX->new(Local => '/run/qemu-server/${vmid}_nbd.migrate', Listen => 1) or die \$!"
            );
            my ($rc, $out) = $lab->run(
                'node1', 'find', '/run/qemu-server', '-name',
                "${vmid}_nbd.migrate", '-type', 's'
            );
            die "no stale socket made\n" if $out !~ /_nbd\.migrate/;
        },
        succeeds => 1,
    },
);

my $only = $ENV{MTUNNEL_FAULT};    # a regex, to run some scenarios only
for my $name (sort grep { !defined($only) || /$only/ } keys %scenario) {
    my $s = $scenario{$name};
    $lab->write_vm_config($vmid, memory => $mem, guest => 'disk', ide0 => "$volid,size=32M");
    $lab->run_ok('node1', 'qm', 'start', $vmid);
    $lab->run_ok('node1', "$top/lab/guest-check", '--wait', $vmid);
    $s->{prepare}->() if $s->{prepare};
    my $t0 = time();
    my $bg = $lab->background(
        'node1', "$dir/fault-$vmid.log",
        "$top/perl/bin/mtunnel-migrate", $vmid,
        'node2', '--node',
        'node1', '--ssh-file',
        "$dir/ssh_prefix_node2", '--online',
        '--with-local-disks', @{ $s->{args} // [] }
    );
    if ($s->{inject}) {
        ok(
            $bg->wait_for(qr/drive-ide0: transferred/, 30),
            "$name: the mirror was under way when the fault hit"
        ) or diag($bg->output);
        eval { $s->{inject}->() };
        is($@, '', "$name: fault injected");
    }
    my $done = $bg->finish(120);
    my $took = time() - $t0;
    ok($done, sprintf("$name: driver finished in bounded time (%.1f s)", $took));
    my $status = $bg->status;
    my $out = $bg->output;
    my ($err) = $out =~ /^(TASK (?:ERROR: .*|OK))$/m;
    diag("$name: " . ($err // 'no TASK line') . sprintf(" (%.1f s)", $took));

    if ($s->{succeeds}) {
        is(($status // -1) >> 8, 0, "$name: the migration succeeds") or diag($out);
        is(qmpstatus('node2'), 'running', "$name: VM runs on node2");
        is(qmpstatus('node1'), 'stopped', "$name: VM stopped on node1");
        my ($crc, $check) = $lab->run('node2', "$top/lab/guest-check", $vmid, $mem);
        is($crc, 0, "$name: guest memory and disk intact on node2") or diag($check);
        $lab->run('node2', 'qm', 'stop', $vmid);
        $lab->run('node2', 'pvesm', 'free', $volid);
    } else {
        isnt(($status // 0) >> 8, 0, "$name: driver reports failure");
        like($out, $s->{error}, "$name: error says what happened") or diag($out);
        like(
            $out,
            qr/drive-ide0: Cancelling block job/,
            "$name: the cleanup cancelled the block job"
        );
        like(
            $out,
            qr/^TASK ERROR: .* - VM $vmid runs on node 'node1' \(source\) only$/m,
            "$name: the verdict says where the VM runs"
        );
        is(qmp('node1', 'query-block-jobs'), "[]\n", "$name: no block job left on the source");
        is(qmpstatus('node1'), 'running', "$name: VM runs on node1");
        isnt(qmpstatus('node2'), 'running', "$name: VM does not run on node2");
        is_deeply([volumes('node2', $s->{target_store} // 'local')],
            [], "$name: the target's new volume was freed");
        is_deeply([volumes('node1', 'local')], [$volid], "$name: the source volume is kept");
        my ($crc, $check) = $lab->run('node1', "$top/lab/guest-check", $vmid, $mem);
        is($crc, 0, "$name: guest memory and disk intact on node1") or diag($check);
        like($check, qr/^guest disk ok:/m, "$name: the disk check ran");
        # guest-check paused the source for its dump: stop the VM for the next round
        $lab->run($_, 'qm', 'stop', $vmid) for qw(node1 node2);
        $lab->run_ok('node1', 'pvesm', 'free', $volid);
    }
    is_deeply([tunnel_ssh()], [], "$name: no tunnel ssh left");
    is_deeply([$lab->socket_files($_)], [], "$name: no socket file left on $_") for qw(node1 node2);
    is_deeply([MTunnelLab::zombies_since($t0)], [], "$name: no zombie left");
}

$lab->down;
done_testing();
