package PVE::MTunnel;

# Thin FFI::Platypus binding of libmtunnel: converts Perl values to the library's JSON options
# and back, and turns result codes into "...\n" errors. The work happens in Rust.

use strict;
use warnings;

use Cwd ();
use File::Basename ();
use JSON::PP ();

our $VERSION = '0.1.0';

# Result code of the last failed call (see MTUNNEL_ERR_* in include/mtunnel.h).
our $last_error_code = 0;

our %ERROR_CODE = (
    invalid_argument => 1,
    timeout => 2,
    ssh_exited => 3,
    protocol => 4,
    no_quorum => 5,
    remote => 6,
    qmp => 7,
    io => 8,
    closed => 9,
    panic => 10,
);
my %LEVEL_NAME = (1 => 'err', 2 => 'warn', 3 => 'info', 4 => 'debug');

# In a build tree (perl/lib/PVE/MTunnel.pm next to Cargo.toml): its top directory, else undef.
sub _build_tree {
    my $top = Cwd::abs_path(File::Basename::dirname(__FILE__) . '/../../..');
    return defined($top) && -f "$top/Cargo.toml" ? $top : undef;
}

sub library_path {
    # installed (libmtunnel0): by soname, through the dynamic loader's search path, whatever
    # the environment says: a daemon that loads this module must not load a library named
    # by whoever set its environment
    my $top = _build_tree() // return 'libmtunnel.so.0';
    # in a build tree: MTUNNEL_LIB, else its own cargo build
    return $ENV{MTUNNEL_LIB} if $ENV{MTUNNEL_LIB};
    for my $profile (qw(release debug)) {
        my $so = "$top/target/$profile/libmtunnel.so";
        return $so if -f $so;
    }
    return 'libmtunnel.so.0';
}

# The library's functions: C name, Perl name, argument types, return type. The module compiles
# without the library (and without FFI::Platypus): each Perl name starts as a stub that loads
# the library and attaches every function on the first call (_load), then runs the real one.
# So a missing or broken libmtunnel fails only the calls that need it, never the compilation
# of a daemon that merely uses this module.
my @FUNCTIONS = (
    [mtunnel_last_error => 'mtunnel_last_error', [] => 'string'],
    [mtunnel_string_free => 'mtunnel_string_free', ['opaque'] => 'void'],
    [mtunnel_version => 'version', [] => 'string'],
    [tunnel_open => '_tunnel_open', ['string', 'mtunnel_log_fn', 'opaque', 'opaque*'] => 'int'],
    [tunnel_wait_ready => '_tunnel_wait_ready', ['opaque', 'sint64'] => 'int'],
    [tunnel_command => '_tunnel_command', ['opaque', 'string', 'sint64', 'opaque*'] => 'int'],
    [tunnel_read_line => '_tunnel_read_line', ['opaque', 'sint64', 'opaque*'] => 'int'],
    [tunnel_close => '_tunnel_close', ['opaque', 'string'] => 'int'],
    [tunnel_status => '_tunnel_status', ['opaque', 'opaque*'] => 'int'],
    [tunnel_free => '_tunnel_free', ['opaque'] => 'void'],
    [qmp_migrate => '_qmp_migrate', ['string', 'string', 'string'] => 'int'],
    [qmp_migrate_setup => '_qmp_migrate_setup', ['string', 'string', 'opaque*'] => 'int'],
    [qmp_query_migrate => '_qmp_query_migrate', ['string', 'sint64', 'opaque*'] => 'int'],
    [qmp_wait_migration => '_qmp_wait_migration', ['string', 'string', 'opaque*'] => 'int'],
    [qmp_migrate_cancel => '_qmp_migrate_cancel', ['string', 'sint64', 'opaque*'] => 'int'],
    [qmp_migrate_start_postcopy => '_qmp_migrate_start_postcopy', ['string', 'sint64'] => 'int'],
    [qmp_migrate_pause => '_qmp_migrate_pause', ['string', 'sint64'] => 'int'],
    [qmp_migrate_recover => '_qmp_migrate_recover', ['string', 'string', 'sint64'] => 'int'],
    [qmp_migrate_resume => '_qmp_migrate_resume', ['string', 'string', 'sint64'] => 'int'],
    [
        qmp_execute => '_qmp_execute',
        ['string', 'string', 'string', 'sint64', 'opaque*'] => 'int'
    ],
    [qmp_mirror_method => '_qmp_mirror_method', ['string', 'string', 'sint64', 'opaque*'] => 'int'],
    [
        qmp_mirror_start => '_qmp_mirror_start',
        ['string', 'string', 'string', 'string', 'opaque*'] => 'int'
    ],
    [qmp_mirror_status => '_qmp_mirror_status', ['string', 'string', 'sint64', 'opaque*'] => 'int'],
    [
        qmp_mirror_wait_ready => '_qmp_mirror_wait_ready',
        ['string', 'string', 'sint64', 'opaque*'] => 'int'
    ],
    [
        qmp_mirror_finish => '_qmp_mirror_finish',
        ['string', 'string', 'string', 'sint64', 'opaque*'] => 'int'
    ],
    [qmp_mirror_cancel => '_qmp_mirror_cancel', ['string', 'string', 'sint64', 'opaque*'] => 'int'],
    [mtunnel_ssh_run => '_ssh_run', ['string', 'opaque*'] => 'int'],
    [mtunnel_ssh_remove_sockets => '_ssh_remove_sockets', ['string'] => 'int'],
    [
        mtunnel_migrate_listen_parse => '_migrate_listen_parse',
        ['string', 'string', 'opaque*'] => 'int'
    ],
);

