#!/usr/bin/perl
# PVE::MTunnel tunnels on the lab: real sshd on node2, the test process living in node1.
# Readiness, commands, staged close, stale sockets, and the ssh-side failures each give a
# clear error, with no socket file, ssh child or zombie left behind.

use strict;
use warnings;
use Test::More;
use IO::Socket::INET;
use IO::Socket::UNIX;
use POSIX ();
use Time::HiRes qw(time);

use MTunnelLab;
use PVE::MTunnel;

my $lab = MTunnelLab->up(nodes => 2);
my $lab_dir = $lab->dir;
$lab->enter('node1');

my @ssh = @{ $lab->ssh_prefix('node2') };
my $sock = '/run/qemu-server/100.migrate';

*children = \&MTunnelLab::children;
*fd_count = \&MTunnelLab::fd_count;

sub gone_ok {
    my ($pid, $name) = @_;
    ok(!-e "/proc/$pid", "$name: ssh (pid $pid) is reaped, no zombie")
        or diag(`cat /proc/$pid/status 2>&1 | head -3`);
    is_deeply([children()], [], "$name: no child process left");
}

sub error_like {
    my ($code, $re, $errcode, $name) = @_;
    my $t0 = time();
    eval { $code->() };
    my $err = $@;
    like($err, $re, $name) or diag("got: $err");
    is(
        $PVE::MTunnel::last_error_code,
        $PVE::MTunnel::ERROR_CODE{$errcode},
        "$name: result code is $errcode"
    );
    return time() - $t0;
}

{
    my @log;
    my $t = PVE::MTunnel->open(ssh => \@ssh, forwards => [$sock], log => sub { push @log, [@_] });
    my $pid = $t->pid;
    my $t0 = time();
    $t->wait_ready(timeout_ms => 30_000);
    diag(sprintf("open -> ready: %.3f s", time() - $t0));
    my $st = $t->status;
    is($st->{state}, 'ready', 'tunnel is ready');
    is($st->{version}, 1, 'remote speaks protocol v1');
    ok(grep({ $_->[0] eq 'info' && $_->[1] eq 'ssh tunnel ver 1' } @log),
        'log callback got "ssh tunnel ver 1"');
    ok(-S $sock, 'forwarded socket exists locally');
    is((stat($sock))[2] & 07777, 0600, 'forwarded socket is mode 0600');
    is_deeply([children()], [$pid], 'ssh is our only child');

    error_like(
        sub { $t->command('resume 999') },
        qr/^tunnel replied 'ERR: .*999.*' to command 'resume 999'$/,
        'remote', 'ERR reply to resume is an error naming the command'
    );

    $t->close;
    ok(!-e $sock, 'close removed the local socket file');
    is_deeply([$lab->socket_files('node2')], [], 'no socket file on node2');
    gone_ok($pid, 'close');
    is($t->status->{state}, 'closed', 'status says closed');
    eval { $t->close };
    is($@, '', 'second close is a no-op');
    error_like(
        sub { $t->command('quit') },
        qr/^tunnel is closed$/,
        'closed', 'command after close fails clearly'
    );
}

# Listening TCP sockets on PORT in this (node1's) network namespace: "ADDRESS inode" each.
sub tcp_listeners {
    my ($port) = @_;
    my @out;
    for my $table ('/proc/net/tcp', '/proc/net/tcp6') {
        open(my $fh, '<', $table) or next;
        <$fh>;
        while (my $line = <$fh>) {
            my @f = split(' ', $line);
            my ($addr, $p) = split(/:/, $f[1]);
            next if $f[3] ne '0A' || hex($p) != $port;
            my $ip =
                length($addr) == 8
                ? join('.', reverse(unpack('C4', pack('H8', $addr))))
                : "[$addr]";
            push @out, "$ip $f[9]";
        }
    }
    return @out;
}

sub socket_inodes_of {
    my ($pid) = @_;
    return map { readlink($_) =~ /^socket:\[(\d+)\]$/ ? ($1) : () } glob("/proc/$pid/fd/*");
}

