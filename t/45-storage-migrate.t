#!/usr/bin/perl
# Live migration of VMs with a local disk (on node1's own storage, which node2 cannot see),
# through perl/bin/mtunnel-migrate as `qm migrate --online --with-local-disks` runs it:
# secure (RAM and NBD through the ssh tunnel's two UNIX socket forwards) and insecure (both
# straight over TCP on the migration network, the tunnel carrying commands only). The guest
# keeps writing its memory and its disk throughout; afterwards its memory and the target's
# disk must hold exactly what it wrote, and nothing is left behind. The target's NBD server
# is stopped before it resumes: through the tunnel where its qm announces `nbdstop`
# (qemu-server with the series), else with `qm nbdstop` over ssh; a failure there is a
# warning, and the VM still runs on the target.

use strict;
use warnings;
use Test::More;
use Cwd qw(abs_path);
use File::Basename qw(dirname);

use MTunnelLab;

my $top = abs_path(dirname(__FILE__) . '/..');
my $lab = MTunnelLab->up(nodes => 2);
my $dir = $lab->dir;
my $mem = 128;
my $net = '198.19.0.0/24';
my $job = $lab->mirror_job('node1', 'ide0');    # drive-ide0 (7.2) or mirror-ide0 (10.0)

*slurp = \&MTunnelLab::slurp;

sub qmpstatus { return $lab->qmpstatus(@_) }

sub volumes { return $lab->volumes(@_) }

sub tunnel_ssh { return $lab->ssh_pids('node1') }

# The driver's ssh to node2 through a wrapper that logs each call's argv: which commands ran
# there over a connection of their own (the tunnel's commands go through `qm mtunnel`).
my $ssh_log = "$dir/ssh-node2.log";
{
    my $wrapper = "$dir/ssh-logged";
    open(my $fh, '>', $wrapper) or die "cannot write $wrapper: $!\n";
    print $fh "#!/bin/sh\nprintf '%s\\n' \"\$*\" >>'$ssh_log'\nexec /usr/bin/ssh \"\$@\"\n";
    close($fh) or die "cannot write $wrapper: $!\n";
    chmod(0755, $wrapper) or die "cannot chmod $wrapper: $!\n";
    my @prefix = split /\n/, slurp("$dir/ssh_prefix_node2");
    $prefix[0] = $wrapper;
    open($fh, '>', "$dir/ssh_prefix_node2_logged") or die "cannot write prefix: $!\n";
    print $fh map { "$_\n" } @prefix;
    close($fh) or die "cannot write prefix: $!\n";
}

# the remote commands of the driver's ssh calls to node2 since the log was last cleared
sub ssh_commands {
    return map { /\s--\s(.*)$/ ? $1 : () } split /\n/, (-e $ssh_log ? slurp($ssh_log) : '');
}

# The target's NBD exports (none once its NBD server stopped).
sub nbd_exports {
    my ($vmid) = @_;
    my ($rc, $out, $err) = $lab->run('node2', 'qmp', $vmid, 'query-block-exports');
    return $rc == 0 ? $out =~ s/\s+//gr : "qmp failed: $err";
}

sub migrate { return migrate_via([], @_) }

# mtunnel-migrate run by @$pre (perl with a fault's module preloaded)
sub migrate_via {
    my ($pre, $vmid, @args) = @_;
    my $since = MTunnelLab::now_ns();
    unlink($ssh_log);
    my @res = $lab->run(
        'node1', @$pre, "$top/perl/bin/mtunnel-migrate",
        $vmid, 'node2', '--node', 'node1', '--ssh-file', "$dir/ssh_prefix_node2_logged",
        '--pve-dir', "$dir/pve", '--online', @args
    );
    is_deeply([$lab->resumed_after_target('node1', 'node2', $vmid, $since)],
        [], "VM $vmid: the source never resumed after the target ran (QEMU's events)");
    return @res;
}

# a VM writing its memory and its local disk, running on node1
sub start_disk_vm {
    my ($vmid) = @_;
    $lab->write_vm_config(
        $vmid,
        memory => $mem,
        guest => 'disk',
        ide0 => "local:$vmid/vm-$vmid-disk-0.raw,size=32M"
    );
    $lab->run_ok('node1', 'qm', 'start', $vmid);
    my $wait = $lab->run_ok('node1', "$top/lab/guest-check", '--wait', $vmid);
    like(
        $wait,
        qr/^guest running: pass \d+, disk pass \d+ sector \d+/m,
        "VM $vmid: the guest writes its disk"
    ) or diag($wait);
}

sub nothing_left {
    my ($what, $t0) = @_;
    is_deeply([tunnel_ssh()], [], "$what: no ssh left on node1");
    is_deeply([$lab->socket_files($_)], [], "$what: no socket file left on $_") for qw(node1 node2);
    is_deeply([MTunnelLab::zombies_since($t0)], [], "$what: no zombie left");
}

