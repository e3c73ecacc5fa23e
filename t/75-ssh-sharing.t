#!/usr/bin/perl
# OpenSSH connection sharing ('share' option) on the lab: the control directory and sockets
# are private, a second tunnel (and a one-shot command) to the same node goes through the one
# master, a pool never puts more than max_sessions sessions on a master (across processes),
# masters are gone after persist_s (or at once with exit_idle), and a master that dies
# mid-migration gives a clear error and leaves no ssh process, socket file or zombie.

use strict;
use warnings;
use Test::More;
use Cwd qw(abs_path);
use File::Basename qw(dirname);
use File::Temp qw(tempdir);
use POSIX ();
use Time::HiRes qw(time sleep);

use MTunnelLab;
use PVE::MTunnel;

my $top = abs_path(dirname(__FILE__) . '/..');
my $lab = MTunnelLab->up(nodes => 2);
my $dir = $lab->dir;
my @ssh = @{ $lab->ssh_prefix('node2') };
my $t_start = time();

# Everything the tests create lives in a temporary directory of ours.
my $tmp = tempdir('mtunnel-share-XXXXXX', TMPDIR => 1, CLEANUP => 1);
my $ctl = "$tmp/ctl";

*slurp = \&MTunnelLab::slurp;

# live ssh masters in node1 that use our control directory
sub masters {
    return grep {
        my $c = slurp("/proc/$_/cmdline");
        MTunnelLab::alive($_)
            && $c =~ /\0ControlMaster=yes\0/
            && index($c, "ControlPath=$ctl/") >= 0;
    } $lab->procs_in('node1');
}

sub control_sockets {
    return grep { -S $_ } glob("$ctl/*");
}

# established ssh connections that node2's sshd serves
sub sshd_connections {
    my ($rc, $out) = $lab->run('node2', 'ss', '-Htn', 'state', 'established', '( sport = :22 )');
    return scalar grep { /\S/ } split /\n/, $out;
}

sub wait_until {
    my ($cond, $secs) = @_;
    my $deadline = time() + $secs;
    while (time() < $deadline) {
        return 1 if $cond->();
        sleep(0.05);
    }
    return $cond->();
}

sub open_ready {
    my ($vmid, %share) = @_;
    my $t = PVE::MTunnel->open(
        ssh => \@ssh,
        forwards => ["/run/qemu-server/$vmid.migrate"],
        share => { control_dir => $ctl, persist_s => 2, %share }
    );
    $t->wait_ready(timeout_ms => 30_000);
    return $t;
}

$lab->enter('node1');

# ---- control directory and socket permissions
{
    my $t = open_ready(101);
    is((lstat($ctl))[2] & 07777, 0700, 'control directory is created with mode 0700');
    my @socks = control_sockets();
    is(scalar(@socks), 1, 'one control socket');
    is((lstat($socks[0]))[2] & 07777, 0600, 'control socket is mode 0600 (no access for others)')
        if @socks;
    is($t->status->{control_path}, $socks[0], 'status names the control socket');
    $t->close;

    my @bad = (
        [
            'open',
            sub { mkdir("$tmp/open") or die; chmod(0755, "$tmp/open") or die },
            qr/^refusing control_dir '\Q$tmp\E\/open': its mode is 0755/
        ],
        [
            'link',
            sub { symlink($ctl, "$tmp/link") or die },
            qr/^refusing control_dir '\Q$tmp\E\/link': it is a symlink/
        ],
        [
            'other',
            sub { mkdir("$tmp/other", 0700) or die; chown(65534, 65534, "$tmp/other") or die },
            qr/^refusing control_dir '\Q$tmp\E\/other': it is owned by uid 65534/
        ],
        [
            'file',
            sub { open(my $fh, '>', "$tmp/file") or die; print $fh "canary\n"; close $fh },
            qr/^refusing control_dir '\Q$tmp\E\/file': it is not a directory/
        ],
    );

    for my $b (@bad) {
        my ($name, $make, $re) = @$b;
        $make->();
        my $before = () = MTunnelLab::children();
        eval {
            PVE::MTunnel->open(
                ssh => \@ssh,
                forwards => ['/run/qemu-server/102.migrate'],
                share => { control_dir => "$tmp/$name" }
            );
        };
        like($@, $re, "control_dir that is $name: refused with a clear error");
        is(
            $PVE::MTunnel::last_error_code,
            $PVE::MTunnel::ERROR_CODE{invalid_argument},
            "$name: invalid argument"
        );
        is(scalar(() = MTunnelLab::children()), $before, "$name: no ssh started");
        ok(!-e "/run/qemu-server/102.migrate", "$name: no socket file");
    }
    is((lstat("$tmp/open"))[2] & 07777, 0755, 'a refused directory is left as it was');
    is(slurp("$tmp/file"), "canary\n", 'a refused file is left as it was');
    eval {
        PVE::MTunnel::ssh_run(
            ssh => \@ssh,
            command => ['true'],
            share => { control_dir => "$tmp/open" }
        );
    };
    like($@, qr/^refusing control_dir/, 'ssh_run refuses a bad control directory too');
}

