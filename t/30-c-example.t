#!/usr/bin/perl
# The C example (examples/c/migrate) migrates a VM on the lab through the C ABI alone:
# ssh_run (qm start), tunnel_open, tunnel_wait_ready, qmp_migrate, qmp_query_migrate until
# completed, tunnel_command (resume), tunnel_close, and quit of the source.

use strict;
use warnings;
use Test::More;
use Cwd qw(abs_path);
use File::Basename qw(dirname);

use MTunnelLab;

my $top = abs_path(dirname(__FILE__) . '/..');
my $bin = "$top/examples/c/build/migrate";
plan skip_all => "$bin not built (make -C examples/c)" if !-x $bin && !$ENV{CI};

my ($vmid, $mem) = (101, 128);
my $lab = MTunnelLab->up(nodes => 2);
$lab->write_vm_config($vmid, memory => $mem);
$lab->run_ok('node1', 'qm', 'start', $vmid);
$lab->run_ok("node1", "$top/lab/guest-check", "--wait", $vmid);

my ($rc, $out, $err) = $lab->run('node1', $bin, $vmid, 'node1', $lab->dir . '/ssh_prefix_node2');
is($rc, 0, 'C example exits 0') or diag("$out$err");
my ($result) = $out =~ /^(RESULT: .*)$/m;
diag($result // 'no RESULT line');
like($out, qr/^tunnel ready after [\d.]+ s$/m, 'tunnel became ready');
like($out, qr/^resume $vmid: OK$/m, 'resume through the tunnel answered OK');
like($result // '', qr/^RESULT: VM $vmid migrated from node1/, 'C example reports success');

like(scalar($lab->run_ok('node2', 'qm', 'status', $vmid, '--verbose')), qr/qmpstatus: running/, 'VM runs on node2');
# The example stops the source with QMP quit; give QEMU a moment to exit.
for (1 .. 50) { last if !$lab->qemu_pids('node1'); select(undef, undef, undef, 0.1) }
is_deeply([$lab->qemu_pids('node1')], [], 'source QEMU is gone');
my ($crc, $check) = $lab->run('node2', "$top/lab/guest-check", $vmid, $mem);
is($crc, 0, 'guest memory pattern intact') or diag($check);
$lab->run_ok('node2', 'qm', 'stop', $vmid);
is_deeply([$lab->socket_files($_)], [], "no socket file left on $_") for qw(node1 node2);

$lab->down;
done_testing();
