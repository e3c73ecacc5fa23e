#!/usr/bin/perl
# The C example (examples/c/migrate) migrates a VM on the lab through the C ABI alone:
# ssh_run (qm start), tunnel_open, tunnel_wait_ready, qmp_migrate, qmp_query_migrate until
# completed, tunnel_command (resume), tunnel_close, and quit of the source.
# With --with-local-disks it also migrates a local disk the guest keeps writing:
# qm start --targetstorage 1, the NBD socket forwarded too, qmp_mirror_start,
# qmp_mirror_wait_ready, RAM, qmp_mirror_finish (cancel), qm nbdstop; and when the target's
# storage fills up during the mirror, its cleanup (qmp_mirror_cancel, qm stop on the target,
# pvesm free of the new volume) leaves the VM running on node1 with nothing left behind.

use strict;
use warnings;
use Test::More;
use Cwd qw(abs_path);
use File::Basename qw(dirname);

use MTunnelLab;

my $top = abs_path(dirname(__FILE__) . '/..');
my $bin = "$top/examples/c/build/migrate";
plan skip_all => "$bin not built (make -C examples/c)" if !-x $bin && !$ENV{CI};

my $mem = 128;
my $lab = MTunnelLab->up(nodes => 2);
my $dir = $lab->dir;
my $ssh_file = "$dir/ssh_prefix_node2";

sub qmpstatus { return $lab->qmpstatus(@_) }

sub volumes { return $lab->volumes($_[0], 'local') }

# ------------------------------------------------------------ RAM only