# ---- a second tunnel and a one-shot command to the same node go through the one master
{
    ok(wait_until(sub { !masters() }, 20), 'no master before')
        or diag(`ps -o pid,args -p @{[join ',', masters()]}`);
    my $before = sshd_connections();
    my $t1 = open_ready(111);
    my $t2 = open_ready(112);
    my @m = masters();
    is(scalar(@m), 1, 'two tunnels to node2: one ssh master');
    is($t1->status->{master_pid}, $m[0], 'first tunnel uses the master');
    is($t2->status->{master_pid}, $m[0], 'second tunnel uses the same master');
    isnt($t2->pid, $m[0], 'the tunnel ssh is a client, not the master');
    is(sshd_connections() - $before, 1, 'node2 serves one ssh connection for both tunnels');
    ok(-S "/run/qemu-server/$_.migrate", "forward $_ listens") for 111, 112;
    my $r = PVE::MTunnel::ssh_run(
        ssh => \@ssh,
        command => ['echo', 'via master'],
        share => { control_dir => $ctl, persist_s => 2 }
    );
    is($r->{stdout}, "via master\n", 'ssh_run through the shared connection');
    is_deeply([masters()], \@m, 'ssh_run started no master of its own');
    is(sshd_connections() - $before, 1, 'still one connection');
    $t1->close;
    ok(!-e '/run/qemu-server/111.migrate', 'closed tunnel: its socket file is gone');
    is(scalar(grep { m{ /run/qemu-server/111\.migrate$} } split /\n/, slurp('/proc/net/unix')),
        0, 'closed tunnel: the master no longer listens on its forward (-O cancel)');
    ok(-S '/run/qemu-server/112.migrate', 'the other tunnel keeps its forward');
    # a new tunnel on the same socket path binds it again in the same master
    my $t3 = open_ready(111);
    is($t3->status->{master_pid}, $m[0], 'reopened forward on the same master');
    ok(-S '/run/qemu-server/111.migrate', 'reopened forward listens again');
    $_->close for $t2, $t3;
    is_deeply([MTunnelLab::children()], [], 'no ssh child left after closing');
    ok(
        wait_until(sub { !masters() && !control_sockets() }, 20),
        'master and control socket gone after persist_s (2 s)'
    ) or diag("masters: @{[masters()]}; sockets: @{[control_sockets()]}");
    is(sshd_connections(), $before, 'node2 serves no connection of ours any more');
}

# ---- exit_idle: the last user stops the master at once
{
    my $t = open_ready(121, persist_s => 600, exit_idle => 1);
    my $m = $t->status->{master_pid};
    ok(MTunnelLab::alive($m), 'master runs while the tunnel is open');
    $t->close;
    ok(wait_until(sub { !MTunnelLab::alive($m) && !control_sockets() }, 5),
        'exit_idle: master and control socket gone at close');
}

