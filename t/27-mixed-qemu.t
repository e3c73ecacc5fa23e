#!/usr/bin/perl
# Mixed QEMU versions, as in a cluster being upgraded: node1 and node3 run Debian 12's QEMU 7.2,
# node2 runs 10.0 (what Proxmox VE 9 runs). Forward (7.2 -> 10.0): RAM with a local disk,
# post-copy, and two faults. The VM keeps the machine type it started with (pc-i440fx-7.2,
# passed to the target as --machine), so the 10.0 target attaches its disk with -drive, as
# qemu-server 9 does below machine version 10.0, and the mirror is a drive-mirror. Back
# (10.0 -> 7.2): a VM whose machine 7.2 knows migrates; a VM on 10.0's own machine type
# (pc-i440fx-10.0) cannot run on 7.2: the target start fails, and the task says so, with the
# VM left running where it was.

use strict;
use warnings;
use Test::More;
use Cwd qw(abs_path);
use File::Basename qw(dirname);
use Time::HiRes qw(time);

use MTunnelLab;

my $top = abs_path(dirname(__FILE__) . '/..');
plan skip_all => 'QEMU 10.0 is not installed (lab/setup-qemu)'
    if system("$top/lab/setup-qemu --path >/dev/null 2>&1") != 0;
my $lab = MTunnelLab->up(nodes => 3, qemu => '7.2,10.0,7.2');
my $dir = $lab->dir;
my $mem = 128;
my $tcg = 'tcg';    # post-copy and the faults need a guest that keeps dirtying its pages

*slurp = \&MTunnelLab::slurp;

is($lab->qemu_version('node1'), '7.2', 'node1 runs QEMU 7.2');
is($lab->qemu_version('node2'), '10.0', 'node2 runs QEMU 10.0');

# the QEMU binary version a VM's process runs on NODE (from the QEMU itself, over QMP)
sub running_qemu {
    my ($node, $vmid) = @_;
    my ($rc, $out) = $lab->run($node, 'qmp', $vmid, 'query-version');
    my ($major, $minor) = $out =~ /"major"\s*:\s*(\d+).*?"minor"\s*:\s*(\d+)/s;
    return defined $major ? "$major.$minor" : "unknown ($out)";
}

# how NODE's QEMU attached ide0 of VMID: 'drive' (a BlockBackend drive-ide0) or 'blockdev'
sub attached_as {
    my ($node, $vmid) = @_;
    my ($rc, $out) = $lab->run($node, 'qmp', $vmid, 'query-block');
    return 'drive' if $out =~ /"device"\s*:\s*"drive-ide0"/;
    return 'blockdev' if $out =~ /"node-name"\s*:\s*"drive-ide0"/;
    return "neither ($out)";
}

sub migrate {
    my ($vmid, $src, $dst, @args) = @_;
    my $since = MTunnelLab::now_ns();
    my @res = $lab->run($src, "$top/perl/bin/mtunnel-migrate",
        $vmid, $dst, '--node', $src,
        '--ssh-file', "$dir/ssh_prefix_$dst", '--pve-dir', "$dir/pve", '--online', @args);
    is_deeply([$lab->resumed_after_target($src, $dst, $vmid, $since)],
        [], "VM $vmid $src -> $dst: the source never resumed after the target ran (QEMU's events)");
    return @res;
}

sub nothing_left {
    my ($what) = @_;
    is_deeply([$lab->ssh_pids($_)], [], "$what: no ssh left on $_") for $lab->nodes;
    is_deeply([$lab->socket_files($_)], [], "$what: no socket file left on $_") for $lab->nodes;
}

sub runs_only_on {
    my ($what, $vmid, $node) = @_;
    for my $n ($lab->nodes) {
        if ($n eq $node) {
            is($lab->qmpstatus($n, $vmid), 'running', "$what: VM $vmid runs on $n");
        } else {
            isnt($lab->qmpstatus($n, $vmid), 'running', "$what: VM $vmid does not run on $n");
        }
    }
    is($lab->vm_config_node($vmid), $node, "$what: the config of VM $vmid is on $node");
}

sub memory_intact {
    my ($what, $node, $vmid) = @_;
    my ($rc, $check) = $lab->run($node, "$top/lab/guest-check", $vmid, $mem);
    is($rc, 0, "$what: guest memory (and disk) intact on $node") or diag($check);
    $lab->run($node, 'qm', 'stop', $vmid);
}

