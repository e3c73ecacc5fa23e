/*
 * errors: the library's argument checks seen from C. NULL and malformed input must give a
 * result code and a message, never a crash. Prints TAP so `prove` could read it too.
 */
#include <stdio.h>
#include <string.h>

#include "mtunnel.h"

static int failures, count;

static void expect(int got, int want, const char *what, const char *needle)
{
    const char *msg = mtunnel_last_error();
    int ok = got == want && (!needle || strstr(msg, needle));
    count++;
    if (!ok)
        failures++;
    printf("%s %d - %s (rc %d, \"%s\")\n", ok ? "ok" : "not ok", count, what, got, msg);
}

int main(void)
{
    mtunnel_tunnel *t = NULL;
    char *out = NULL;

    expect(tunnel_open(NULL, NULL, NULL, &t), MTUNNEL_ERR_INVALID_ARGUMENT, "NULL options are refused", "options_json is NULL");
    expect(tunnel_open("{}", NULL, NULL, NULL), MTUNNEL_ERR_INVALID_ARGUMENT, "NULL tunnel_out is refused", "tunnel_out is NULL");
    expect(tunnel_open("{\"ssh\": [\"ssh\", \"-oProxyCommand=x\"]}", NULL, NULL, &t), MTUNNEL_ERR_INVALID_ARGUMENT,
           "a destination starting with '-' is refused", "invalid ssh destination");
    expect(tunnel_open("{\"ssh\": [\"ssh\", \"root@198.18.0.2\"], \"forwards\": [\"/run/qemu-server/../x.migrate\"]}", NULL, NULL, &t),
           MTUNNEL_ERR_INVALID_ARGUMENT, "'..' in a forward is refused", "invalid socket path");
    expect(tunnel_open("{\"ssh\": [\"ssh\", \"root@198.18.0.2\"], \"frwards\": []}", NULL, NULL, &t),
           MTUNNEL_ERR_INVALID_ARGUMENT, "a misspelt option is refused", "unknown option 'frwards'");
    expect(tunnel_open("{\"ssh\": [\"ssh\", \"root@198.18.0.2\"", NULL, NULL, &t), MTUNNEL_ERR_INVALID_ARGUMENT,
           "malformed JSON is refused", "not valid JSON");
    expect(tunnel_open("{\"ssh\": [\"ssh\", \"\xff@198.18.0.2\"]}", NULL, NULL, &t), MTUNNEL_ERR_INVALID_ARGUMENT,
           "invalid UTF-8 is refused", "not valid UTF-8");
    expect(t == NULL, 1, "no handle was written on failure", NULL);
    expect(tunnel_wait_ready(NULL, 0), MTUNNEL_ERR_INVALID_ARGUMENT, "wait_ready(NULL) is refused", "tunnel is NULL");
    expect(tunnel_command(NULL, "quit", 0, &out), MTUNNEL_ERR_INVALID_ARGUMENT, "command(NULL) is refused", "tunnel is NULL");
    expect(tunnel_read_line(NULL, 0, &out), MTUNNEL_ERR_INVALID_ARGUMENT, "read_line(NULL) is refused", "tunnel is NULL");
    expect(tunnel_open("{\"ssh\": [\"ssh\", \"root@198.18.0.2\"], \"forwards\": [\"60000:198.18.0.2:60000\"]}", NULL, NULL, &t),
           MTUNNEL_ERR_INVALID_ARGUMENT, "a TCP forward to another host is refused, naming it", "unsupported forward '60000:198.18.0.2:60000'");
    expect(tunnel_close(NULL, NULL), MTUNNEL_OK, "close(NULL) is a no-op", NULL);
    tunnel_free(NULL);
    mtunnel_string_free(NULL);
    expect(qmp_migrate(NULL, "unix:/x", NULL), MTUNNEL_ERR_INVALID_ARGUMENT, "qmp_migrate(NULL socket) is refused", "qmp_socket is NULL");
    expect(qmp_migrate("/nonexistent/100.qmp", "exec:rm -rf /", NULL), MTUNNEL_ERR_INVALID_ARGUMENT, "an exec: URI is refused", "invalid migration URI");
    expect(qmp_migrate_setup(NULL, NULL, &out), MTUNNEL_ERR_INVALID_ARGUMENT, "qmp_migrate_setup(NULL socket) is refused", "qmp_socket is NULL");
    expect(qmp_migrate_setup("/nonexistent/100.qmp", "{\"capabilities\": {\"xbzrle\": 1}}", &out), MTUNNEL_ERR_INVALID_ARGUMENT,
           "a capability that is not a boolean is refused", "capability 'xbzrle' must be true or false");
    expect(qmp_query_migrate("/nonexistent/100.qmp", 1000, &out), MTUNNEL_ERR_IO, "a missing QMP socket is named", "does not exist");
    expect(out == NULL, 1, "no output was written on failure", NULL);
    expect(qmp_wait_migration(NULL, NULL, &out), MTUNNEL_ERR_INVALID_ARGUMENT, "qmp_wait_migration(NULL socket) is refused", "qmp_socket is NULL");
    expect(qmp_wait_migration("/nonexistent/100.qmp", "{\"hold_ms\": -5}", &out), MTUNNEL_ERR_INVALID_ARGUMENT,
           "a negative hold is refused", "option 'hold_ms' must be 0 or more milliseconds, not -5");
    expect(qmp_wait_migration("/nonexistent/100.qmp", NULL, &out), MTUNNEL_ERR_IO, "qmp_wait_migration names a missing QMP socket", "does not exist");
    expect(qmp_mirror_start(NULL, "drive-scsi0", "nbd:unix:/run/qemu-server/100_nbd.migrate:exportname=drive-scsi0", NULL, &out),
           MTUNNEL_ERR_INVALID_ARGUMENT, "qmp_mirror_start(NULL socket) is refused", "qmp_socket is NULL");
    expect(qmp_mirror_start("/nonexistent/100.qmp", NULL, "nbd:unix:/run/qemu-server/100_nbd.migrate:exportname=drive-scsi0", NULL, &out),
           MTUNNEL_ERR_INVALID_ARGUMENT, "qmp_mirror_start(NULL device) is refused", "device is NULL");
    expect(qmp_mirror_start("/nonexistent/100.qmp", "drive-scsi0", "exec:rm -rf /", NULL, &out), MTUNNEL_ERR_INVALID_ARGUMENT,
           "a mirror target that is not nbd: or a path is refused", "invalid mirror target");
    expect(qmp_mirror_start("/nonexistent/100.qmp", "drive-scsi0", "nbd:unix:/run/qemu-server/100_nbd.migrate:exportname=drive-scsi0",
                            "{\"speed\": -1}", &out),
           MTUNNEL_ERR_INVALID_ARGUMENT, "a negative mirror speed is refused", "option 'speed' must be a non-negative integer");
    expect(qmp_mirror_method(NULL, "drive-scsi0", 1000, &out), MTUNNEL_ERR_INVALID_ARGUMENT,
           "qmp_mirror_method(NULL socket) is refused", "qmp_socket is NULL");
    expect(qmp_mirror_method("/nonexistent/100.qmp", NULL, 1000, &out), MTUNNEL_ERR_INVALID_ARGUMENT,
           "qmp_mirror_method(NULL device) is refused", "device is NULL");
    expect(qmp_mirror_method("/nonexistent/100.qmp", "drive scsi0", 1000, &out), MTUNNEL_ERR_INVALID_ARGUMENT,
           "qmp_mirror_method: a device name with a space is refused before connecting", "invalid device 'drive scsi0'");
    expect(qmp_mirror_method("/nonexistent/100.qmp", "drive-scsi0", 1000, &out), MTUNNEL_ERR_IO,
           "qmp_mirror_method names a missing QMP socket", "does not exist");
    expect(out == NULL, 1, "qmp_mirror_method wrote nothing on failure", NULL);
    expect(qmp_mirror_status("/nonexistent/100.qmp", NULL, 1000, &out), MTUNNEL_ERR_INVALID_ARGUMENT,
           "qmp_mirror_status(NULL jobs) is refused", "jobs_json is NULL");
    expect(qmp_mirror_wait_ready("/nonexistent/100.qmp", "{\"drive-scsi0\": 1}", 1000, &out), MTUNNEL_ERR_INVALID_ARGUMENT,
           "a job list that is not an array is refused", "jobs_json must be a JSON array of job ids");
    expect(qmp_mirror_finish("/nonexistent/100.qmp", "[\"drive-scsi0\"]", "pivot", 1000, &out), MTUNNEL_ERR_INVALID_ARGUMENT,
           "an unknown finish mode is refused", "invalid finish mode 'pivot'");
    expect(qmp_mirror_cancel(NULL, "[]", 1000, &out), MTUNNEL_ERR_INVALID_ARGUMENT, "qmp_mirror_cancel(NULL socket) is refused",
           "qmp_socket is NULL");
    expect(out == NULL, 1, "no output was written on failure", NULL);
    expect(qmp_mirror_cancel("/nonexistent/100.qmp", "[]", 1000, NULL), MTUNNEL_OK, "cancelling no jobs is a no-op (NULL out is fine)", NULL);
    expect(mtunnel_migrate_listen_parse("garbage\n", "100", &out), MTUNNEL_ERR_PROTOCOL, "output without an address is refused",
           "unable to detect remote migration address");
    expect(mtunnel_migrate_listen_parse("migration listens on unix:/run/qemu-server/100.migrate\n", "100", &out), MTUNNEL_OK,
           "a listen line is parsed", NULL);
    expect(out && strstr(out, "\"uri\":\"unix:/run/qemu-server/100.migrate\"") != NULL, 1, "the parsed URI is returned", NULL);
    mtunnel_string_free(out);
    out = NULL;
    /* The former names still link and behave the same, for one release. */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
    expect(migrate_listen_parse("migration listens on unix:/run/qemu-server/100.migrate\n", "100", &out), MTUNNEL_OK,
           "the deprecated migrate_listen_parse still links and parses", NULL);
    expect(ssh_run(NULL, NULL), MTUNNEL_ERR_INVALID_ARGUMENT, "the deprecated ssh_run still links and checks its arguments",
           "options_json is NULL");
    expect(ssh_remove_sockets("{\"ssh\": [\"ssh\", \"root@198.18.0.2\"], \"sockets\": [\"/etc/passwd\"]}"),
           MTUNNEL_ERR_INVALID_ARGUMENT, "the deprecated ssh_remove_sockets still links and checks its paths", "/etc/passwd");
#pragma GCC diagnostic pop
    mtunnel_string_free(out);
    expect(mtunnel_ssh_run(NULL, NULL), MTUNNEL_ERR_INVALID_ARGUMENT, "mtunnel_ssh_run(NULL options) is refused", "options_json is NULL");
    printf("1..%d\n", count);
    printf("RESULT: %d passed, %d failed\n", count - failures, failures);
    return failures != 0;
}
