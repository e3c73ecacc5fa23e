package ScriptedQMP;

# Test helper: a scripted QMP monitor on a UNIX socket, for what a real QEMU does not do on
# purpose (garbage, silence, huge lines) or cannot do here (Proxmox's QEMU and its own fields
# in query-machines). A forked child listens on PATH; stop() (or DESTROY) ends it.
#
#   use ScriptedQMP;
#   # one connection, the script talks (gets the connected socket)
#   my $mon = ScriptedQMP->script($path, sub { my ($c) = @_; print $c $ScriptedQMP::GREETING; ... });
#   # a monitor: greeting, qmp_capabilities, then each command answered from the table (a
#   # value is the "return", a code ref gets the arguments and returns it); unknown commands
#   # get QEMU's CommandNotFound error; any number of connections, one at a time, as QEMU
#   my $mon = ScriptedQMP->monitor($path, { 'query-status' => { status => 'running' } });
#   $mon->received;    # the commands it was asked, in order: ['qmp_capabilities', ...]
#   $mon->received_args;   # the same with their arguments: [['migrate', {uri => ...}], ...]
#   # a code ref may answer with QEMU's error instead of a return value:
#   sub { return ScriptedQMP::error('GenericError', 'migrate-pause is currently only ...') }
#   $mon->stop;
#
# Core Perl modules only.

use strict;
use warnings;

use IO::Socket::UNIX;
use JSON::PP ();
use POSIX ();
use Time::HiRes qw(sleep);

our $GREETING =
    qq({"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 9}, "package": ""}, "capabilities": []}}\r\n);

my $JSON = JSON::PP->new->canonical;

sub _listen {
    my ($path) = @_;
    unlink($path) if -S $path;
    my $l = IO::Socket::UNIX->new(Local => $path, Listen => 5) or die "listen on $path: $!\n";
    return $l;
}

# ScriptedQMP->script($path, $code): the first connection is handed to $code; the child
# lingers 0.5 s after it returns, so that what it wrote is read before the socket closes.
sub script {
    my ($class, $path, $code) = @_;
    my $l = _listen($path);
    my $pid = fork() // die "fork: $!\n";
    if (!$pid) {
        my $c = $l->accept;
        $code->($c);
        sleep(0.5);
        POSIX::_exit(0);
    }
    close($l);
    return bless { pid => $pid, path => $path, owner => $$ }, $class;
}

# ScriptedQMP->monitor($path, \%replies): answers as QEMU's monitor does, the commands it
# was asked appended to PATH.log (one line each).
sub monitor {
    my ($class, $path, $replies) = @_;
    my $l = _listen($path);
    my $log = "$path.log";
    unlink($log, "$log.args");
    open(my $lfh, '>>', $log) or die "$log: $!\n";
    $lfh->autoflush(1);
    open(my $afh, '>>', "$log.args") or die "$log.args: $!\n";
    $afh->autoflush(1);
    my $pid = fork() // die "fork: $!\n";

    if (!$pid) {
        # a client that gave up on a slow reply closed its end: QEMU lives on, and so do we
        $SIG{PIPE} = 'IGNORE';
        while (my $c = $l->accept) {
            $c->autoflush(1);
            print $c $GREETING;
            while (my $line = <$c>) {
                my $cmd = eval { $JSON->decode($line) };
                if (!$cmd || ref $cmd ne 'HASH' || !defined $cmd->{execute}) {
                    print $c $JSON->encode(
                        {
                            error => {
                                class => 'GenericError',
                                desc => 'QMP input must be a JSON object'
                            }
                        }
                        ),
                        "\r\n";
                    next;
                }
                my $name = $cmd->{execute};
                print $lfh "$name\n";
                print $afh $JSON->encode([$name, $cmd->{arguments} // {}]), "\n";
                my %reply;
                $reply{id} = $cmd->{id} if exists $cmd->{id};
                if ($name eq 'qmp_capabilities') {
                    $reply{return} = {};
                } elsif (exists $replies->{$name}) {
                    my $r = $replies->{$name};
                    $r = $r->($cmd->{arguments}) if ref $r eq 'CODE';
                    if (ref $r eq 'ScriptedQMP::Error') {
                        $reply{error} = {%$r};
                    } else {
                        $reply{return} = $r;
                    }
                } else {
                    $reply{error} = {
                        class => 'CommandNotFound',
                        desc => "The command $name has not been found"
                    };
                }
                print $c $JSON->encode(\%reply), "\r\n";
            }
            close($c);
        }
        POSIX::_exit(0);
    }
    close($l);
    close($lfh);
    return bless { pid => $pid, path => $path, log => $log, owner => $$ }, $class;
}

# QEMU's error reply, for a code ref of monitor() to answer with
sub error {
    my ($class, $desc) = @_;
    return bless { class => $class, desc => $desc }, 'ScriptedQMP::Error';
}

# the commands a monitor was asked with their arguments, in order: [[name, {args}], ...]
sub received_args {
    my ($self) = @_;
    open(my $fh, '<', "$self->{log}.args") or return [];
    my @cmds = map { $JSON->decode($_) } <$fh>;
    close($fh);
    return \@cmds;
}

sub pid { $_[0]->{pid} }
sub path { $_[0]->{path} }

# the commands a monitor was asked, in order
sub received {
    my ($self) = @_;
    open(my $fh, '<', $self->{log}) or return [];
    chomp(my @cmds = <$fh>);
    close($fh);
    return \@cmds;
}

# waits for a script to end by itself
sub wait {
    my ($self) = @_;
    return if !$self->{pid};
    waitpid($self->{pid}, 0);
    delete $self->{pid};
}

sub stop {
    my ($self) = @_;
    # a forked child of the test never ends its parent's monitor
    return if !$self->{pid} || $self->{owner} != $$;
    kill('KILL', $self->{pid});
    waitpid($self->{pid}, 0);
    delete $self->{pid};
    unlink($self->{path}) if -S $self->{path};
    unlink($self->{log}, "$self->{log}.args") if $self->{log};
}

sub DESTROY {
    my ($self) = @_;
    local ($@, $!, $?);
    $self->stop;
}

# the "id" of the next command the client sends, as JSON text (to be put back in a reply)
sub reply_id {
    my ($c) = @_;
    my $line = <$c> // return;
    my ($id) = $line =~ /"id":\s*("[^"]*")/;
    return $id;
}

1;
