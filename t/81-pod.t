#!/usr/bin/perl
# The Perl documentation: podchecker finds no errors in the modules and the command, every
# public sub of the modules has a POD entry (Pod::Coverage), and every option of
# mtunnel-migrate's GetOptions list is described in its OPTIONS section.

use strict;
use warnings;
use Test::More;
use File::Basename qw(dirname);
use Cwd qw(abs_path);
use Pod::Checker ();
use Pod::Coverage ();

my $top = abs_path(dirname(abs_path(__FILE__)) . '/..');
my %module = (
    'PVE::MTunnel' => "$top/perl/lib/PVE/MTunnel.pm",
    'PVE::MTunnel::Tunnel' => "$top/perl/lib/PVE/MTunnel/Tunnel.pm",
    'PVE::MTunnel::Migrate' => "$top/perl/lib/PVE/MTunnel/Migrate.pm",
    'PVE::MTunnel::Postcopy' => "$top/perl/lib/PVE/MTunnel/Postcopy.pm",
    'PVE::MTunnel::Check' => "$top/perl/lib/PVE/MTunnel/Check.pm",
);
my $cli = "$top/perl/bin/mtunnel-migrate";

for my $file ((map { $module{$_} } sort keys %module), $cli) {
    my $report = '';
    open(my $out, '>', \$report) or die;
    my $checker = Pod::Checker->new(-warnings => 1);
    $checker->parse_from_file($file, $out);
    close($out);
    my $name = $file =~ s{^\Q$top\E/}{}r;
    is($checker->num_errors, 0, "$name: podchecker finds POD and no errors in it") or diag($report);
}

for my $package (sort keys %module) {
    my $pc = Pod::Coverage->new(package => $package, pod_from => $module{$package});
    my $coverage = $pc->coverage;
    is($coverage, 1, "$package: every public sub has a POD entry")
        or diag(
        defined $coverage
        ? "undocumented: " . join(', ', sort $pc->naked)
        : "not rated: " . $pc->why_unrated
        );
}

{
    open(my $fh, '<', $cli) or die "cannot read $cli: $!\n";
    my $src = do { local $/; <$fh> };
    close($fh);
    my ($spec) = $src =~ /^GetOptions\(\s*\\%opt,\s*(.*?)\)\s*or die/ms;
    ok(defined $spec, 'mtunnel-migrate: the GetOptions list is found');
    my @options = map { /^([\w-]+)/ ? $1 : () } ($spec // '') =~ /'([^']+)'/g;
    cmp_ok(scalar(@options), '>=', 10, 'mtunnel-migrate: its options are read from GetOptions');
    my ($pod_options) = $src =~ /^=head1 OPTIONS\n(.*?)^=head1 /ms;

    for my $o (@options) {
        like(
            $pod_options // '',
            qr/^=item .*B<--\Q$o\E>/m,
            "mtunnel-migrate: option --$o is described in OPTIONS"
        );
    }
}

done_testing();