# ------------------------------------------------------------ 7.2 -> 10.0, RAM and a local disk

{
    my $vmid = 270;
    $lab->write_vm_config(
        $vmid,
        memory => $mem,
        guest => 'disk',
        ide0 => "local:$vmid/vm-$vmid-disk-0.raw,size=32M"
    );
    $lab->run_ok('node1', 'qm', 'start', $vmid);
    $lab->run_ok('node1', "$top/lab/guest-check", '--wait', $vmid);
    is(attached_as('node1', $vmid), 'drive', '7.2 source: the disk is a -drive BlockBackend');
    my ($rc, $out, $err) = migrate($vmid, 'node1', 'node2', '--with-local-disks');
    is($rc, 0, '7.2 -> 10.0 with a local disk: TASK OK') or diag("$out$err");
    like(
        slurp("$dir/node2/qm-start.log"),
        qr/^start $vmid args=.*--machine pc-i440fx-7\.2 /m,
        '7.2 -> 10.0: the target starts the machine type the source runs'
    );
    like($out, qr/drive mirror is starting for drive-ide0$/m, '7.2 -> 10.0: the disk is mirrored');
    runs_only_on('7.2 -> 10.0 with a local disk', $vmid, 'node2');
    is(running_qemu('node2', $vmid), '10.0', '7.2 -> 10.0: the VM now runs on QEMU 10.0');
    is(
        attached_as('node2', $vmid),
        'drive',
        '7.2 -> 10.0: below machine 10.0 the target attaches the disk with -drive, as qemu-server 9'
    );
    is_deeply([$lab->volumes('node1', $vmid)], [], '7.2 -> 10.0: the source volume was freed');
    nothing_left('7.2 -> 10.0 with a local disk');

    # ------------------------------------------------------------ and back: 10.0 -> 7.2
    # the machine is still pc-i440fx-7.2, which QEMU 7.2 runs: the way back is open
    ($rc, $out, $err) = migrate($vmid, 'node2', 'node3', '--with-local-disks');
    is($rc, 0, '10.0 -> 7.2 on machine pc-i440fx-7.2 with a local disk: TASK OK')
        or diag("$out$err");
    runs_only_on('10.0 -> 7.2 on machine pc-i440fx-7.2', $vmid, 'node3');
    is(running_qemu('node3', $vmid), '7.2', '10.0 -> 7.2: the VM now runs on QEMU 7.2');
    memory_intact('7.2 -> 10.0 -> 7.2 with a local disk', 'node3', $vmid);
    nothing_left('10.0 -> 7.2 with a local disk');
}

# ------------------------------------------------------------ 10.0's own machine cannot go back

