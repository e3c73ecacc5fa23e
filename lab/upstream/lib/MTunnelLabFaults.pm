package MTunnelLabFaults;

# Faults injected into a PVE lab node's own qm (lab/upstream/pve-cli), for the runs that test
# how the migration's source handles a target that fails at one step. A test arms a fault by
# creating $LAB/NODE/fault-NAME; the qm that fires it renames the file away first (each fault
# fires once). Without such a file nothing here changes anything.

use strict;
use warnings;

sub install {
    my ($cli) = @_;
    return;
}

1;
