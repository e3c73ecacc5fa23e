#!/usr/bin/perl
# PVE::MTunnel without a lab: argument checks die PVE-style with a clear message, result codes
# are exposed, and the target's start output is parsed as QemuMigrate.pm does.

use strict;
use warnings;
use Test::More;
use File::Temp qw(tempdir);
use File::Basename qw(dirname);
use JSON::PP ();

use PVE::MTunnel;
use PVE::MTunnel::Migrate;

sub dies_like(&$$) {
    my ($code, $re, $name) = @_;
    eval { $code->() };
    my $err = $@;
    like($err, $re, $name) and ok($err =~ /\n\z/, "$name: message ends in a newline (PVE style)");
}

my @ssh = ('/usr/bin/ssh', 'root@198.18.0.2');

dies_like { PVE::MTunnel->open(ssh => ['/usr/bin/ssh', '-oProxyCommand=touch /tmp/x']) }
qr/^invalid ssh destination '-oProxyCommand=touch \/tmp\/x'/,
    'destination that looks like an option is refused';
is(
    $PVE::MTunnel::last_error_code,
    $PVE::MTunnel::ERROR_CODE{invalid_argument},
    'result code is invalid_argument'
);

dies_like {
    PVE::MTunnel->open(ssh => \@ssh, forwards => ['/run/qemu-server/../../etc/100.migrate'])
}
qr/^invalid socket path .*contains '\.' or '\.\.'/, 'forward with .. is refused';

dies_like { PVE::MTunnel->open(ssh => \@ssh, forwards => ['/run/qemu-server/$(touch x).migrate']) }
qr/^invalid socket path/, 'forward with shell syntax is refused';

dies_like {
    PVE::MTunnel->open(ssh => \@ssh, forwards => ['/run/qemu-server/' . ('1' x 120) . '.migrate'])
}
qr/longer than 107 bytes/, 'over-long forward path is refused';

dies_like { PVE::MTunnel->open(ssh => \@ssh, greting_timeout_ms => 5) }
qr/^unknown option 'greting_timeout_ms'/, 'misspelt option is refused';

dies_like { PVE::MTunnel->open(ssh => 'ssh root@x') } qr/'ssh' must be an array reference/,
    'ssh must be an argv';

{
    # Canaries in a temporary directory, never real system files.
    my $dir = tempdir(CLEANUP => 1);
    open(my $fh, '>', "$dir/100.migrate") or die;
    print $fh "canary";
    close $fh;
    dies_like {
        PVE::MTunnel->open(ssh => \@ssh, socket_dir => $dir, forwards => ["$dir/100.migrate"])
    }
    qr/refusing to use socket path '\Q$dir\E\/100\.migrate': it is a regular file, not a socket/,
        'regular file at the socket path is refused';
    open($fh, '<', "$dir/100.migrate") or die;
    is(scalar(<$fh>), 'canary', 'the regular file is untouched');
    mkdir "$dir/101.migrate";
    dies_like {
        PVE::MTunnel->open(ssh => \@ssh, socket_dir => $dir, forwards => ["$dir/101.migrate"])
    }
    qr/it is a directory, not a socket/, 'directory at the socket path is refused';
    symlink("$dir/100.migrate", "$dir/102.migrate");
    dies_like {
        PVE::MTunnel->open(ssh => \@ssh, socket_dir => $dir, forwards => ["$dir/102.migrate"])
    }
    qr/it is a symlink, not a socket/, 'symlink at the socket path is refused';
    ok(-l "$dir/102.migrate", 'the symlink is untouched');
    dies_like {
        PVE::MTunnel->open(
            ssh => \@ssh,
            socket_dir => "$dir/missing",
            forwards => ["$dir/missing/100.migrate"]
        )
    }
    qr/socket directory '\Q$dir\E\/missing' does not exist/, 'missing socket directory is named';
}

dies_like { PVE::MTunnel::qmp_query_migrate('/nonexistent-mtunnel/100.qmp') }
qr/^QMP socket '\/nonexistent-mtunnel\/100\.qmp' does not exist/, 'missing QMP socket is named';
dies_like { PVE::MTunnel::qmp_migrate('/nonexistent-mtunnel/100.qmp', 'exec:rm -rf /') }
qr/^invalid migration URI 'exec:rm -rf \/'/, 'exec: migration URI is refused';
dies_like { PVE::MTunnel::qmp_migrate_resume('/nonexistent-mtunnel/100.qmp', 'exec:cat') }
qr/^invalid migration URI 'exec:cat'/, 'post-copy resume: a bad URI is refused first';
dies_like { PVE::MTunnel::qmp_migrate_recover('/nonexistent-mtunnel/100.qmp', 'fd:3') }
qr/^invalid migration URI 'fd:3'/, 'post-copy recover: a bad URI is refused first';

