#!/usr/bin/perl
# PVE::MTunnel compiles without its library: a missing or broken libmtunnel (or FFI::Platypus)
# fails only the call that needs it, with an error naming the package to install, never the
# compilation of a daemon that uses the module. An installed module loads the library by its
# soname only: MTUNNEL_LIB counts in a build tree alone. No lab: each case is a perl process
# of its own.

use strict;
use warnings;
use Test::More;
use Cwd qw(abs_path);
use File::Basename qw(dirname);
use File::Path qw(make_path);
use File::Temp qw(tempdir);

my $top = abs_path(dirname(__FILE__) . '/..');
my $lib = $ENV{MTUNNEL_LIB} // "$top/target/release/libmtunnel.so";
plan skip_all => "no $lib: build first (cargo build --release)" if !-f $lib;
my $tmp = tempdir('mtunnel-lazy-load.XXXXXX', TMPDIR => 1, CLEANUP => 1);
my ($version) = `cat $top/Cargo.toml` =~ /^version\s*=\s*"([^"]+)"/m
    or die "no version in Cargo.toml";

# Runs perl with @args in a clean environment plus %env; returns its stdout and stderr, joined.
sub perl_out {
    my ($env, @args) = @_;
    my $pid = open(my $fh, '-|') // die "fork: $!";
    if (!$pid) {
        open(STDERR, '>&', \*STDOUT) or die;
        delete @ENV{qw(MTUNNEL_LIB PERL5LIB PERL5OPT PERLLIB LD_LIBRARY_PATH)};
        %ENV = (%ENV, %$env);
        exec($^X, @args) or die "exec: $!";
    }
    local $/;
    my $out = <$fh> // '';
    close($fh);
    return $out;
}

# A script that uses every module of the binding, says it compiled, then makes calls.
my $uses =
      'use PVE::MTunnel; use PVE::MTunnel::Tunnel; use PVE::MTunnel::Migrate;'
    . ' use PVE::MTunnel::Postcopy; use PVE::MTunnel::Check; print "compiled\n";'
    . ' print "FFI::Platypus loaded at compile time\n" if $INC{"FFI/Platypus.pm"};';
my $calls = $uses . <<'PERL';
for my $call (
    sub { PVE::MTunnel::version() },
    sub { PVE::MTunnel::qmp_query_migrate('/nonexistent-mtunnel/100.qmp') },
    sub { PVE::MTunnel->open(ssh => ['ssh', 'root@198.18.0.2']) },
    sub { PVE::MTunnel::Tunnel::fork_ssh_tunnel(['ssh', 'root@198.18.0.2'], ['qm', 'mtunnel'], []) },
) {
    eval { $call->() };
    print "died: $@";
}
PERL

my $missing = "$tmp/no-such-dir/libmtunnel.so";
my $out = perl_out({ MTUNNEL_LIB => $missing }, "-I$top/perl/lib", '-e', $calls);
like($out, qr/\Acompiled\n/, 'every module compiles with the library missing');
unlike($out, qr/FFI::Platypus loaded/, 'FFI::Platypus itself is loaded only by the first call');
my $want = "libmtunnel0 is missing or broken: cannot load $missing - $missing: cannot open shared"
    . " object file: No such file or directory";
my @died = $out =~ /^died: (.*)$/mg;
is(scalar(@died), 4, 'each call dies') or diag($out);
is($died[0], $want, 'the first call dies naming the package, the file and the loader\'s reason');
is($died[1], $want, 'so does every later call (the load is tried again)');
is($died[2], $want, 'PVE::MTunnel->open too');
is($died[3], "can't open tunnel - $want", 'and the drop-in with its upstream prefix');

open(my $fh, '>', "$tmp/libgarbage.so") or die;
print $fh "not a shared object\n";
close($fh);
$out = perl_out({ MTUNNEL_LIB => "$tmp/libgarbage.so" },
    "-I$top/perl/lib", '-e', $uses . 'eval { PVE::MTunnel::version() }; print $@;');
like(
    $out,
    qr{\Acompiled\nlibmtunnel0 is missing or broken: cannot load \Q$tmp\E/libgarbage\.so - \Q$tmp\E/libgarbage\.so: (file too short|invalid ELF header)\n\z},
    'a file that is no library: broken, with the loader\'s reason'
);

my ($other) =
    grep { -f $_ }
    map { ("/lib/$_/libz.so.1", "/usr/lib/$_/libz.so.1") }
    ('x86_64-linux-gnu', 'aarch64-linux-gnu');
