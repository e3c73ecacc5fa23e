#!/usr/bin/perl
# PVE::MTunnel without a lab: argument checks die PVE-style with a clear message, result codes
# are exposed, and the target's start output is parsed as QemuMigrate.pm does.

use strict;
use warnings;
use Test::More;
use File::Temp qw(tempdir);
use JSON::PP ();

use PVE::MTunnel;

sub dies_like(&$$) {
    my ($code, $re, $name) = @_;
    eval { $code->() };
    my $err = $@;
    like($err, $re, $name) and ok($err =~ /\n\z/, "$name: message ends in a newline (PVE style)");
}

my @ssh = ('/usr/bin/ssh', 'root@198.18.0.2');

dies_like { PVE::MTunnel->open(ssh => ['/usr/bin/ssh', '-oProxyCommand=touch /tmp/x']) }
    qr/^invalid ssh destination '-oProxyCommand=touch \/tmp\/x'/, 'destination that looks like an option is refused';
is($PVE::MTunnel::last_error_code, $PVE::MTunnel::ERROR_CODE{invalid_argument}, 'result code is invalid_argument');

dies_like { PVE::MTunnel->open(ssh => \@ssh, forwards => ['/run/qemu-server/../../etc/100.migrate']) }
    qr/^invalid socket path .*contains '\.' or '\.\.'/, 'forward with .. is refused';

dies_like { PVE::MTunnel->open(ssh => \@ssh, forwards => ['/run/qemu-server/$(touch x).migrate']) }
    qr/^invalid socket path/, 'forward with shell syntax is refused';

dies_like { PVE::MTunnel->open(ssh => \@ssh, forwards => ['/run/qemu-server/' . ('1' x 120) . '.migrate']) }
    qr/longer than 107 bytes/, 'over-long forward path is refused';

dies_like { PVE::MTunnel->open(ssh => \@ssh, greting_timeout_ms => 5) }
    qr/^unknown option 'greting_timeout_ms'/, 'misspelt option is refused';

dies_like { PVE::MTunnel->open(ssh => 'ssh root@x') } qr/'ssh' must be an array reference/, 'ssh must be an argv';

{
    # Canaries in a temporary directory, never real system files.
    my $dir = tempdir(CLEANUP => 1);
    open(my $fh, '>', "$dir/100.migrate") or die; print $fh "canary"; close $fh;
    dies_like { PVE::MTunnel->open(ssh => \@ssh, socket_dir => $dir, forwards => ["$dir/100.migrate"]) }
        qr/refusing to use socket path '\Q$dir\E\/100\.migrate': it is a regular file, not a socket/, 'regular file at the socket path is refused';
    open($fh, '<', "$dir/100.migrate") or die; is(scalar(<$fh>), 'canary', 'the regular file is untouched');
    mkdir "$dir/101.migrate";
    dies_like { PVE::MTunnel->open(ssh => \@ssh, socket_dir => $dir, forwards => ["$dir/101.migrate"]) }
        qr/it is a directory, not a socket/, 'directory at the socket path is refused';
    symlink("$dir/100.migrate", "$dir/102.migrate");
    dies_like { PVE::MTunnel->open(ssh => \@ssh, socket_dir => $dir, forwards => ["$dir/102.migrate"]) }
        qr/it is a symlink, not a socket/, 'symlink at the socket path is refused';
    ok(-l "$dir/102.migrate", 'the symlink is untouched');
    dies_like { PVE::MTunnel->open(ssh => \@ssh, socket_dir => "$dir/missing", forwards => ["$dir/missing/100.migrate"]) }
        qr/socket directory '\Q$dir\E\/missing' does not exist/, 'missing socket directory is named';
}

dies_like { PVE::MTunnel::qmp_query_migrate('/nonexistent-mtunnel/100.qmp') }
    qr/^QMP socket '\/nonexistent-mtunnel\/100\.qmp' does not exist/, 'missing QMP socket is named';
dies_like { PVE::MTunnel::qmp_migrate('/nonexistent-mtunnel/100.qmp', 'exec:rm -rf /') }
    qr/^invalid migration URI 'exec:rm -rf \/'/, 'exec: migration URI is refused';

my $listen = PVE::MTunnel::migrate_listen_parse(
    "QEMU: some warning\nmigration listens on unix:/run/qemu-server/100.migrate\n", 100);