my $json = JSON::PP->new->canonical->allow_nonref;

# The FFI::Platypus instance once the library is loaded and every function attached.
my $ffi;

# Loads the library and attaches every function, or dies saying which package is missing or
# broken and why. Tried again at every call until it succeeds (a library installed meanwhile
# is found); nothing is attached unless everything is.
sub _load {
    return $ffi if $ffi;
    eval { require FFI::Platypus; FFI::Platypus->VERSION('2.00'); 1 } or do {
        my ($err) = split(/\n/, $@);    # the first line: what is missing
        die "libffi-platypus-perl is missing or broken: cannot load FFI::Platypus 2.00 - $err\n";
    };
    my $path = library_path();
    my $broken = sub {
        die "libmtunnel0 is missing or broken: cannot load $path - $_[0]\n";
    };
    require FFI::Platypus::DL;
    # the dynamic loader's own reason (FFI::Platypus would only say a symbol is missing)
    my $handle = FFI::Platypus::DL::dlopen($path, FFI::Platypus::DL::RTLD_PLATYPUS_DEFAULT());
    $broken->((FFI::Platypus::DL::dlerror() // 'dlopen failed') =~ s/\s+\z//r) if !$handle;
    my $new = FFI::Platypus->new(api => 2, lib => [$path]);
    $new->type('(opaque,int,string)->void' => 'mtunnel_log_fn');
    my %sub;
    for my $f (@FUNCTIONS) {
        my ($c_name, $name, $args, $ret) = @$f;
        my $function = eval { $new->function($c_name => $args => $ret) };
        if (!$function) {
            FFI::Platypus::DL::dlclose($handle);
            $broken->("it has no function '$c_name' (older than PVE::MTunnel $VERSION?)");
        }
        $sub{$name} = $function->sub_ref;
    }
    FFI::Platypus::DL::dlclose($handle);    # FFI::Platypus holds its own
    no strict 'refs';
    no warnings 'redefine';
    *{ __PACKAGE__ . "::$_" } = $sub{$_} for keys %sub;
    return $ffi = $new;
}

for my $f (@FUNCTIONS) {
    my $name = $f->[1];
    my $full = __PACKAGE__ . "::$name";
    no strict 'refs';
    # _load replaces this stub by the attached function, which the goto then runs
    *$full = sub { _load(); goto &$full };
}

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
    my $s = _load()->cast('opaque', 'string', $ptr);
    mtunnel_string_free($ptr);
    utf8::decode($s);
    return $s;
}

sub _decode {
    my ($ptr) = @_;
    my $s = _take_string($ptr);
    return defined($s) ? $json->decode($s) : undef;
}

# Perl hands us numbers as strings and booleans as 1/0; the library wants JSON types. Only
# options that are numbers by name become numbers, and only from a plain decimal integer:
# "1234\n" or "0042" stay strings (so the library names the bad option), and a string option
# such as ssh_run's 'input' is never turned into a number.
my %BOOL_OPTION =
    map { $_ => 1 } qw(remote_cleanup check cleanup setup adaptive_slots cleanup_in_command pass);

# Options that are integers by name without one of those suffixes: qmp_mirror_start's 'speed'
# (bytes per second).
my %INTEGER_OPTION = map { $_ => 1 } qw(speed);

sub _numeric_option {
    return $INTEGER_OPTION{ $_[0] } || $_[0] =~ /(?:_ms|_s|_slots|_retries|_count_max)\z/;
}

# QEMU's integer and boolean migration parameters (qapi MigrationParameters); the others
# (tls-creds, mode, …) are strings.
my %INTEGER_PARAMETER = map { $_ => 1 }
    qw(announce-initial announce-max announce-rounds announce-step
    throttle-trigger-threshold cpu-throttle-initial cpu-throttle-increment max-bandwidth
    avail-switchover-bandwidth downtime-limit x-checkpoint-delay multifd-channels xbzrle-cache-size
    max-postcopy-bandwidth max-cpu-throttle multifd-zlib-level multifd-qatzip-level multifd-zstd-level
    x-vcpu-dirty-limit-period vcpu-dirty-limit compress-level compress-threads decompress-threads);
my %BOOL_PARAMETER =
    map { $_ => 1 } qw(cpu-throttle-tailslow direct-io block-incremental compress-wait-thread);

sub _typed {
    my ($v, $type) = @_;
    return $v if ref($v) || !defined($v);
    if ($type eq 'bool') {
        return JSON::PP::true if $v =~ /\A(?:1|true)\z/i;
        return JSON::PP::false if $v =~ /\A(?:0|false|)\z/i;
        return "$v";    # not a boolean: the library refuses it, naming the option
    }
    return 0 + $v if $type eq 'int' && $v =~ /\A-?(?:0|[1-9][0-9]*)\z/;
    return "$v";
}

sub _option_type {
    my ($key) = @_;
    return 'bool' if $BOOL_OPTION{$key};
    return 'int' if _numeric_option($key);
    return 'string';
}

sub _parameter_type {
    my ($key) = @_;
    return 'bool' if $BOOL_PARAMETER{$key};
    return 'int' if $INTEGER_PARAMETER{$key};
    return 'string';
}

sub _options_json {
    my (%opts) = @_;
    my $out = {};
    for my $k (keys %opts) {
        my $v = $opts{$k};
        if (ref($v) eq 'ARRAY') {
            $out->{$k} = [map { "$_" } @$v];
        } elsif (ref($v) eq 'HASH') {
            $out->{$k} = $v;
        } else {
            $out->{$k} = _typed($v, _option_type($k));
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
        $closure = _load()->closure(
            sub {
                my (undef, $level, $msg) = @_;
                eval { $log->($LEVEL_NAME{$level} // 'info', $msg) };
                warn "mtunnel log callback failed: $@" if $@;
            }
        );
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

sub read_line {
    my ($self, %opts) = @_;
    my $line;
    _check(_tunnel_read_line($self->_ptr, $opts{timeout_ms} // 60_000, \$line));
    return _take_string($line);
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

# { capabilities => {...}, parameters => {...}, timeout_ms => N, setup => 0|1,
#   postcopy => 0|1 } as JSON.
sub _migrate_options_json {
    my ($opts) = @_;
    $opts //= {};
    my %o;
    if (my $caps = $opts->{capabilities}) {
        $o{capabilities} = { map { $_ => _typed($caps->{$_}, 'bool') } keys %$caps };
    }
    if (my $params = $opts->{parameters}) {
        $o{parameters} = { map { $_ => _typed($params->{$_}, _parameter_type($_)) } keys %$params };
    }
    $o{timeout_ms} = _typed($opts->{timeout_ms}, 'int') if defined $opts->{timeout_ms};
    for my $flag (qw(setup postcopy)) {
        $o{$flag} = _typed($opts->{$flag}, 'bool') if defined $opts->{$flag};
    }
    return $json->encode(\%o);
}

sub qmp_migrate {
    my ($qmp_socket, $uri, $opts) = @_;
    _check(_qmp_migrate($qmp_socket, $uri, _migrate_options_json($opts)));
    return;
}

sub qmp_migrate_setup {
    my ($qmp_socket, $opts) = @_;
    my $out;
    _check(_qmp_migrate_setup($qmp_socket, _migrate_options_json($opts), \$out));
    return _decode($out);
}

sub qmp_query_migrate {
    my ($qmp_socket, %opts) = @_;
    my $out;
    _check(_qmp_query_migrate($qmp_socket, $opts{timeout_ms} // 10_000, \$out));
    return _decode($out);
}

# query-migrate's answer once the migration ended or hold_ms (default 250) passed, whichever
# comes first: waits on QEMU's MIGRATION event (the 'events' capability) on a connection held
# that long at most. Call it in a loop instead of sleeping between qmp_query_migrate calls.
sub qmp_wait_migration {
    my ($qmp_socket, %opts) = @_;
    my $out;
    _check(_qmp_wait_migration($qmp_socket, _options_json(%opts), \$out));
    return _decode($out);
}

sub qmp_migrate_cancel {
    my ($qmp_socket, %opts) = @_;
    my $out;
    _check(_qmp_migrate_cancel($qmp_socket, $opts{timeout_ms} // 30_000, \$out));
    return _decode($out);
}

sub qmp_migrate_start_postcopy {
    my ($qmp_socket, %opts) = @_;
    _check(_qmp_migrate_start_postcopy($qmp_socket, $opts{timeout_ms} // 10_000));
    return;
}

sub qmp_migrate_pause {
    my ($qmp_socket, %opts) = @_;
    _check(_qmp_migrate_pause($qmp_socket, $opts{timeout_ms} // 10_000));
    return;
}

sub qmp_migrate_recover {
    my ($qmp_socket, $uri, %opts) = @_;
    _check(_qmp_migrate_recover($qmp_socket, $uri, $opts{timeout_ms} // 10_000));
    return;
}

sub qmp_migrate_resume {
    my ($qmp_socket, $uri, %opts) = @_;
    _check(_qmp_migrate_resume($qmp_socket, $uri, $opts{timeout_ms} // 10_000));
    return;
}

sub qmp_execute {
    my ($qmp_socket, $command, $arguments, %opts) = @_;
    die "qmp_execute: arguments must be a hash reference\n"
        if defined($arguments) && ref($arguments) ne 'HASH';
    my $out;
    my $args = defined($arguments) ? $json->encode($arguments) : undef;
    _check(_qmp_execute($qmp_socket, $command, $args, $opts{timeout_ms} // 10_000, \$out));
    return _decode($out);
}

# \@jobs as the library's JSON array of job ids.
sub _jobs_json {
    my ($function, $jobs) = @_;
    die "$function: jobs must be an array reference\n" if ref($jobs) ne 'ARRAY';
    return $json->encode([map { "$_" } @$jobs]);
}

sub qmp_mirror_method {
    my ($qmp_socket, $device, %opts) = @_;
    my $out;
    _check(_qmp_mirror_method($qmp_socket, $device, $opts{timeout_ms} // 10_000, \$out));
    return _take_string($out);
}

sub qmp_mirror_start {
    my ($qmp_socket, $device, $target, $opts) = @_;
    die "qmp_mirror_start: options must be a hash reference\n"
        if defined($opts) && ref($opts) ne 'HASH';
    my $out;
    _check(
        _qmp_mirror_start($qmp_socket, $device, $target, _options_json(%{ $opts // {} }), \$out));
    return _take_string($out);
}

sub qmp_mirror_status {
    my ($qmp_socket, $jobs, %opts) = @_;
    my $out;
    _check(
        _qmp_mirror_status(
            $qmp_socket, _jobs_json('qmp_mirror_status', $jobs),
            $opts{timeout_ms} // 10_000, \$out
        )
    );
    return _decode($out);
}

sub qmp_mirror_wait_ready {
    my ($qmp_socket, $jobs, %opts) = @_;
    my $out;
    _check(
        _qmp_mirror_wait_ready(
            $qmp_socket, _jobs_json('qmp_mirror_wait_ready', $jobs),
            $opts{timeout_ms} // -1, \$out
        )
    );
    return _decode($out);
}

sub qmp_mirror_finish {
    my ($qmp_socket, $jobs, %opts) = @_;
    my $out;
    _check(
        _qmp_mirror_finish(
            $qmp_socket, _jobs_json('qmp_mirror_finish', $jobs),
            $opts{mode}, $opts{timeout_ms} // 60_000,
            \$out
        )
    );
    return _decode($out);
}

sub qmp_mirror_cancel {
    my ($qmp_socket, $jobs, %opts) = @_;
    my $out;
    _check(
        _qmp_mirror_cancel(
            $qmp_socket, _jobs_json('qmp_mirror_cancel', $jobs),
            $opts{timeout_ms} // 30_000, \$out
        )
    );
    return _decode($out);
}

sub ssh_run {
    my (%opts) = @_;
    my $out;
    _check(_ssh_run(_options_json(%opts), \$out));
    return _decode($out);
}

# the sockets among sockets => [...] removed on the remote node; dies naming anything else kept
sub ssh_remove_sockets {
    my (%opts) = @_;
    _check(_ssh_remove_sockets(_options_json(%opts)));
    return 1;
}

sub migrate_listen_parse {
    my ($output, $vmid) = @_;
    my $out;
    _check(_migrate_listen_parse($output, $vmid // '', \$out));
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

=head1 LOADING THE LIBRARY

C<use PVE::MTunnel> compiles without the library and without FFI::Platypus: the first call
that needs the library (any function below but C<library_path>) loads C<library_path()> and
attaches every function. If that fails, the call dies, and so does every later one until a
load succeeds (each call tries again; nothing is attached unless everything is):

  libmtunnel0 is missing or broken: cannot load libmtunnel.so.0 - REASON

REASON is the dynamic loader's (C<libmtunnel.so.0: cannot open shared object file: No such
file or directory>, C<invalid ELF header>, ...) or C<it has no function 'NAME' (older than
PVE::MTunnel VERSION?)>. Without FFI::Platypus 2.00 the call dies C<libffi-platypus-perl is
missing or broken: cannot load FFI::Platypus 2.00 - REASON>. So a program that only uses this
module (a PVE daemon) starts without the library; only the calls that need it fail.

=head1 METHODS AND FUNCTIONS

=over

=item C<< PVE::MTunnel->open(ssh => \@rem_ssh, forwards => [...], command => [...], log => $cb, %opts) >>

Class method: starts ssh. A forward is one socket path (the same on both nodes) or
C<"LOCAL:REMOTE">; or a TCP forward to the target's loopback, C<"PORT:localhost:PORT"> (PVE's
legacy path for a target that answers C<tcp:localhost:PORT>), which listens on this node's
loopback only and is ready once ssh holds the port and no other process listens there
(else it dies C<forward P:localhost:P: another process listens on ADDR:P too ...>); any other
spec dies C<unsupported forward '...'>. Options that are numbers by name (C<*_ms>,
C<*_s>, C<*_slots>, C<*_retries>, C<*_count_max>) must be plain integers; every other scalar
is passed as a string. C<cleanup_in_command> (default 1): the remote command removes the
forwards' sockets on the target when it ends, so a normal close needs no second connection;
C<adaptive_slots> (default 1): a node that drops handshakes gets fewer concurrent ones for a
while; C<connect_retries>: a maximum of retries of a pre-authentication drop (default: until
the deadline); C<share>: OpenSSH connection sharing (F<docs/sharing.md>); C<ciphers>: a
C<-o Ciphers=> list for ssh, e.g. C<'aes128-gcm@openssh.com,chacha20-poly1305@openssh.com'>
(none by default: ssh and the admin's F<ssh_config> choose; C<''> is the same as none).
Every ssh option the library adds, and why: F<docs/ssh-options.md>.

=item C<< $t->wait_ready(timeout_ms => N) >>, C<< $t->command($cmd, timeout_ms => N) >>, C<< $t->read_line(timeout_ms => N) >>

Method: readiness (greeting and every forward listening); one command (protocol v1: C<OK>;
v2: a JSON object or a bare command name, returns the JSON reply); the next line from the
remote.

=item C<< $t->close(%opts) >>

Method: staged close; C<cleanup> (v2 C<quit>), C<cleanup_sockets> (more socket paths removed
on both nodes, sockets only), C<quit_timeout_ms>, C<exit_timeout_ms>, C<remote_cleanup>,
C<cleanup_timeout_ms> (5000: the bound of the separate remote cleanup, also on C<DESTROY>).
The separate remote cleanup only runs when the remote command did not remove the sockets
itself; when it fails (node unreachable, connection refused) that is a warning through the
C<log> callback and C<< status->{cleanup_warning} >>, not an error. It dies only for what the
caller has to act on (e.g. a file that is no socket at a socket path, kept and named).

=item C<qmp_migrate_setup($qmp_socket, { capabilities => {...}, parameters => {...} })>

Function: sets what it is given, and only that. C<capabilities> as Proxmox VE's
C<set_migration_caps> (the ones named true on, every other one off); C<parameters> as its
phase 2 (C<max-bandwidth> 16 GiB/s unless given, C<downtime-limit> capped, and when the same
call turns xbzrle on, the xbzrle cache from the guest's memory). Only C<capabilities>: only
capabilities are set; only C<parameters>: only parameters; neither: the default parameters
(C<< parameters => {} >>). Both: one call sets capabilities, then parameters, and the
parameters are set even when the capabilities failed (as phase 2 does). Returns what was
applied (C<capabilities>, C<parameters>: each only when set).

A failed step dies naming each step that failed, with QEMU's reason:
C<"migrate-set-capabilities failed - REASON\n">, C<"migrate-set-parameters failed - REASON\n">,
or both joined by C<"; ">. So a caller can log a capability failure as a warning and go on,
as upstream does, knowing the parameters (its bandwidth limit) were still set when only the
first step is named. A capability this QEMU does not offer, post-copy on a QEMU without it or
a C<downtime-limit> that is no integer dies before anything is set.

C<< postcopy => 1 >> makes the migration able to switch to post-copy: C<postcopy-ram> on (a
QEMU without it is refused before anything is set), C<postcopy-preempt> on where QEMU offers
it, the other capabilities as C<capabilities> says (off when absent), and with C<parameters>
C<max-postcopy-bandwidth> as C<max-bandwidth> unless given. QEMU needs it on both sides.

=item C<qmp_migrate($qmp_socket, $uri, { ..., setup => 0|1 })>

Function: C<qmp_migrate_setup> (unless C<setup> is 0), then C<migrate>; a failed setup step
dies as C<qmp_migrate_setup> does, before C<migrate> is sent.

=item C<< $t->status() >>, C<< $t->pid() >>

Method: the tunnel's state as a hashref: C<state> (C<started>, C<online>, C<greeted>,
C<ready>, C<closed>), C<pid> (ssh's), C<version> (the remote protocol's, C<undef> before the
greeting), C<forwards>, for a shared connection C<master_pid> and C<control_path>, and
C<cleanup_warning> (why close could not remove the remote sockets, else C<undef>).
C<pid> returns C<< status->{pid} >>.

=item C<< DESTROY >>

Frees the handle; a tunnel still open is closed with default options first. In a forked
child only the child's copies of the file descriptors are released.

=item C<qmp_query_migrate($qmp_socket, timeout_ms =E<gt> 10000)>

Function: C<query-migrate>; returns QEMU's answer as a hashref. Unknown statuses are passed
through: treat them as still running.

=item C<qmp_wait_migration($qmp_socket, hold_ms =E<gt> 250, timeout_ms =E<gt> N, pass =E<gt> 0)>

Function: C<query-migrate>'s answer as soon as QEMU's C<MIGRATION> event says the migration
ended (completed, failed, cancelled) or entered another post-copy status (C<postcopy-active>,
C<postcopy-paused>, C<postcopy-recover>, ...), with C<pass> also when its C<MIGRATION_PASS>
event says a new pass over memory began, or when C<hold_ms> passed, whichever comes
first. The
monitor connection is held at most that long, so other clients are served. Call it in a loop
instead of sleeping between C<qmp_query_migrate> calls (needs the C<events> capability).

=item C<qmp_migrate_cancel($qmp_socket, timeout_ms =E<gt> 30000)>

Function: C<migrate_cancel>, then waits until the migration is cancelled, failed or completed
(or there was none); returns the last C<query-migrate> answer. A migration that completed
before the cancel shows as C<completed>: it must then be finished, not rolled back.

=item C<qmp_migrate_start_postcopy($qmp_socket, timeout_ms =E<gt> 10000)>

Function: switches the running migration to post-copy (C<migrate-start-postcopy>): the source
stops and the target runs (once resumed) while it pulls the remaining pages. From then on the
VM's memory is split between the nodes: the migration can only be finished, or recovered when
it pauses, never cancelled.

=item C<qmp_migrate_pause($qmp_socket, timeout_ms =E<gt> 10000)>

Function: C<migrate-pause>, on either side: a post-copy migration whose channel hangs instead
of failing goes to C<postcopy-paused>, from where it can be recovered.

=item C<qmp_migrate_recover($qmp_socket, $uri, timeout_ms =E<gt> 10000)>

Function: on the target of a paused post-copy migration, C<migrate-recover>: listens on
C<$uri> for the source's resume. On a stock node the same goes through C<qm monitor VMID>
(HMP C<migrate_recover URI>).

=item C<qmp_migrate_resume($qmp_socket, $uri, timeout_ms =E<gt> 10000)>

Function: on the source of a paused post-copy migration, C<migrate> with C<resume>: continues
it into C<$uri>, where the target listens again (a new tunnel's forward).

=item C<qmp_execute($qmp_socket, $command, \%arguments, timeout_ms =E<gt> 10000)>

Function: any QMP command (C<cont>, C<quit>, C<query-status>, ...) with optional arguments;
returns its C<return> value decoded (hashref, arrayref or scalar). A QMP error dies with
QEMU's class and description.

=item C<ssh_run(ssh =E<gt> \@rem_ssh, command =E<gt> [...], input =E<gt> $stdin, timeout_ms =E<gt> 60000, check =E<gt> 1, %ssh_opts)>

Function: runs one remote command over ssh (every word shell-quoted for the remote shell;
C<input> goes to its stdin, never argv) and returns C<< { exit_code, signal, stdout, stderr } >>.
With C<check> (the default) a non-zero exit dies with the stderr tail. A connection that
failed before authentication is retried (C<connect_retries>), so the command never runs
twice. Takes the ssh options of C<open> (C<handshake_slots>, C<connect_timeout_s>, C<share>,
...).

=item C<ssh_remove_sockets(ssh =E<gt> \@rem_ssh, sockets =E<gt> [...], socket_dir =E<gt> '/run/qemu-server', timeout_ms =E<gt> 30000, %ssh_opts)>

Function: removes the sockets among C<sockets> on the remote node, as a tunnel's close does
for its forwards (for a target whose QEMU listens but no tunnel got ready). Each path must
be a socket path in C<socket_dir>; any other file there is kept, and the call dies naming it
(C<refusing to remove '...' on user@host: not a socket (kept)>). Dies with ssh's error when
the connection fails.

=item C<migrate_listen_parse($output, $vmid)>

Function: parses the output of the target's C<qm start VMID --migratedfrom NODE> as
QemuMigrate.pm does and returns C<< { uri, socket, nbd => [{ drive, uri, socket, volume }, ...],
spice_port, messages => [...] } >>. Dies C<"unable to detect remote migration address\n"> when
there is no address, and on a VMID mismatch.

=item C<version()>

Function: the loaded library's version (C<mtunnel_version()>, Cargo.toml's version), which
equals C<$PVE::MTunnel::VERSION> and the header's C<MTUNNEL_VERSION_STRING> of the same
release.

=item C<library_path()>

Function: where the library is loaded from. Installed (this module not in a build tree): the
soname C<libmtunnel.so.0>, found by the dynamic loader (the Debian package libmtunnel0
installs it in the multiarch library directory), whatever the environment says. In a build
tree (this module under F<perl/lib> next to F<Cargo.toml>): C<$ENV{MTUNNEL_LIB}> if set, else
its F<target/release> (or F<target/debug>) F<libmtunnel.so>, else the soname. Needs no
library.

=item C<mtunnel_last_error()>, C<mtunnel_string_free($ptr)>

The C functions of the same names, used by the wrappers: the last failed call's message on
this thread, and freeing a string the library returned. Callers of the functions above never
need them.

=back

=head2 Storage migration (local disks mirrored into the target's NBD export)

As Proxmox VE's C<PVE::QemuServer::BlockJob> does it for a migration with local disks:
C<qmp_mirror_start> per disk (into the C<nbd:...> URI the target printed after C<storage
migration listens on>), C<qmp_mirror_wait_ready>, migrate RAM, then C<qmp_mirror_finish>;
on failure C<qmp_mirror_cancel>. Every look at the jobs uses its own QMP connection, so other
monitor clients (C<pvestatd>) are not starved during a wait. Jobs run with C<auto-dismiss>
off; a job seen concluded is dismissed, and one that failed dies with C<"JOB: mirror failed:
ERROR (io-status: S)\n">.

The library picks the QMP call from what the VM's QEMU has attached, never from a version
(C<qmp_mirror_method> tells which):

=over

=item C<drive-mirror>

A disk attached with C<-drive> (QEMU 7.2; machine versions below 10.0 on Proxmox VE 9) has a
device (BlockBackend) named C<drive-ID> in C<query-block>. The job id is the device.

    my $job = PVE::MTunnel::qmp_mirror_start($qmp, 'drive-scsi0', $nbd_uri);   # 'drive-scsi0'

=item C<blockdev-mirror>

A disk attached with C<-blockdev> (Proxmox VE 9, machine versions 10.0 and later) has no such
device, only a top block node C<drive-ID> (a C<throttle> filter above the format and file
nodes). As qemu-server 9 does, the target is added as a block node of its own (C<nbd>, named
C<mt-JOB>; C<mt2-JOB> when C<mt-JOB> is the disk itself after an earlier completed mirror;
a job id too long for QEMU's 31 characters is cut to C<mt-> + 19 characters + C<-> + 8 hex
digits of its FNV-1a hash), and the job C<mirror-ID> mirrors the top node and C<replaces>
the node below the throttle filter. C<qmp_mirror_finish> (cancel mode) and
C<qmp_mirror_cancel> delete the target node (C<blockdev-del>) once the job is gone;
C<qmp_mirror_finish> in complete mode keeps it (it is the disk now) and deletes the node the
disk left, if that is still there.

    my $job = PVE::MTunnel::qmp_mirror_start($qmp, 'drive-scsi0', $nbd_uri);   # 'mirror-scsi0'

=back

The calls after C<qmp_mirror_start> take the job ids it returned, whichever the method.

=over

=item C<qmp_mirror_method($qmp_socket, $device, timeout_ms =E<gt> 10000)>

Function: C<'drive-mirror'> when C<query-block> lists a device named C<$device>,
C<'blockdev-mirror'> when there is none but a block node of that name. Dies naming the device
when it is neither (C<"'DEVICE' is neither a drive (...) nor a block node (...)\n">,
C<invalid_argument>).

=item C<qmp_mirror_start($qmp_socket, $device, $target, { speed => N, format => ..., mode => ..., sync => ..., job_id => ..., timeout_ms => N })>

Function: mirrors C<$device> (e.g. C<drive-scsi0>: 1-64 characters of C<A-Za-z0-9_.->) with
the call C<qmp_mirror_method> names into C<$target>: C<nbd:unix:/PATH:exportname=NAME>,
C<nbd:HOST:PORT:exportname=NAME> or an absolute path. Options (all optional): C<speed> in
bytes per second (PVE: bwlimit KiB/s * 1024; an integer, no limit without it), C<format>
(C<nbd> for an C<nbd:> target, required for a path), C<mode> (C<existing>; C<absolute-paths>
only for drive-mirror), C<sync> (C<full>), C<job_id> (the device for drive-mirror, C<mirror-ID>
for blockdev-mirror of C<drive-ID>). Returns the job id. QEMU's refusal (a busy device, an
unreachable NBD server) dies with QEMU's description; so does a job id in use already. If
C<blockdev-mirror> fails, the target node it added is deleted again.

=item C<qmp_mirror_status($qmp_socket, \@jobs, timeout_ms => 10000)>

Function: one C<query-block-jobs> look; returns C<< { all_ready => 0|1, jobs => [{ id, type,
status, len, offset, ready, busy, io_status, speed }, ...] } >> in the order of C<@jobs>.
Dies naming the job when one has vanished (C<"JOB: block job has vanished (cancelled?)">),
failed or ended.

=item C<qmp_mirror_wait_ready($qmp_socket, \@jobs, timeout_ms => N)>

Function: polls C<qmp_mirror_status> (every 500 ms) until every job is ready and returns that
status; the default C<timeout_ms> is -1 (no limit, as PVE). On the deadline it dies
C<"mirror not ready after N s: JOB at X of Y bytes (P%)\n">, naming each job not ready.

=item C<qmp_mirror_finish($qmp_socket, \@jobs, mode => 'cancel', timeout_ms => 60000)>

Function: every job must be ready (else it dies and sends nothing). C<mode> C<cancel> (the
default) sends C<block-job-cancel> without force: the mirror syncs the target and ends
without switching the VM over, as a migration wants; C<complete> sends C<job-complete>.
Waits until the jobs are gone (concluded ones are dismissed) and returns C<< { jobs => [{ id,
offset, len }, ...] } >>, the last figures seen. For blockdev-mirror jobs it then deletes the
target nodes left unused (cancel; a job that failed) or, after C<complete>, the node the disk
left; the result gets C<< detached => [node names] >> when nodes were deleted and C<<
detach_errors => [messages] >> when one could not be (that does not fail the call: the data is
on the target). Drive-mirror results have neither key.

=item C<qmp_mirror_cancel($qmp_socket, \@jobs, timeout_ms => 30000)>

Function: the abort path: C<block-job-cancel> with C<force> for each job, concluded ones
dismissed, waits until none is left; a job that no longer exists is fine. Then deletes the
target nodes the blockdev-mirror jobs among them left (also of jobs already gone). Returns
C<< { cancelled => [...], already_gone => [...] } >>, with C<detached> and C<detach_errors> as
for C<qmp_mirror_finish>; an empty C<@jobs> does nothing. Dies on the deadline naming the jobs
still there.

=back

For QemuMigrate.pm's own tunnel functions see L<PVE::MTunnel::Tunnel>.

=cut