for my $call (qw(qmp_migrate_start_postcopy qmp_migrate_pause)) {
    dies_like { no strict 'refs'; &{"PVE::MTunnel::$call"}('/nonexistent-mtunnel/100.qmp') }
    qr/^QMP socket '\/nonexistent-mtunnel\/100\.qmp' does not exist/,
        "$call: a missing QMP socket is named";
}
dies_like {
    PVE::MTunnel::qmp_migrate_setup('/nonexistent-mtunnel/100.qmp', { postcopy => 'maybe' })
}
qr/postcopy/, 'postcopy must be a boolean';

my $listen = PVE::MTunnel::migrate_listen_parse(
    "QEMU: some warning\nmigration listens on unix:/run/qemu-server/100.migrate\n", 100);
is($listen->{uri}, 'unix:/run/qemu-server/100.migrate', 'listen line gives the URI');
is($listen->{socket}, '/run/qemu-server/100.migrate', 'and the socket to forward');
is_deeply($listen->{messages}, ['some warning'], 'QEMU: lines are kept for the log');
dies_like {
    PVE::MTunnel::migrate_listen_parse("migration listens on unix:/run/qemu-server/101.migrate\n",
        100)
}
qr/VMID 101 does not match source VMID 100/, 'VMID mismatch is refused';
dies_like {
    PVE::MTunnel::migrate_listen_parse(
        "Configuration file 'nodes/node2/qemu-server/100.conf' does not exist\n", 100)
}
qr/^unable to detect remote migration address$/m, 'no address is the PVE error';

{
    # Typing of options: numbers only by name, and only from a plain integer.
    my $o = JSON::PP->new->decode(
        PVE::MTunnel::_options_json(
            input => "1234\n",
            greeting_timeout_ms => '5000',
            handshake_slots => 0,
            remote_cleanup => 0,
            ciphers => '0042'
        )
    );
    is($o->{input}, "1234\n", 'ssh_run input "1234\n" stays a string');
    is($o->{ciphers}, '0042', 'a string option that looks like a number stays a string');
    ok(JSON::PP::is_bool($o->{remote_cleanup}) && !$o->{remote_cleanup},
        'a boolean option becomes false');
    is(
        PVE::MTunnel::_options_json(greeting_timeout_ms => '5000'),
        '{"greeting_timeout_ms":5000}',
        'a numeric option becomes a number'
    );
    dies_like { PVE::MTunnel->open(ssh => \@ssh, greeting_timeout_ms => '0042') }
    qr/^option 'greeting_timeout_ms' must be an integer number of milliseconds/,
        '"0042" is not taken as 42 but refused by name';
    dies_like { PVE::MTunnel->open(ssh => \@ssh, connect_timeout_s => "10\n") }
    qr/^option 'connect_timeout_s' must be a non-negative integer/, '"10\n" is refused by name';
    my $b = JSON::PP->new->decode(
        PVE::MTunnel::_options_json(
            check => 'true',
            setup => '1',
            remote_cleanup => 'False',
            adaptive_slots => ''
        )
    );
    is_deeply(
        [
            map { JSON::PP::is_bool($b->{$_}) ? ($b->{$_} ? 'true' : 'false') : "'$b->{$_}'" }
                qw(check setup remote_cleanup adaptive_slots)
        ],
        [qw(true true false false)],
        'boolean options: 1/true and 0/false/"" (any case)'
    );
    dies_like { PVE::MTunnel->open(ssh => \@ssh, cleanup_in_command => 'maybe') }
    qr/^option 'cleanup_in_command' must be true or false/,
        '"maybe" for a boolean option is refused by name, not taken as true';
    my $m = JSON::PP->new->decode(
        PVE::MTunnel::_migrate_options_json(
            {
                parameters => {
                    'downtime-limit' => '100',
                    'tls-hostname' => '1234',
                    'max-bandwidth' => '0042'
                },
                capabilities => { xbzrle => 1, 'auto-converge' => 0 }
            }
        )
    );
    is($m->{parameters}{'downtime-limit'}, 100, 'an integer QEMU parameter becomes a number');
    is($m->{parameters}{'tls-hostname'}, '1234', 'a string QEMU parameter stays a string');
    is($m->{parameters}{'max-bandwidth'},
        '0042', '"0042" for an integer parameter stays a string (QEMU refuses it by name)');
    ok(JSON::PP::is_bool($m->{capabilities}{xbzrle}) && $m->{capabilities}{xbzrle},
        'capabilities are booleans');
}

