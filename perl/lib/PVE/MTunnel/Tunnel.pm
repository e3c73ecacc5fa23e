package PVE::MTunnel::Tunnel;

# The ssh half of pve-guest-common's PVE::Tunnel, on libmtunnel: same functions, arguments,
# return values and die texts, so QemuMigrate.pm switches by changing which package it calls.
# The ssh child, its readiness, deadlines and cleanup are the library's (see the POD).

use strict;
use warnings;

use JSON::PP ();

use PVE::MTunnel;

my $json = JSON::PP->new->canonical;

# Upstream's stages: 30 s for the reply to 'quit', 30 s for ssh to exit, then TERM and KILL.
my $QUIT_TIMEOUT_MS = 30_000;
my $EXIT_TIMEOUT_MS = 30_000;

# `use PVE::MTunnel::Tunnel ':pve-tunnel';` — the one-line switch, process-wide: PVE::Tunnel's
# ssh functions run here, for every caller in the process; a tunnel this package did not open
# (a websocket tunnel) still goes to upstream's. The scoped way is to call this package's
# functions by name: they pass foreign tunnels to upstream's themselves.
sub import {
    my ($class, @tags) = @_;
    for my $tag (@tags) {
        die "PVE::MTunnel::Tunnel: unknown import '$tag' (known: ':pve-tunnel')\n"
            if $tag ne ':pve-tunnel';
        _take_over_pve_tunnel();
    }
}

# PVE::Tunnel's own functions, once ':pve-tunnel' replaced them there.
my %upstream;

sub _require_pve_tunnel {
    eval { require PVE::Tunnel; 1 }
        or die "PVE::MTunnel::Tunnel: PVE::Tunnel (pve-guest-common) cannot be loaded: $@";
}

sub _take_over_pve_tunnel {
    return if %upstream;
    _require_pve_tunnel();
    no strict 'refs';
    no warnings 'redefine';
    for my $name (qw(fork_ssh_tunnel read_tunnel write_tunnel finish_tunnel)) {
        my $ours = \&{"PVE::MTunnel::Tunnel::$name"};
        $upstream{$name} = \&{"PVE::Tunnel::$name"};
        *{"PVE::Tunnel::$name"} = $name eq 'fork_ssh_tunnel' ? $ours : sub {
            my ($tunnel) = @_;
            goto &$ours if _ours($tunnel);
            goto &{ $upstream{$name} };
        };
    }
    return;
}

# Whether $tunnel was opened by this package's fork_ssh_tunnel.
sub _ours {
    my ($tunnel) = @_;
    return ref($tunnel) eq 'HASH' && $tunnel->{mtunnel};
}

# Upstream's PVE::Tunnel::$name (loaded on first need): where a tunnel this package did not
# open goes.
sub _upstream {
    my ($name) = @_;
    return $upstream{$name} if $upstream{$name};
    _require_pve_tunnel();
    no strict 'refs';
    return \&{"PVE::Tunnel::$name"};
}

sub _mtunnel {
    my ($tunnel) = @_;
    my $t = ref($tunnel) eq 'HASH' ? $tunnel->{mtunnel} : undef;
    die "not a tunnel opened by PVE::MTunnel::Tunnel::fork_ssh_tunnel\n" if !$t;
    return $t;
}

sub _error_is {
    my ($name) = @_;
    return $PVE::MTunnel::last_error_code == $PVE::MTunnel::ERROR_CODE{$name};
}