# ---- a client killed before it could cancel its forward: the master still listens on the
# path, and would answer the next -L for it with OK without binding it again; open cancels it
{
    pipe(my $r, my $w) or die;
    my $pid = fork() // die "fork: $!\n";
    if (!$pid) {
        close $r;
        my $t = eval { open_ready(151) };
        syswrite($w, $t ? "ok\n" : "error: $@");
        sleep(60);
        POSIX::_exit(0);
    }
    close $w;
    my $line = <$r> // '';
    ok($line !~ /^error/, 'a tunnel in another process') or diag($line);
    kill('KILL', $pid);
    waitpid($pid, 0);
    my ($m) = masters();
    ok($m && grep({ m{ /run/qemu-server/151\.migrate$} } split /\n/, slurp('/proc/net/unix')),
        'its killed process left the forward in the master');
    my @log;
    my $t = PVE::MTunnel->open(
        ssh => \@ssh,
        forwards => ['/run/qemu-server/151.migrate'],
        share => { control_dir => $ctl, persist_s => 2 },
        log => sub { push @log, $_[1] }
    );
    $t->wait_ready(timeout_ms => 30_000);
    ok(
        grep(
            { /^cancelling stale forwards \/run\/qemu-server\/151\.migrate:\S+ in shared ssh master/
            } @log),
        'open cancelled the stale forward'
    ) or diag(join("\n", @log));
    ok(-S '/run/qemu-server/151.migrate', 'the forward is bound again: its socket file exists');
    is($t->status->{master_pid}, $m, 'on the same master');
    $t->close;
    ok(!-e '/run/qemu-server/151.migrate', 'closed: no socket file');
}

# ---- a host with SIGCHLD ignored (the foreground ssh that backgrounds the master is reaped
# by the kernel, its status unknown): the master still starts and is used
{
    local $SIG{CHLD} = 'IGNORE';
    ok(wait_until(sub { !masters() }, 5), 'no master before');
    my $t = open_ready(126, exit_idle => 1);
    my $m = $t->status->{master_pid};
    ok($m && MTunnelLab::alive($m), 'SIGCHLD ignored: the master is started and named');
    my $r = PVE::MTunnel::ssh_run(
        ssh => \@ssh,
        command => ['echo', 'ok'],
        share => { control_dir => $ctl, persist_s => 2, exit_idle => 1 }
    );
    is($r->{stdout}, "ok\n", 'SIGCHLD ignored: ssh_run through the master');
    $t->close;
    ok(
        wait_until(sub { !masters() && !control_sockets() }, 5),
        'SIGCHLD ignored: master gone at close (exit_idle)'
    );
}

# ---- the pool: never more than max_sessions sessions per master, across processes
{
    my ($n, $max) = (5, 2);
    my (@kids, @report_r, @release_w);
    for my $i (1 .. $n) {
        pipe(my $rep_r, my $rep_w) or die;
        pipe(my $rel_r, my $rel_w) or die;
        my $pid = fork() // die "fork: $!\n";
        if (!$pid) {
            close $rep_r;
            close $rel_w;
            my $msg = eval {
                my $t = open_ready(130 + $i, persist_s => 2, max_sessions => $max);
                my $m = $t->status->{master_pid};
                syswrite($rep_w, "$m\n");
                sysread($rel_r, my $buf, 1);    # until the parent lets go
                $t->close;
                '';
            } // "error: $@";
            syswrite($rep_w, $msg) if $msg ne '';
            POSIX::_exit($msg eq '' ? 0 : 1);
        }
        close $rep_w;
        close $rel_r;
        push @kids, $pid;
        push @report_r, $rep_r;
        push @release_w, $rel_w;
    }
    my %per_master;
    for my $fh (@report_r) {
        my $line = <$fh> // 'no report';
        chomp $line;
        if ($line =~ /^(\d+)$/) { $per_master{$1}++ }
        else { diag("tunnel process: $line") }
    }
    my @m = masters();
    is(scalar(keys %per_master), 3, "$n tunnels in $n processes with max_sessions $max: 3 masters")
        or diag(explain(\%per_master));
    is(scalar(@m), 3, 'three ssh master processes');
    ok(!grep({ $_ > $max } values %per_master), "no master carries more than $max sessions")
        or diag(explain(\%per_master));
    close $_ for @release_w;
    for my $pid (@kids) {
        waitpid($pid, 0);
        is($? >> 8, 0, "tunnel process $pid closed cleanly");
    }
    ok(wait_until(sub { !masters() && !control_sockets() }, 20),
        'all masters gone after persist_s');
}