{
    my $vmid = 101;
    $lab->write_vm_config($vmid, memory => $mem);
    $lab->run_ok('node1', 'qm', 'start', $vmid);
    $lab->run_ok("node1", "$top/lab/guest-check", "--wait", $vmid);

    my ($rc, $out, $err) = $lab->run('node1', $bin, $vmid, 'node1', $ssh_file);
    is($rc, 0, 'C example exits 0') or diag("$out$err");
    my ($result) = $out =~ /^(RESULT: .*)$/m;
    diag($result // 'no RESULT line');
    like($out, qr/^tunnel ready after [\d.]+ s$/m, 'tunnel became ready');
    like($out, qr/^resume $vmid: OK$/m, 'resume through the tunnel answered OK');
    like($result // '', qr/^RESULT: VM $vmid migrated from node1/, 'C example reports success');
    unlike($out, qr/^mirror /m, 'RAM only: no mirror');
    # the example leaves configs alone (no PVE node): its config moves as a source would move it
    $lab->move_vm_config($vmid, 'node2');

    like(
        scalar($lab->run_ok('node2', 'qm', 'status', $vmid, '--verbose')),
        qr/qmpstatus: running/,
        'VM runs on node2'
    );
    # The example stops the source with QMP quit; give QEMU a moment to exit.
    for (1 .. 50) { last if !$lab->qemu_pids('node1'); select(undef, undef, undef, 0.1) }
    is_deeply([$lab->qemu_pids('node1')], [], 'source QEMU is gone');
    my ($crc, $check) = $lab->run('node2', "$top/lab/guest-check", $vmid, $mem);
    is($crc, 0, 'guest memory pattern intact') or diag($check);
    $lab->run_ok('node2', 'qm', 'stop', $vmid);
    is_deeply([$lab->socket_files($_)], [], "no socket file left on $_") for qw(node1 node2);
}

# ------------------------------------------------------------ with a local disk

{
    my $vmid = 102;
    my $volid = "local:$vmid/vm-$vmid-disk-0.raw";
    $lab->write_vm_config($vmid, memory => $mem, guest => 'disk', ide0 => "$volid,size=32M");
    $lab->run_ok('node1', 'qm', 'start', $vmid);
    my $wait = $lab->run_ok('node1', "$top/lab/guest-check", '--wait', $vmid);
    like(
        $wait,
        qr/^guest running: pass \d+, disk pass \d+ sector \d+/m,
        'disk: the guest writes its disk'
    ) or diag($wait);

    my ($rc, $out, $err) =
        $lab->run('node1', $bin, $vmid, 'node1', $ssh_file, '--with-local-disks');
    is($rc, 0, 'disk: C example exits 0') or diag("$out$err");
    my ($result) = $out =~ /^(RESULT: .*)$/m;
    diag($result // 'no RESULT line');
    like(
        MTunnelLab::slurp("$dir/node2/qm-start.log"),
        qr/^start $vmid args=--skiplock --migratedfrom node1 --migration_type secure --stateuri unix --targetstorage 1 stdin=nbd_protocol_version:1$/m,
        'disk: the target was started with --targetstorage 1 after --stateuri unix'
    );
    my $nbd = "nbd:unix:/run/qemu-server/${vmid}_nbd.migrate:exportname=drive-ide0";
    like(
        $out,
        qr/^target exports drive-ide0 on \Q$nbd\E \(new volume \Q$volid\E\)$/m,
        'disk: the NBD export and its new volume'
    );
    like($out, qr/^tunnel ready after [\d.]+ s$/m, 'disk: tunnel became ready');
    # QEMU 10.0's default machine (10.0) has its disk attached with -blockdev, 7.2's with -drive
    my $method = $lab->qemu_version('node1') eq '7.2' ? 'drive-mirror' : 'blockdev-mirror';
    like(
        $out,
        qr/^mirror method for drive-ide0: $method$/m,
        "disk: the library picked $method from what QEMU "
            . $lab->qemu_version('node1')
            . ' attached'
    );
    like(
        $out,
        qr/^mirror started: (?:drive|mirror)-ide0 -> \Q$nbd\E$/m,
        'disk: mirror into the NBD export through the tunnel'
    );
    like(
        $out,
        qr/^mirror ready: (?:drive|mirror)-ide0 \d+ of \d+ bytes after [\d.]+ s$/m,
        'disk: mirror ready'
    );
    like(
        $out,
        qr/^mirror finished: (?:drive|mirror)-ide0 \d+ of \d+ bytes$/m,
        'disk: mirror finished (block-job-cancel)'
    );
    like($out, qr/^NBD server stopped on the target$/m, 'disk: qm nbdstop on the target');
    like(
        $out,
        qr/^mirror ready:.*^migration completed in .*^mirror finished:.*^NBD server stopped.*^resume $vmid: OK$/ms,
        'disk: mirrors ready, RAM, mirrors finished, NBD stopped, resume: in that order'
    );
    like(
        $out,
        qr/^source volumes kept on node1 /m,
        'disk: the example says the source volume is kept'
    );
    like(
        $result // '',
        qr/^RESULT: VM $vmid migrated from node1/,
        'disk: C example reports success'
    );
    # the example leaves configs alone (no PVE node): its config moves as a source would move it
    $lab->move_vm_config($vmid, 'node2');

    is(qmpstatus('node2', $vmid), 'running', 'disk: VM runs on node2');
    for (1 .. 50) { last if !$lab->qemu_pids('node1'); select(undef, undef, undef, 0.1) }
    is_deeply([$lab->qemu_pids('node1')], [], 'disk: source QEMU is gone');
    is(qmpstatus('node1', $vmid), 'stopped', 'disk: and the VM does not run on node1');
    my ($crc, $check) = $lab->run('node2', "$top/lab/guest-check", $vmid, $mem);
    is($crc, 0, 'disk: guest memory and disk intact on node2') or diag($check);
    like($check, qr/^guest memory ok:/m, 'disk: memory pattern ok');
    like(
        $check,
        qr/^guest disk ok: \d+ sectors, pass \d+, next sector \d+/m,
        'disk: every disk write the guest made is on node2'
    );
    # the example does not free the source's volume (the Perl driver does)
    is_deeply([volumes('node1')], [$volid], 'disk: the source volume is still on node1');
    is_deeply([volumes('node2')], [$volid], 'disk: node2 has the new volume');
    is_deeply([$lab->socket_files($_)], [], "disk: no socket file left on $_") for qw(node1 node2);

    $lab->run_ok('node2', 'qm', 'stop', $vmid);
    $lab->run_ok('node2', 'pvesm', 'free', $volid);
    $lab->run_ok('node1', 'pvesm', 'free', $volid);
    is_deeply([volumes($_)], [], "disk: clean after the test on $_") for qw(node1 node2);
}

# ------------------------------------------------------------ storage full on the target

# node2's "local" tmpfs shrunk to 1 MiB: the target's new (sparse) volume is allocated, but
# the mirror fails with ENOSPC once the guest has written more than that
{
    my ($vmid, $t0) = (103, time());
    my $volid = "local:$vmid/vm-$vmid-disk-0.raw";
    $lab->write_vm_config($vmid, memory => $mem, guest => 'disk', ide0 => "$volid,size=32M");
    $lab->run_ok('node1', 'qm', 'start', $vmid);
    my $written;
    for (1 .. 600) {
        my (undef, $o) = $lab->run('node1', "$top/lab/guest-check", '--wait', $vmid);
        my ($pass, $sector) = $o =~ /disk pass (\d+) sector (\d+)/;
        last if $written = defined $pass && ($pass > 1 || ($sector - 2048) * 512 >= (2 << 20));
        select(undef, undef, undef, 0.1);
    }
    ok($written, 'full: the guest wrote 2 MiB of its disk');
    $lab->run_ok('node2', 'mount', '-o', 'remount,size=1m', "$dir/local");

    my ($rc, $out, $err) =
        $lab->run('node1', $bin, $vmid, 'node1', $ssh_file, '--with-local-disks');
    isnt($rc, 0, 'full: C example fails') or diag("$out$err");
    like(
        $err,
        qr/^migrate: qmp_mirror_wait_ready failed: (?:drive|mirror)-ide0: mirror failed: No space left on device/m,
        'full: the error says the mirror failed for lack of space'
    ) or diag("$out$err");
    unlike($out, qr/^migration completed/m, 'full: RAM was not migrated');
    like(
        $out,
        qr/^aborting: cleaning up\ncleanup: mirror jobs cancelled: .*\ncleanup: VM $vmid stopped on the target\ncleanup: volume \Q$volid\E freed on the target\nRESULT: migration of VM $vmid FAILED$/m,
        'full: cleanup: mirror cancelled, target stopped, new volume freed'
    ) or diag($out);
    $lab->run_ok('node2', 'mount', '-o', 'remount,size=4g', "$dir/local");

    is(qmpstatus('node1', $vmid), 'running', 'full: VM still runs on node1');
    isnt(qmpstatus('node2', $vmid), 'running', 'full: VM does not run on node2');
    is(scalar($lab->run_ok('node1', 'qmp', $vmid, 'query-block-jobs')),
        "[]\n", 'full: no block job left on the source');
    is_deeply([volumes('node2')], [], "full: the target's new volume was freed");
    is_deeply([volumes('node1')], [$volid], 'full: the source volume is kept');
    my ($crc, $check) = $lab->run('node1', "$top/lab/guest-check", $vmid, $mem);
    is($crc, 0, 'full: guest memory and disk intact on node1') or diag($check);
    like($check, qr/^guest disk ok:/m, 'full: the disk check ran');
    is_deeply([$lab->socket_files($_)], [], "full: no socket file left on $_") for qw(node1 node2);
    is_deeply(
        [
            grep { MTunnelLab::slurp("/proc/$_/cmdline") =~ /^\/usr\/bin\/ssh\0/ }
                $lab->procs_in('node1')
        ],
        [],
        'full: no ssh left on node1'
    );
    is_deeply([MTunnelLab::zombies_since($t0)], [], 'full: no zombie left');

    $lab->run_ok('node1', 'qm', 'stop', $vmid);
    $lab->run_ok('node1', 'pvesm', 'free', $volid);
    is_deeply([volumes($_)], [], "full: clean after the test on $_") for qw(node1 node2);
}

$lab->down;
done_testing();
