#!/usr/bin/perl
# lab/qm keeps upstream qm's contract (qemu-server 9.2), so that a driver tested against the
# lab also works against real PVE: the options vm_start accepts and nothing else, stdin read
# only for a migration target, the config lock, the target's migration capabilities, stop
# during failure cleanup, unlock, nbdstop, /usr/sbin/qm inside the nodes only, the mtunnel
# protocols (v1 as upstream, v2 as the lab's extension), each VM config in its node's directory
# as pmxcfs keeps it (loaded where upstream's qm loads it), and the post-copy commands of the
# target's qm mtunnel with the series.

use strict;
use warnings;
use Cwd qw(abs_path);
use File::Basename qw(dirname);

# The lab's daemons (sshd, QEMU -daemonize) are re-parented to the nearest subreaper, and this
# machine's pid 1 reaps nothing: like `make test`, run under lab/reap-run, so that the zombie
# check at the end sees only zombies this test makes.
BEGIN {
    if (!$ENV{MTUNNEL_T15_REAP_RUN}) {
        $ENV{MTUNNEL_T15_REAP_RUN} = 1;
        my $reap_run = abs_path(dirname(__FILE__) . '/../lab/reap-run');
        exec($reap_run, $^X, (map { "-I$_" } grep { !ref } @INC), __FILE__, @ARGV)
            or die "exec $reap_run: $!\n";
    }
}

use Test::More;
use IPC::Open3 qw(open3);
use IO::Select;
use JSON::PP ();
use POSIX qw(WNOHANG);
use Symbol qw(gensym);
use Time::HiRes qw(time sleep);

use Digest::SHA ();
use MTunnelLab;

my $vmid = 100;
my $sock = "/run/qemu-server/$vmid.migrate";
my $lab = MTunnelLab->up(nodes => 2, accel => 'tcg');
my $dir = $lab->dir;
# a new VM's config is on node1 ($LAB/pve/nodes/node1/qemu-server/100.conf)
my $conf_path = $lab->write_vm_config($vmid, memory => 64, guest => 'idle', lock => 'migrate');

# A command in a node with a pipe on each of stdin, stdout and stderr; every read has a deadline.
{

    package Proc;
    use IPC::Open3 qw(open3);
    use POSIX qw(WNOHANG);
    use Symbol qw(gensym);
    use Time::HiRes qw(time sleep);

    sub start {
        my ($class, $lab, $node, @cmd) = @_;
        local $ENV{MTUNNEL_LAB} = $lab->name;
        my $err = gensym;
        my $pid = open3(my $in, my $out, $err, $lab->lab_sh, 'exec', $node, @cmd);
        $in->autoflush(1);
        return bless {
            pid => $pid,
            in => $in,
            fh => { out => $out, err => $err },
            buf => { out => '', err => '' },
            eof => {}
        }, $class;
    }

    # unbuffered: nothing is left for close() to write into a pipe whose reader is gone
    sub send {
        my ($self, $data) = @_;
        local $SIG{PIPE} = 'IGNORE';
        while (length $data) {
            my $n = syswrite($self->{in}, $data);
            next if !defined $n && $!{EINTR};
            last if !$n;    # the command is gone: its exit code will tell
            substr($data, 0, $n, '');
        }
    }

    # read what arrives until $done->() or the deadline; false on timeout
    sub pump {
        my ($self, $deadline, $done) = @_;
        while (!$done->()) {
            my @open = grep { !$self->{eof}{$_} } qw(out err);
            return 1 if !@open;
            my $left = $deadline - time;
            return 0 if $left <= 0;
            my %name = map { fileno($self->{fh}{$_}) => $_ } @open;
            for my $fh (IO::Select->new(map { $self->{fh}{$_} } @open)->can_read($left)) {
                my $which = $name{ fileno($fh) };
                my $n = sysread($fh, $self->{buf}{$which}, 65536, length $self->{buf}{$which});
                next if !defined $n && $!{EINTR};
                $self->{eof}{$which} = 1 if !$n;
            }
        }
        return 1;
    }

    # next stdout line (without "\n"), undef if none came within $timeout seconds
    sub read_line {
        my ($self, $timeout) = @_;
        $self->pump(time + $timeout,
            sub { index($self->{buf}{out}, "\n") >= 0 || $self->{eof}{out} });
        return $self->{buf}{out} =~ s/^(.*?)\n// ? $1 : undef;
    }

    # close stdin, collect the rest: (exit code, rest of stdout, all of stderr); 'timeout' if it hung
    sub finish {
        my ($self, $timeout) = @_;
        my $deadline = time + $timeout;
        { local $SIG{PIPE} = 'IGNORE'; close($self->{in}) }
        $self->pump($deadline, sub { 0 });
        my $r;
        while (($r = waitpid($self->{pid}, WNOHANG)) == 0 && time < $deadline) { sleep(0.02) }
        if ($r == 0) {
            kill('KILL', $self->{pid});
            waitpid($self->{pid}, 0);
            return ('timeout', $self->{buf}{out}, $self->{buf}{err});
        }
        my $rc = ($? & 127) ? 128 + ($? & 127) : $? >> 8;
        return ($rc, $self->{buf}{out}, $self->{buf}{err});
    }
}

# (exit code, stdout, stderr) of CMD in NODE with INPUT on stdin
sub run_input {
    my ($node, $input, @cmd) = @_;
    my $p = Proc->start($lab, $node, @cmd);
    $p->send($input);
    return $p->finish(60);
}

