package PVE::MTunnel;

# Thin FFI::Platypus binding of libmtunnel: converts Perl values to the library's JSON options
# and back, and turns result codes into "...\n" errors. The work happens in Rust.

use strict;
use warnings;

use Cwd ();
use File::Basename ();
use FFI::Platypus 2.00;
use JSON::PP ();

our $VERSION = '0.1.0';

# Result code of the last failed call (see MTUNNEL_ERR_* in include/mtunnel.h).
our $last_error_code = 0;

our %ERROR_CODE = (
    invalid_argument => 1, timeout => 2, ssh_exited => 3, protocol => 4, no_quorum => 5,
    remote => 6, qmp => 7, io => 8, closed => 9, panic => 10,
);
my %LEVEL_NAME = (1 => 'err', 2 => 'warn', 3 => 'info', 4 => 'debug');

sub library_path {
    return $ENV{MTUNNEL_LIB} if $ENV{MTUNNEL_LIB};
    my $top = Cwd::abs_path(File::Basename::dirname(__FILE__) . '/../../..');
    for my $profile (qw(release debug)) {
	my $so = "$top/target/$profile/libmtunnel.so";
	return $so if -f $so;
    }
    return 'libmtunnel.so';
}

my $json = JSON::PP->new->canonical->allow_nonref;
my $ffi = FFI::Platypus->new(api => 2, lib => [library_path()]);
$ffi->type('(opaque,int,string)->void' => 'mtunnel_log_fn');

$ffi->attach(mtunnel_last_error => [] => 'string');
$ffi->attach(mtunnel_string_free => ['opaque'] => 'void');
$ffi->attach([tunnel_open => '_tunnel_open'] => ['string', 'mtunnel_log_fn', 'opaque', 'opaque*'] => 'int');
$ffi->attach([tunnel_wait_ready => '_tunnel_wait_ready'] => ['opaque', 'sint64'] => 'int');
$ffi->attach([tunnel_command => '_tunnel_command'] => ['opaque', 'string', 'sint64', 'opaque*'] => 'int');
$ffi->attach([tunnel_close => '_tunnel_close'] => ['opaque', 'string'] => 'int');
$ffi->attach([tunnel_status => '_tunnel_status'] => ['opaque', 'opaque*'] => 'int');
$ffi->attach([tunnel_free => '_tunnel_free'] => ['opaque'] => 'void');
$ffi->attach([qmp_migrate => '_qmp_migrate'] => ['string', 'string', 'string'] => 'int');
$ffi->attach([qmp_query_migrate => '_qmp_query_migrate'] => ['string', 'sint64', 'opaque*'] => 'int');
$ffi->attach([qmp_migrate_cancel => '_qmp_migrate_cancel'] => ['string', 'sint64', 'opaque*'] => 'int');
$ffi->attach([qmp_execute => '_qmp_execute'] => ['string', 'string', 'string', 'sint64', 'opaque*'] => 'int');
$ffi->attach([ssh_run => '_ssh_run'] => ['string', 'opaque*'] => 'int');
$ffi->attach([migrate_listen_parse => '_migrate_listen_parse'] => ['string', 'string', 'opaque*'] => 'int');

# Dies PVE-style with the library's message unless $rc is 0.
sub _check {
    my ($rc) = @_;
    $last_error_code = $rc;
    return if $rc == 0;
    my $msg = mtunnel_last_error() // "unknown error";
    die "$msg\n";
}

# Takes ownership of a library string.
sub _take_string {
    my ($ptr) = @_;
    return undef if !$ptr;
    my $s = $ffi->cast('opaque', 'string', $ptr);
    mtunnel_string_free($ptr);
    utf8::decode($s);
    return $s;
}

sub _decode { my ($ptr) = @_; my $s = _take_string($ptr); return defined($s) ? $json->decode($s) : undef; }

# Perl hands us numbers as strings and booleans as 1/0; the library wants JSON types.
sub _typed {
    my ($v, $bool) = @_;
    return $v if ref($v);
    return undef if !defined($v);
    return $v ? JSON::PP::true : JSON::PP::false if $bool;
    return 0 + $v if $v =~ /^-?\d+$/;
    return $v;
}

my %BOOL_OPTION = (remote_cleanup => 1, check => 1);

sub _options_json {
    my (%opts) = @_;
    my $out = {};
    for my $k (keys %opts) {
	my $v = $opts{$k};
	if (ref($v) eq 'ARRAY') {
	    $out->{$k} = [ map { "$_" } @$v ];
	} elsif (ref($v) eq 'HASH') {
	    $out->{$k} = $v;
	} else {
	    $out->{$k} = _typed($v, $BOOL_OPTION{$k});
	}
    }
    return $json->encode($out);
}

