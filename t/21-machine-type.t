#!/usr/bin/perl
# The machine type the driver asks the target to start (qm start --machine) is the one the
# source QEMU runs, written as upstream's PVE::QemuServer::Machine writes it: a scripted
# monitor answers query-machines as Proxmox's QEMU does (the running machine marked
# 'is-current', with its 'pve-version' when it is pinned to one) and as a stock QEMU does
# (no 'is-current': the QOM type of /machine tells it).

use strict;
use warnings;
use Test::More;
use File::Temp qw(tempdir);

use ScriptedQMP;
use PVE::MTunnel::Migrate;

my $tmp = tempdir(CLEANUP => 1);
my $qmp = "$tmp/100.qmp";

# query-machines entries as Proxmox's QEMU 9.2 gives them (abridged)
sub entry {
    my ($name, %extra) = @_;
    return {
        name => $name,
        'cpu-max' => 1024,
        'hotpluggable-cpus' => JSON::PP::true,
        'numa-mem-supported' => JSON::PP::false,
        deprecated => JSON::PP::false,
        'default-cpu-type' => 'qemu64-x86_64-cpu',
        'default-ram-id' => 'pc.ram',
        acpi => JSON::PP::true,
        %extra
    };
}

# the --machine the driver's prepare() picks for the target's qm start against a running VM
# whose monitor answers query-machines with $machines (and qom-get with $qom), and whose
# config (`qm config` on the source) is $conf; and the commands the monitor was asked
sub machine_against {
    my ($machines, $qom, $conf) = @_;
    my $mon = ScriptedQMP->monitor(
        $qmp,
        {
            'query-status' => { status => 'running', running => JSON::PP::true },
            'query-machines' => $machines,
            (defined $qom ? ('qom-get' => $qom) : ()),
        }
    );
    my $m = PVE::MTunnel::Migrate->new(
        vmid => 100,
        node => 'node1',
        target => 'node2',
        ssh => ['ssh', 'root@198.18.0.2'],
        qmp_socket => $qmp,
        local_qm => ['sh', '-c', 'printf "%s" "$1"', 'qm', $conf // "memory: 64\n"],
    );
    eval { $m->prepare() };
    my $err = $@;
    my $asked = $mon->received;
    $mon->stop;
    # the monitor's own connection setup is no news
    return ($m->{machine}, $err, [grep { $_ ne 'qmp_capabilities' } @$asked]);
}

my @others = (
    entry('pc-i440fx-9.2', alias => 'pc', 'is-default' => JSON::PP::true),
    entry('pc-q35-9.2', alias => 'q35'),
    entry('pc-i440fx-8.1'),
);

{
    # Proxmox's QEMU, machine pinned to a PVE version: is-current carries pve-version "pve1"
    my ($got, $err, $asked) = machine_against(
        [
            @others[0, 1],
            entry('pc-i440fx-8.1', 'is-current' => JSON::PP::true, 'pve-version' => 'pve1')
        ]
    );
    is($err, '', 'Proxmox QEMU with a PVE machine version: no error');
    is($got, 'pc-i440fx-8.1+pve1',
        "Proxmox QEMU with a PVE machine version: the target gets 'name+pveN', as upstream sends it"
    );
    is_deeply(
        $asked,
        ['query-status', 'query-machines'],
        'Proxmox QEMU with a PVE machine version: query-machines tells it, no QOM fallback'
    );
}

{
    # Proxmox's QEMU, a machine without a PVE version: the plain name
    my ($got, $err) =
        machine_against([@others[0, 1], entry('pc-i440fx-8.1', 'is-current' => JSON::PP::true)]);
    is($err, '', 'Proxmox QEMU without a PVE machine version: no error');
    is($got, 'pc-i440fx-8.1', 'Proxmox QEMU without a PVE machine version: the plain name');
}

{
    # a pve-version only on an entry that is not the current one is not the running machine's
    my ($got, $err) = machine_against(
        [
            entry('pc-i440fx-9.2', alias => 'pc', 'pve-version' => 'pve2'),
            entry('pc-q35-9.2', 'is-current' => JSON::PP::true)
        ]
    );
    is($got, 'pc-q35-9.2', "a pve-version on another entry is not the current machine's")
        or diag($err);
}

{
    # stock QEMU: no is-current, no pve-version; /machine's QOM type names the machine
    my ($got, $err, $asked) = machine_against([@others], 'pc-i440fx-7.2-machine');
    is($err, '', 'stock QEMU: no error');
    is($got, 'pc-i440fx-7.2', 'stock QEMU: the machine from the QOM type of /machine');
    is_deeply(
        $asked,
        ['query-status', 'query-machines', 'qom-get'],
        'stock QEMU: query-machines first, then qom-get'
    );
}

{
    my ($got, $err) = machine_against([@others], 'something-else');
    like(
        $err,
        qr/^cannot tell which machine type VM 100 runs \('something-else'\)$/,
        'stock QEMU with an unexpected QOM type: a clear error'
    );
}

{
    # as upstream's qemu_machine_pxe: '.pxe' when the VM's config asks for the PXE ROMs
    my ($got, $err) = machine_against(
        [
            @others[0, 1],
            entry('pc-i440fx-8.1', 'is-current' => JSON::PP::true, 'pve-version' => 'pve1')
        ],
        undef,
        "machine: pc-i440fx-8.1.pxe,viommu=virtio\nmemory: 64\n"
    );
    is($got, 'pc-i440fx-8.1+pve1.pxe',
        "a config machine type ending in .pxe: 'name+pveN.pxe', as upstream")
        or diag($err);
    ($got, $err) = machine_against([entry('pc-q35-9.2', 'is-current' => JSON::PP::true)],
        undef, "machine: type=q35\n");
    is($got, 'pc-q35-9.2', 'a config machine type without .pxe: no suffix') or diag($err);
}

done_testing();
