#!/usr/bin/perl
# An insecure migration to a target behind a firewall, on a PVE lab (lab/upstream/README.md):
# the target node lets in from the migration network only what pve-firewall opens there for
# migrations, tcp 60000:60050, and ssh (22); everything else from it is dropped (nftables in
# the target node's network namespace). qemu-server's insecure migration listens within that
# range (upstream: next_migrate_port; with the series: QEMU binds the first free port of
# tcp:IP:60000,to=60050 itself), so the RAM migration must go through.
#
# Patch 0007 before 76b8969 let QEMU bind port 0 (a port of the kernel's ephemeral range,
# 32768-60999), which this firewall drops: the migration failed and the VM stayed on the
# source. When the migration fails the run still checks that the VM is where the task left
# it, whole.

use strict;
use warnings;
use Test::More;
use Time::HiRes qw(time);

use MTunnelLab;
use UpstreamLab;

my ($h, $skip) = UpstreamLab::Harness->new(nodes => 2);
plan skip_all => "upstream trees missing: $skip" if $skip;
my $lab = $h->lab;
my $net = $lab->{env}->{LAB_MIGRATION_NETWORK};
my $ip = $lab->{env}->{LAB_node2_MIGRATION_IP};

# the firewall of node2, as pve-firewall's rules for the migration network leave it
my $rules = <<"END";
table inet mtunnel_lab_firewall {
    chain input {
        type filter hook input priority 0; policy accept;
        ip saddr $net ct state established,related accept
        ip saddr $net tcp dport { 22, 60000-60050 } accept
        ip saddr $net drop
    }
}
END
my ($rc, $out, $err) = $lab->run('node2', 'sh', '-c', 'printf "%s" "$1" | nft -f -', 'nft', $rules);
is($rc, 0, 'the firewall is up on node2') or diag("$out$err");
# a connect that the firewall drops fails after 3 SYNs (7 s), not after the kernel's 7 (127 s)
$lab->run_ok('node1', 'sysctl', '-q', '-w', 'net.ipv4.tcp_syn_retries=2');

# the firewall does what it says: from node1 a port in the range is reachable, one outside not
my $listen = q{
    $| = 1;
    my ($ip, $port) = @ARGV;
    my $s = IO::Socket::INET->new(LocalAddr => $ip, LocalPort => $port, Listen => 1, ReuseAddr => 1)
        or die "listen $ip:$port: $!\n";
    print "listening\n";
    my $c = $s->accept;
};
my $connect = q{
    my ($ip, $port) = @ARGV;
    exit(IO::Socket::INET->new(PeerAddr => $ip, PeerPort => $port, Timeout => 2) ? 0 : 1);
};
for my $port (60010, 45000) {
    my $bg = $lab->background('node2', $lab->dir . "/listen-$port.log",
        'timeout', '10', 'perl', '-MIO::Socket::INET', '-e', $listen, $ip, $port);
    $bg->wait_for(qr/^listening$/m, 10) or diag($bg->output);
    my ($rc) = $lab->run('node1', 'perl', '-MIO::Socket::INET', '-e', $connect, $ip, $port);
    if ($port == 60010) {
        is($rc, 0, "firewall: node1 reaches node2:$port (the migration range)");
    } else {
        isnt($rc, 0, "firewall: node1 does not reach node2:$port (outside the range)");
    }
    kill('TERM', $bg->pid);
    $bg->finish(10);
}

# --- RAM, insecure, on the migration network
{
    my $vmid = 400;
    my $name = 'insecure behind the firewall';
    my $t0 = time();
    $h->start_vm($vmid);
    my $bg = $h->migrate($vmid, 'node1', 'node2',
        opts => ['--migration_type', 'insecure', '--migration_network', $net]);
    ok($bg->finish(180), "$name: the migration ended");
    my $out = $bg->output;
    my ($port) = $out =~ / start migrate command to tcp:\Q$ip\E:(\d+)$/m;
    diag("$name: the target listened on port " . ($port // '(none)'));
    ok(
        defined($port) && $port >= 60000 && $port <= 60050,
        "$name: the target listened within 60000:60050"
    );
    my $ok = like($out, qr/^TASK OK$/m, "$name: TASK OK (the RAM went through the firewall)");
    diag($out) if !$ok;
    # where the task left it, whole: on node2, or (failed) still on node1
    $h->check_vm($name, $vmid, $ok ? 'node2' : 'node1', since => $t0);
    $h->remove_vm($vmid);
}

$h->down;
done_testing();
