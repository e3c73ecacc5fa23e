#!/usr/bin/perl
# QemuMigrate.pm's call sequence through PVE::MTunnel::Tunnel, the drop-in for PVE::Tunnel's
# ssh half: examples/perl/qemu-migrate-flow migrates a VM between two lab nodes with upstream's
# qm start, -S poll, `resume VMID` (v1), a v2 tunnel, and finish_tunnel after failures; its task
# log keeps upstream's messages. Then the drop-in's own contract: return values, die texts,
# deadlines that a host's alarm does not touch, and cleanup that removes sockets only.

use strict;
use warnings;
use Test::More;
use Cwd qw(abs_path);
use File::Basename qw(dirname);
use File::Temp ();
use JSON::PP ();
use POSIX qw(:sys_wait_h);
use Time::HiRes qw(time sleep);

use MTunnelLab;
use PVE::MTunnel::Tunnel;

my $top = abs_path(dirname(__FILE__) . '/..');
my $flow = "$top/examples/perl/qemu-migrate-flow";
my $lab = MTunnelLab->up(nodes => 2);
my $dir = $lab->dir;
# the flow's --pve-dir: the lab's config tree, pmxcfs's layout (it moves the config as upstream)
my $pve_dir = "$dir/pve";
my ($vmid, $mem) = (100, 256);

*slurp = \&MTunnelLab::slurp;

sub qmpstatus { return $lab->qmpstatus($_[0], $vmid) }

sub run_flow {
    my ($from, $to, @args) = @_;
    return $lab->run($from, $flow, $vmid, $to, '--node', $from, '--ssh-file',
        "$dir/ssh_prefix_$to", '--pve-dir', $pve_dir, @args);
}

