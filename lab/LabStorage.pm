package LabStorage;

# The lab's storage.cfg and volume helpers, shared by lab/qm and lab/pvesm (core Perl only).
#
# Storages, PVE "dir" style (volume id STORE:VMID/vm-VMID-disk-N.raw, file
# PATH/images/VMID/vm-VMID-disk-N.raw):
#   shared  $LAB/shared  seen by every node (as NFS or Ceph on a cluster)
#   local   $LAB/local   a tmpfs of each node's own (lab.sh mounts it in the node's mount
#                        namespace): no other node sees it, as PVE's "local" storage
#   small   $LAB/small   like local, 1 MiB: for storage-full tests
# Drive lines of a VM config, as PVE's: "ide0: local:100/vm-100-disk-0.raw,size=32M".

use strict;
use warnings;

use Fcntl qw(O_WRONLY O_CREAT O_EXCL O_NOFOLLOW);

my %STORAGE = (
    shared => { dir => 'shared', shared => 1 },
    local => { dir => 'local', shared => 0 },
    small => { dir => 'small', shared => 0 },
);

sub ids { return sort keys %STORAGE }

sub storage {
    my ($id) = @_;
    my $s = $STORAGE{$id} or die "storage '$id' does not exist\n";
    return $s;
}

sub is_shared { return storage($_[0])->{shared} }

# "local:100/vm-100-disk-0.raw" -> (storage, vmid, name)
sub parse_volid {
    my ($volid) = @_;
    my ($store, $vmid, $name) =
        $volid =~ m{^([a-z][a-z0-9\-_.]*[a-z0-9]):([1-9][0-9]*)/(vm-\2-disk-[0-9]+\.raw)$}
        or die "unable to parse volume ID '$volid'\n";
    storage($store);
    return ($store, $vmid, $name);
}

sub path {
    my ($lab, $volid) = @_;
    my ($store, $vmid, $name) = parse_volid($volid);
    return "$lab/$STORAGE{$store}{dir}/images/$vmid/$name";
}

# "32M" | "1G" | "4096K" | bytes -> bytes
sub parse_size {
    my ($s) = @_;
    my ($n, $u) = $s =~ /^([0-9]+)([KMGT]?)$/ or die "invalid size '$s'\n";
    my %mul = ('' => 1, K => 1 << 10, M => 1 << 20, G => 1 << 30, T => 1 << 40);
    return $n * $mul{$u};
}

sub format_size {
    my ($bytes) = @_;
    for my $u ([T => 1 << 40], [G => 1 << 30], [M => 1 << 20], [K => 1 << 10]) {
        return ($bytes / $u->[1]) . $u->[0] if $bytes % $u->[1] == 0 && $bytes >= $u->[1];
    }
    return $bytes;
}

# "local:100/vm-100-disk-0.raw,size=32M" -> { volid, size (bytes, or undef) }
sub parse_drive {
    my ($key, $value) = @_;
    my ($volid, @opts) = split /,/, $value;
    my %drive = (volid => $volid);
    parse_volid($volid);
    for my $o (@opts) {
        my ($k, $v) = split /=/, $o, 2;
        die "drive $key: unknown option '$k'\n" if $k ne 'size' || !defined $v;
        $drive{size} = parse_size($v);
    }
    return \%drive;
}

sub drive_string {
    my ($drive) = @_;
    return $drive->{volid} . (defined $drive->{size} ? ',size=' . format_size($drive->{size}) : '');
}

# a new volume for VMID on STORAGE: the first free vm-VMID-disk-N, created sparse (O_EXCL:
# two allocations at once never get the same name)
sub alloc {
    my ($lab, $store, $vmid, $size) = @_;
    my $dir = "$lab/" . storage($store)->{dir};
    for my $sub ('', '/images', "/images/$vmid") {
        mkdir("$dir$sub", 0755);
    }
    $dir .= "/images/$vmid";
    -d $dir or die "cannot create $dir: $!\n";
    for my $n (0 .. 99) {
        my $name = "vm-$vmid-disk-$n.raw";
        sysopen(my $fh, "$dir/$name", O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, 0600) or next;
        if (!truncate($fh, $size) || !close($fh)) {
            my $err = $!;
            unlink("$dir/$name");
            die "cannot allocate $store:$vmid/$name: $err\n";
        }
        return "$store:$vmid/$name";
    }
    die "no free disk name for VM $vmid on storage '$store'\n";
}

# `pvesm alloc STORE VMID NAME SIZE`: exactly that name, as the dir plugin's alloc_image (an
# existing one is an error, never overwritten)
sub alloc_named {
    my ($lab, $store, $vmid, $name, $size) = @_;
    die "illegal name '$name' - should be 'vm-$vmid-*'\n" if $name !~ m/^vm-$vmid-/;
    die "illegal name '$name' - the lab's storages hold vm-$vmid-disk-N.raw only\n"
        if $name !~ /^vm-$vmid-disk-[0-9]+\.raw$/;
    my $dir = "$lab/" . storage($store)->{dir};
    for my $sub ('', '/images', "/images/$vmid") {
        mkdir("$dir$sub", 0755);
    }
    my $path = "$dir/images/$vmid/$name";
    die "disk image '$path' already exists\n" if -e $path || -l $path;
    sysopen(my $fh, $path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, 0600)
        or die "disk image '$path' already exists\n";
    if (!truncate($fh, $size) || !close($fh)) {
        my $err = $!;
        unlink($path);
        die "cannot allocate $store:$vmid/$name: $err\n";
    }
    return "$store:$vmid/$name";
}

sub free {
    my ($lab, $volid) = @_;
    my $path = path($lab, $volid);
    die "volume '$volid' does not exist\n" if !-e $path;
    unlink($path) or die "cannot remove $path: $!\n";
}

1;
