/*
 * migrate: live-migrate one VM with libmtunnel from C, the way QemuMigrate.pm phase 2/3 does.
 *
 *   migrate VMID SOURCE_NODE SSH_PREFIX_FILE
 *
 * SSH_PREFIX_FILE holds the ssh argv prefix, one element per line, `user@host` last. The
 * program starts the target with `qm start VMID --skiplock --migratedfrom SOURCE_NODE
 * --migration_type secure --stateuri unix` over ssh (`nbd_protocol_version: 1` on its stdin, as
 * Proxmox VE does), opens the tunnel, waits until it is ready, runs qmp_migrate, polls
 * query-migrate until completed, resumes the VM on the target through the tunnel, closes the
 * tunnel and stops the source.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "mtunnel.h"

/* Appends `s` to `buf` as a JSON string. */
static int json_string(char *buf, size_t cap, const char *s)
{
    size_t n = strlen(buf);
    if (n + 3 >= cap)
        return -1;
    buf[n++] = '"';
    for (; *s; s++) {
        if (n + 8 >= cap)
            return -1;
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            buf[n++] = '\\';
            buf[n++] = (char)c;
        } else if (c < 0x20) {
            n += (size_t)snprintf(buf + n, cap - n, "\\u%04x", c);
        } else {
            buf[n++] = (char)c;
        }
    }
    buf[n++] = '"';
    buf[n] = '\0';
    return 0;
}

/* Reads the prefix file into a JSON array in `out`. */
static int read_prefix(const char *path, char *out, size_t cap)
{
    FILE *f = fopen(path, "r");
    char line[1024];
    int first = 1;
    if (!f) {
        perror(path);
        return -1;
    }
    strcpy(out, "[");
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = '\0';
        if (!line[0])
            continue;
        if (!first)
            strncat(out, ",", cap - strlen(out) - 1);
        first = 0;
        if (json_string(out, cap, line) < 0) {
            fclose(f);
            return -1;
        }
    }
    fclose(f);
    strncat(out, "]", cap - strlen(out) - 1);
    return first ? -1 : 0;
}

