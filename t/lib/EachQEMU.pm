package EachQEMU;

# Runs a test file that starts its own QEMUs (no lab) once per QEMU this machine has: Debian's
# 7.2 (qemu-system-x86_64 on PATH) and 10.0 (lab/setup-qemu's prefix), each as a subtest.
#
#   use EachQEMU;
#   my ($qemu, $version) = EachQEMU::qemu();   # in the parent run: runs the file per QEMU, exits
#
# In the parent run, qemu() re-runs the test file once per QEMU with MTUNNEL_TEST_QEMU set
# (and MTUNNEL_TEST_QEMU_VERSION), relays each run's results as a subtest "QEMU V", and exits.
# In such a run (or when MTUNNEL_TEST_QEMU is set by hand: one QEMU only) it returns the binary
# and its version. No QEMU at all: skip_all. Only core modules.

use strict;
use warnings;

use Test::More ();
use Cwd qw(abs_path);
use File::Basename qw(dirname);

my $PREFIX_QEMU = '/opt/mtunnel-lab/qemu-10.0/bin/qemu-system-x86_64';

# [version, path] of every QEMU here: 7.2 first
sub available {
    my @q;
    my ($debian) = grep { -x } map { "$_/qemu-system-x86_64" } split(/:/, $ENV{PATH} // '');
    for my $path (grep { defined } $debian, $PREFIX_QEMU) {
        next if !-x $path;
        my ($v) = `$path -version 2>/dev/null` =~ /version (\d+\.\d+)/;
        push @q, [$v, $path] if defined $v && !grep { $_->[0] eq $v } @q;
    }
    return @q;
}

sub qemu {
    if (my $path = $ENV{MTUNNEL_TEST_QEMU}) {
        my $v = $ENV{MTUNNEL_TEST_QEMU_VERSION};
        ($v) = `$path -version 2>/dev/null` =~ /version (\d+\.\d+)/ if !defined $v;
        Test::More::plan(skip_all => "MTUNNEL_TEST_QEMU=$path does not run") if !defined $v;
        return ($path, $v);
    }
    my @q = available();
    Test::More::plan(skip_all => 'no qemu-system-x86_64 is installed (lab/setup-packages)') if !@q;
    Test::More::diag('QEMU 10.0 is not installed (lab/setup-qemu): only ' . $q[0][0])
        if @q == 1;
    my $file = abs_path($0);
    my @inc = map { "-I$_" } grep { !ref } @INC;
    for my $q (@q) {
        my ($v, $path) = @$q;
        Test::More::subtest("QEMU $v ($path)" => sub { relay($v, $path, $file, @inc) });
    }
    Test::More::done_testing();
    exit(0);
}

# one run of the file on one QEMU, its TAP relayed into the current subtest
sub relay {
    my ($v, $path, $file, @inc) = @_;
    local $ENV{MTUNNEL_TEST_QEMU} = $path;
    local $ENV{MTUNNEL_TEST_QEMU_VERSION} = $v;
    my $pid = open(my $fh, '-|') // die "fork: $!\n";
    if (!$pid) {    # its diagnostics (stderr) go straight to ours
        exec($^X, @inc, $file) or die "exec $^X: $!\n";
    }
    my ($tests, $skip) = (0, undef);
    while (my $line = <$fh>) {
        chomp $line;
        if ($line =~ /^1\.\.0\s*#\s*skip\s*(.*)/i) {
            $skip = $1;
        } elsif ($line =~ /^(not )?ok \d+\s*(?:-\s*)?(.*)$/) {
            my ($fail, $name) = ($1, $2);
            $tests++;
            if ($name =~ s/\s*#\s*skip\b\s*(.*)//i) {
                Test::More::pass("$name (skipped: $1)");
            } else {
                Test::More::ok(!$fail, $name);
            }
        } elsif ($line =~ /^\s*#/ || $line =~ /^1\.\.\d+/) {
            Test::More::note($line) if $line !~ /^1\.\./;
        } elsif ($line ne '') {
            Test::More::diag($line);
        }
    }
    close($fh);
    my $rc = $? >> 8;
    if (defined $skip) {
        Test::More::plan(skip_all => $skip);
        return;
    }
    Test::More::is($rc, 0, "the run on QEMU $v exited 0 (it failed $rc test(s) or died)")
        if $rc != 0 || !$tests;
    Test::More::done_testing();
}

1;