{
    my $vmid = 271;
    $lab->write_vm_config($vmid, memory => $mem);
    $lab->move_vm_config($vmid, 'node2');
    $lab->run_ok('node2', 'qm', 'start', $vmid);
    $lab->run_ok('node2', "$top/lab/guest-check", '--wait', $vmid);
    is(attached_as('node2', $vmid),
        'blockdev', '10.0, machine pc (= pc-i440fx-10.0): the disk is attached with -blockdev');
    my ($rc, $out, $err) = migrate($vmid, 'node2', 'node3');
    isnt($rc, 0, '10.0 -> 7.2 on machine pc-i440fx-10.0: the migration fails');
    like(
        $out,
        qr/^TASK ERROR: .*pc-i440fx-10\.0.* - VM $vmid runs on node 'node2' \(source\) only$/m,
        '10.0 -> 7.2: the task names the machine type QEMU 7.2 lacks and where the VM runs'
    ) or diag("$out$err");
    diag(($out =~ /^(TASK ERROR: .*)$/m)[0] // 'no TASK ERROR line');
    runs_only_on('10.0 -> 7.2 refused', $vmid, 'node2');
    is_deeply([$lab->qemu_pids('node3')], [], '10.0 -> 7.2 refused: no QEMU left on node3');

    # pinned to a machine type that both know (as an admin does before going back)
    $lab->run_ok('node2', 'qm', 'stop', $vmid);
    $lab->write_vm_config($vmid, memory => $mem, machine => 'pc-i440fx-7.2');
    $lab->run_ok('node2', 'qm', 'start', $vmid);
    $lab->run_ok('node2', "$top/lab/guest-check", '--wait', $vmid);
    is(attached_as('node2', $vmid),
        'drive', '10.0 with machine pc-i440fx-7.2 pinned: the disk is attached with -drive');
    ($rc, $out, $err) = migrate($vmid, 'node2', 'node3');
    is($rc, 0, '10.0 -> 7.2 with machine pc-i440fx-7.2 pinned: TASK OK') or diag("$out$err");
    runs_only_on('10.0 -> 7.2 pinned', $vmid, 'node3');
    memory_intact('10.0 -> 7.2 pinned', 'node3', $vmid);
    nothing_left('10.0 -> 7.2 pinned');
}

# ------------------------------------------------------------ 7.2 -> 10.0, post-copy

{
    my $vmid = 272;
    $lab->qemu_server_series($_, 1) for qw(node1 node2);
    $lab->write_vm_config($vmid, memory => $mem, accel => $tcg);
    $lab->run_ok('node1', 'qm', 'start', $vmid);
    $lab->run_ok('node1', "$top/lab/guest-check", '--wait', $vmid);
    my ($rc, $out, $err) =
        migrate($vmid, 'node1', 'node2', '--postcopy', 'always', '--bwlimit', 16384);
    is($rc, 0, '7.2 -> 10.0 post-copy: TASK OK') or diag("$out$err");
    like(
        $out,
        qr/switching to post-copy: .*\n(?s:.*)VM $vmid resumed on node 'node2' \(post-copy\)/m,
        '7.2 -> 10.0 post-copy: the migration switched and the target resumed in post-copy'
    ) or diag($out);
    # 7.2 offers postcopy-preempt; the 10.0 target, listening already, refuses it
    like(
        $out,
        qr/^\S+ \S+ postcopy-preempt not taken on node 'node2' \(.*Postcopy preempt must be set before incoming starts.*\): without it$/m,
        '7.2 -> 10.0 post-copy: the 10.0 target refuses postcopy-preempt, and post-copy goes on without it'
    ) or diag($out);
    runs_only_on('7.2 -> 10.0 post-copy', $vmid, 'node2');
    memory_intact('7.2 -> 10.0 post-copy', 'node2', $vmid);
    nothing_left('7.2 -> 10.0 post-copy');
    $lab->qemu_server_series($_, 0) for qw(node1 node2);
}

# ------------------------------------------------------------ 7.2 -> 10.0, faults

for my $fault (
    [
        'kill ssh' => sub { kill('KILL', $lab->ssh_pids('node1', $_[0])) or die "no tunnel ssh\n" }
    ],
    [
        'kill the 10.0 target QEMU' => sub {
            my @p = $lab->qemu_pids('node2');
            kill('KILL', @p) or die "no target QEMU\n";
        }
    ],
    )
{
    my ($name, $inject) = @$fault;
    my $vmid = $name =~ /ssh/ ? 273 : 274;
    $lab->write_vm_config($vmid, memory => $mem, accel => $tcg);
    $lab->run_ok('node1', 'qm', 'start', $vmid);
    $lab->run_ok('node1', "$top/lab/guest-check", '--wait', $vmid);
    my $since = MTunnelLab::now_ns();
    my $bg = $lab->background(
        'node1', "$dir/fault-$vmid.log",
        "$top/perl/bin/mtunnel-migrate", $vmid,
        'node2', '--node',
        'node1', '--ssh-file',
        "$dir/ssh_prefix_node2", '--pve-dir',
        "$dir/pve", '--online',
        '--bwlimit', 4096
    );
    ok($bg->wait_for(qr/migration active/, 30), "7.2 -> 10.0, $name: the migration was under way")
        or diag($bg->output);
    eval { $inject->($vmid) };
    is($@, '', "7.2 -> 10.0, $name: fault injected");
    ok($bg->finish(60), "7.2 -> 10.0, $name: the driver finished");
    my $out = $bg->output;
    like(
        $out,
        qr/^TASK ERROR: .* - VM $vmid runs on node 'node1' \(source\) only$/m,
        "7.2 -> 10.0, $name: the verdict says the VM runs on the source"
    ) or diag($out);
    is_deeply([$lab->resumed_after_target('node1', 'node2', $vmid, $since)],
        [], "7.2 -> 10.0, $name: the source never resumed after the target ran");
    runs_only_on("7.2 -> 10.0, $name", $vmid, 'node1');
    memory_intact("7.2 -> 10.0, $name", 'node1', $vmid);
    nothing_left("7.2 -> 10.0, $name");
}

$lab->down;
done_testing();