{
    # PVE's legacy path: a target that answers tcp:localhost:PORT gets a TCP forward. It
    # listens on node1's loopback only (even where ssh_config says GatewayPorts yes), is ready
    # once ssh holds the port, carries a connection to node2's localhost:PORT, and is gone
    # after close.
    my $port = 60123;
    my $log = "$lab_dir/tcp-echo.log";
    my $echo = $lab->background(
        'node2',
        $log,
        'perl',
        '-MIO::Socket::INET',
        '-e',
        'my $l = IO::Socket::INET->new(LocalAddr => "127.0.0.1", LocalPort => $ARGV[0],'
            . ' Listen => 1, ReuseAddr => 1) or die "listen: $!";'
            . ' $| = 1; print "listening\n"; my $c = $l->accept or die;'
            . ' my $line = <$c>; print $c "echo: $line"; close($c);',
        $port
    );
    ok($echo->wait_for(qr/listening/, 30), 'TCP forward: a server listens on node2\'s localhost')
        or diag($echo->output);
    my @warn;
    my $t = PVE::MTunnel->open(
        ssh => [$ssh[0], '-o', 'GatewayPorts=yes', @ssh[1 .. $#ssh]],
        forwards => ["$port:localhost:$port"],
        log => sub { push @warn, $_[1] if $_[0] eq 'warn' },
    );
    my $pid = $t->pid;
    $t->wait_ready(timeout_ms => 30_000);
    my $st = $t->status;
    is($st->{state}, 'ready', 'TCP forward: the tunnel is ready');
    is_deeply($st->{forwards}, ["$port:localhost:$port"], 'TCP forward: status shows it as given');
    like(
        MTunnelLab::slurp("/proc/$pid/cmdline"),
        qr/\0-L\0localhost:$port:localhost:$port\0/,
        'TCP forward: ssh is told to bind localhost explicitly'
    );
    my %ours = map { $_ => 1 } socket_inodes_of($pid);
    my @listen = tcp_listeners($port);
    ok(@listen, "TCP forward: something listens on port $port") or diag(join(', ', @listen));
    is_deeply([grep { !$ours{ (split ' ', $_)[1] } } @listen],
        [], 'TCP forward: every listener on the port is held by our ssh');
    is_deeply([grep { !/^(127\.0\.0\.1|\[0+10+\]) / } @listen],
        [], 'TCP forward: on loopback only, although the caller asked for GatewayPorts yes');
    my $c = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port, Timeout => 10)
        or die "connect: $!";
    print $c "hello\n";
    is(scalar(<$c>), "echo: hello\n", 'TCP forward: a connection reaches node2\'s localhost:PORT');
    close($c);
    ok($echo->finish(30), 'TCP forward: the server on node2 is done');
    error_like(
        sub { $t->command('resume 999') },
        qr/^tunnel replied 'ERR: .*999.*' to command 'resume 999'$/,
        'remote', 'TCP forward: commands go through the tunnel as usual'
    );
    $t->close;
    is_deeply([tcp_listeners($port)], [], 'TCP forward: nothing listens on the port after close');
    is_deeply([$lab->socket_files('node2')], [], 'TCP forward: no socket file on node2');
    gone_ok($pid, 'TCP forward');
    note("TCP forward, ssh's warnings: @warn") if @warn;

    # the port taken by another process (here: this one): ssh cannot bind it and exits
    # (ExitOnForwardFailure); a wildcard or loopback listener of someone else never passes
    my $taken = IO::Socket::INET->new(
        LocalAddr => '127.0.0.1',
        LocalPort => $port,
        Listen => 1,
        ReuseAddr => 1
    ) or die "listen: $!";
    $t = PVE::MTunnel->open(ssh => \@ssh, forwards => ["$port:localhost:$port"]);
    $pid = $t->pid;
    error_like(
        sub { $t->wait_ready(timeout_ms => 30_000) },
        qr/^ssh to root\@198\.18\.0\.2 exit code 255 while waiting for 'tunnel online'; stderr: .*bind \[127\.0\.0\.1\]:$port: Address already in use.*(cannot listen to port|Could not request local forwarding)/,
        'ssh_exited',
        'TCP forward: a port another process listens on fails the open, with ssh\'s reason'
    );
    $t->close(remote_cleanup => 0);
    is_deeply(
        [tcp_listeners($port)],
        [join(' ', '127.0.0.1', (stat($taken))[1])],
        'TCP forward: the other listener is untouched'
    );
    close($taken);
    gone_ok($pid, 'TCP forward on a taken port');

    # through a shared master: the master holds the port, close cancels it there
    my $ctl = "$lab_dir/ctl-tcp";
    $t = PVE::MTunnel->open(
        ssh => \@ssh,
        forwards => ["$port:localhost:$port"],
        share => { control_dir => $ctl, exit_idle => 1 }
    );
    $t->wait_ready(timeout_ms => 30_000);
    my $master = $t->status->{master_pid};
    my %held = map { $_ => 1 } socket_inodes_of($master);
    ok(
        (grep { $held{ (split ' ', $_)[1] } } tcp_listeners($port)),
        'TCP forward, shared: the master holds the port'
    );
    $t->close;
    is_deeply([tcp_listeners($port)], [], 'TCP forward, shared: the port is cancelled at close');
}

{
    # A socket file left by a crashed run: nobody listens on it.
    my $stale = IO::Socket::UNIX->new(Local => $sock, Listen => 1) or die "bind $sock: $!";
    close($stale);
    ok(-S $sock, 'stale socket file is present before open');
    my @log;
    my $t = PVE::MTunnel->open(ssh => \@ssh, forwards => [$sock], log => sub { push @log, $_[1] });
    $t->wait_ready(timeout_ms => 30_000);
    ok(grep({ $_ eq "removed stale socket $sock" } @log), 'stale socket was removed and logged');
    is($t->status->{state}, 'ready', 'tunnel is ready despite the stale socket');
    my $pid = $t->pid;
    undef $t;
    ok(!-e $sock, 'DESTROY closed the tunnel and removed the socket');
    gone_ok($pid, 'DESTROY');
}

{
    # ssh dies under us: writing to it must not raise SIGPIPE in this (default-SIGPIPE) host,
    # and the error says what happened.
    local $SIG{PIPE} = 'DEFAULT';
    my $t = PVE::MTunnel->open(ssh => \@ssh, forwards => [$sock]);
    $t->wait_ready(timeout_ms => 30_000);
    my $pid = $t->pid;
    kill('KILL', $pid);
    select(undef, undef, undef, 0.2);
    error_like(
        sub { $t->command('resume 100') },
        qr/^ssh to root\@198\.18\.0\.2 killed by signal 9 while (writing|waiting for the reply to) 'resume 100'/,
        'ssh_exited',
        'command to a killed ssh fails clearly'
    );
    pass('host process survived the write to a dead ssh (no SIGPIPE)');
    $t->close(remote_cleanup => 0);
    ok(!-e $sock, 'socket of the killed ssh is removed on close');
    gone_ok($pid, 'killed ssh');
}

{
    # The remote shell gets every word quoted: nothing in an argument is ever executed.
    my $canary = "$lab_dir/pwned";
    my $res = PVE::MTunnel::ssh_run(
        ssh => \@ssh,
        command => ['echo', "\$(touch $canary)", "`touch $canary`;", "'"]
    );
    is($res->{stdout}, "\$(touch $canary) `touch $canary`; '\n", 'remote argv arrives literally');
    ok(!-e $canary, 'no command substitution ran on the remote node');
    my $in =
        PVE::MTunnel::ssh_run(ssh => \@ssh, command => ['cat'], input => "spice-ticket-secret\n");
    is($in->{stdout}, "spice-ticket-secret\n", 'input reaches the remote command on stdin');
    is_deeply([children()], [], 'ssh_run leaves no child');
}

{
    # Remote cleanup on close removes a stale socket on the target, and only a socket; the
    # regular file it keeps is named in close's error.
    $lab->run_ok('node2', 'perl', '-MIO::Socket::UNIX', '-e',
        'IO::Socket::UNIX->new(Local => "/run/qemu-server/100.migrate", Listen => 1) or die');
    $lab->run_ok('node2', 'sh', '-c', 'echo canary > /run/qemu-server/101.migrate');
    my $t = PVE::MTunnel->open(ssh => \@ssh, forwards => [$sock, '/run/qemu-server/101.migrate']);
    $t->wait_ready(timeout_ms => 30_000);
    error_like(
        sub { $t->close },
        qr/^refusing to remove '\/run\/qemu-server\/101\.migrate' on root\@198\.18\.0\.2: not a socket \(kept\)$/,
        'invalid_argument',
        'close names the remote regular file it kept'
    );
    is_deeply(
        [$lab->socket_files('node2')],
        ['/run/qemu-server/101.migrate'],
        'close removed the stale remote socket and kept the regular file'
    );
    is(scalar($lab->run_ok('node2', 'cat', '/run/qemu-server/101.migrate')),
        "canary\n", 'the remote regular file is untouched');
    $lab->run_ok('node2', 'rm', '/run/qemu-server/101.migrate');
}

{
    # The remote sockets go with the tunnel's remote command; when it did not end normally
    # (here: exit 1 after quit) close removes them over a second connection, and when that
    # connection is refused the close still succeeds, with a warning in the log and status.
    my @warn;
    my $t = PVE::MTunnel->open(
        ssh => \@ssh,
        forwards => [$sock],
        command => ['sh', '-c', 'qm mtunnel; exit 1'],
        log => sub { push @warn, $_[1] if $_[0] eq 'warn' }
    );
    $t->wait_ready(timeout_ms => 30_000);
    $lab->sshd('node2', 'DenyUsers', 'root');
    my $ok = eval { $t->close; 1 };
    my $err = $@;
    $lab->sshd('node2');
    ok($ok, 'close succeeds although its cleanup connection was refused') or diag($err);
    like(
        join("\n", @warn),
        qr/removing remote sockets: .*Permission denied.* \(left on root\@198\.18\.0\.2: \Q$sock\E\)/,
        'the refused cleanup is a warning in the log naming what was left'
    );
    like($t->status->{cleanup_warning} // '', qr/removing remote sockets/, 'and in tunnel_status');
    ok(!-e $sock, 'the local socket is removed');
    $lab->run_ok('node2', 'rm', '-f', $sock);

    # the normal case: the remote command ended, its cleanup ran, no second connection
    my $before = () = MTunnelLab::slurp("$lab_dir/node2/sshd.log") =~ /Accepted publickey/g;
    $t = PVE::MTunnel->open(ssh => \@ssh, forwards => [$sock]);
    $t->wait_ready(timeout_ms => 30_000);
    $t->close;
    my $after = () = MTunnelLab::slurp("$lab_dir/node2/sshd.log") =~ /Accepted publickey/g;
    is($after - $before,
        1, 'a normal open and close authenticate to the target once (no cleanup connection)');
    is_deeply([$lab->socket_files('node2')], [], 'and the remote socket is gone');
}

{
    # ssh_remove_sockets: the same remote cleanup without a tunnel (a target whose QEMU listens
    # but no tunnel got ready): sockets removed, anything else kept and named.
    $lab->run_ok('node2', 'perl', '-MIO::Socket::UNIX', '-e',
        'IO::Socket::UNIX->new(Local => "/run/qemu-server/100.migrate", Listen => 1) or die');
    $lab->run_ok('node2', 'sh', '-c', 'echo canary > /run/qemu-server/100_nbd.migrate');
    my @paths = ('/run/qemu-server/100.migrate', '/run/qemu-server/100_nbd.migrate');
    error_like(
        sub { PVE::MTunnel::ssh_remove_sockets(ssh => \@ssh, sockets => \@paths) },
        qr/^refusing to remove '\/run\/qemu-server\/100_nbd\.migrate' on root\@198\.18\.0\.2: not a socket \(kept\)$/,
        'invalid_argument',
        'ssh_remove_sockets names the regular file it kept'
    );
    is_deeply(
        [$lab->socket_files('node2')],
        ['/run/qemu-server/100_nbd.migrate'],
        'ssh_remove_sockets removed the socket and kept the regular file'
    );
    is(scalar($lab->run_ok('node2', 'cat', '/run/qemu-server/100_nbd.migrate')),
        "canary\n", 'the regular file is untouched');
    $lab->run_ok('node2', 'rm', '/run/qemu-server/100_nbd.migrate');
    ok(PVE::MTunnel::ssh_remove_sockets(ssh => \@ssh, sockets => \@paths),
        'nothing left to remove: success');
    error_like(
        sub { PVE::MTunnel::ssh_remove_sockets(ssh => \@ssh, sockets => ['/etc/passwd']) },
        qr/invalid socket path '\/etc\/passwd'/,
        'invalid_argument',
        'ssh_remove_sockets refuses a path outside the socket directory'
    );
}

{
    # Permission denied: an unprivileged host process whose socket directory is not writable.
    # (The lab's own directory is root-only, so nobody's copies live in a directory of its own.)
    my $ro = "/run/mtunnel-ro-$$";
    mkdir($ro, 0755) or die "mkdir $ro: $!";
    system('cp', "$lab_dir/id_ed25519", "$lab_dir/known_hosts", $ro) == 0 or die;
    chown(65534, 65534, "$ro/id_ed25519");
    my @nobody_ssh = map { s/\Q$lab_dir\E\/(id_ed25519|known_hosts)\b/$ro\/$1/r } @ssh;
    my @nobody_opts = (
        ssh => \@nobody_ssh,
        socket_dir => $ro,
        forwards => ["$ro/100.migrate"],
        lock_dir => "$ro/locks"
    );
    mkdir("$ro/locks", 0700);
    chown(65534, 65534, "$ro/locks");
    pipe(my $r, my $w) or die;
    my $pid = fork() // die;

    if (!$pid) {
        close $r;
        $( = $) = 65534;
        $< = $> = 65534;
        my $t;
        my $ok =
            eval { $t = PVE::MTunnel->open(@nobody_opts); $t->wait_ready(timeout_ms => 30_000); 1 };
        print $w ($ok ? 'no error' : $@);
        close($w);
        eval { $t->close(remote_cleanup => 0) } if $t;
        POSIX::_exit(0);
    }
    close $w;
    my $err = do { local $/; <$r> };
    waitpid($pid, 0);
    like(
        $err,
        qr/^ssh to root\@198\.18\.0\.2 exit code 255 while waiting for 'tunnel online'; stderr: .*cannot bind to path \Q$ro\E\/100\.migrate: Permission denied/,
        'permission denied on the socket directory is named'
    ) or diag($err);
    ok(!-e "$ro/100.migrate", 'nothing was created in the read-only directory');
    system('rm', '-rf', $ro);
}

my %fault = (
    'auth refused' => {
        ssh => [map { $_ eq "$lab_dir/id_ed25519" ? '/dev/null' : $_ } @ssh],
        re =>
            qr/^ssh to root\@198\.18\.0\.2 exit code 255 while waiting for 'tunnel online'; stderr: .*Permission denied \(publickey\)/,
        code => 'ssh_exited',
    },
    'unknown host key' => {
        ssh => [map { s/^HostKeyAlias=node2$/HostKeyAlias=node-unknown/r } @ssh],
        re =>
            qr/exit code 255 while waiting for 'tunnel online'; stderr: .*Host key verification failed/,
        code => 'ssh_exited',
    },
    'changed host key' => {
        # node1's key recorded for node2's address: exactly what a reinstalled node looks like
        ssh => [map { s/^HostKeyAlias=node2$/HostKeyAlias=node1/r } @ssh],
        re =>
            qr/exit code 255 while waiting for 'tunnel online'; stderr: .*(REMOTE HOST IDENTIFICATION HAS CHANGED|Host key verification failed)/,
        code => 'ssh_exited',
    },
    'host unreachable' => {
        ssh => [@ssh[0 .. $#ssh - 1], 'root@198.18.0.99'],
        opts => { connect_timeout_s => 2 },
        re => qr/exit code 255 while waiting for 'tunnel online'; stderr: .*198\.18\.0\.99/,
        code => 'ssh_exited',
    },
    'remote command missing' => {
        command => ['qm-does-not-exist', 'mtunnel'],
        re =>
            qr/exit code 127 while waiting for 'tunnel online'; stderr: .*qm-does-not-exist.*not found/,
        code => 'ssh_exited',
    },
    'remote exits at once' => {
        command => ['true'],
        re => qr/exit code 0 while waiting for 'tunnel online'/,
        code => 'ssh_exited',
    },
    'no quorum' => {
        command => ['echo', 'no quorum'],
        re => qr/^no quorum on target node$/,
        code => 'no_quorum',
    },
    'remote prints garbage' => {
        command => ['echo', 'Welcome to node2'],
        re => qr/^got strange reply from tunnel \('Welcome to node2'\)$/,
        code => 'protocol',
    },
    'bad version line' => {
        command => ['printf', 'tunnel online\nver one\n'],
        re => qr/^received invalid tunnel version string 'ver one'$/,
        code => 'protocol',
    },
    'remote is silent' => {
        command => ['sleep', '60'],
        opts => { greeting_timeout_ms => 1000 },
        re =>
            qr/^no reply from tunnel to root\@198\.18\.0\.2 within \d+ ms while waiting for 'tunnel online'$/,
        code => 'timeout',
    },
);

for my $name (sort keys %fault) {
    my $f = $fault{$name};
    my $fds = fd_count();
    my $t = PVE::MTunnel->open(
        ssh => $f->{ssh} // \@ssh,
        forwards => [$sock],
        ($f->{command} ? (command => $f->{command}) : ()), %{ $f->{opts} // {} }
    );
    my $pid = $t->pid;
    my $took =
        error_like(sub { $t->wait_ready(timeout_ms => 30_000) }, $f->{re}, $f->{code}, $name);
    ok($took < 30, "$name: failed before the overall deadline");
    $t->close(remote_cleanup => 0);
    ok(!-e $sock, "$name: no socket file left");
    is_deeply([$lab->socket_files('node2')], [], "$name: no socket file left on node2");
    gone_ok($pid, $name);
    undef $t;
    is(fd_count(), $fds, "$name: fd count back to its baseline");
}

$lab->leave;
$lab->down;
done_testing();
