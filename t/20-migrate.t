#!/usr/bin/perl
# End to end: a 256 MiB VM is live-migrated from node1 to node2 by the QemuMigrate-style Perl
# driver, through the Rust library, over a real ssh tunnel to a real sshd, into a real QEMU.
# The guest keeps writing memory; afterwards its page pattern proves nothing was lost.

use strict;
use warnings;
use Test::More;
use Cwd qw(abs_path);
use File::Basename qw(dirname);

use MTunnelLab;

my $top = abs_path(dirname(__FILE__) . '/..');
my $vmid = 100;
my $mem = 256;

my $lab = MTunnelLab->up(nodes => 2);
$lab->write_vm_config($vmid, memory => $mem);
$lab->run_ok('node1', 'qm', 'start', $vmid);
like(
    scalar($lab->run_ok('node1', 'qm', 'status', $vmid, '--verbose')),
    qr/qmpstatus: running/,
    'source VM runs on node1'
);
# KVM guests spend seconds in SeaBIOS: wait until the page loop runs, then let it dirty memory.
$lab->run_ok("node1", "$top/lab/guest-check", "--wait", $vmid);
sleep(1);

my $since = MTunnelLab::now_ns();
my ($rc, $out, $err) = $lab->run(
    'node1', "$top/perl/bin/mtunnel-migrate", $vmid, 'node2',
    '--node', 'node1', '--ssh-file', $lab->dir . '/ssh_prefix_node2',
    '--pve-dir', $lab->dir . '/pve', '--memory', $mem
);
is($rc, 0, 'driver exits 0') or diag("$out$err");
is($err, '', 'driver writes nothing to stderr (no Perl warning)');
like(
    $out,
    qr/^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ssh tunnel ver 1$/m,
    'task log shows the tunnel version'
);
like(
    $out,
    qr/^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d starting online\/live migration on unix:\/run\/qemu-server\/$vmid\.migrate$/m,
    'task log shows the migration URI'
);
like($out, qr/migration status: completed$/m, 'migration completed');
like(
    MTunnelLab::slurp($lab->dir . '/node2/qm-start.log'),
    qr/^start $vmid args=--skiplock --migratedfrom node1 --migration_type secure --stateuri unix --machine pc-\S+ stdin=nbd_protocol_version:1$/m,
    'the target was started as upstream does: --skiplock, --stateuri, the source\'s machine type, nbd_protocol_version on stdin'
);
like(
    $out,
    qr/^\S+ \S+ migration downtime limit: 100 ms\n\S+ \S+ migration cachesize: 32\.0 MiB\n\S+ \S+ set migration parameters$/m,
    'parameters logged as upstream: downtime limit, xbzrle cache of a tenth of 256 MiB rounded up'
);
like($out, qr/^TASK OK$/m, 'task OK');
is_deeply([$lab->resumed_after_target('node1', 'node2', $vmid, $since)],
    [], "the source never resumed after the target ran (QEMU's events)");
my ($timing) = $out =~ /^(TIMING .*)$/m;
diag($timing // 'no timing line');
note($out);

like(
    scalar($lab->run_ok('node2', 'qm', 'status', $vmid, '--verbose')),
    qr/qmpstatus: running/,
    'target VM is running on node2'
);
# (qm status on node1 would not find the config: it moved to node2)
is($lab->qmpstatus('node1', $vmid), 'stopped', 'VM is stopped on node1');
is_deeply([$lab->qemu_pids('node1')], [], 'no QEMU process left on node1');

my ($crc, $check) = $lab->run('node2', "$top/lab/guest-check", $vmid, $mem);
is($crc, 0, 'guest memory pattern intact after migration') or diag($check);
like($check, qr/^guest memory ok: /m, 'guest-check reports ok');
diag($check);
$lab->run_ok('node2', 'qm', 'stop', $vmid);

is_deeply([$lab->socket_files($_)], [], "no socket file left on $_") for qw(node1 node2);
for my $node (qw(node1 node2)) {
    my @left = grep { my $c = `cat /proc/$_/comm 2>/dev/null`; chomp $c; $c ne 'sshd' }
        $lab->procs_in($node);
    is_deeply(\@left, [], "no ssh, QEMU or other process left in $node (besides sshd)")
        or diag(`ps -o pid,stat,args -p @{[join(',', @left)]}`);
}
is_deeply([MTunnelLab::zombies_since($^T)], [], 'no zombie left by this test');

# Refused before anything happens on the target (QemuMigrate.pm's prepare), each with an error
# naming what is wrong, a verdict saying nothing was done, and no `qm start` on node2.
sub migrate_refused {
    my ($what, $v, $ssh_file, $error) = @_;
    my $starts = () = MTunnelLab::slurp($lab->dir . '/node2/qm-start.log') =~ /^start /mg;
    my ($rc, $out, $err) = $lab->run('node1', "$top/perl/bin/mtunnel-migrate",
        $v, 'node2', '--node', 'node1', '--ssh-file', $ssh_file, '--pve-dir', $lab->dir . '/pve');
    is($rc, 1, "$what: the driver exits 1") or diag("$out$err");
    like($out, $error, "$what: the error says what is wrong") or diag($out);
    unlike($out, qr/left waiting|cannot be reached|qm stop/, "$what: no alarm about node2")
        or diag($out);
    my $after = () = MTunnelLab::slurp($lab->dir . '/node2/qm-start.log') =~ /^start /mg;
    is($after, $starts, "$what: nothing was started on node2");
    is($lab->qmpstatus('node2', $v), 'stopped', "$what: node2 does not run the VM");
}

$lab->write_vm_config(101, memory => 64);
migrate_refused(
    'a VM that is not running',
    101,
    $lab->dir . '/ssh_prefix_node2',
    qr/^TASK ERROR: VM 101 is not running on node 'node1' \(.*\) - nothing was done: VM 101 is left as it was on node 'node1'$/m
);

$lab->run_ok('node1', 'qm', 'start', 101);
$lab->run_ok('node1', 'qmp', 101, 'stop');
migrate_refused(
    'a paused VM',
    101,
    $lab->dir . '/ssh_prefix_node2',
    qr/^TASK ERROR: VM 101 on node 'node1' is paused, not running: only a running VM is live-migrated \(resume it first\) - nothing was done/m
);
is($lab->qmpstatus('node1', 101), 'paused', 'a paused VM: it stays paused on node1');
$lab->run_ok('node1', 'qmp', 101, 'cont');

# an ssh file that names no destination: the library refuses it before ssh runs
my $bad_ssh = $lab->dir . '/ssh_prefix_bad';
unlink($bad_ssh);
open(my $fh, '>', $bad_ssh) or die "$bad_ssh: $!\n";
print $fh "ssh\n";
close($fh);
migrate_refused('an ssh file without a destination', 101, $bad_ssh,
    qr/^TASK ERROR: .*ssh prefix needs at least the ssh binary and user\@host - VM 101 runs on node 'node1' \(source\) only$/m
);
is($lab->qmpstatus('node1', 101), 'running', 'bad ssh file: the VM still runs on node1');
$lab->run_ok('node1', 'qm', 'stop', 101);

$lab->down;
done_testing();
