#!/usr/bin/perl
# Post-copy's fault soak: t/57-fault-soak.t in its post-copy mode, every fault once at
# postcopy-active (kill ssh, SIGSTOP ssh, cut link, kill qm mtunnel, SIGTERM (SIGINT takes its path), SIGKILL
# then --check --fix, the target QEMU killed, the source QEMU killed), spread over QEMU 10.0
# and 7.2 node pairs as t/57 does, on nodes whose qm is
# qemu-server with the series. Each round says whether a recovery must happen and checks that
# it did; the QEMUs killed lose the VM, and the verdict must say so with the source never
# continued. See t/57 for what every round checks.

use strict;
use warnings;
use File::Basename qw(dirname);
use Cwd qw(abs_path);

$ENV{MTUNNEL_SOAK_MODE} = 'postcopy';
my $soak = abs_path(dirname(__FILE__)) . '/57-fault-soak.t';
do $soak;
die $@ if $@;