SKIP: {
    skip 'no libz.so.1 to stand in for a library without our functions', 1 if !$other;
    $out = perl_out({ MTUNNEL_LIB => $other },
        "-I$top/perl/lib", '-e', $uses . 'eval { PVE::MTunnel::version() }; print $@;');
    is(
        $out,
        "compiled\nlibmtunnel0 is missing or broken: cannot load $other - it has no function"
            . " 'mtunnel_last_error' (older than PVE::MTunnel $version?)\n",
        'a library without our functions: broken, naming the first function missing'
    );
}

# the same process, once the library is there: the next call loads it and works
$out = perl_out({ MTUNNEL_LIB => $missing }, "-I$top/perl/lib", '-e', $uses . <<'PERL', $lib);
eval { PVE::MTunnel::version() };
print "first: ", ($@ ? "died\n" : "worked\n");
$ENV{MTUNNEL_LIB} = $ARGV[0];
print "then: ", PVE::MTunnel::version(), "\n";
eval { PVE::MTunnel::qmp_query_migrate('/nonexistent-mtunnel/100.qmp') };
print "qmp: $@";
PERL
is(
    $out,
    "compiled\nfirst: died\nthen: $version\n"
        . "qmp: QMP socket '/nonexistent-mtunnel/100.qmp' does not exist (VM not running?)\n",
    'once the library can be loaded, the same process uses it'
);

# FFI::Platypus missing (libffi-platypus-perl not installed): compiles, the call names it
make_path("$tmp/noffi/FFI");
open($fh, '>', "$tmp/noffi/FFI/Platypus.pm") or die;
print $fh "die \"Can't locate FFI/Platypus.pm in \\\@INC\\n\";\n";
close($fh);
$out = perl_out({ MTUNNEL_LIB => $lib },
    "-I$tmp/noffi", "-I$top/perl/lib", '-e', $uses . 'eval { PVE::MTunnel::version() }; print $@;');
is(
    $out,
    "compiled\nlibffi-platypus-perl is missing or broken: cannot load FFI::Platypus 2.00 -"
        . " Can't locate FFI/Platypus.pm in \@INC\n",
    'without FFI::Platypus the modules compile and the first call names libffi-platypus-perl'
);

# Installed (no Cargo.toml next to the modules): the soname only, whatever MTUNNEL_LIB says.
make_path("$tmp/installed/lib", "$tmp/installed/perl5");
system('cp', '-a', "$top/perl/lib/PVE", "$tmp/installed/perl5/") == 0 or die "cp failed";
system("cp", $lib, "$tmp/installed/lib/libmtunnel.so.0") == 0 or die "cp failed";
my $maps = 'open(my $m, "<", "/proc/self/maps") or die;'
    . ' print join(" ", sort keys %{{ map { m{(\S*libmtunnel\S*)$} ? ($1 => 1) : () } <$m> }}), "\n";';
$out = perl_out(
    { MTUNNEL_LIB => "$tmp/libgarbage.so", LD_LIBRARY_PATH => "$tmp/installed/lib" },
    "-I$tmp/installed/perl5",
    '-e',
    $uses . 'print PVE::MTunnel::library_path(), "\n", PVE::MTunnel::version(), "\n";' . $maps
);
is(
    $out,
    "compiled\nlibmtunnel.so.0\n$version\n$tmp/installed/lib/libmtunnel.so.0\n",
    'installed: MTUNNEL_LIB is ignored, the library is loaded by its soname'
);
SKIP: {
    skip 'libmtunnel.so.0 is installed on this machine', 1
        if `ldconfig -p 2>/dev/null` =~ /libmtunnel\.so\.0 /;
    $out = perl_out({ MTUNNEL_LIB => $lib },
        "-I$tmp/installed/perl5", '-e', $uses . 'eval { PVE::MTunnel::version() }; print $@;');
    like(
        $out,
        qr/\Acompiled\nlibmtunnel0 is missing or broken: cannot load libmtunnel\.so\.0 - libmtunnel\.so\.0: cannot open shared object file: No such file or directory\n\z/,
        'installed without libmtunnel0: the soname named, even with MTUNNEL_LIB set to a good library'
    ) or diag($out);
}

# a build tree honours MTUNNEL_LIB (make test points it at its build)
$out = perl_out({ MTUNNEL_LIB => $lib },
    "-I$top/perl/lib", '-e', 'use PVE::MTunnel; print PVE::MTunnel::library_path(), "\n";');
is($out, "$lib\n", 'build tree: MTUNNEL_LIB names the library');

done_testing();