sub open {
    my ($class, %opts) = @_;
    my $log = delete $opts{log};
    die "PVE::MTunnel->open: 'ssh' must be an array reference\n" if ref($opts{ssh}) ne 'ARRAY';
    my $self = bless { ptr => undef, closed => 0, pid_owner => $$ }, $class;
    my $closure;
    if ($log) {
	# A die inside a callback must not unwind through Rust: report it as a warning.
	$closure = $ffi->closure(sub {
	    my (undef, $level, $msg) = @_;
	    eval { $log->($LEVEL_NAME{$level} // 'info', $msg) };
	    warn "mtunnel log callback failed: $@" if $@;
	});
	$self->{closure} = $closure;
    }
    my $ptr;
    _check(_tunnel_open(_options_json(%opts), $closure, undef, \$ptr));
    $self->{ptr} = $ptr;
    return $self;
}

sub _ptr {
    my ($self) = @_;
    die "tunnel handle already freed\n" if !$self->{ptr};
    return $self->{ptr};
}

sub wait_ready {
    my ($self, %opts) = @_;
    _check(_tunnel_wait_ready($self->_ptr, $opts{timeout_ms} // -1));
    return $self;
}

sub command {
    my ($self, $cmd, %opts) = @_;
    my $reply;
    _check(_tunnel_command($self->_ptr, $cmd, $opts{timeout_ms} // 30_000, \$reply));
    return _take_string($reply);
}

sub close {
    my ($self, %opts) = @_;
    return if !$self->{ptr};
    _check(_tunnel_close($self->{ptr}, _options_json(%opts)));
    return;
}

sub status {
    my ($self) = @_;
    my $out;
    _check(_tunnel_status($self->_ptr, \$out));
    return _decode($out);
}

sub pid { return $_[0]->status->{pid} }

sub DESTROY {
    my ($self) = @_;
    my $ptr = delete $self->{ptr} or return;
    # tunnel_free closes if still open; in a forked child it only releases the child's fds.
    _tunnel_free($ptr);
}

sub qmp_migrate {
    my ($qmp_socket, $uri, $opts) = @_;
    $opts //= {};
    my %o;
    $o{capabilities} = { map { $_ => _typed($opts->{capabilities}{$_}, 1) } keys %{$opts->{capabilities}} } if $opts->{capabilities};
    $o{parameters} = { map { $_ => _typed($opts->{parameters}{$_}) } keys %{$opts->{parameters}} } if $opts->{parameters};
    $o{timeout_ms} = 0 + $opts->{timeout_ms} if defined $opts->{timeout_ms};
    _check(_qmp_migrate($qmp_socket, $uri, $json->encode(\%o)));
    return;
}

sub qmp_query_migrate {
    my ($qmp_socket, %opts) = @_;
    my $out;
    _check(_qmp_query_migrate($qmp_socket, $opts{timeout_ms} // 10_000, \$out));
    return _decode($out);
}

sub qmp_migrate_cancel {
    my ($qmp_socket, %opts) = @_;
    my $out;
    _check(_qmp_migrate_cancel($qmp_socket, $opts{timeout_ms} // 30_000, \$out));
    return _decode($out);
}

sub qmp_execute {
    my ($qmp_socket, $command, $arguments, %opts) = @_;
    my $out;
    my $args = defined($arguments) ? $json->encode($arguments) : undef;
    _check(_qmp_execute($qmp_socket, $command, $args, $opts{timeout_ms} // 10_000, \$out));
    return _decode($out);
}

sub ssh_run {
    my (%opts) = @_;
    my $out;
    _check(_ssh_run(_options_json(%opts), \$out));
    return _decode($out);
}

sub migrate_listen_parse {
    my ($output, $vmid) = @_;
    my $out;
    _check(_migrate_listen_parse($output, "$vmid", \$out));
    return _decode($out);
}

1;

__END__

=head1 NAME

PVE::MTunnel - ssh UNIX-socket migration tunnel and QMP calls for QemuMigrate-style code

=head1 SYNOPSIS

  use PVE::MTunnel;
  my $t = PVE::MTunnel->open(ssh => \@rem_ssh, forwards => ["/run/qemu-server/$vmid.migrate"],
                             command => ['qm', 'mtunnel'], log => sub { my ($level, $msg) = @_ });
  $t->wait_ready;
  PVE::MTunnel::qmp_migrate("/run/qemu-server/$vmid.qmp", "unix:/run/qemu-server/$vmid.migrate",
                            { capabilities => { 'auto-converge' => 1 }, parameters => { 'downtime-limit' => 100 } });
  my $status = PVE::MTunnel::qmp_query_migrate("/run/qemu-server/$vmid.qmp");
  $t->command("resume $vmid");
  $t->close;

Every failure dies with a message ending in "\n"; C<$PVE::MTunnel::last_error_code> holds the
library's result code. Timeouts are in milliseconds (C<timeout_ms>).

=cut
