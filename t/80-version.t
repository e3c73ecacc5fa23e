#!/usr/bin/perl
# One version, Cargo.toml's: the header's MTUNNEL_VERSION_* macros, mtunnel_version() of the
# loaded library (as a C program compiled against the header sees it, and through the Perl
# binding), $PVE::MTunnel::VERSION, debian/changelog and the pkg-config template agree.

use strict;
use warnings;
use Test::More;
use File::Temp qw(tempdir);
use File::Basename qw(dirname);
use Cwd qw(abs_path);

use PVE::MTunnel;

my $top = abs_path(dirname(abs_path(__FILE__)) . '/..');

sub slurp {
    my ($path) = @_;
    open(my $fh, '<', $path) or die "cannot read $path: $!\n";
    local $/;
    return scalar(<$fh>);
}

my ($cargo) = slurp("$top/Cargo.toml") =~ /^\[package\][^\[]*?^version\s*=\s*"([^"]+)"/ms;
ok(defined $cargo, "Cargo.toml has a package version") or BAIL_OUT("no version in Cargo.toml");
my ($major, $minor, $patch) = $cargo =~ /^([0-9]+)\.([0-9]+)\.([0-9]+)/;

my $header = slurp("$top/include/mtunnel.h");
my %macro = $header =~ /^#define (MTUNNEL_VERSION_\w+) (\S+)$/mg;
is($macro{MTUNNEL_VERSION_MAJOR}, $major, 'header MTUNNEL_VERSION_MAJOR is Cargo.toml\'s major');
is($macro{MTUNNEL_VERSION_MINOR}, $minor, 'header MTUNNEL_VERSION_MINOR is Cargo.toml\'s minor');
is($macro{MTUNNEL_VERSION_PATCH}, $patch, 'header MTUNNEL_VERSION_PATCH is Cargo.toml\'s patch');
is($macro{MTUNNEL_VERSION_STRING},
    "\"$cargo\"", 'header MTUNNEL_VERSION_STRING is Cargo.toml\'s version');
like($header, qr/^const char \*mtunnel_version\(void\);$/m, 'header declares mtunnel_version()');

is(PVE::MTunnel::version(), $cargo,
    'PVE::MTunnel::version() (the library\'s mtunnel_version) is Cargo.toml\'s version');
is($PVE::MTunnel::VERSION, $cargo, '$PVE::MTunnel::VERSION is Cargo.toml\'s version');

my ($changelog) = slurp("$top/debian/changelog") =~ /\A\S+ \(([^)]+)\)/;
# native package: the Debian version is the upstream version (a -N revision would follow it)
(my $upstream = $changelog // '') =~ s/-[^-]+\z//;
is($upstream, $cargo, 'debian/changelog\'s top entry is Cargo.toml\'s version');
like(
    slurp("$top/debian/mtunnel.pc.in"),
    qr/^Version: \@VERSION\@$/m,
    'mtunnel.pc gets its version filled in from Cargo.toml'
);

SKIP: {
    my $lib = PVE::MTunnel::library_path();
    skip "library loaded by soname, no file to link a C program against", 2 if $lib !~ m{/};
    my $dir = tempdir(CLEANUP => 1);
    open(my $fh, '>', "$dir/version.c") or die;
    print $fh <<'C';
#include <stdio.h>
#include <string.h>
#include "mtunnel.h"
int main(void) {
    printf("%s %s %d.%d.%d\n", MTUNNEL_VERSION_STRING, mtunnel_version(),
           MTUNNEL_VERSION_MAJOR, MTUNNEL_VERSION_MINOR, MTUNNEL_VERSION_PATCH);
    return strcmp(MTUNNEL_VERSION_STRING, mtunnel_version()) != 0;
}
C
    close($fh);
    # link against exactly the library the binding loaded (by path, so no -L search)
    my $out =
        `cc -std=c11 -Wall -Wextra -Werror -I'$top/include' -o '$dir/version' '$dir/version.c' '$lib' 2>&1`;
    is($?, 0, 'a C program using the version macros and mtunnel_version() compiles') or diag($out);
    # it needs the soname libmtunnel.so.0: a link to the loaded file, in our own directory
    symlink($lib, "$dir/libmtunnel.so.0") or die "symlink: $!\n";
    my $got = `LD_LIBRARY_PATH='$dir' '$dir/version'`;
    is(
        $got,
        "$cargo $cargo $cargo\n",
        'in C: MTUNNEL_VERSION_STRING == mtunnel_version() == the macros == Cargo.toml\'s version'
    );
}

done_testing();
