package MTunnelLabFaults;

# Faults injected into a PVE lab node's own qm (lab/upstream/pve-cli loads this module into
# every qm it runs), for the runs that test how a migration's source handles a target that
# fails at one step. Without an armed fault nothing here changes anything.
#
# A test arms fault NAME on a node by writing $LAB/NODE/fault-NAME: "N" (a count) or "always".
# Each qm that is about to fire it takes one from the count under a lock (the file goes when
# the count is used up); every firing is appended to $LAB/NODE/fault.log as "NAME COMMAND".
#
#   resume    PVE::QemuServer::RunState::vm_resume dies "lab fault: resume refused", without
#             resuming: `qm mtunnel`'s resume answers "ERR: resume failed - ...", `qm resume`
#             exits non-zero
#   nbdstop   PVE::QemuServer::QMPHelpers::nbd_stop dies "lab fault: nbd-server-stop failed",
#             without stopping the NBD server: `qm mtunnel`'s nbdstop answers "ERR: nbdstop
#             failed - ...", `qm nbdstop` warns (and exits 0, as upstream's)

use strict;
use warnings;

use Fcntl qw(:flock O_RDWR O_WRONLY O_APPEND O_CREAT O_NOFOLLOW);

my %FAULTS = (
    resume => ['PVE::QemuServer::RunState', 'vm_resume', "lab fault: resume refused\n"],
    nbdstop => ['PVE::QemuServer::QMPHelpers', 'nbd_stop', "lab fault: nbd-server-stop failed\n"],
);

my $LAB = $ENV{MTUNNEL_LAB_DIR};
my $NODE = $ENV{MTUNNEL_LAB_NODE};

# whether fault NAME fires now: takes one from its count (under a lock on its file)
my sub take {
    my ($name) = @_;
    my $path = "$LAB/$NODE/fault-$name";
    sysopen(my $fh, $path, O_RDWR | O_NOFOLLOW) or return 0;
    flock($fh, LOCK_EX) or return 0;
    my $text = do { local $/; <$fh> }
        // '';
    my $fire = 0;
    if ($text =~ /^\s*always\s*$/) {
        $fire = 1;
    } elsif ($text =~ /^\s*(\d+)\s*$/ && $1 > 0) {
        $fire = 1;
        my $left = $1 - 1;
        if ($left > 0) {
            truncate($fh, 0);
            sysseek($fh, 0, 0);
            syswrite($fh, "$left\n");
        } else {
            unlink($path);
        }
    }
    close($fh);
    return $fire;
}

my sub record {
    my ($name, $command) = @_;
    sysopen(my $fh, "$LAB/$NODE/fault.log", O_WRONLY | O_APPEND | O_CREAT | O_NOFOLLOW, 0600)
        or return;
    syswrite($fh, "$name $command\n");
    close($fh);
}

# Called by pve-cli once the CLI class is loaded: wraps the functions of the faults armed on
# this node (a function is looked up when called, so qm's own calls meet the wrapper).
sub install {
    my ($cli) = @_;
    return if !$LAB || !$NODE;
    my $command = join(' ', $cli, @ARGV);
    for my $name (sort keys %FAULTS) {
        next if !-e "$LAB/$NODE/fault-$name";
        my ($package, $sub, $error) = @{ $FAULTS{$name} };
        no strict 'refs';
        no warnings qw(redefine prototype);
        my $original = \&{"${package}::${sub}"};
        *{"${package}::${sub}"} = sub {
            if (take($name)) {
                record($name, $command);
                die $error;
            }
            return $original->(@_);
        };
    }
}

1;