dies_like { PVE::MTunnel->open(ssh => \@ssh, forwards => ['60000:198.18.0.2:60000']) }
qr/^unsupported forward '60000:198\.18\.0\.2:60000': expected a UNIX socket forward \('PATH' or 'LOCAL_PATH:REMOTE_PATH'\) or a TCP forward to the target's loopback \('PORT:localhost:PORT'\)$/,
    'a TCP forward to another host than the target\'s loopback is refused, naming it';
dies_like {
    PVE::MTunnel->open(ssh => \@ssh, forwards => ['/run/qemu-server/100.migrate:/etc/passwd'])
}
qr/^invalid socket path '\/etc\/passwd': not in \/run\/qemu-server/,
    'the remote end of a forward is validated too';
dies_like { PVE::MTunnel::migrate_listen_parse("migration listens on port 60001\n", 100) }
qr/^target answered with the legacy address 'migration listens on port 60001'/,
    'a legacy "port N" answer is refused clearly';
{
    my $r = PVE::MTunnel::migrate_listen_parse(
        "Resuming suspended VM\nre-using replicated volume: scsi0 - local-zfs:vm-100-disk-0\n"
            . "storage migration listens on nbd:198.18.0.2:60001:exportname=drive-scsi0 volume:local-zfs:vm-100-disk-0\n"
            . "migration listens on tcp:198.18.0.2:60000\n",
        100
    );
    is_deeply($r->{messages}, ['Resuming suspended VM'],
        'an unknown line of qm start is returned, not dropped');
    is_deeply(
        $r->{replicated},
        [{ drive => 'scsi0', volume => 'local-zfs:vm-100-disk-0' }],
        're-using replicated volume is parsed'
    );
    is($r->{nbd}[0]{uri}, 'nbd:198.18.0.2:60001:exportname=drive-scsi0', 'NBD over TCP is parsed');
}