sub qm { return $lab->run(shift, 'qm', @_) }
sub start_log { return MTunnelLab::slurp("$dir/$_[0]/qm-start.log") }
sub last_log_line { my @l = split /\n/, start_log($_[0]); return $l[-1] // '' }

# QEMU's own run state (qm status needs the config on that node)
sub qmpstatus { return $lab->qmpstatus($_[0], $_[1] // $vmid) }

sub qemu_cmdline {
    my ($node) = @_;
    my ($pid) = $lab->qemu_pids($node) or return '';
    return MTunnelLab::slurp("/proc/$pid/cmdline") =~ tr/\0/ /r;
}

# ------------------------------------------------------------ /usr/sbin/qm

{
    my ($rc, $out, $err) = $lab->run('node1', '/usr/sbin/qm', 'status', $vmid);
    is($rc, 0, '/usr/sbin/qm runs inside a node') or diag($err);
    is($out, "status: stopped\n", '/usr/sbin/qm is the lab qm of that node');
    ok(!-e '/usr/sbin/qm' || MTunnelLab::slurp('/usr/sbin/qm') !~ /MTUNNEL_LAB/,
        "the host's /usr/sbin/qm is not the lab's (absent here)")
        or diag(MTunnelLab::slurp('/usr/sbin/qm'));
}

# ------------------------------------------------------------ options real qm refuses

for my $case (
    ['--nbd-protocol-version', '1'],
    ['--replicated-volumes', 'local:vm-100-disk-0'],
    ['--node', 'node2']
    )
{
    my $name = $case->[0] =~ s/^--//r;
    my ($rc, $out, $err) = qm('node2', 'start', $vmid, '--skiplock', @$case);
    isnt($rc, 0, "start with $case->[0] is refused");
    is(
        (split /\n/, $err)[0],
        "Unknown option: $name",
        "start with $case->[0]: first stderr line names the option"
    ) or diag($err);
}
{
    my ($rc, $out, $err) = qm('node2', 'start', $vmid, '--skiplock', '--targetstorage', 'local');
    isnt($rc, 0, '--targetstorage without --migratedfrom is refused');
    like(
        $err,
        qr/^targetstorage: targetstorage can only by used with migratedfrom\.$/m,
        '--targetstorage without --migratedfrom: upstream\'s text'
    ) or diag($err);
    ($rc, $out, $err) = qm('node2', 'start', $vmid, '--skiplock', '--migration_type', 'plain');
    isnt($rc, 0, 'a --migration_type other than secure|insecure is refused');
    like(
        $err,
        qr/^migration_type: value 'plain' does not have a value in the enumeration 'secure, insecure'$/m,
        'bad --migration_type: the schema error names the option'
    ) or diag($err);
}
is(start_log('node2'), '', 'starts refused at option parsing are not logged');
is_deeply([$lab->qemu_pids('node2')], [], 'no QEMU started by refused starts');

# ------------------------------------------------------------ the config lock

{
    my ($rc, $out, $err) = qm('node1', 'start', $vmid);
    isnt($rc, 0, 'start of a config with "lock: migrate" is refused without --skiplock');
    is($err, "VM is locked (migrate)\n", 'locked start: upstream\'s check_lock text') or diag($err);
    is_deeply([$lab->qemu_pids('node1')], [], 'locked start: no QEMU');

    # stdin is read before the lock check; a bare first line is an old source's spice ticket
    ($rc, $out, $err) =
        run_input('node2', "OLD-TICKET-4711\nnbd_protocol_version: 1\nsome: thing\n",
        'qm', 'start', $vmid, '--migratedfrom', 'node1', '--migration_type', 'secure',
        '--stateuri', 'unix');
    isnt($rc, 0, 'locked target start is refused too');
    like(
        $err,
        qr/^unknown 'start' parameter on STDIN: 'some: thing'$/m,
        'a later unknown stdin line is warned about'
    ) or diag($err);
    is(
        last_log_line('node2'),
        'start 100 args=--migratedfrom node1 --migration_type secure --stateuri unix stdin=spice_ticket:set,nbd_protocol_version:1',
        'a bare first stdin line is taken as the spice ticket and logged as set'
    );
    unlike(
        "$out$err" . start_log('node2'),
        qr/OLD-TICKET-4711/,
        'the fallback ticket is shown nowhere'
    );
}

# ------------------------------------------------------------ --migratedfrom without --stateuri: plain start

{
    my ($rc, $out, $err) = run_input('node1', "nbd_protocol_version: 1\n",
        'qm', 'start', $vmid, '--skiplock', '--migratedfrom', 'node1');
    is($rc, 0, '--skiplock starts a locked config') or diag($err);
    unlike($out, qr/migration listens/, '--migratedfrom without --stateuri prints no listens line');
    unlike(qemu_cmdline('node1'), qr/-incoming/,
        '--migratedfrom without --stateuri starts QEMU without -incoming');
    is(qmpstatus('node1'), 'running', '--migratedfrom without --stateuri: the guest runs');
    is(
        last_log_line('node1'),
        'start 100 args=--skiplock --migratedfrom node1 stdin=',
        '--migratedfrom without --stateuri does not read stdin'
    );

    ($rc, $out, $err) = qm('node1', 'nbdstop', $vmid);
    is($rc, 0, 'nbdstop without an NBD server exits 0');
    like($err, qr/NBD server not running/, 'nbdstop without an NBD server warns on stderr')
        or diag($err);

    $lab->run_ok('node1', 'qmp', $vmid, 'stop');
    ($rc, $out, $err) = qm('node1', 'resume', $vmid);
    isnt($rc, 0, 'resume of a locked paused VM is refused without --skiplock');
    is($err, "VM is locked (migrate)\n", 'locked resume: upstream\'s check_lock text')
        or diag($err);
    ($rc, $out, $err) = qm('node1', 'resume', $vmid, '--skiplock');
    is($rc, 0, 'resume --skiplock continues it') or diag($err);
    is(qmpstatus('node1'), 'running', 'resume --skiplock: the guest runs again');

    ($rc, $out, $err) = qm('node1', 'stop', $vmid);
    isnt($rc, 0, 'stop of a locked VM is refused without --skiplock');
    is($err, "VM is locked (migrate)\n", 'locked stop: upstream\'s text') or diag($err);
    is(qmpstatus('node1'), 'running', 'a refused stop leaves the VM running');
    ($rc, $out, $err) = qm('node1', 'stop', $vmid, '--skiplock', '1');
    is($rc, 0, 'stop --skiplock 1 stops a locked VM') or diag($err);
    is_deeply([$lab->qemu_pids('node1')], [], 'stop --skiplock: no QEMU left');
}

# ------------------------------------------------------------ a migration target

{
    my $ticket = 'SPICE-SECRET-0815';
    my ($rc, $out, $err) = run_input('node2', "nbd_protocol_version: 1\nspice_ticket: $ticket\n",
        'qm', 'start', $vmid, '--skiplock', '--migratedfrom', 'node1', '--migration_type', 'secure',
        '--stateuri', 'unix');
    is($rc, 0, 'target start with stdin lines succeeds') or diag($err);
    is($out, "migration listens on unix:$sock\n", 'target start prints the listens line');
    is(
        last_log_line('node2'),
        'start 100 args=--skiplock --migratedfrom node1 --migration_type secure --stateuri unix stdin=nbd_protocol_version:1,spice_ticket:set',
        'qm-start.log records the options and the stdin keys'
    );
    unlike("$out$err" . start_log('node2'), qr/\Q$ticket\E/, 'the spice ticket is shown nowhere');
    like(
        qemu_cmdline('node2'),
        qr/ -incoming unix:\Q$sock\E -S( |$)/,
        'target QEMU waits on the UNIX socket, paused'
    );
    is(qmpstatus('node2'), 'inmigrate', 'target QEMU is inmigrate');

    my ($qrc, $caps, $qerr) = $lab->run('node2', 'qmp', $vmid, 'query-migrate-capabilities');
    my $list = eval { JSON::PP::decode_json($caps) } // [];
    my @on = sort map { $_->{capability} } grep { $_->{state} } @$list;
    is_deeply(\@on, ['auto-converge', 'xbzrle'], 'target: only auto-converge and xbzrle are on')
        or diag("$caps$qerr");
    cmp_ok(scalar(@$list), '>', 2, 'target: QEMU reported the other capabilities too');

    ($rc, $out, $err) = qm('node2', 'resume', $vmid);
    isnt($rc, 0, 'resume on the target, whose config is still on the source, is refused');
    is(
        $err,
        "unable to find configuration file for VM $vmid on node 'node2'\n",
        'resume without --nocheck: upstream\'s check_running text'
    ) or diag($err);

    ($rc, $out, $err) = qm('node2', 'stop', $vmid, '--skiplock', '--migratedfrom', 'node1');
    is($rc, 0, 'stop --skiplock --migratedfrom NODE (failure cleanup) succeeds') or diag($err);
    is_deeply([$lab->qemu_pids('node2')], [], 'stop --migratedfrom: the target QEMU is gone');
    is(qmpstatus('node2'), 'stopped', 'stop --migratedfrom: status stopped');
}

# ------------------------------------------------------------ unlock

{
    my ($rc, $out, $err) = qm('node2', 'unlock', $vmid);
    is($rc, 255, 'unlock on a node without the config fails');
    is(
        $err,
        "Configuration file 'nodes/node2/qemu-server/$vmid.conf' does not exist\n",
        'unlock without the config: upstream\'s load_config text'
    );
    ($rc, $out, $err) = qm('node1', 'unlock', $vmid);
    is($rc, 0, 'unlock succeeds') or diag($err);
    is(
        MTunnelLab::slurp($conf_path),
        "guest: idle\nmemory: 64\n",
        'unlock removes the lock line and keeps the rest'
    );
    ($rc, $out, $err) = qm('node1', 'unlock', $vmid);
    is($rc, 0, 'unlock without a lock is no error (as upstream)') or diag($err);
}

# ------------------------------------------------------------ mtunnel v1

{
    my $t = Proc->start($lab, 'node2', 'qm', 'mtunnel');
    is($t->read_line(30), 'tunnel online', 'mtunnel v1: greeting');
    is($t->read_line(10), 'ver 1', 'mtunnel v1: version 1');
    $t->send("bogus command\n");
    is($t->read_line(0.5), undef, 'mtunnel v1: an unknown command gets no reply');
    $t->send("resume $vmid\n");
    is(
        $t->read_line(10),
        "ERR: resume failed - VM $vmid not running",
        'mtunnel v1: resume of a stopped VM fails'
    );
    $t->send("quit\n");
    is($t->read_line(10), 'OK', 'mtunnel v1: quit -> OK');
    my ($rc, $rest, $err) = $t->finish(10);
    is($rc, 0, 'mtunnel v1: exits 0 after quit') or diag($err);
    is($rest, '', 'mtunnel v1: nothing else on stdout');
}

# ------------------------------------------------------------ qemu-server with the series

# $LAB/NODE/qemu-server-series: the node's qm behaves as with patches/qemu-server/ (0005)
{
    my $v = 120;
    my $volid = "local:$v/vm-$v-disk-0.raw";
    $lab->write_vm_config($v, memory => 64, guest => 'idle', ide0 => "$volid,size=4M");
    my @target = (
        'qm', 'start', $v, '--skiplock',
        '--migratedfrom', 'node1', '--migration_type', 'secure',
        '--stateuri', 'unix', '--targetstorage', '1'
    );
    my ($rc, $out, $err) = run_input('node2', "nbd_protocol_version: 1\n", @target);
    is($rc, 0, 'as released: a target with a local disk starts') or diag($err);
    unlike($out, qr/^mtunnel commands:/m, 'as released: no mtunnel commands line');
    like(
        qemu_cmdline('node2'),
        qr/ -pidfile \/var\/run\/qemu-server\/$v\.pid /,
        "QEMU's pid file is named as PVE names it (its vm_running_locally compares the argument)"
    );
    qm('node2', 'stop', $v, '--migratedfrom', 'node1');
    $lab->run_ok('node2', 'pvesm', 'free', $volid);

    $lab->qemu_server_series('node2', 1);
    ($rc, $out, $err) = run_input('node2', "nbd_protocol_version: 1\n", @target);
    is($rc, 0, 'with the series: the target starts') or diag($err);
    like(
        $out,
        qr/^migration listens on unix:\S+\nmtunnel commands: nbdstop postcopy-capabilities postcopy-status postcopy-pause postcopy-recover\nstorage migration listens on /,
        'with the series: qm start announces nbdstop and the post-copy commands after the listens line'
    );
    my $t = Proc->start($lab, 'node2', 'qm', 'mtunnel');
    is($t->read_line(30), 'tunnel online', 'with the series: greeting');
    is($t->read_line(10), 'ver 1', 'with the series: still version 1');
    $t->send("bogus command\n");
    is(
        $t->read_line(10),
        "ERR: unknown command 'bogus command'",
        'with the series: an unknown command is answered'
    );
    $t->send("nbdstop $v\n");
    is($t->read_line(10), 'OK', 'with the series: nbdstop stops the NBD server');
    $t->send("nbdstop $v\n");
    like(
        $t->read_line(10) // '',
        qr/^ERR: nbdstop failed - /,
        'with the series: nbdstop without an NBD server is an error'
    );
    $t->send("quit\n");
    is($t->read_line(10), 'OK', 'with the series: quit -> OK');
    ($rc, $out, $err) = $t->finish(10);
    is($rc, 0, 'with the series: mtunnel exits 0 after quit') or diag($err);
    $lab->qemu_server_series('node2', 0);
    qm('node2', 'stop', $v, '--migratedfrom', 'node1');
    $lab->run_ok('node2', 'pvesm', 'free', $volid);
}

# ------------------------------------------------------------ mtunnel --v2 (lab extension)

sub v2_call {
    my ($t, $line) = @_;
    $t->send("$line\n");
    my $reply = $t->read_line(30);
    return { raw => $reply // '(no reply)' } if !defined $reply || $reply !~ /^\{/;
    return eval { JSON::PP::decode_json($reply) } // { raw => $reply };
}

{
    # on the node whose directory holds the config (v2 loads this node's, as upstream's)
    my $t = Proc->start($lab, 'node1', 'qm', 'mtunnel', '--v2', $vmid);
    is($t->read_line(30), 'tunnel online', 'mtunnel v2: greeting');
    is($t->read_line(10), 'ver 2', 'mtunnel v2: version 2');
    my $r = v2_call($t, '{"cmd":"version"}');
    is_deeply(
        $r,
        { api => 2, age => 0, success => JSON::PP::true },
        'mtunnel v2: version -> api 2, age 0'
    );
    $r = v2_call($t, '{"cmd":"resume"}');
    ok(defined $r->{success} && !$r->{success}, 'mtunnel v2: resume of a stopped VM is no success')
        or diag(explain($r));
    like(
        $r->{msg} // '',
        qr/^failed to handle 'resume' command - VM $vmid not running\n?$/,
        'mtunnel v2: resume failure message'
    );
    $r = v2_call($t, '{"cmd":"nope"}');
    is($r->{msg}, "unknown command 'nope' given", 'mtunnel v2: unknown command');
    $r = v2_call($t, '{"foo":1}');
    is($r->{msg}, "'cmd' missing", 'mtunnel v2: a request without cmd');
    $r = v2_call($t, 'this is garbage');
    like($r->{msg} // '', qr/^failed to parse command - /, 'mtunnel v2: a line that is not JSON');
    $r = v2_call($t, '{"cmd":"lab-garbage"}');
    is($r->{raw}, 'this is not json', 'mtunnel v2: the lab-garbage hook answers a non-JSON line');
    $r = v2_call($t, '{"cmd":"quit","cleanup":"maybe"}');
    like(
        $r->{msg} // '',
        qr/^failed to handle 'quit' command - .*cleanup: type check \('boolean'\) failed/s,
        'mtunnel v2: quit with a non-boolean cleanup is refused'
    );
    $r = v2_call($t, '{"cmd":"quit","cleanup":false}');
    is_deeply($r, { success => JSON::PP::true }, 'mtunnel v2: quit succeeds');
    $r = v2_call($t, '{"cmd":"version"}');
    is(
        $r->{msg},
        "tunnel is in exit-mode, processing 'version' cmd not possible",
        'mtunnel v2: commands after quit are refused'
    );
    my ($rc, $rest, $err) = $t->finish(10);
    is($rc, 0, 'mtunnel v2: EOF after quit -> exit 0') or diag($err);
    is($rest, '', 'mtunnel v2: nothing else on stdout');
    like($err, qr/^received command 'version'$/m, 'mtunnel v2: diagnostics go to stderr');

    $t = Proc->start($lab, 'node1', 'qm', 'mtunnel', '--v2', $vmid);
    $t->read_line(30) for 1 .. 2;
    ($rc, $rest, $err) = $t->finish(10);
    isnt($rc, 0, 'mtunnel v2: EOF without quit is an error exit');
    like($err, qr/mtunnel exited unexpectedly/, 'mtunnel v2: EOF without quit is reported')
        or diag($err);
}

# ------------------------------------------------------------ storages, --targetstorage, insecure

{
    my $v = 110;
    my $cmdline = sub {
        my ($node) = @_;
        my ($c) = grep { / -name vm$v / }
            map { MTunnelLab::slurp("/proc/$_/cmdline") =~ tr/\0/ /r } $lab->qemu_pids($node);
        return $c // '';
    };
    my $volid = "local:$v/vm-$v-disk-0.raw";
    $lab->write_vm_config($v, memory => 64, guest => 'idle', ide0 => "$volid,size=4M");
    my ($rc, $out, $err) = qm('node1', 'config', $v);
    is($out, "guest: idle\nide0: $volid,size=4M\nmemory: 64\n",
        'qm config prints the config lines');
    ($rc, $out, $err) = qm('node1', 'start', $v);
    is($rc, 0, 'a VM with a disk on local storage starts') or diag($err);
    like(
        scalar($lab->run_ok('node1', 'pvesm', 'list', 'local')),
        qr/^\Q$volid\E\s+raw\s+images\s+4194304 $v$/m,
        'its volume was created on node1\'s local storage, at the configured size'
    );
    is(scalar($lab->run_ok('node2', 'pvesm', 'list', 'local')) =~ tr/\n//,
        1, 'node2 does not see node1\'s local storage');
    my $path = "$dir/local/images/$v/vm-$v-disk-0.raw";

    if ($lab->qemu_version('node1') eq '7.2') {
        like(
            $cmdline->('node1'),
            qr/-drive file=\Q$path\E,format=raw,if=ide,index=0,id=drive-ide0/,
            'QEMU 7.2 (machine pc-i440fx-7.2): QEMU opens it with -drive as drive-ide0'
        );
    } else {
        # qemu-server 9 for machine >= 10.0: throttle drive-ide0 -> raw f<hash> -> file e<hash>
        my $hash = Digest::SHA::sha256_hex("drive=ide0,volid=$volid");
        my $c = $cmdline->('node1');
        like(
            $c,
            qr/-object \{"id":"throttle-drive-ide0","limits":\{\},"qom-type":"throttle-group"\} -blockdev \{[^ ]*"driver":"throttle","file":\{[^ ]*"driver":"raw","file":\{[^ ]*"driver":"file","filename":"\Q$path\E","node-name":"e\Q${\ substr($hash, 0, 30)}\E"[^ ]*"node-name":"f\Q${\ substr($hash, 0, 30)}\E"[^ ]*"node-name":"drive-ide0"[^ ]*"throttle-group":"throttle-drive-ide0"\} -device ide-hd,bus=ide\.0,unit=0,drive=drive-ide0,id=ide0 /,
            'QEMU 10.0 (machine pc = 10.0): the disk is attached with -blockdev as qemu-server 9 does'
        ) or diag($c);
        unlike($c, qr/ -drive /, 'QEMU 10.0 (machine 10.0): no -drive');

        # a machine type pinned in the config, older than 10.0: -drive, as qemu-server 9
        my $p = 119;
        $lab->write_vm_config($p, memory => 64, guest => 'idle', machine => 'pc-i440fx-9.2');
        my ($prc, undef, $perr) = qm('node1', 'start', $p);
        is($prc, 0, 'a VM with machine: pc-i440fx-9.2 starts on QEMU 10.0') or diag($perr);
        my ($pc) = grep { / -name vm$p / }
            map { MTunnelLab::slurp("/proc/$_/cmdline") =~ tr/\0/ /r } $lab->qemu_pids('node1');
        like(
            $pc // '',
            qr/ -machine pc-i440fx-9\.2 .* -drive file=[^ ]*,format=raw,if=ide,index=0,id=drive-ide0 /,
            'machine pc-i440fx-9.2 pinned: that machine, and the disk attached with -drive'
        );
        qm('node1', 'stop', $p);
        $lab->write_vm_config($p, memory => 64, guest => 'idle', machine => 'pc-i440fx-99.0');
        ($prc, undef, $perr) = qm('node1', 'start', $p);
        isnt($prc, 0, 'a machine type this QEMU lacks: the start fails');
        like($perr, qr/unsupported machine type/, "... with QEMU's error") or diag($perr);
        $lab->remove_vm_config($p);
    }

    # a target without --targetstorage cannot have the local volume (as upstream)
    ($rc, $out, $err) = run_input('node2', "nbd_protocol_version: 1\n",
        'qm', 'start', $v, '--skiplock', '--migratedfrom', 'node1', '--migration_type', 'secure',
        '--stateuri', 'unix');
    isnt($rc, 0, 'target start without --targetstorage fails for a local disk');
    like($err, qr/^volume '\Q$volid\E' does not exist$/m, 'the missing volume is named');

    # secure + --targetstorage: a new volume, exported over the NBD UNIX socket
    ($rc, $out, $err) = run_input('node2', "nbd_protocol_version: 1\n",
        'qm', 'start', $v, '--skiplock', '--migratedfrom', 'node1', '--migration_type', 'secure',
        '--stateuri', 'unix', '--targetstorage', '1');
    is($rc, 0, 'target start with --targetstorage 1') or diag($err);
    is(
        $out,
        "migration listens on unix:/run/qemu-server/$v.migrate\n"
            . "storage migration listens on nbd:unix:/run/qemu-server/${v}_nbd.migrate:exportname=drive-ide0 volume:$volid,size=4M\n",
        'upstream\'s two lines: RAM socket, then the NBD export with the new drive string'
    );
    like(
        scalar($lab->run_ok('node2', 'pvesm', 'list', 'local')),
        qr/^\Q$volid\E\s+raw\s+images\s+4194304 $v$/m,
        'the new volume is on node2\'s local storage, same size'
    );
    qm('node2', 'stop', $v, '--migratedfrom', 'node1');
    is(
        scalar($lab->run_ok('node2', 'pvesm', 'free', $volid)),
        "Removed volume '$volid'\n",
        'pvesm free removes it'
    );

    # --targetstorage small: mapped to another storage
    ($rc, $out, $err) = run_input(
        'node2', "nbd_protocol_version: 1\n",
        'qm', 'start',
        $v, '--skiplock',
        '--migratedfrom', 'node1',
        '--migration_type', 'secure',
        '--stateuri', 'unix',
        '--targetstorage', 'local:small'
    );
    is($rc, 0, 'target start with a storage map') or diag($err);
    like(
        $out,
        qr/^storage migration listens on \S+ volume:small:$v\/vm-$v-disk-0\.raw,size=4M$/m,
        'the map sends local to small'
    );
    qm('node2', 'stop', $v, '--migratedfrom', 'node1');
    $lab->run_ok('node2', 'pvesm', 'free', "small:$v/vm-$v-disk-0.raw");

    # insecure: RAM and NBD on the address in the migration network, on ports QEMU bound itself
    ($rc, $out, $err) = run_input(
        'node2', "nbd_protocol_version: 1\n",
        'qm', 'start',
        $v, '--skiplock',
        '--migratedfrom', 'node1',
        '--migration_type', 'insecure',
        '--migration_network', '198.19.0.0/24',
        '--stateuri', 'tcp',
        '--targetstorage', '1'
    );
    is($rc, 0, 'insecure target start') or diag($err);
    my ($ram) = $out =~ /^migration listens on tcp:198\.19\.0\.2:(\d+)$/m;
    my ($nbd) = $out =~
        /^storage migration listens on nbd:198\.19\.0\.2:(\d+):exportname=drive-ide0 volume:\Q$volid\E,size=4M$/m;
    ok($ram && $nbd && $ram != $nbd,
        "insecure: RAM ($ram) and NBD ($nbd) on the migration network address")
        or diag($out);
    like(
        $cmdline->('node2'),
        qr/-incoming defer/,
        'insecure: QEMU starts with -incoming defer (the port comes after)'
    );
    my (undef, $ss) = $lab->run('node2', 'ss', '-Hltn');
    like($ss, qr/198\.19\.0\.2:$ram\b/, 'insecure: the RAM port really listens');
    like($ss, qr/198\.19\.0\.2:$nbd\b/, 'insecure: the NBD port really listens');
    qm('node2', 'stop', $v, '--migratedfrom', 'node1');
    $lab->run_ok('node2', 'pvesm', 'free', $volid);

    # a migration network without an address of this node
    ($rc, $out, $err) = run_input(
        'node2', "nbd_protocol_version: 1\n",
        'qm', 'start',
        $v, '--skiplock',
        '--migratedfrom', 'node1',
        '--migration_type', 'insecure',
        '--migration_network', '198.20.0.0/24',
        '--stateuri', 'tcp',
        '--targetstorage', '1'
    );
    isnt($rc, 0, 'insecure start with a foreign network fails');
    like(
        $err,
        qr/^could not get IP: no address configured on local node for network '198\.20\.0\.0\/24'$/m,
        'upstream\'s text'
    );
    is(scalar($lab->run_ok('node2', 'pvesm', 'list', 'local')) =~ tr/\n//,
        1, 'the failed start left no volume behind');
    is($cmdline->('node2'), '', 'the failed start left no QEMU');

    # a start that fails after allocating (the NBD server start fails): the lab frees the new
    # volume; with $LAB/NODE/qm-start-keeps-volumes it stays, as upstream's vm_start leaves it
    my @fail_after_alloc = (
        'env', 'MTUNNEL_LAB_FAIL_NBD_START=1',
        'qm', 'start', $v, '--skiplock', '--migratedfrom',
        'node1', '--migration_type', 'secure', '--stateuri', 'unix', '--targetstorage', '1'
    );
    ($rc, $out, $err) = run_input('node2', "nbd_protocol_version: 1\n", @fail_after_alloc);
    like($err, qr/^start failed: nbd-server-start failed/m, 'a start failing after its allocation');
    is(scalar($lab->run_ok('node2', 'pvesm', 'list', 'local')) =~ tr/\n//,
        1, 'the lab frees what it allocated');
    my $keep = "$dir/node2/qm-start-keeps-volumes";
    open(my $kfh, '>', $keep) or die "$keep: $!\n";
    close($kfh);
    ($rc, $out, $err) = run_input('node2', "nbd_protocol_version: 1\n", @fail_after_alloc);
    like(
        $err,
        qr/^start failed: nbd-server-start failed/m,
        'the same start with qm-start-keeps-volumes'
    );
    like(
        scalar($lab->run_ok('node2', 'pvesm', 'list', 'local')),
        qr/^\Q$volid\E\s+raw\s+images\s+4194304 $v$/m,
        'with qm-start-keeps-volumes the failed start leaves its new volume, as upstream'
    );
    unlink($keep);
    is($cmdline->('node2'), '', 'nor a QEMU');
    $lab->run_ok('node2', 'pvesm', 'free', $volid);
    $lab->run('node2', 'rm', '-f', "/run/qemu-server/$v.migrate");

    # pvesm alloc and list as real pvesm: SIZE in KiB or with M/G, exactly that name, never
    # over an existing one; list's columns as wide as the longest volid and size
    is(
        scalar($lab->run_ok('node2', 'pvesm', 'alloc', 'local', $v, "vm-$v-disk-3.raw", '2M')),
        "successfully created 'local:$v/vm-$v-disk-3.raw'\n",
        'pvesm alloc prints what real pvesm prints'
    );
    ($rc, $out, $err) = $lab->run('node2', 'pvesm', 'alloc', 'local', $v, "vm-$v-disk-3.raw", '1M');
    isnt($rc, 0, 'pvesm alloc of an existing name fails');
    like($err, qr/^disk image '.*\/vm-$v-disk-3\.raw' already exists$/m, 'with upstream\'s text');
    ($rc, $out, $err) =
        $lab->run('node2', 'pvesm', 'alloc', 'local', $v, "vm-999-disk-0.raw", '1M');
    like(
        $err,
        qr/^illegal name 'vm-999-disk-0\.raw' - should be 'vm-$v-\*'$/m,
        'pvesm alloc refuses another VM\'s name'
    );
    $lab->run_ok('node2', 'pvesm', 'alloc', 'local', $v + 1, "vm-@{[$v + 1]}-disk-0.raw", '64');
    is(
        scalar($lab->run_ok('node2', 'pvesm', 'list', 'local', '--vmid', $v)),
        "Volid                       Format  Type         Size VMID\n"
            . "local:$v/vm-$v-disk-3.raw raw     images    2097152 $v\n",
        'pvesm list --vmid: that VM only, in real pvesm\'s columns'
    );
    $lab->run_ok('node2', 'pvesm', 'free', "local:$v/vm-$v-disk-3.raw");
    $lab->run_ok('node2', 'pvesm', 'free', "local:@{[$v + 1]}/vm-@{[$v + 1]}-disk-0.raw");

    qm('node1', 'stop', $v);
    $lab->run_ok('node1', 'pvesm', 'free', $volid);
}

# ------------------------------------------------------------ qm monitor

# as upstream's (CLI/qm.pm): HMP lines through QMP human-monitor-command, driven over ssh
# without a tty as the post-copy recovery drives it. Upstream's Term::ReadLine (::Gnu on PVE)
# has no terminal there: stdin, the prompt and the echoed line on stderr, a bare prompt at EOF.
{
    my $v = 130;
    my @ssh = @{ $lab->ssh_prefix('node2') };
    my $monitor = sub { run_input('node1', $_[0], @ssh, 'qm', 'monitor', $_[1] // $v) };
    my $enter = "Entering QEMU Monitor for VM $v - type 'help' for help\n";
    $lab->write_vm_config($v, memory => 64, guest => 'idle');
    $lab->move_vm_config($v, 'node2');
    $lab->run_ok('node2', 'qm', 'start', $v);

    my ($rc, $out, $err) = $monitor->("info status\n\n  \nbogus_cmd\nquit\ninfo status\n");
    is($rc, 0, 'qm monitor over ssh exits 0 after quit') or diag($err);
    is(
        $out,
        "${enter}VM status: running\r\nunknown command: 'bogus_cmd'\r\n",
        'qm monitor: the greeting, then what QEMU answers (an unknown command is its text, not an error); nothing after quit'
    );
    is(
        $err,
        "qm> info status\nqm> \nqm>   \nqm> bogus_cmd\nqm> quit\n",
        'qm monitor without a tty: each prompt and echoed line on stderr, blank lines skipped'
    );

    ($rc, $out, $err) =
        $monitor->("migrate_recover unix:/run/qemu-server/$v.migrate-recover\ninfo status");
    is($rc, 0, 'qm monitor: EOF ends it, exit 0') or diag($err);
    like(
        $out,
        qr/\A\Q$enter\E(?!ERROR)\S.*\r\nVM status: running\r\n\z/s,
        'qm monitor: an HMP error is QEMU\'s output, then the last line without a newline runs too'
    );
    is(
        $err,
        "qm> migrate_recover unix:/run/qemu-server/$v.migrate-recover\nqm> info status\nqm> ",
        'qm monitor: at EOF the bare prompt stays'
    );

    $lab->run_ok('node2', 'qm', 'stop', $v);
    ($rc, $out, $err) = $monitor->("info status\n");
    is($rc, 0, 'qm monitor of a stopped VM still exits 0');
    is(
        $out,
        "${enter}ERROR: VM $v not running\n",
        'qm monitor of a stopped VM: each command fails with upstream\'s "ERROR: " line'
    );

    ($rc, $out, $err) = $monitor->("info status\n", $v + 1);
    is($rc, 255, 'qm monitor of a VM without config is refused');
    is(
        $err,
        "Configuration file 'nodes/node2/qemu-server/" . ($v + 1) . ".conf' does not exist\n",
        'qm monitor of a VM without config: upstream\'s load_config text'
    );
    is($out, '', 'qm monitor of a VM without config: no greeting');

    ($rc, $out, $err) = qm('node2', 'monitor');
    isnt($rc, 0, 'qm monitor without a VMID is refused');
    like($err, qr/^400 not enough arguments\nqm monitor <vmid>\n\z/, 'with the usage line')
        or diag($err);
    $lab->remove_vm_config($v);
}

# ------------------------------------------------------------ configs per node, as pmxcfs keeps them

# $LAB/pve/nodes/NODE/qemu-server/VMID.conf, moved between nodes by rename (a migration's source
# does; here the test does it): qm loads a config where upstream's qm loads it.
{
    my $v = 150;
    my $missing = sub { "Configuration file 'nodes/$_[0]/qemu-server/$v.conf' does not exist\n" };
    my $not_on = sub { "unable to find configuration file for VM $v on node '$_[0]'\n" };
    $lab->write_vm_config($v, memory => 80, guest => 'idle');
    is($lab->vm_config_node($v), 'node1', 'configs: a new VM\'s config is on node1');

    for my $cmd (qw(status config monitor)) {
        my ($rc, $out, $err) = qm('node2', $cmd, $v);
        is($rc, 255, "configs: qm $cmd on the node without the config fails");
        is($err, $missing->('node2'), "configs: qm $cmd: upstream's load_config text");
        is($out, '', "configs: qm $cmd: nothing on stdout");
    }
    my ($rc, $out, $err) = qm('node2', 'start', $v);
    is($err, $missing->('node2'), 'configs: a plain start loads this node\'s config only');

    # an incoming migration's config is on the source: --migratedfrom names that node
    my @incoming = ('--migration_type', 'secure', '--stateuri', 'unix');
    ($rc, $out, $err) = run_input('node2', "nbd_protocol_version: 1\n",
        'qm', 'start', $v, '--migratedfrom', 'node2', @incoming);
    is($err, $missing->('node2'), 'configs: start --migratedfrom loads the named node\'s config');
    is_deeply([$lab->qemu_pids('node2')], [], 'configs: no QEMU from that start');
    ($rc, $out, $err) = run_input('node2', "nbd_protocol_version: 1\n",
        'qm', 'start', $v, '--migratedfrom', 'node1', @incoming);
    is($rc, 0, 'configs: start --migratedfrom node1 on node2 starts the incoming VM')
        or diag($err);
    like(qemu_cmdline('node2'), qr/ -m 80 /, 'configs: with the source\'s config (its memory)');

    # stop --migratedfrom: the config must be on the named node (upstream's check_running)
    ($rc, $out, $err) = qm('node2', 'stop', $v, '--migratedfrom', 'node2');
    is($rc, 255, 'configs: stop --migratedfrom a node without the config is refused');
    is($err, $not_on->('node2'), 'configs: with upstream\'s check_running text');
    ($rc, $out, $err) = qm('node2', 'stop', $v);
    is($err, $not_on->('node2'), 'configs: a plain stop needs this node\'s config');
    is(qmpstatus('node2', $v), 'inmigrate', 'configs: the refused stops left the VM alone');
    $lab->move_vm_config($v, 'node2');
    ($rc, $out, $err) = qm('node2', 'stop', $v, '--migratedfrom', 'node1');
    is($err, $not_on->('node1'),
        'configs: once the config moved here, stop --migratedfrom the source is refused');
    ($rc, $out, $err) = qm('node2', 'stop', $v, '--migratedfrom', 'node2');
    is($rc, 0, 'configs: stop --migratedfrom the node that holds the config works')
        or diag($err);
    is(qmpstatus('node2', $v), 'stopped', 'configs: and the VM is gone');

    # resume --nocheck (and mtunnel's resume): the config may be on any node
    $lab->run_ok('node2', 'qm', 'start', $v);
    $lab->run_ok('node2', 'qmp', $v, 'stop');
    $lab->move_vm_config($v, 'node1');
    ($rc, $out, $err) = qm('node2', 'resume', $v);
    is($err, $not_on->('node2'), 'configs: resume without --nocheck needs this node\'s config');
    ($rc, $out, $err) = qm('node2', 'resume', $v, '--nocheck');
    is($rc, 0, 'configs: resume --nocheck finds the config on the other node') or diag($err);
    is(qmpstatus('node2', $v), 'running', 'configs: resume --nocheck continued the VM');
    $lab->run_ok('node2', 'qmp', $v, 'stop');
    my $t = Proc->start($lab, 'node2', 'qm', 'mtunnel');
    $t->read_line(30) for 1 .. 2;
    $t->send("resume $v\nquit\n");
    is($t->read_line(30), 'OK', 'configs: mtunnel\'s resume finds it there too');
    $t->finish(10);
    is(qmpstatus('node2', $v), 'running', 'configs: mtunnel\'s resume continued the VM');
    $lab->run_ok('node2', 'qmp', $v, 'stop');
    my $saved = MTunnelLab::slurp($lab->vm_config_path($v));
    $lab->remove_vm_config($v);
    ($rc, $out, $err) = qm('node2', 'resume', $v, '--nocheck');
    is($err, $missing->('node2'),
        'configs: resume --nocheck without any config: this node\'s load_config text (upstream\'s last try)'
    );
    $lab->write_vm_config($v, map { /^(\w+): (.*)$/ ? ($1 => $2) : () } split /\n/, $saved);
    qm('node2', 'stop', $v, '--migratedfrom', 'node1');
    is_deeply([$lab->qemu_pids('node2')], [], 'configs: nothing left running on node2');
    $lab->remove_vm_config($v);
}

# ------------------------------------------------------------ post-copy commands of qm mtunnel

# qemu-server with the series: the source drives the target's QEMU through the tunnel during a
# post-copy migration (the target's qm status and qm monitor need the config, still on the
# source). Replies: OK, OK <JSON> (compact, canonical, one line) or ERR: <command> failed - ....
{
    my ($in, $run, $none) = (160, 161, 169);
    my $canonical = JSON::PP->new->canonical;
    $lab->qemu_server_series('node2', 1);
    $lab->write_vm_config($in, memory => 64, guest => 'idle');
    $lab->write_vm_config($run, memory => 64, guest => 'idle');
    $lab->move_vm_config($run, 'node2');
    my @incoming = (
        'qm', 'start', $in, '--skiplock',
        '--migratedfrom', 'node1', '--migration_type', 'secure',
        '--stateuri', 'unix'
    );
    my ($rc, $out, $err) = run_input('node2', "nbd_protocol_version: 1\n", @incoming);
    is($rc, 0, 'post-copy: an incoming VM on a node with the series') or diag($err);
    is(
        $out,
        "migration listens on unix:/run/qemu-server/$in.migrate\n"
            . "mtunnel commands: nbdstop postcopy-capabilities postcopy-status postcopy-pause postcopy-recover\n",
        'post-copy: qm start announces every command on one line after the listens line'
    );
    $lab->run_ok('node2', 'qm', 'start', $run);

    my $t = Proc->start($lab, 'node2', 'qm', 'mtunnel');
    $t->read_line(30) for 1 .. 2;
    my $call = sub { $t->send("$_[0]\n"); return $t->read_line(30) // '(no reply)' };
    # the JSON of "OK <JSON>", undef if the reply is not that
    my $json_of = sub {
        my ($reply) = @_;
        return undef if $reply !~ /^OK (.+)$/;
        return eval { JSON::PP::decode_json($1) };
    };
    # QEMU's own error text for a command on a VM (through the lab's qmp)
    my $qemu_error = sub {
        my ($v, @cmd) = @_;
        my (undef, undef, $e) = $lab->run('node2', 'qmp', $v, @cmd);
        return $e =~ /^qmp: QMP command '[^']*' failed - \w+: (.*)$/ ? $1 : "(no error: $e)";
    };

    my $r = $call->("postcopy-capabilities $in");
    my $caps = $json_of->($r);
    is(ref $caps, 'ARRAY', 'postcopy-capabilities: OK and query-migrate-capabilities\' array')
        or diag($r);
    my %cap = map { $_->{capability} => $_->{state} } @{ $caps // [] };
    ok($cap{'postcopy-ram'}, 'postcopy-capabilities: postcopy-ram is true') or diag($r);
    ok(
        exists $cap{'postcopy-preempt'} && !$cap{'postcopy-preempt'},
        'postcopy-capabilities: postcopy-preempt stays off unless asked for'
    );
    ok($cap{xbzrle} && $cap{'auto-converge'},
        'postcopy-capabilities: the capabilities qm start set stay as they were');
    is(
        $r,
        'OK ' . $canonical->encode($caps // []),
        'postcopy-capabilities: compact canonical JSON on the one line'
    );
    $r = $call->("postcopy-capabilities $in postcopy-preempt");

    if ($lab->qemu_version('node2') eq '7.2') {
        %cap = map { $_->{capability} => $_->{state} } @{ $json_of->($r) // [] };
        ok($cap{'postcopy-ram'} && $cap{'postcopy-preempt'},
            'postcopy-capabilities VMID postcopy-preempt: both true (QEMU 7.2)')
            or diag($r);
    } else {
        # QEMU 8.1 and later refuse it on a target whose incoming migration already listens
        # (-incoming unix:): the driver goes on without it (t/27, docs/postcopy.md)
        like(
            $r,
            qr/^ERR: postcopy-capabilities failed - .*Postcopy preempt must be set before incoming starts/,
            'postcopy-capabilities VMID postcopy-preempt: QEMU 10.0 refuses it on a listening target, and ERR says so'
        );
    }

    my $st = $json_of->($call->("postcopy-status $in"));
    is($st->{status}, 'running', 'postcopy-status of the incoming VM: its QEMU runs');
    is($st->{qmpstatus}, 'inmigrate', 'postcopy-status: query-status\' status');
    is(ref $st->{migration}, 'HASH', 'postcopy-status: query-migrate\'s object')
        or diag(explain($st));
    $r = $call->("postcopy-status $run");
    is_deeply(
        $json_of->($r),
        { status => 'running', qmpstatus => 'running', migration => {} },
        'postcopy-status of a running VM without a migration: migration is {}'
    ) or diag($r);
    is(
        $call->("postcopy-status $none"),
        'OK {"status":"stopped"}',
        'postcopy-status of a VM without a QEMU here: stopped'
    );
    is(
        $call->("postcopy-capabilities $none"),
        "ERR: postcopy-capabilities failed - VM $none not running",
        'postcopy-capabilities of a VM without a QEMU here: not running'
    );

    is(
        $call->("postcopy-pause $run"),
        "ERR: postcopy-pause failed - VM $run qmp command 'migrate-pause' failed - "
            . $qemu_error->($run, 'migrate-pause'),
        'postcopy-pause without a migration: QEMU\'s error, as mon_cmd dies with it'
    );
    my $path = "/run/qemu-server/${in}_recover1.migrate";
    is(
        $call->("postcopy-recover $in $path"),
        "ERR: postcopy-recover failed - VM $in qmp command 'migrate-recover' failed - "
            . $qemu_error->($run, 'migrate-recover', qq({"uri":"unix:$path"})),
        'postcopy-recover of a VM not in postcopy-paused: QEMU\'s error'
    );
    like(
        $call->("postcopy-recover $in /run/qemu-server/${in}_recover1234567890.migrate"),
        qr/^ERR: postcopy-recover failed - VM $in qmp command 'migrate-recover' failed - /,
        'postcopy-recover: N of 10 digits is a valid path (QEMU refuses, not the check)'
    );

    for my $bad (
        ["/run/qemu-server/${run}_recover1.migrate", 'another VMID'],
        ["/run/qemu-server/${in}_recover01.migrate", 'N with a leading zero'],
        ["/run/qemu-server/${in}_recover12345678901.migrate", 'N of 11 digits'],
        ["/run/qemu-server/${in}_recover.migrate", 'no N'],
        ["/tmp/${in}_recover1.migrate", 'another directory'],
        ["/run/qemu-server/../qemu-server/${in}_recover1.migrate", 'a ".."'],
        ["unix:/run/qemu-server/${in}_recover1.migrate", 'a URI, not a path'],
        )
    {
        is(
            $call->("postcopy-recover $in $bad->[0]"),
            "ERR: postcopy-recover failed - invalid recovery socket '$bad->[0]'",
            "postcopy-recover refuses $bad->[1]"
        );
    }
    is(qmpstatus('node2', $in), 'inmigrate', 'post-copy: the incoming VM is still waiting');

    for my $line (
        'postcopy-status',
        "postcopy-status $in extra",
        "postcopy-capabilities $in preempt",
        "postcopy-pause $in $in",
        "postcopy-recover $in",
        "postcopy-recover $in /run/qemu-server/${in}_recover1.migrate x",
        "postcopy-status vm$in",
        )
    {
        is($call->($line), "ERR: unknown command '$line'", "a malformed line: '$line'");
    }
    $t->send("quit\n");
    is($t->read_line(10), 'OK', 'post-copy: quit -> OK');
    ($rc, $out, $err) = $t->finish(10);
    is($rc, 0, 'post-copy: mtunnel exits 0') or diag($err);

    # qemu-server as released: neither announced nor answered
    $lab->qemu_server_series('node2', 0);
    qm('node2', 'stop', $in, '--migratedfrom', 'node1');
    ($rc, $out, $err) = run_input('node2', "nbd_protocol_version: 1\n", @incoming);
    is(
        $out,
        "migration listens on unix:/run/qemu-server/$in.migrate\n",
        'as released: no mtunnel commands line'
    );
    $t = Proc->start($lab, 'node2', 'qm', 'mtunnel');
    $t->read_line(30) for 1 .. 2;
    $t->send("postcopy-status $run\n");
    is($t->read_line(1), undef, 'as released: postcopy-status gets no reply');
    $t->send("quit\n");
    is($t->read_line(10), 'OK', 'as released: the tunnel still answers quit');
    $t->finish(10);

    qm('node2', 'stop', $in, '--migratedfrom', 'node1');
    $lab->run_ok('node2', 'qm', 'stop', $run);
    is_deeply([$lab->qemu_pids('node2')], [], 'post-copy: nothing left running on node2');
    $lab->remove_vm_config($_) for $in, $run;
}

# ------------------------------------------------------------ teardown

$lab->down;
my @mounted = grep { (split / /)[4] =~ /^\Q$dir\E(\/|$)/ } split /\n/,
    MTunnelLab::slurp('/proc/self/mountinfo');
is_deeply(\@mounted, [], 'lab down leaves nothing of the lab mounted');
ok(!-e '/usr/sbin/qm' || MTunnelLab::slurp('/usr/sbin/qm') !~ /MTUNNEL_LAB/,
    "no lab qm on the host's /usr/sbin after down");
is_deeply([MTunnelLab::zombies_since($^T)], [], 'no zombie left by this test');
done_testing();