is($listen->{uri}, 'unix:/run/qemu-server/100.migrate', 'listen line gives the URI');
is($listen->{socket}, '/run/qemu-server/100.migrate', 'and the socket to forward');
is_deeply($listen->{messages}, ['some warning'], 'QEMU: lines are kept for the log');
dies_like { PVE::MTunnel::migrate_listen_parse("migration listens on unix:/run/qemu-server/101.migrate\n", 100) }
    qr/VMID 101 does not match source VMID 100/, 'VMID mismatch is refused';
dies_like { PVE::MTunnel::migrate_listen_parse("Configuration file 'nodes/node2/qemu-server/100.conf' does not exist\n", 100) }
    qr/^unable to detect remote migration address$/m, 'no address is the PVE error';

{
    # Typing of options: numbers only by name, and only from a plain integer.
    my $o = JSON::PP->new->decode(PVE::MTunnel::_options_json(input => "1234\n", greeting_timeout_ms => '5000', handshake_slots => 0,
	remote_cleanup => 0, ciphers => '0042'));
    is($o->{input}, "1234\n", 'ssh_run input "1234\n" stays a string');
    is($o->{ciphers}, '0042', 'a string option that looks like a number stays a string');
    ok(JSON::PP::is_bool($o->{remote_cleanup}) && !$o->{remote_cleanup}, 'a boolean option becomes false');
    is(PVE::MTunnel::_options_json(greeting_timeout_ms => '5000'), '{"greeting_timeout_ms":5000}', 'a numeric option becomes a number');
    dies_like { PVE::MTunnel->open(ssh => \@ssh, greeting_timeout_ms => '0042') }
	qr/^option 'greeting_timeout_ms' must be an integer number of milliseconds/, '"0042" is not taken as 42 but refused by name';
    dies_like { PVE::MTunnel->open(ssh => \@ssh, connect_timeout_s => "10\n") }
	qr/^option 'connect_timeout_s' must be a non-negative integer/, '"10\n" is refused by name';
    my $m = JSON::PP->new->decode(PVE::MTunnel::_migrate_options_json({ parameters => { 'downtime-limit' => '100', 'tls-hostname' => '1234',
	'max-bandwidth' => '0042' }, capabilities => { xbzrle => 1, 'auto-converge' => 0 } }));
    is($m->{parameters}{'downtime-limit'}, 100, 'an integer QEMU parameter becomes a number');
    is($m->{parameters}{'tls-hostname'}, '1234', 'a string QEMU parameter stays a string');
    is($m->{parameters}{'max-bandwidth'}, '0042', '"0042" for an integer parameter stays a string (QEMU refuses it by name)');
    ok(JSON::PP::is_bool($m->{capabilities}{xbzrle}) && $m->{capabilities}{xbzrle}, 'capabilities are booleans');
}

dies_like { PVE::MTunnel->open(ssh => \@ssh, forwards => ['60000:localhost:60000']) }
    qr/^unsupported forward '60000:localhost:60000': only UNIX socket forwards/, 'a TCP forward spec is refused, naming it';
dies_like { PVE::MTunnel->open(ssh => \@ssh, forwards => ['/run/qemu-server/100.migrate:/etc/passwd']) }
    qr/^invalid socket path '\/etc\/passwd': not in \/run\/qemu-server/, 'the remote end of a forward is validated too';
dies_like { PVE::MTunnel::migrate_listen_parse("migration listens on port 60001\n", 100) }
    qr/^target answered with the legacy address 'migration listens on port 60001'/, 'a legacy "port N" answer is refused clearly';
{
    my $r = PVE::MTunnel::migrate_listen_parse("Resuming suspended VM\nre-using replicated volume: scsi0 - local-zfs:vm-100-disk-0\n"
	. "storage migration listens on nbd:198.18.0.2:60001:exportname=drive-scsi0 volume:local-zfs:vm-100-disk-0\n"
	. "migration listens on tcp:198.18.0.2:60000\n", 100);
    is_deeply($r->{messages}, ['Resuming suspended VM'], 'an unknown line of qm start is returned, not dropped');
    is_deeply($r->{replicated}, [{ drive => 'scsi0', volume => 'local-zfs:vm-100-disk-0' }], 're-using replicated volume is parsed');
    is($r->{nbd}[0]{uri}, 'nbd:198.18.0.2:60001:exportname=drive-scsi0', 'NBD over TCP is parsed');
}

dies_like { PVE::MTunnel::ssh_run(ssh => ['/nonexistent/ssh', 'root@198.18.0.2'], command => ['true']) }
    qr/cannot execute '\/nonexistent\/ssh': No such file or directory/, 'missing ssh binary is named';

done_testing();