/* Finds "key":"value" in a flat JSON reply and copies value; good enough for an example. */
static int json_field(const char *json, const char *key, char *out, size_t cap)
{
    char pat[64];
    const char *p, *end;
    snprintf(pat, sizeof pat, "\"%s\":\"", key);
    p = strstr(json, pat);
    if (!p)
        return -1;
    p += strlen(pat);
    end = strchr(p, '"');
    if (!end || (size_t)(end - p) >= cap)
        return -1;
    memcpy(out, p, (size_t)(end - p));
    out[end - p] = '\0';
    return 0;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void on_log(void *userdata, int level, const char *msg)
{
    (void)userdata;
    if (level <= MTUNNEL_LOG_INFO)
        printf("  [mtunnel] %s\n", msg);
}

#define FAIL(what)                                                                     \
    do {                                                                               \
        fprintf(stderr, "migrate: %s failed: %s\n", what, mtunnel_last_error());       \
        goto out;                                                                      \
    } while (0)

int main(int argc, char **argv)
{
    char prefix[4096], opts[8192], qmp[128], uri[256], sock[128], status[64];
    char *result = NULL, *reply = NULL;
    mtunnel_tunnel *tunnel = NULL;
    const char *vmid, *node;
    int rc = 1;
    double t_open, t_ready, t_migrate;

    if (argc != 4) {
        fprintf(stderr, "usage: %s VMID SOURCE_NODE SSH_PREFIX_FILE\n", argv[0]);
        return 2;
    }
    vmid = argv[1];
    node = argv[2];
    if (read_prefix(argv[3], prefix, sizeof prefix) < 0) {
        fprintf(stderr, "migrate: cannot read ssh prefix from %s\n", argv[3]);
        return 2;
    }
    snprintf(qmp, sizeof qmp, "/run/qemu-server/%s.qmp", vmid);

    /* phase 2: start the target and learn where it listens */
    snprintf(opts, sizeof opts, "{\"ssh\":%s,\"command\":[\"qm\",\"start\",", prefix);
    json_string(opts, sizeof opts, vmid);
    strncat(opts, ",\"--skiplock\",\"--migratedfrom\",", sizeof opts - strlen(opts) - 1);
    json_string(opts, sizeof opts, node);
    strncat(opts, ",\"--migration_type\",\"secure\",\"--stateuri\",\"unix\"],\"input\":\"nbd_protocol_version: 1\\n\"}",
            sizeof opts - strlen(opts) - 1);
    if (ssh_run(opts, &result) != MTUNNEL_OK)
        FAIL("starting the target VM");
    {
        /* The parser wants the raw stdout: ask it from the JSON result. */
        char *out_json = NULL;
        const char *p = strstr(result, "\"stdout\":\"");
        char stdout_text[4096];
        size_t n = 0;
        if (!p)
            FAIL("reading qm start output");
        for (p += 10; *p && *p != '"' && n + 1 < sizeof stdout_text; p++) {
            if (*p == '\\' && p[1] == 'n') {
                stdout_text[n++] = '\n';
                p++;
            } else {
                stdout_text[n++] = *p;
            }
        }
        stdout_text[n] = '\0';
        if (migrate_listen_parse(stdout_text, vmid, &out_json) != MTUNNEL_OK)
            FAIL("parsing the target's listen address");
        if (json_field(out_json, "uri", uri, sizeof uri) < 0 || json_field(out_json, "socket", sock, sizeof sock) < 0) {
            mtunnel_string_free(out_json);
            fprintf(stderr, "migrate: target did not report a UNIX socket\n");
            goto out;
        }
        mtunnel_string_free(out_json);
    }
    printf("target listens on %s\n", uri);

    snprintf(opts, sizeof opts, "{\"ssh\":%s,\"forwards\":[", prefix);
    json_string(opts, sizeof opts, sock);
    strncat(opts, "]}", sizeof opts - strlen(opts) - 1);
    t_open = now();
    if (tunnel_open(opts, on_log, NULL, &tunnel) != MTUNNEL_OK)
        FAIL("tunnel_open");
    if (tunnel_wait_ready(tunnel, 70000) != MTUNNEL_OK)
        FAIL("tunnel_wait_ready");
    t_ready = now();
    printf("tunnel ready after %.3f s\n", t_ready - t_open);

    if (qmp_migrate(qmp, uri, "{\"capabilities\":{\"auto-converge\":true},\"parameters\":{\"downtime-limit\":100}}") != MTUNNEL_OK)
        FAIL("qmp_migrate");
    t_migrate = now();
    for (;;) {
        struct timespec pause = {0, 100 * 1000 * 1000};
        if (qmp_query_migrate(qmp, 10000, &result) != MTUNNEL_OK)
            FAIL("qmp_query_migrate");
        if (json_field(result, "status", status, sizeof status) < 0)
            strcpy(status, "none");
        mtunnel_string_free(result);
        result = NULL;
        if (!strcmp(status, "completed"))
            break;
        if (!strcmp(status, "failed") || !strcmp(status, "cancelled")) {
            fprintf(stderr, "migrate: migration %s\n", status);
            goto out;
        }
        nanosleep(&pause, NULL);
    }
    printf("migration completed in %.3f s\n", now() - t_migrate);

    /* phase 3: resume on the target, close, stop the source */
    {
        char cmd[64];
        snprintf(cmd, sizeof cmd, "resume %s", vmid);
        if (tunnel_command(tunnel, cmd, 30000, &reply) != MTUNNEL_OK)
            FAIL("resume through the tunnel");
        printf("resume %s: %s\n", vmid, reply);
    }
    if (tunnel_close(tunnel, NULL) != MTUNNEL_OK)
        FAIL("tunnel_close");
    if (qmp_execute(qmp, "quit", NULL, 10000, NULL) != MTUNNEL_OK)
        FAIL("stopping the source");
    printf("RESULT: VM %s migrated from %s, tunnel closed, source stopped\n", vmid, node);
    rc = 0;
out:
    mtunnel_string_free(result);
    mtunnel_string_free(reply);
    tunnel_free(tunnel);
    if (rc)
        printf("RESULT: migration of VM %s FAILED\n", vmid);
    return rc;
}