# A lab fault, preloaded into the driver: the target's NBD server is stopped by someone else
# as soon as the mirrors are finished, so that the driver's own nbdstop fails there.
my $nbd_gone = "$dir/NbdStoppedFirst.pm";
{
    (my $code = <<'EOM') =~ s/\@PREFIX\@/$dir\/ssh_prefix_node2/;
package NbdStoppedFirst;
use strict;
use warnings;
use PVE::MTunnel;
my $finish = \&PVE::MTunnel::qmp_mirror_finish;
no warnings 'redefine';
*PVE::MTunnel::qmp_mirror_finish = sub {
    my $res = $finish->(@_);
    open(my $fh, '<', '@PREFIX@') or die "no ssh prefix: $!\n";
    chomp(my @ssh = <$fh>);
    my ($vmid) = $_[0] =~ m{/([0-9]+)\.qmp$} or die "no VMID in $_[0]\n";
    PVE::MTunnel::ssh_run(ssh => \@ssh, command => ['qmp', $vmid, 'nbd-server-stop']);
    print "lab fault: NBD server of VM $vmid stopped on node2\n";
    return $res;
};
1;
EOM
    open(my $fh, '>', $nbd_gone) or die "cannot write $nbd_gone: $!\n";
    print $fh $code;
    close($fh) or die "cannot write $nbd_gone: $!\n";
}

# ------------------------------------------------------------ with a local disk

