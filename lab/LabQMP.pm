package LabQMP;

# Tiny QMP client for the lab's stand-ins (lab/qm, lab/guest-check, lab/qmp).
# Core modules only. One connection per call (QMP allows one client per
# monitor socket): connect, read greeting, qmp_capabilities, execute, close.
# Every read has a deadline; asynchronous {"event":...} lines are skipped.
#
#   my $ret = LabQMP::cmd('/run/qemu-server/100.qmp', 'query-status');
#   LabQMP::cmd($sock, 'migrate', { uri => 'unix:/run/...' }, timeout => 10);
#   my $q = LabQMP->connect($sock); $q->execute(...); $q->execute(...); $q->close;
#   LabQMP->connect($sock, retry => 1, pid => $qemu_pid): retries a missing or refusing socket
#   until the timeout, but not once that QEMU is gone
#
# Errors die with a one-line message ending in "\n".

use strict;
use warnings;

use IO::Socket::UNIX;
use IO::Select;
use JSON::PP;
use Socket qw(SOCK_STREAM);
use Time::HiRes qw(time sleep);
use Errno qw(EINTR EAGAIN ENOENT ECONNREFUSED);

my $json = JSON::PP->new->canonical->allow_nonref;

sub connect {
    my ($class, $path, %opt) = @_;
    my $timeout = $opt{timeout} // 5;
    my $deadline = time + $timeout;
    my $sock;
    while (1) {
        $sock = IO::Socket::UNIX->new(Type => SOCK_STREAM, Peer => $path);
        last if $sock;
        my $errno = $! + 0;
        my $err = "$!";
        # QEMU may still be creating its monitor socket right after start (not if it died)
        if (   ($errno == ENOENT || $errno == ECONNREFUSED)
            && $opt{retry}
            && time < $deadline
            && (!$opt{pid} || pid_alive($opt{pid})))
        {
            sleep 0.05;
            next;
        }
        die "QMP connect $path: $err\n";
    }
    $sock->blocking(0);
    my $self = bless {
        sock => $sock,
        path => $path,
        buf => '',
        id => 0,
        timeout => $timeout
    }, $class;
    my $greeting = $self->_read_msg(time + $timeout);
    die "QMP $path: no greeting\n" if !$greeting || !$greeting->{QMP};
    $self->execute('qmp_capabilities');
    return $self;
}

# the pid in a pid file (QEMU's -pidfile), undef if there is none
sub read_pidfile {
    my ($path) = @_;
    open(my $fh, '<', $path) or return undef;
    my $pid = <$fh>;
    close $fh;
    return undef if !defined $pid || $pid !~ /^\s*([0-9]+)\s*$/;
    return $1;
}

# alive and not a zombie (a daemonized QEMU is not our child)
sub pid_alive {
    my ($pid) = @_;
    return 0 if !kill(0, $pid);
    open(my $fh, '<', "/proc/$pid/stat") or return 0;
    my $stat = <$fh> // '';
    close $fh;
    return 0 if $stat =~ /^\d+ \(.*\) ([ZX]) /s;
    return 1;
}

sub _read_line {
    my ($self, $deadline) = @_;
    my $sel = IO::Select->new($self->{sock});
    while (1) {
        if ((my $i = index($self->{buf}, "\n")) >= 0) {
            my $line = substr($self->{buf}, 0, $i + 1, '');
            $line =~ s/\r?\n\z//;
            return $line;
        }
        my $left = $deadline - time;
        die "QMP $self->{path}: timeout waiting for reply\n" if $left <= 0;
        next if !$sel->can_read($left);
        my $n = sysread($self->{sock}, $self->{buf}, 65536, length $self->{buf});
        if (!defined $n) {
            next if $!{EINTR} || $!{EAGAIN};
            die "QMP $self->{path}: read: $!\n";
        }
        die "QMP $self->{path}: connection closed\n" if $n == 0;
    }
}

sub _read_msg {
    my ($self, $deadline) = @_;
    while (1) {
        my $line = $self->_read_line($deadline);
        next if $line !~ /\S/;
        my $msg = eval { $json->decode($line) };
        die "QMP $self->{path}: bad JSON: $line\n" if !$msg || ref $msg ne 'HASH';
        return $msg;
    }
}

sub _write_all {
    my ($self, $data, $deadline) = @_;
    my $sel = IO::Select->new($self->{sock});
    local $SIG{PIPE} = 'IGNORE';
    while (length $data) {
        my $left = $deadline - time;
        die "QMP $self->{path}: timeout writing\n" if $left <= 0;
        next if !$sel->can_write($left);
        my $n = syswrite($self->{sock}, $data);
        if (!defined $n) {
            next if $!{EINTR} || $!{EAGAIN};
            die "QMP $self->{path}: write: $!\n";
        }
        substr($data, 0, $n, '');
    }
}

# execute(NAME, ARGS-HASHREF, timeout => S) -> the "return" value
sub execute {
    my ($self, $name, $args, %opt) = @_;
    my $deadline = time + ($opt{timeout} // $self->{timeout});
    my $id = 'lab-' . ++$self->{id};
    my $req = { execute => $name, id => $id };
    $req->{arguments} = $args if $args && %$args;
    $self->_write_all($json->encode($req) . "\n", $deadline);
    while (1) {
        my $msg = $self->_read_msg($deadline);
        next if exists $msg->{event};
        next if !defined $msg->{id} || $msg->{id} ne $id;
        if (my $e = $msg->{error}) {
            my $desc = $e->{desc} // 'unknown error';
            $desc =~ s/\s*\n\s*/ /g;
            die "QMP command '$name' failed - $e->{class}: $desc\n";
        }
        return $msg->{return};
    }
}

sub close {
    my ($self) = @_;
    close($self->{sock}) if $self->{sock};
    delete $self->{sock};
}

sub DESTROY { $_[0]->close }

# One-shot: connect, execute, close.
sub cmd {
    my ($path, $name, $args, %opt) = @_;
    my $q = LabQMP->connect($path, %opt);
    my $ret = $q->execute($name, $args, %opt);
    $q->close;
    return $ret;
}

sub encode { $json->encode($_[0]) }
sub decode { $json->decode($_[0]) }

1;