sub fork_ssh_tunnel {
    my ($rem_ssh, $cmd, $ssh_forward_info, $log) = @_;

    $log //= sub { };
    die "can't open tunnel - ssh_forward_info must be an array reference of 'LOCAL:REMOTE'"
        . " socket pairs or 'PORT:localhost:PORT' TCP forwards, not '$ssh_forward_info'\n"
        if defined($ssh_forward_info) && ref($ssh_forward_info) ne 'ARRAY';
    # The library's lines come without "\n"; upstream's callers get them with one.
    my $relay = sub {
        my ($level, $msg) = @_;
        $log->($level, "$msg\n") if $level ne 'debug';
    };
    my $t = eval {
        PVE::MTunnel->open(
            ssh => $rem_ssh,
            command => $cmd,
            forwards => [@{ $ssh_forward_info // [] }],
            log => $relay,
        );
    };
    die "can't open tunnel - $@" if $@;

    # Greeting, version and every forward listening: QemuMigrate.pm's -S poll passes at once.
    eval { $t->wait_ready() };
    if (my $err = $@) {
        eval { $t->close(quit_timeout_ms => 5000, exit_timeout_ms => 2000) };
        $log->('warn', "closing the failed tunnel: $@") if $@;
        die "can't open tunnel - $err";
    }

    my $status = $t->status();
    return {
        pid => $status->{pid},
        version => $status->{version},
        rem_ssh => $rem_ssh,
        log => $log,
        mtunnel => $t,
    };
}

sub read_tunnel {
    my ($tunnel, $timeout) = @_;

    # a websocket tunnel, or any this package did not open: upstream's
    goto &{ _upstream('read_tunnel') } if !_ours($tunnel);

    $timeout = 60 if !defined($timeout);
    my $line = eval { _mtunnel($tunnel)->read_line(timeout_ms => int($timeout * 1000)) };
    if (my $err = $@) {
        # End of stream reads as undef, as from upstream's pipe.
        return undef if _error_is('ssh_exited');
        die "reading from tunnel failed: $err";
    }
    return $line;
}

sub write_tunnel {
    my ($tunnel, $timeout, $command, $params) = @_;

    # a websocket tunnel, or any this package did not open: upstream's
    goto &{ _upstream('write_tunnel') } if !_ours($tunnel);

    $timeout = 60 if !defined($timeout);
    my $t = _mtunnel($tunnel);
    my $version = $tunnel->{version} // 0;

    if ($version >= 2) {
        my $object = defined($params) ? {%$params} : {};
        $object->{cmd} = $command;
        $command = eval { $json->encode($object) };
        die "failed to encode command as JSON - $@\n" if $@;
    }

    my $reply = eval { $t->command($command, timeout_ms => int($timeout * 1000)) };
    if (my $err = $@) {
        # The library's texts are upstream's: "tunnel replied '…' to command '…'", "failed to
        # decode tunnel reply '…' (command '…') - …", "error - tunnel command '…' failed - …".
        die $err if _error_is('remote') || _error_is('protocol');
        die "writing to tunnel failed: $err"
            if _error_is('closed') || _error_is('invalid_argument');
        die "no reply to command '$command': $err";
    }
    return if $version < 2;
    return $json->decode($reply);
}

sub finish_tunnel {
    my ($tunnel, $cleanup) = @_;

    # a websocket tunnel, or any this package did not open: upstream's
    goto &{ _upstream('finish_tunnel') } if !_ours($tunnel);

    my $t = _mtunnel($tunnel);
    # Set by the caller after fork_ssh_tunnel (QemuMigrate.pm: after its -S poll). Removed on
    # both nodes with the forwards, and only if they are sockets.
    my $sockets = $tunnel->{unix_sockets} // [];
    $t->close(
        cleanup => $cleanup ? 1 : 0,
        cleanup_sockets => [@$sockets],
        quit_timeout_ms => $QUIT_TIMEOUT_MS,
        exit_timeout_ms => $EXIT_TIMEOUT_MS,
    );
    return;
}

1;

__END__

=encoding utf8

=head1 NAME

PVE::MTunnel::Tunnel - drop-in for the ssh half of PVE::Tunnel, on libmtunnel

=head1 SYNOPSIS

  use PVE::MTunnel::Tunnel;

  my $tunnel = PVE::MTunnel::Tunnel::fork_ssh_tunnel(
      $self->{rem_ssh}, ['/usr/sbin/qm', 'mtunnel'], ["$sock:$sock"], sub { $self->log(@_) });
  $tunnel->{unix_sockets} = [$sock];
  PVE::MTunnel::Tunnel::write_tunnel($tunnel, 30, "resume $vmid");
  PVE::MTunnel::Tunnel::finish_tunnel($tunnel);

=head1 DESCRIPTION

The functions of pve-guest-common's C<PVE::Tunnel> that QemuMigrate.pm calls for an ssh
tunnel, with the same names, arguments, return values and error texts. In QemuMigrate.pm,
C<PVE::Tunnel::fork_ssh_tunnel> and friends become C<PVE::MTunnel::Tunnel::…>; the control
flow stays as it is. See F<docs/qemu-server.md> for the switch and what it gains.

All timeouts are seconds, as upstream's, but kept by the library with monotonic deadlines
instead of C<alarm>: a host's own C<alarm> or signal handlers cannot cut them short or
extend them, and no C<SIGALRM> handler is installed.

=head2 The scoped way (recommended): call this package by name

In QemuMigrate.pm, call C<PVE::MTunnel::Tunnel::fork_ssh_tunnel>, C<read_tunnel>,
C<write_tunnel> and C<finish_tunnel> where it calls C<PVE::Tunnel::…> for its tunnel. Only
that caller changes: C<PVE::Tunnel> stays as it is for everyone else in the process
(pve-container's migration, other plugins). C<read_tunnel>, C<write_tunnel> and
C<finish_tunnel> hand a tunnel this package did not open (a websocket tunnel of a remote
migration, any hash without C<mtunnel>) to C<PVE::Tunnel>'s own functions, with the same
arguments, and return what they return; C<PVE::Tunnel> is loaded (C<require>) only then. So
the calls can be renamed wherever a tunnel arrives, websocket or ssh:

  my $tunnel = PVE::MTunnel::Tunnel::fork_ssh_tunnel($rem_ssh, $cmd, $forwards, $log);
  PVE::MTunnel::Tunnel::write_tunnel($self->{tunnel}, 30, "resume $vmid");   # ssh or websocket
  PVE::MTunnel::Tunnel::finish_tunnel($self->{tunnel});

=head2 The one-line switch: C<:pve-tunnel> (process-wide)

  use PVE::MTunnel::Tunnel ':pve-tunnel';

after C<use PVE::Tunnel;> redefines C<PVE::Tunnel::fork_ssh_tunnel>, C<read_tunnel>,
C<write_tunnel> and C<finish_tunnel> in the whole process, for every caller (pve-container's
calls too), from the moment it is imported until the process ends: C<PVE::Tunnel::fork_ssh_tunnel>
then opens tunnels through the library, and the other three handle them here; a tunnel this
package did not open is passed on to upstream's functions unchanged. It is kept as a contract,
but prefer the scoped way above: it changes nothing outside its caller.

Without C<PVE::Tunnel> (pve-guest-common) installed, C<:pve-tunnel> dies at import, and a
foreign tunnel given to this package's functions dies C<PVE::MTunnel::Tunnel: PVE::Tunnel
(pve-guest-common) cannot be loaded: …>; the package's own tunnels do not need it.

=head1 FUNCTIONS

=head2 fork_ssh_tunnel($rem_ssh, $cmd, $ssh_forward_info, $log)

Starts C<@$rem_ssh -o ExitOnForwardFailure=yes -L LOCAL:REMOTE … @$cmd> and returns when the
tunnel is ready: C<tunnel online> (60 s) and C<ver N> (10 s) read, and every local socket a
listening socket held by this very ssh (never probed by connecting). C<$ssh_forward_info> is a
list of C<"LOCAL:REMOTE"> UNIX socket pairs or single paths, or of TCP forwards to the
target's loopback, C<"LPORT:localhost:PORT"> (QemuMigrate.pm's legacy path for a target that
answers C<tcp:localhost:PORT>), which listen on this node's loopback only and are ready once
this ssh holds LPORT and no other process listens there (else C<can't open tunnel - forward
LPORT:localhost:PORT: another process listens on ADDR:LPORT too ...>); may be empty or undef
(a command-only tunnel). Any other spec dies C<can't open tunnel - unsupported forward '...'>.
A stale
socket at a local path is removed first; anything else there is refused and kept.
C<$cmd> words are shell-quoted for the remote shell. C<$log> gets C<($level, "msg\n")>.

Returns a hash with C<version>, C<pid> (ssh), C<rem_ssh>, C<log> and the library handle
C<mtunnel>; there are no C<reader>/C<writer> file handles. Dies
C<can't open tunnel - no quorum on target node>,
C<can't open tunnel - got strange reply from tunnel ('…')>,
C<can't open tunnel - failed to receive tunnel version string (…)>,
C<can't open tunnel - received invalid tunnel version string '…'>, or
C<can't open tunnel - ssh to … exit code N while waiting for 'tunnel online'; stderr: …>,
always after stopping and reaping ssh and removing the local sockets.

=head2 read_tunnel($tunnel, $timeout)

A tunnel not opened by C<fork_ssh_tunnel> here goes to C<PVE::Tunnel::read_tunnel> (so do
those of C<write_tunnel> and C<finish_tunnel> to upstream's of the same name). Reads one line (default timeout 60 s) and returns it without its newline, or C<undef> at the
end of the stream. Dies C<reading from tunnel failed: …> on timeout.

=head2 write_tunnel($tunnel, $timeout, $command, $params)

Protocol v1: sends C<$command> and returns nothing if the reply is C<OK>, else dies
C<tunnel replied '…' to command '…'>. Protocol v2: sends C<{cmd =E<gt> $command, %$params}>
as JSON and returns the decoded reply if its C<success> is true, else dies
C<error - tunnel command '…' failed - MSG>, or C<failed to decode tunnel reply '…' (command
'…') - …> for a reply that is not JSON. Without a reply within C<$timeout> seconds (default
60) it dies C<no reply to command '…': …>, naming the command; ssh's exit is reported the
same way, with its stderr.

=head2 finish_tunnel($tunnel, $cleanup)

Sends C<quit> (v2: with C<cleanup>) and waits 30 s for the reply, closes ssh's input, waits
30 s for it to exit, then SIGTERM and SIGKILL, and reaps it. Then removes the forwarded
sockets and the paths in C<< $tunnel->{unix_sockets} >> on this node and on the target. Only
sockets are removed: a regular file, directory or symlink at such a path is kept and named in
the error, as is a path outside F</run/qemu-server/VMID[_nbd].migrate>. Everything is done
even when a stage fails; then it dies with the first failure. Calling it again does nothing.

=head1 DIFFERENCES FROM PVE::Tunnel

Deadlines instead of C<alarm>; a forward that is not proven listening is an error (upstream
left that to the caller's C<-S> poll, which a stale file from a crashed run passes); sockets
are removed only if they are sockets, and the forwards are removed even when the caller never
set C<unix_sockets>; a TCP forward listens on loopback only and must be ours alone, and
goes to the target's loopback only; ssh's stderr tail is part of every error; the
websocket functions (C<fork_websocket_tunnel>, C<forward_unix_socket>) are not provided.

=cut