$lab->leave;

# ---- the master dies mid-migration: a clear error, nothing left behind
{
    my $vmid = 140;
    $lab->enter('node1');
    my $t = open_ready(141);
    my $m = $t->status->{master_pid};
    kill('KILL', $m);
    ok(wait_until(sub { !MTunnelLab::alive($m) }, 5), 'master killed');
    eval { $t->command('resume 141', timeout_ms => 5000) };
    like(
        $@,
        qr/^shared ssh connection to root\@\S+ is gone \(master pid $m exited; control socket \Q$ctl\E\/\S+\); its client ssh /,
        'a command on a tunnel whose master died names the lost shared connection'
    );
    $t->close;
    ok(!-e '/run/qemu-server/141.migrate', 'no socket file left');
    is_deeply([control_sockets()], [], 'the dead master\'s control socket is removed');
    is_deeply([MTunnelLab::children()], [], 'no ssh child left');
    $lab->leave;

    my $mem = 128;
    $lab->write_vm_config($vmid, memory => $mem, accel => 'tcg');
    $lab->run_ok('node1', 'qm', 'start', $vmid);
    $lab->run_ok('node1', "$top/lab/guest-check", '--wait', $vmid);
    my $t0 = time();
    my $share = qq({"control_dir":"$ctl","persist_s":2,"exit_idle":true});
    my $bg = $lab->background(
        'node1', "$dir/share-$vmid.log",
        "$top/perl/bin/mtunnel-migrate", $vmid,
        'node2', '--node',
        'node1', '--ssh-file',
        "$dir/ssh_prefix_node2", '--pve-dir',
        "$dir/pve", '--memory',
        $mem, '--bwlimit',
        4096, '--ssh-option',
        "share=$share"
    );
    ok($bg->wait_for(qr/migration active/, 30),
        'migration through a shared connection is under way')
        or diag($bg->output);
    my @m = masters();
    is(scalar(@m), 1, 'the migration uses one shared master');
    kill('KILL', @m);
    ok($bg->finish(60), 'driver finished');
    my $out = $bg->output;
    isnt(($bg->status // 0) >> 8, 0, 'driver reports failure');
    like(
        $out,
        qr/^TASK ERROR: .* - VM $vmid runs on node 'node1' \(source\) only$/m,
        'the verdict says the VM runs on node1 only'
    ) or diag($out);
    my ($err) = $out =~ /^(TASK ERROR: .*)$/m;
    diag('master killed mid-migration: ' . ($err // 'no TASK ERROR line'));
    is($lab->qmpstatus('node1', $vmid), 'running', 'VM runs on node1');
    isnt($lab->qmpstatus('node2', $vmid), 'running', 'VM does not run on node2');
    my ($crc, $check) = $lab->run('node1', "$top/lab/guest-check", $vmid, $mem);
    is($crc, 0, 'guest memory intact on node1') or diag($check);
    $lab->run($_, 'qm', 'stop', $vmid) for qw(node1 node2);
    ok(
        wait_until(sub { !masters() && !control_sockets() }, 20),
        'no ssh master and no control socket left (after persist_s at most)'
    ) or diag("masters: @{[masters()]}; sockets: @{[control_sockets()]}");
    is_deeply([$lab->ssh_pids('node1')], [], 'no ssh process left in node1');
    is_deeply([$lab->socket_files($_)], [], "no socket file left on $_") for qw(node1 node2);
}

is_deeply([MTunnelLab::zombies_since($t_start)], [], 'no zombie left');
$lab->down;
done_testing();