for my $case (
    { name => 'secure', type => 'secure', vmid => 400 },
    {
        name => 'insecure',
        type => 'insecure',
        vmid => 401,
        args => ['--migration_type', 'insecure', '--migration_network', $net]
    },
    # qemu-server with the series on node2: its qm start announces nbdstop
    { name => 'secure, target with the series', type => 'secure', vmid => 405, series => 1 },
    {
        name => 'nbdstop failing on the target',
        type => 'secure',
        vmid => 406,
        series => 1,
        pre => ['perl', "-I$top/perl/lib", "-I$dir", '-MNbdStoppedFirst']
    },
    )
{
    my ($name, $type, $vmid, $args) = (@$case{qw(name type vmid)}, $case->{args} // []);
    my $t0 = time();
    $lab->qemu_server_series('node2', $case->{series});
    start_disk_vm($vmid);
    my ($rc, $out, $err) = migrate_via($case->{pre} // [], $vmid, '--with-local-disks', @$args);
    is($rc, 0, "$name with a local disk: TASK OK") or diag("$out$err");
    my @nbdstop_ssh = grep { /\bnbdstop\b/ } ssh_commands();

    if (!$case->{series}) {
        is_deeply(\@nbdstop_ssh, ["qm nbdstop $vmid"],
            "$name: a target as released: qm nbdstop over ssh, once");
        unlike(
            $out,
            qr/nbdstop through tunnel|does not know nbdstop/,
            "$name: nbdstop was never sent through the tunnel"
        );
    } elsif (!$case->{pre}) {
        is_deeply(\@nbdstop_ssh, [],
            "$name: no qm nbdstop over ssh: the NBD server stopped through the tunnel");
        unlike(
            $out,
            qr/ERROR:|nbdstop through tunnel failed|does not know nbdstop/,
            "$name: nbdstop through the tunnel went through without a word"
        );
    } else {
        like(
            $out,
            qr/^lab fault: NBD server of VM $vmid stopped on node2$/m,
            "$name: the fault was injected once the mirrors were finished"
        ) or diag($out);
        like(
            $out,
            qr/^\S+ \S+ stopping NBD server on target failed: tunnel replied 'ERR: nbdstop failed - [^\n]*NBD server not running[^\n]*' to command 'nbdstop $vmid'$/m,
            "$name: a warning with the target's answer"
        );
        is_deeply(\@nbdstop_ssh, [], "$name: not tried again over ssh");
        like(
            $out,
            qr/^\S+ \S+ migration finished successfully/m,
            "$name: the migration goes on and finishes, as upstream's qm nbdstop only warns"
        );
    }
    is(nbd_exports($vmid), '[]', "$name: the target's NBD server has no export left");
    like($out, qr/^TASK OK$/m, "$name with a local disk: the task says OK");
    like(
        slurp("$dir/node2/qm-start.log"),
        qr/^start $vmid args=--skiplock --migratedfrom node1 --migration_type $type .*--targetstorage 1 stdin=nbd_protocol_version:1$/m,
        "$name: the target was started with --targetstorage 1, as upstream without a storage map"
    );
    my $nbd =
        $type eq 'secure'
        ? qr{nbd:unix:/run/qemu-server/${vmid}_nbd\.migrate:exportname=drive-ide0}
        : qr{nbd:198\.19\.0\.2:\d+:exportname=drive-ide0};
    like(
        $out,
        qr/^\S+ \S+ ide0: start migration to $nbd$/m,
        "$name: the disk is mirrored into the target's NBD export"
    );
    like(
        $out,
        qr/^\S+ \S+ volume 'local:$vmid\/vm-$vmid-disk-0\.raw' is 'local:$vmid\/vm-$vmid-disk-0\.raw' on the target$/m,
        "$name: the volume mapping is logged as upstream does"
    );
    like(
        $out,
        qr/^\S+ \S+ $job: transferred \d+\.\d \S+ of 3\d\.\d MiB \(\d+\.\d\d%\) in \d+s/m,
        "$name: disk progress, PVE style"
    );
    like($out, qr/^\S+ \S+ all 'mirror' jobs are ready$/m, "$name: all mirrors ready before RAM");
    like(
        $out,
        qr/all 'mirror' jobs are ready.*starting online\/live migration.*$job: Completed successfully\..*stopping NBD storage migration server on target\..*stopped VM $vmid on source node/s,
        "$name: upstream's order: mirrors ready, RAM, block jobs finished, NBD stopped, source stopped"
    );
    like($out, qr/^\S+ \S+ migration active, transferred/m, "$name: RAM progress too")
        if $out =~ /migration active/;
    like(
        $out,
        $type eq 'secure'
        ? qr/starting online\/live migration on unix:/
        : qr/starting online\/live migration on tcp:198\.19\.0\.2:\d+$/m,
        "$name: RAM goes "
            . ($type eq 'secure' ? 'through the tunnel' : 'over the migration network')
    );

    is(qmpstatus('node2', $vmid), 'running', "$name: the VM runs on node2");
    is(qmpstatus('node1', $vmid), 'stopped', "$name: and not on node1");
    my ($crc, $check) = $lab->run('node2', "$top/lab/guest-check", $vmid, $mem);
    is($crc, 0, "$name: guest memory and disk intact on node2") or diag($check);
    like($check, qr/^guest memory ok:/m, "$name: memory pattern ok");
    like(
        $check,
        qr/^guest disk ok: \d+ sectors, pass \d+, next sector \d+/m,
        "$name: every disk write the guest made is on node2's disk"
    );
    is_deeply([volumes('node1', 'local')],
        [], "$name: the source's volume was freed after the migration");
    is_deeply(
        [volumes('node2', 'local')],
        ["local:$vmid/vm-$vmid-disk-0.raw"],
        "$name: node2 has the new volume"
    );
    $lab->run_ok('node2', 'qm', 'stop', $vmid);
    $lab->run_ok('node2', 'pvesm', 'free', "local:$vmid/vm-$vmid-disk-0.raw");
    nothing_left($name, $t0);
}
$lab->qemu_server_series('node2', 0);

# ------------------------------------------------------------ insecure, RAM only

{
    my ($vmid, $t0) = (402, time());
    $lab->write_vm_config($vmid, memory => $mem);
    $lab->run_ok('node1', 'qm', 'start', $vmid);
    $lab->run_ok('node1', "$top/lab/guest-check", '--wait', $vmid);
    my ($rc, $out, $err) =
        migrate($vmid, '--migration_type', 'insecure', '--migration_network', $net);
    is($rc, 0, 'insecure RAM-only: TASK OK') or diag("$out$err");
    like(
        $out,
        qr/starting online\/live migration on tcp:198\.19\.0\.2:\d+$/m,
        'insecure RAM-only: to the migration network address'
    );
    unlike($out, qr/storage migration/, 'insecure RAM-only: no storage migration');
    my ($crc, $check) = $lab->run('node2', "$top/lab/guest-check", $vmid, $mem);
    is($crc, 0, 'insecure RAM-only: guest memory intact on node2') or diag($check);
    $lab->run_ok('node2', 'qm', 'stop', $vmid);
    nothing_left('insecure RAM-only', $t0);
}

# ------------------------------------------------------------ refusals

# a target that answers an address outside the migration network (lab hook: the driver's
# remote qm command sets MTUNNEL_LAB_LISTEN_IP for lab/qm)
{
    my ($vmid, $t0) = (403, time());
    start_disk_vm($vmid);
    my $code = q{
	my ($vmid, $ssh_file, $net) = @ARGV;
	open(my $fh, '<', $ssh_file) or die; chomp(my @ssh = <$fh>);
	my $m = PVE::MTunnel::Migrate->new(vmid => $vmid, node => 'node1', target => 'node2', ssh => \@ssh,
	    qm => ['env', 'MTUNNEL_LAB_LISTEN_IP=198.18.0.2', 'qm'], with_local_disks => 1,
	    migration_type => 'insecure', migration_network => $net);
	eval { $m->migrate() };
	print $@ ? "TASK ERROR: $@" : "TASK OK\n";
	exit($@ ? 1 : 0);
    };
    my ($rc, $out, $err) =
        $lab->run('node1', 'perl', "-I$top/perl/lib", '-MPVE::MTunnel::Migrate', '-e', $code,
        $vmid, "$dir/ssh_prefix_node2", $net);
    isnt($rc, 0, 'address outside the migration network: refused');
    like(
        $out,
        qr/^TASK ERROR: target address 198\.18\.0\.2 in 'tcp:198\.18\.0\.2:\d+' is outside the migration network 198\.19\.0\.0\/24 - refusing to migrate over it - VM $vmid runs on node 'node1' \(source\) only$/m,
        'address outside the migration network: the error names address and network'
    ) or diag($out);
    is(qmpstatus('node1', $vmid), 'running', 'refused address: the VM still runs on node1');
    is(qmpstatus('node2', $vmid), 'stopped', 'refused address: the target VM was stopped');
    is_deeply([volumes('node2', 'local')],
        [], 'refused address: the target\'s new volume was freed');
    is_deeply(
        [volumes('node1', 'local')],
        ["local:$vmid/vm-$vmid-disk-0.raw"],
        'refused address: the source volume is kept'
    );
    my ($crc, $check) = $lab->run('node1', "$top/lab/guest-check", $vmid, $mem);
    is($crc, 0, 'refused address: guest memory and disk intact on node1') or diag($check);
    $lab->run_ok('node1', 'qm', 'stop', $vmid);
    nothing_left('refused address', $t0);

    # without --with-local-disks the target cannot start: the local volume is not there
    $lab->run_ok('node1', 'qm', 'start', $vmid);
    ($rc, $out, $err) = migrate($vmid);
    isnt($rc, 0, 'local disk without --with-local-disks: refused');
    like(
        $out,
        qr/^TASK ERROR: .*volume 'local:$vmid\/vm-$vmid-disk-0\.raw' does not exist/m,
        'local disk without --with-local-disks: the target says which volume is missing'
    ) or diag($out);
    is(qmpstatus('node1', $vmid),
        'running', 'without --with-local-disks: the VM still runs on node1');
    $lab->run_ok('node1', 'qm', 'stop', $vmid);
    $lab->run_ok('node1', 'pvesm', 'free', "local:$vmid/vm-$vmid-disk-0.raw");
    nothing_left('without --with-local-disks', $t0);
}

# a target start that fails once its QEMU listens on VMID.migrate (lab hook: the NBD server
# start fails, qm kills that QEMU): no tunnel ever names the socket, the cleanup removes it
{
    my ($vmid, $t0) = (404, time());
    start_disk_vm($vmid);
    my $code = q{
	my ($vmid, $ssh_file) = @ARGV;
	open(my $fh, '<', $ssh_file) or die; chomp(my @ssh = <$fh>);
	my $m = PVE::MTunnel::Migrate->new(vmid => $vmid, node => 'node1', target => 'node2', ssh => \@ssh,
	    qm => ['env', 'MTUNNEL_LAB_FAIL_NBD_START=1', 'qm'], with_local_disks => 1);
	eval { $m->migrate() };
	print $@ ? "TASK ERROR: $@" : "TASK OK\n";
	exit($@ ? 1 : 0);
    };
    my ($rc, $out, $err) =
        $lab->run('node1', 'perl', "-I$top/perl/lib", '-MPVE::MTunnel::Migrate', '-e', $code,
        $vmid, "$dir/ssh_prefix_node2");
    isnt($rc, 0, 'target start failing after its QEMU listened: the migration fails');
    like(
        $out,
        qr/^TASK ERROR: .*start failed: nbd-server-start failed .* - VM $vmid runs on node 'node1' \(source\) only$/m,
        'target start failing after its QEMU listened: the error is the target\'s'
    ) or diag($out);
    is(qmpstatus('node1', $vmid),
        'running', 'target start failing after its QEMU listened: the VM still runs on node1');
    is(qmpstatus('node2', $vmid),
        'stopped', 'target start failing after its QEMU listened: nothing runs on node2');
    my ($crc, $check) = $lab->run('node1', "$top/lab/guest-check", $vmid, $mem);
    is($crc, 0, 'target start failing after its QEMU listened: guest memory and disk intact')
        or diag($check);
    $lab->run_ok('node1', 'qm', 'stop', $vmid);
    $lab->run_ok('node1', 'pvesm', 'free', "local:$vmid/vm-$vmid-disk-0.raw");
    is_deeply([volumes('node2', 'local')],
        [], 'target start failing after its QEMU listened: no volume left on node2');
    nothing_left('target start failing after its QEMU listened', $t0);
}

$lab->down;
done_testing();