{
    # Storage migration: argument checks happen before any socket is touched.
    my $qmp = '/nonexistent-mtunnel/100.qmp';
    my $nbd = 'nbd:unix:/run/qemu-server/100_nbd.migrate:exportname=drive-scsi0';
    dies_like { PVE::MTunnel::qmp_mirror_start(undef, 'drive-scsi0', $nbd) }
    qr/^qmp_socket is NULL$/, 'mirror_start: a missing QMP socket argument is named';
    is(
        $PVE::MTunnel::last_error_code,
        $PVE::MTunnel::ERROR_CODE{invalid_argument},
        'mirror_start: invalid_argument'
    );
    dies_like { PVE::MTunnel::qmp_mirror_start($qmp, undef, $nbd) } qr/^device is NULL$/,
        'mirror_start: a missing device is named';
    dies_like { PVE::MTunnel::qmp_mirror_start($qmp, 'drive-scsi0"; rm', $nbd) }
    qr/^invalid device 'drive-scsi0"; rm': expected 1-64 characters/,
        'mirror_start: a bad device is refused';
    dies_like { PVE::MTunnel::qmp_mirror_start($qmp, 'drive-scsi0', 'exec:rm -rf /') }
    qr/^invalid mirror target 'exec:rm -rf \/': expected nbd:unix:/,
        'mirror_start: a bad target is refused';
    dies_like {
        PVE::MTunnel::qmp_mirror_start($qmp, 'drive-scsi0',
            'nbd:unix:/run/qemu-server/100_nbd.migrate')
    }
    qr/^invalid mirror target .*needs ':exportname=NAME'/,
        'mirror_start: an NBD target without an export is refused';
    dies_like {
        PVE::MTunnel::qmp_mirror_start($qmp, 'drive-scsi0',
            '/var/lib/vz/images/100/vm-100-disk-0.raw')
    }
    qr/^option 'format' is required for mirror target/,
        'mirror_start: a path target needs a format';
    dies_like { PVE::MTunnel::qmp_mirror_start($qmp, 'drive-scsi0', $nbd, { sped => 1 }) }
    qr/^unknown option 'sped'/, 'mirror_start: a misspelt option is refused';
    dies_like { PVE::MTunnel::qmp_mirror_start($qmp, 'drive-scsi0', $nbd, { speed => '0042' }) }
    qr/^option 'speed' must be a non-negative integer/,
        'mirror_start: speed "0042" is refused by name';
    dies_like { PVE::MTunnel::qmp_mirror_start($qmp, 'drive-scsi0', $nbd, [speed => 1]) }
    qr/^qmp_mirror_start: options must be a hash reference$/,
        'mirror_start: options must be a hash';
    is(
        PVE::MTunnel::_options_json(speed => 1024 * '10240', format => '0042'),
        '{"format":"0042","speed":10485760}',
        'speed becomes a number, format stays a string'
    );
    dies_like { PVE::MTunnel::qmp_mirror_start($qmp, 'drive-scsi0', $nbd) }
    qr/^QMP socket '\Q$qmp\E' does not exist/,
        'mirror_start: valid arguments reach the socket, which is named';

    dies_like { PVE::MTunnel::qmp_mirror_status($qmp, 'drive-scsi0') }
    qr/^qmp_mirror_status: jobs must be an array reference$/, 'status: jobs must be a list';
    dies_like { PVE::MTunnel::qmp_mirror_status(undef, ['drive-scsi0']) } qr/^qmp_socket is NULL$/,
        'status: a missing socket is named';
    dies_like { PVE::MTunnel::qmp_mirror_status($qmp, []) } qr/^no block jobs given$/,
        'status: an empty job list is refused';
    dies_like { PVE::MTunnel::qmp_mirror_wait_ready($qmp, ['drive-scsi0', 'drive-scsi0']) }
    qr/^jobs_json lists job 'drive-scsi0' twice$/, 'wait_ready: a job listed twice is refused';
    dies_like { PVE::MTunnel::qmp_mirror_wait_ready($qmp, ['drive scsi0']) }
    qr/^invalid job id 'drive scsi0'/, 'wait_ready: a bad job id is refused';

    for my $case (
        ['[', qr/^jobs_json is not valid JSON/],
        ['{"drive-scsi0": 1}', qr/^jobs_json must be a JSON array of job ids$/],
        ['[1]', qr/^jobs_json must be a JSON array of job ids$/],
        [undef, qr/^jobs_json is NULL$/]
        )
    {
        my ($text, $re) = @$case;
        my $out;
        dies_like {
            PVE::MTunnel::_check(PVE::MTunnel::_qmp_mirror_status($qmp, $text, 1000, \$out))
        }
        $re, 'status: jobs_json ' . ($text // 'NULL') . ' is refused';
        ok(!defined($out), 'status: nothing is written on failure');
    }
    dies_like { PVE::MTunnel::qmp_mirror_finish($qmp, ['drive-scsi0'], mode => 'pivot') }
    qr/^invalid finish mode 'pivot': expected cancel or complete$/,
        'finish: an unknown mode is refused';
    dies_like { PVE::MTunnel::qmp_mirror_finish($qmp, ['drive-scsi0']) }
    qr/^QMP socket '\Q$qmp\E' does not exist/, 'finish: the missing socket is named';
    is_deeply(
        PVE::MTunnel::qmp_mirror_cancel($qmp, []),
        { cancelled => [], already_gone => [] },
        'cancel: no jobs, nothing to do'
    );
    dies_like { PVE::MTunnel::qmp_mirror_cancel($qmp, ['drive-scsi0']) }
    qr/^QMP socket '\Q$qmp\E' does not exist/, 'cancel: the missing socket is named';
    is($PVE::MTunnel::last_error_code, $PVE::MTunnel::ERROR_CODE{io}, 'cancel: io code');
}

dies_like {
    PVE::MTunnel::ssh_run(ssh => ['/nonexistent/ssh', 'root@198.18.0.2'], command => ['true'])
}
qr/cannot execute '\/nonexistent\/ssh': No such file or directory/, 'missing ssh binary is named';

dies_like { PVE::MTunnel::qmp_execute('/run/qemu-server/100.qmp', 'query-status', 'running') }
qr/^qmp_execute: arguments must be a hash reference$/, 'qmp_execute: arguments that are not a hash';
{
    my @warnings;
    local $SIG{__WARN__} = sub { push @warnings, @_ };
    dies_like {
        PVE::MTunnel::migrate_listen_parse(
            "migration listens on unix:/run/qemu-server/100.migrate\n", undef)
    }
    qr/^invalid VMID '': expected 1-9 digits$/, 'migrate_listen_parse: a missing VMID is named';
    is_deeply(\@warnings, [], 'migrate_listen_parse: a missing VMID gives no Perl warning');
}

# The driver refuses bad settings before anything runs, naming them.
for my $case (
    [target => 'node1', qr/^target is local node \('node1'\)$/],
    [bwlimit => -5, qr/^invalid bwlimit '-5' \(KiB\/s, a whole number; 0 = no limit\)$/],
    [
        stall_timeout_ms => -1,
        qr/^invalid stall_timeout_ms '-1' \(a whole number of milliseconds, more than 0\)$/
    ],
    [mirror_timeout_ms => 0, qr/^invalid mirror_timeout_ms '0'/],
    [downtime_ms => '100ms', qr/^invalid downtime_ms '100ms'/],
    [hold_ms => -1, qr/^invalid hold_ms '-1'/],
    [completion_wait => 'sleep', qr/^invalid completion wait 'sleep' \(events, poll or pve\)$/],
    [vmid => '0100', qr/^invalid VMID '0100'$/],
    )
{
    my ($key, $value, $error) = @$case;
    dies_like {
        PVE::MTunnel::Migrate->new(
            vmid => 100,
            node => 'node1',
            target => 'node2',
            ssh => \@ssh,
            $key => $value
        )
    }
    $error, "Migrate->new: $key '$value' is refused by name";
}
ok(
    PVE::MTunnel::Migrate->new(
        vmid => 100,
        node => 'node1',
        target => 'node2',
        ssh => \@ssh,
        bwlimit => 0,
        hold_ms => 0
    ),
    'Migrate->new: bwlimit 0 (no limit) and hold_ms 0 are accepted'
);

# On a Proxmox VE node (/etc/pve; MTUNNEL_PVE_DIR here) the CLI refuses and names `qm migrate`
# and the flag that lets a non-PVE host through. The CLI beside the modules under test.
{
    my $cli =
        $INC{'PVE/MTunnel.pm'} =~ m{^/usr/share/perl5/}
        ? '/usr/bin/mtunnel-migrate'
        : dirname($INC{'PVE/MTunnel.pm'}) . '/../../bin/mtunnel-migrate';
    my $pve = tempdir(CLEANUP => 1);
    my $cli_run = sub {
        my ($pve_dir, @args) = @_;
        local $ENV{MTUNNEL_PVE_DIR} = $pve_dir;
        my $out = `$^X $cli @args 2>&1`;
        return ($? >> 8, $out);
    };
    my @args = (100, 'node2', '--node', 'node1', '--ssh-file', "$pve/no-such-ssh-file");
    my ($rc, $out) = $cli_run->($pve, @args);
    is($rc, 1, 'CLI on a PVE node: exit 1');
    like(
        $out,
        qr/^TASK ERROR: this is a Proxmox VE node \(\Q$pve\E exists\): migrate VM 100 with 'qm migrate 100 node2 --online'\. .*does not move the VM's config, take its 'migrate' lock or tell HA, so VM 100 would look stopped on node 'node1' and could be started there a second time\. .*pass --standalone - nothing was done$/,
        'CLI on a PVE node: refused, naming qm migrate, what it would skip and --standalone'
    );
    ($rc, $out) = $cli_run->($pve, @args, '--check', '--fix');
    like(
        $out,
        qr/^TASK ERROR: this is a Proxmox VE node/,
        'CLI on a PVE node: --check --fix is refused too'
    );
    for my $case (
        ['--standalone', [$pve, @args, '--standalone']],
        ['--check without --fix only reads', [$pve, @args, '--check']],
        ['a host without the directory', ["$pve/none", @args]],
        )
    {
        my ($name, $run) = @$case;
        ($rc, $out) = $cli_run->(@$run);
        like(
            $out,
            qr/^cannot read \Q$pve\E\/no-such-ssh-file: /,
            "CLI: $name goes on (to reading the ssh file)"
        );
    }
}

done_testing();