# Both nodes clean: no socket file, nothing but sshd in their netns, no lock, no zombie.
sub clean_ok {
    my ($name, $since) = @_;
    is_deeply([$lab->socket_files($_)], [], "$name: no socket file left on $_") for qw(node1 node2);
    for my $node (qw(node1 node2)) {
        my @left = grep {
            my $c = slurp("/proc/$_/comm");
            chomp $c;
            $c ne 'sshd' && $c ne 'qemu-system-x86'
        } $lab->procs_in($node);
        is_deeply(\@left, [], "$name: no ssh or qm process left in $node")
            or diag(`ps -o pid,args -p @{[join(',', @left)]}`);
    }
    unlike(slurp($lab->vm_config_path($vmid) // ''), qr/^lock:/m,
        "$name: the migrate lock is gone");
    is_deeply([MTunnelLab::zombies_since($since)], [], "$name: no zombie left");
}

# Upstream's task log lines for a secure, RAM-only online migration, in order.
my @upstream_lines = (
    qr/starting migration of VM $vmid to node '(node\d)'/,
    qr/starting VM $vmid on remote node 'node\d'/,
    qr/start remote tunnel/,
    qr/ssh tunnel ver \d/,
    qr/starting online\/live migration on unix:\/run\/qemu-server\/$vmid\.migrate/,
    qr/set migration capabilities/,
    qr/migration downtime limit: 100 ms/,
    qr/migration cachesize: 32\.0 MiB/,
    qr/set migration parameters/,
    qr/start migrate command to unix:\/run\/qemu-server\/$vmid\.migrate/,
    qr/average migration speed: [\d.]+ [KMG]iB\/s - downtime \d+ ms/,
    qr/migration completed, transferred [\d.]+ [KMG]iB VM-state/,
    qr/migration status: completed/,
    qr/migration finished successfully \(duration \d\d:\d\d:\d\d\)/,
);

sub upstream_log_ok {
    my ($name, $out) = @_;
    my @lines = split /\n/, $out;
    my $i = 0;
    for my $re (@upstream_lines) {
        $i++ while $i < @lines && $lines[$i] !~ /^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d $re$/;
        ok($i < @lines, "$name: task log has upstream's line /$re/ in order") or return diag($out);
    }
}

$lab->write_vm_config($vmid, memory => $mem);
$lab->run_ok('node1', 'qm', 'start', $vmid);
$lab->run_ok('node1', "$top/lab/guest-check", '--wait', $vmid);
sleep(1);

{
    my $t0 = time();
    my ($rc, $out, $err) = run_flow('node1', 'node2');
    is($rc, 0, 'v1: QemuMigrate.pm\'s sequence on the drop-in migrates node1 -> node2')
        or diag("$out$err");
    is($err, '', 'v1: nothing on stderr (no Perl warning)');
    upstream_log_ok('v1', $out);
    like($out, qr/ssh tunnel ver 1$/m, 'v1: the tunnel speaks protocol v1');
    like(
        $out,
        qr/-S poll: sockets ready at look 1$/m,
        'v1: QemuMigrate.pm\'s -S poll passes at its first look'
    );
    unlike($out, qr/ERROR/, 'v1: no error in the task log');
    like(
        slurp("$dir/node2/qm-start.log"),
        qr/^start $vmid args=--skiplock --migratedfrom node1 --migration_type secure --stateuri unix --machine pc-\S+ stdin=nbd_protocol_version:1$/m,
        'v1: the target was started with upstream\'s options and stdin line'
    );
    is(qmpstatus('node2'), 'running', 'v1: VM runs on node2 (resumed through the tunnel)');
    is(qmpstatus('node1'), 'stopped', 'v1: VM is stopped on node1');
    note($out);
    clean_ok('v1', $t0);
}

{
    my $t0 = time();
    my ($rc, $out, $err) = run_flow('node2', 'node1', '--tunnel-version', 2);
    is($rc, 0, 'v2: the same sequence over a protocol v2 tunnel migrates node2 -> node1')
        or diag("$out$err");
    upstream_log_ok('v2', $out);
    like($out, qr/ssh tunnel ver 2$/m, 'v2: the tunnel speaks protocol v2');
    like(
        $out,
        qr/received command 'resume'.*received command 'unlock'.*received command 'quit'/s,
        'v2: resume, unlock and quit went through the tunnel as JSON commands'
    );
    is(qmpstatus('node1'), 'running', 'v2: VM runs on node1');
    is(qmpstatus('node2'), 'stopped', 'v2: VM is stopped on node2');
    clean_ok('v2', $t0);
}

{
    my $t0 = time();
    my ($rc, $out, $err) = run_flow('node1', 'node2', '--fault', 'after-tunnel');
    isnt($rc, 0, 'failure after the tunnel is up: the flow reports failure');
    like(
        $out,
        qr/ERROR: online migrate failure - injected fault after the tunnel is up$/m,
        'failure after the tunnel: cause logged'
    );
    like(
        $out,
        qr/aborting phase 2 - cleanup resources$/m,
        'failure after the tunnel: phase2_cleanup ran'
    );
    like(
        $out,
        qr/ERROR: migration finished with problems/m,
        'failure after the tunnel: verdict as upstream'
    );
    is(qmpstatus('node1'), 'running', 'failure after the tunnel: VM keeps running on node1');
    is(qmpstatus('node2'), 'stopped', 'failure after the tunnel: no VM left on node2');
    clean_ok('failure after the tunnel', $t0);
}

{
    # A real fault mid-migration on a v2 tunnel: the target QEMU dies. phase2_cleanup stops
    # the target through the tunnel ('stop') and finish_tunnel closes it.
    my $t0 = time();
    my $log = "$dir/flow-kill.log";
    my $pid = fork() // die;
    if (!$pid) {
        $ENV{MTUNNEL_LAB} = $lab->name;
        open(STDOUT, '>', $log) or die;
        open(STDERR, '>&', \*STDOUT) or die;
        exec(
            "$top/lab/lab.sh", 'exec', 'node1',
            $flow, $vmid, 'node2',
            '--node', 'node1', '--ssh-file',
            "$dir/ssh_prefix_node2", '--pve-dir', $pve_dir,
            '--tunnel-version', 2, '--bwlimit',
            8192
        ) or die;
    }
    my ($done, $status) = (0, undef);
    my $reap = sub {
        if (!$done && waitpid($pid, WNOHANG) == $pid) { $done = 1; $status = $? }
        return $done;
    };
    my $active = 0;
    for (1 .. 300) {
        if (slurp($log) =~ /migration active/) { $active = 1; last }
        last if $reap->();
        sleep(0.1);
    }
    ok($active, 'target killed: migration was under way') or diag(slurp($log));
    ok(kill('KILL', $lab->qemu_pids('node2')), 'target killed: the target QEMU was killed');
    for (1 .. 600) { last if $reap->(); sleep(0.1) }
    ok($done, sprintf('target killed: the flow finished (%.1f s)', time() - $t0))
        or kill('KILL', $pid);
    my $out = slurp($log);
    isnt(($status // 0) >> 8, 0, 'target killed: the flow reports failure');
    like($out, qr/migration status error: failed/m,
        'target killed: the failed migration is logged');
    like(
        $out,
        qr/received command 'stop'/,
        'target killed: phase2_cleanup stopped the target through the v2 tunnel'
    );
    my @errors = map { s/^\S+ \S+ ERROR: //r } grep { /^\S+ \S+ ERROR: / } split /\n/, $out;
    is_deeply(
        \@errors,
        [
            'online migrate failure - aborting',
            'migration finished with problems (duration '
                . ($errors[-1] =~ /\((duration [^)]*)\)/ ? substr($1, 9) : '') . ')'
        ],
        'target killed: the only errors are the failure and the verdict (stop and finish_tunnel went through)'
    ) or diag($out);
    is(qmpstatus('node1'), 'running', 'target killed: VM keeps running on node1');
    is(qmpstatus('node2'), 'stopped', 'target killed: no VM on node2');
    clean_ok('target killed', $t0);
}

{
    # QemuMigrate.pm's legacy tcp path: a target that answers tcp:localhost:PORT (as qemu-server
    # did before UNIX sockets) gets the TCP forward PORT:localhost:PORT, and QEMU migrates
    # through it to the target's localhost.
    my $t0 = time();
    my ($rc, $out, $err) = run_flow('node1', 'node2', '--stateuri', 'tcp');
    is($rc, 0, 'legacy tcp path: the flow migrates node1 -> node2 through a TCP forward')
        or diag("$out$err");
    like(
        slurp("$dir/node2/qm-start.log"),
        qr/^start $vmid args=--skiplock --migratedfrom node1 --migration_type secure --stateuri tcp /m,
        'legacy tcp path: the target was started with --stateuri tcp'
    );
    like(
        $out,
        qr/start migrate command to tcp:localhost:(\d+)$/m,
        'legacy tcp path: QEMU migrated to tcp:localhost:PORT on the source (the forward)'
    );
    unlike($out, qr/ERROR/, 'legacy tcp path: no error in the task log');
    is(qmpstatus('node2'), 'running', 'legacy tcp path: VM runs on node2');
    is(qmpstatus('node1'), 'stopped', 'legacy tcp path: VM is stopped on node1');
    note($out);
    clean_ok('legacy tcp path', $t0);
}

my ($crc, $check) = $lab->run('node2', "$top/lab/guest-check", $vmid, $mem);
is($crc, 0,
    'after five migrations (one through a TCP forward) and two failures the guest memory is intact on node2'
) or diag($check);
$lab->run_ok('node2', 'qm', 'stop', $vmid);

# ------------------------------------------------------------ the drop-in's contract

$lab->write_vm_config(300, memory => 64);
# on node2 first: the v2 tunnel's commands load node2's config (as upstream's endpoint)
$lab->move_vm_config(300, 'node2');
$lab->enter('node1');
my @ssh = @{ $lab->ssh_prefix('node2') };
my $sock = '/run/qemu-server/200.migrate';
my $qm = ['/usr/sbin/qm', 'mtunnel'];
my $fds = MTunnelLab::fd_count();
my $t0 = time();

sub dies_like {
    my ($code, $re, $name) = @_;
    eval { $code->() };
    like($@, $re, $name);
    like($@, qr/\n\z/, "$name: message ends in a newline (PVE style)");
}

{
    my @log;
    my $t =
        PVE::MTunnel::Tunnel::fork_ssh_tunnel(\@ssh, $qm, ["$sock:$sock"], sub { push @log, [@_] });
    is($t->{version}, 1, 'fork_ssh_tunnel: version 1');
    like($t->{pid}, qr/^\d+$/, 'fork_ssh_tunnel: pid of ssh');
    is_deeply($t->{rem_ssh}, \@ssh, 'fork_ssh_tunnel: rem_ssh kept');
    ok(ref($t->{log}) eq 'CODE', 'fork_ssh_tunnel: log kept');
    ok(-S $sock, 'fork_ssh_tunnel: returns with the forward listening (-S passes at once)');
    ok(
        (grep { $_->[0] eq 'info' && $_->[1] eq "ssh tunnel ver 1\n" } @log),
        'fork_ssh_tunnel: logs "ssh tunnel ver 1\n" at info, as upstream'
    );

    dies_like(
        sub { PVE::MTunnel::Tunnel::write_tunnel($t, 30, "resume 999") },
        qr/^tunnel replied 'ERR: resume failed - VM 999 not running' to command 'resume 999'$/,
        'write_tunnel v1: ERR reply is upstream\'s error'
    );
    my $start = time();
    my $alarms = 0;
    local $SIG{ALRM} = sub { $alarms++ };
    alarm(1);
    dies_like(
        sub { PVE::MTunnel::Tunnel::write_tunnel($t, 2.5, "frobnicate") },
        qr/^no reply to command 'frobnicate': no reply from tunnel to root\@198\.18\.0\.2 within \d+ ms/,
        'write_tunnel v1: an unknown command times out naming it'
    );
    alarm(0);
    my $took = time() - $start;
    ok(
        $took >= 2.4,
        sprintf(
            'write_tunnel: a host alarm after 1 s did not cut the 2.5 s deadline short (%.2f s)',
            $took)
    );
    is($alarms, 1, 'write_tunnel: the host\'s alarm handler still ran');
    is(PVE::MTunnel::Tunnel::write_tunnel($t, 10, 'quit'),
        undef, 'write_tunnel v1: OK returns nothing');
    is(PVE::MTunnel::Tunnel::read_tunnel($t, 5),
        undef, 'read_tunnel: end of stream after quit reads as undef');
    PVE::MTunnel::Tunnel::finish_tunnel($t);
    ok(!-e $sock, 'finish_tunnel: the forwarded socket is removed');
    PVE::MTunnel::Tunnel::finish_tunnel($t);
    pass('finish_tunnel: a second call is a no-op');
}

{
    # Regular files where unix_sockets point, on both nodes: kept, and named.
    my $file = '/run/qemu-server/201.migrate';
    open(my $fh, '>', $file) or die "$file: $!";
    print $fh "canary\n";
    close($fh);
    $lab->run_ok('node2', 'sh', '-c', "echo canary > $file");
    my $outside = File::Temp->newdir();
    my $canary = "$outside/202.migrate";
    open($fh, '>', $canary) or die;
    print $fh "canary\n";
    close($fh);
    my $t = PVE::MTunnel::Tunnel::fork_ssh_tunnel(\@ssh, $qm, ["$sock:$sock"], sub { });
    $t->{unix_sockets} = [$sock, $file];
    dies_like(
        sub { PVE::MTunnel::Tunnel::finish_tunnel($t) },
        qr/^refusing to use socket path '\Q$file\E': it is a regular file, not a socket$/,
        'finish_tunnel: a local regular file in unix_sockets is named'
    );
    is(slurp($file), "canary\n", 'finish_tunnel: the local regular file is kept');
    is(scalar($lab->run_ok('node2', 'cat', $file)),
        "canary\n", 'finish_tunnel: the remote regular file is kept');
    unlink($file);
    $t = PVE::MTunnel::Tunnel::fork_ssh_tunnel(\@ssh, $qm, ["$sock:$sock"], sub { });
    $t->{unix_sockets} = [$sock, $file];
    dies_like(
        sub { PVE::MTunnel::Tunnel::finish_tunnel($t) },
        qr/^refusing to remove '\Q$file\E' on root\@198\.18\.0\.2: not a socket \(kept\)$/,
        'finish_tunnel: a remote regular file in unix_sockets is named'
    );
    is(scalar($lab->run_ok('node2', 'cat', $file)),
        "canary\n", 'finish_tunnel: the remote regular file is still kept');
    $lab->run_ok('node2', 'rm', $file);
    $t = PVE::MTunnel::Tunnel::fork_ssh_tunnel(\@ssh, $qm, [], sub { });
    $t->{unix_sockets} = [$canary];
    dies_like(
        sub { PVE::MTunnel::Tunnel::finish_tunnel($t) },
        qr/^not removing cleanup socket: invalid socket path '\Q$canary\E': not in \/run\/qemu-server$/,
        'finish_tunnel: a path outside the socket pattern is refused'
    );
    is(slurp($canary), "canary\n", 'finish_tunnel: the canary outside the pattern is untouched');
}

dies_like(
    sub {
        PVE::MTunnel::Tunnel::fork_ssh_tunnel(\@ssh, $qm, ['60000:198.18.0.2:60000'], sub { });
    },
    qr/^can't open tunnel - unsupported forward '60000:198\.18\.0\.2:60000': expected a UNIX socket forward \('PATH' or 'LOCAL_PATH:REMOTE_PATH'\) or a TCP forward to the target's loopback \('PORT:localhost:PORT'\)$/,
    'fork_ssh_tunnel: a TCP forward to another host than the target\'s loopback is refused, naming it'
);
dies_like(
    sub {
        PVE::MTunnel::Tunnel::fork_ssh_tunnel(\@ssh, $qm, "$sock:$sock", sub { });
    },
    qr/^can't open tunnel - ssh_forward_info must be an array reference of 'LOCAL:REMOTE' socket pairs or 'PORT:localhost:PORT' TCP forwards, not '\Q$sock:$sock\E'$/,
    'fork_ssh_tunnel: forwards given as a string, not a list, are refused clearly'
);
dies_like(
    sub {
        PVE::MTunnel::Tunnel::fork_ssh_tunnel(\@ssh, ['echo', 'no quorum'], [], sub { });
    },
    qr/^can't open tunnel - no quorum on target node$/,
    'fork_ssh_tunnel: no quorum'
);
dies_like(
    sub {
        PVE::MTunnel::Tunnel::fork_ssh_tunnel(\@ssh, ['echo', 'Welcome!'], [], sub { });
    },
    qr/^can't open tunnel - got strange reply from tunnel \('Welcome!'\)$/,
    'fork_ssh_tunnel: strange greeting'
);
dies_like(
    sub {
        PVE::MTunnel::Tunnel::fork_ssh_tunnel(\@ssh, ['echo', 'tunnel online'], [], sub { });
    },
    qr/^can't open tunnel - failed to receive tunnel version string \(ssh to root\@198\.18\.0\.2 exit code 0/,
    'fork_ssh_tunnel: no version line'
);
dies_like(
    sub {
        PVE::MTunnel::Tunnel::fork_ssh_tunnel(\@ssh,
            ['sh', '-c', 'echo "no such command" >&2; exit 127'],
            [], sub { });
    },
    qr/^can't open tunnel - ssh to root\@198\.18\.0\.2 exit code 127 while waiting for 'tunnel online'; stderr: no such command$/,
    'fork_ssh_tunnel: ssh\'s stderr tail is in the error'
);

{
    my $t = PVE::MTunnel::Tunnel::fork_ssh_tunnel(\@ssh, [@$qm, '--v2', 300], [], sub { });
    is($t->{version}, 2, 'v2: version 2');
    my $reply = PVE::MTunnel::Tunnel::write_tunnel($t, 10, 'version');
    is_deeply(
        [$reply->{api}, $reply->{age}, !!$reply->{success}],
        [2, 0, 1],
        'write_tunnel v2: returns the decoded reply'
    );
    dies_like(
        sub { PVE::MTunnel::Tunnel::write_tunnel($t, 10, 'resume') },
        qr/^error - tunnel command '\{"cmd":"resume"\}' failed - .*VM 300 not running/,
        'write_tunnel v2: success false dies with msg'
    );
    dies_like(
        sub { PVE::MTunnel::Tunnel::write_tunnel($t, 10, 'lab-garbage') },
        qr/^failed to decode tunnel reply 'this is not json' \(command '\{"cmd":"lab-garbage"\}'\) - /,
        'write_tunnel v2: a reply that is not JSON'
    );
    dies_like(
        sub { PVE::MTunnel::Tunnel::write_tunnel($t, 10, 'frobnicate', { x => 1 }) },
        qr/^error - tunnel command '\{"cmd":"frobnicate","x":1\}' failed - unknown command 'frobnicate' given$/,
        'write_tunnel v2: params go into the JSON command'
    );
    PVE::MTunnel::Tunnel::finish_tunnel($t, 1);
    pass('finish_tunnel v2: quit with cleanup answered');
}

# A stand-in for pve-guest-common's PVE::Tunnel (not installable here) that records what
# reaches it, in a directory of its own for @INC.
my $pve_tunnel_inc = File::Temp->newdir();
{
    mkdir("$pve_tunnel_inc/PVE") or die;
    open(my $fh, '>', "$pve_tunnel_inc/PVE/Tunnel.pm") or die;
    print $fh <<'PM';
package PVE::Tunnel;
our @calls;
sub fork_ssh_tunnel { push @calls, 'fork_ssh_tunnel'; return { pid => 1 } }
sub read_tunnel { push @calls, "read_tunnel $_[1]"; return 'line' }
sub write_tunnel { push @calls, "write_tunnel $_[2]"; return { success => 1, args => scalar(@_) } }
sub finish_tunnel { push @calls, 'finish_tunnel' . (defined $_[1] ? " $_[1]" : ''); return }
1;
PM
    close($fh);
}

{
    # The scoped way: PVE::MTunnel::Tunnel's functions by name. Tunnels they did not open go to
    # PVE::Tunnel's own functions (loaded only then); PVE::Tunnel itself is left as it is.
    local @INC = ("$pve_tunnel_inc", @INC);
    ok(!$INC{'PVE/Tunnel.pm'},
        'scoped: PVE::Tunnel is not loaded before a foreign tunnel needs it');
    my $t = PVE::MTunnel::Tunnel::fork_ssh_tunnel(\@ssh, $qm, ["$sock:$sock"], sub { });
    ok($t->{mtunnel} && -S $sock, 'scoped: fork_ssh_tunnel opens the tunnel through the library');
    ok(!$INC{'PVE/Tunnel.pm'}, 'scoped: ... without loading PVE::Tunnel');
    dies_like(
        sub { PVE::MTunnel::Tunnel::write_tunnel($t, 30, "resume 999") },
        qr/^tunnel replied 'ERR: resume failed - VM 999 not running' to command 'resume 999'$/,
        'scoped: write_tunnel on our tunnel is the library\'s'
    );
    my $websocket = { version => 2, pid => 1 };
    is_deeply(
        PVE::MTunnel::Tunnel::write_tunnel($websocket, 10, 'stop', { cleanup => 1 }),
        { success => 1, args => 4 },
        'scoped: a websocket tunnel goes to upstream\'s write_tunnel, every argument passed on'
    );
    ok($INC{'PVE/Tunnel.pm'}, 'scoped: PVE::Tunnel was loaded for it');
    is(PVE::MTunnel::Tunnel::read_tunnel($websocket, 7),
        'line', 'scoped: ... and to upstream\'s read_tunnel, with its return value');
    PVE::MTunnel::Tunnel::finish_tunnel({ pid => 1 }, 1);
    no warnings 'once';
    is_deeply(
        \@PVE::Tunnel::calls,
        ['write_tunnel stop', 'read_tunnel 7', 'finish_tunnel 1'],
        'scoped: only the foreign tunnels reached upstream\'s functions'
    );
    is(PVE::Tunnel::fork_ssh_tunnel(\@ssh, $qm, [], sub { })->{pid},
        1, 'scoped: PVE::Tunnel::fork_ssh_tunnel is still upstream\'s (nothing redefined)');
    is(PVE::Tunnel::write_tunnel($t, 30, 'resume 999')->{success},
        1, 'scoped: ... and so is PVE::Tunnel::write_tunnel, even for our tunnel');
    PVE::MTunnel::Tunnel::finish_tunnel($t);
    ok(!-e $sock, 'scoped: finish_tunnel closes our tunnel');
    @PVE::Tunnel::calls = ();
}

{
    # The one-line switch, `use PVE::MTunnel::Tunnel ':pve-tunnel'`, process-wide (PVE::Tunnel's
    # functions redefined), against the stand-in.
    local @INC = ("$pve_tunnel_inc", @INC);
    PVE::MTunnel::Tunnel->import(':pve-tunnel');
    my $t = PVE::Tunnel::fork_ssh_tunnel(\@ssh, $qm, ["$sock:$sock"], sub { });
    ok($t->{mtunnel} && -S $sock,
        'one-line switch: PVE::Tunnel::fork_ssh_tunnel opens the tunnel through the library');
    dies_like(
        sub { PVE::Tunnel::write_tunnel($t, 30, "resume 999") },
        qr/^tunnel replied 'ERR: resume failed - VM 999 not running' to command 'resume 999'$/,
        'one-line switch: PVE::Tunnel::write_tunnel on it is the library\'s'
    );
    PVE::Tunnel::finish_tunnel($t);
    ok(!-e $sock, 'one-line switch: PVE::Tunnel::finish_tunnel closes it');
    my $websocket = { version => 2, pid => 1 };
    is_deeply(
        PVE::Tunnel::write_tunnel($websocket, 10, 'stop'),
        { success => 1, args => 3 },
        'one-line switch: another tunnel goes to upstream\'s write_tunnel'
    );
    PVE::Tunnel::finish_tunnel($websocket);
    is(PVE::Tunnel::read_tunnel($websocket, 1),
        'line', 'one-line switch: ... and to upstream\'s read_tunnel');
    no warnings 'once';
    is_deeply(
        \@PVE::Tunnel::calls,
        ['write_tunnel stop', 'finish_tunnel', 'read_tunnel 1'],
        'one-line switch: only the other tunnel reached upstream\'s functions'
    );
}

{
    # qmp_migrate_setup on a real QEMU: capabilities as set_migration_caps, parameters as phase 2.
    $lab->move_vm_config(300, 'node1');
    $lab->run_ok('node1', 'qm', 'start', 300);
    my $qmp = '/run/qemu-server/300.qmp';
    PVE::MTunnel::qmp_execute($qmp, 'migrate-set-capabilities',
        { capabilities => [{ capability => 'events', state => JSON::PP::true }] });
    my $applied = PVE::MTunnel::qmp_migrate_setup(
        $qmp,
        {
            capabilities => { 'auto-converge' => 1, xbzrle => 1 },
            parameters => { 'downtime-limit' => 100 }
        }
    );
    my @on = sort map { $_->{capability} }
        grep { $_->{state} } @{ PVE::MTunnel::qmp_execute($qmp, 'query-migrate-capabilities') };
    is_deeply(
        \@on,
        ['auto-converge', 'xbzrle'],
        'qmp_migrate_setup: only the wanted capabilities are on ("events", left on before, is off)'
    );
    my $p = PVE::MTunnel::qmp_execute($qmp, 'query-migrate-parameters');
    is_deeply(
        [@$p{qw(max-bandwidth downtime-limit xbzrle-cache-size)}],
        [16 << 30, 100, 8 << 20],
        'qmp_migrate_setup: 16 GiB/s, the downtime limit, and a tenth of 64 MiB rounded up to 8 MiB as xbzrle cache'
    );
    is_deeply(
        $applied->{parameters},
        { 'max-bandwidth' => 16 << 30, 'downtime-limit' => 100, 'xbzrle-cache-size' => 8 << 20 },
        'qmp_migrate_setup: returns what it set'
    );
    $lab->run_ok('node1', 'qm', 'stop', 300);
}

is_deeply([MTunnelLab::children()], [], 'drop-in: no child process left');
is(MTunnelLab::fd_count(), $fds, 'drop-in: fd count back at its baseline');
is_deeply([MTunnelLab::zombies_since($t0)], [], 'drop-in: no zombie left');
$lab->leave;
is_deeply([$lab->socket_files($_)], [], "drop-in: no socket file left on $_") for qw(node1 node2);

$lab->down;
done_testing();
