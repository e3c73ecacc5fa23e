/*
 * migrate: live-migrate one VM with libmtunnel from C, the way QemuMigrate.pm phase 2/3 does.
 *
 *   migrate VMID SOURCE_NODE SSH_PREFIX_FILE [--with-local-disks]
 *
 * SSH_PREFIX_FILE holds the ssh argv prefix, one element per line, `user@host` last. The
 * program starts the target with `qm start VMID --skiplock --migratedfrom SOURCE_NODE
 * --migration_type secure --stateuri unix` over ssh (`nbd_protocol_version: 1` on its stdin, as
 * Proxmox VE does), opens the tunnel, waits until it is ready, runs qmp_migrate, polls
 * query-migrate until completed, resumes the VM on the target through the tunnel, closes the
 * tunnel and stops the source.
 *
 * With --with-local-disks it also migrates the VM's local disks, as `qm migrate --online
 * --with-local-disks` does: the target is started with `--targetstorage 1` (same storage
 * names), allocates a new volume for each local disk and exports it over NBD on a UNIX
 * socket; the tunnel forwards that socket next to the RAM socket; each disk is mirrored into
 * its export (qmp_mirror_start) and the RAM migration starts once every mirror is ready
 * (qmp_mirror_wait_ready). The library picks the QMP call from how the VM attached the disk,
 * and the example prints which (qmp_mirror_method): drive-mirror for a disk attached with
 * -drive (QEMU 7.2; machine versions below 10.0 on Proxmox VE 9; the job id is the device,
 * drive-ide0), blockdev-mirror for one attached with -blockdev (Proxmox VE 9, machine versions
 * 10.0 and later: the target becomes a block node of its own, mt-mirror-ide0, and the job is
 * mirror-ide0). Once RAM has converged, the mirrors are ended with block-job-cancel
 * (qmp_mirror_finish "cancel": the target gets every write, the source keeps its disk; for
 * blockdev-mirror the library then deletes the target nodes, and the example prints them), the
 * target's NBD server is stopped (`qm nbdstop VMID`) and the VM resumed there. The source's
 * volumes are left in place (free them with `pvesm free` on the source).
 *
 * If that fails after the target was started, the example cleans up as the Perl driver's
 * phase2_cleanup does: migrate_cancel (if RAM was migrating), `cont` of a source left in
 * postmigrate, qmp_mirror_cancel, `qm stop VMID --skiplock --migratedfrom NODE` on the target,
 * `pvesm free VOLID` on the target for each new volume, and closes the tunnel.
 *
 * The JSON handling below is a small reader for the library's own replies (compact JSON),
 * good enough for an example; a real program would use a JSON library.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "mtunnel.h"

#define MAX_NBD 16

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

/* Appends the literal `s` to `buf`. */
static int append(char *buf, size_t cap, const char *s)
{
    size_t n = strlen(buf), m = strlen(s);
    if (n + m >= cap)
        return -1;
    memcpy(buf + n, s, m + 1);
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
        if ((!first && append(out, cap, ",") < 0) || json_string(out, cap, line) < 0) {
            fclose(f);
            return -1;
        }
        first = 0;
    }
    fclose(f);
    if (append(out, cap, "]") < 0)
        return -1;
    return first ? -1 : 0;
}

/* ------------------------------------------------------------ reading JSON replies */

static const char *json_ws(const char *p)
{
    while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')
        p++;
    return p;
}

static unsigned json_hex4(const char *p)
{
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char c = p[i];
        v <<= 4;
        if (c >= '0' && c <= '9')
            v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f')
            v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F')
            v |= (unsigned)(c - 'A' + 10);
        else
            return 0xFFFFFFFFu;
    }
    return v;
}

/* Decodes the JSON string at `p` (its opening quote) into `out` (if not NULL). Returns the
 * position after the closing quote, or NULL if malformed or longer than `cap`. */
static const char *json_decode(const char *p, char *out, size_t cap)
{
    size_t n = 0;
    if (*p++ != '"')
        return NULL;
    while (*p != '"') {
        unsigned c = (unsigned char)*p++;
        char enc[4];
        size_t len = 1;
        if (!c)
            return NULL;
        if (c == '\\') {
            switch (*p++) {
            case '"': c = '"'; break;
            case '\\': c = '\\'; break;
            case '/': c = '/'; break;
            case 'b': c = '\b'; break;
            case 'f': c = '\f'; break;
            case 'n': c = '\n'; break;
            case 'r': c = '\r'; break;
            case 't': c = '\t'; break;
            case 'u':
                c = json_hex4(p);
                if (c == 0xFFFFFFFFu)
                    return NULL;
                p += 4;
                if (c >= 0xD800 && c < 0xDC00 && p[0] == '\\' && p[1] == 'u') {
                    unsigned lo = json_hex4(p + 2);
                    if (lo >= 0xDC00 && lo < 0xE000) {
                        c = 0x10000 + ((c - 0xD800) << 10) + (lo - 0xDC00);
                        p += 6;
                    }
                }
                break;
            default:
                return NULL;
            }
            /* UTF-8 encode escapes; raw bytes of the input are copied as they are */
            if (c < 0x80) {
                enc[0] = (char)c;
            } else if (c < 0x800) {
                enc[0] = (char)(0xC0 | (c >> 6));
                enc[1] = (char)(0x80 | (c & 0x3F));
                len = 2;
            } else if (c < 0x10000) {
                enc[0] = (char)(0xE0 | (c >> 12));
                enc[1] = (char)(0x80 | ((c >> 6) & 0x3F));
                enc[2] = (char)(0x80 | (c & 0x3F));
                len = 3;
            } else {
                enc[0] = (char)(0xF0 | (c >> 18));
                enc[1] = (char)(0x80 | ((c >> 12) & 0x3F));
                enc[2] = (char)(0x80 | ((c >> 6) & 0x3F));
                enc[3] = (char)(0x80 | (c & 0x3F));
                len = 4;
            }
        } else {
            enc[0] = (char)c;
        }
        if (out) {
            if (n + len >= cap)
                return NULL;
            memcpy(out + n, enc, len);
        }
        n += len;
    }
    if (out)
        out[n] = '\0';
    return p + 1;
}

/* Returns the position after the JSON value at `p`, or NULL if malformed. */
static const char *json_skip(const char *p)
{
    int depth = 0;
    p = json_ws(p);
    do {
        if (*p == '"') {
            if (!(p = json_decode(p, NULL, 0)))
                return NULL;
            continue;
        }
        if (*p == '{' || *p == '[') {
            depth++;
        } else if (*p == '}' || *p == ']') {
            if (--depth < 0)
                return NULL;
        } else if (!*p) {
            return NULL;
        } else if (!depth) {
            /* a number, true, false or null */
            while (*p && !strchr(",}] \t\r\n", *p))
                p++;
            return p;
        }
        p++;
    } while (depth);
    return p;
}

/* The value of member `key` of the JSON object at `obj` (top level only), or NULL. */
static const char *json_get(const char *obj, const char *key)
{
    char name[64];
    const char *p = json_ws(obj);
    if (*p++ != '{')
        return NULL;
    for (;;) {
        p = json_ws(p);
        if (*p != '"' || !(p = json_decode(p, name, sizeof name)))
            return NULL;
        p = json_ws(p);
        if (*p++ != ':')
            return NULL;
        p = json_ws(p);
        if (!strcmp(name, key))
            return p;
        if (!(p = json_skip(p)))
            return NULL;
        p = json_ws(p);
        if (*p++ != ',')
            return NULL;
    }
}

/* Copies the string member `key` of the object at `obj` into `out`. */
static int json_str(const char *obj, const char *key, char *out, size_t cap)
{
    const char *v = json_get(obj, key);
    return v && *v == '"' && json_decode(v, out, cap) ? 0 : -1;
}

/* The number member `key` of the object at `obj`, or -1. */
static long long json_num(const char *obj, const char *key)
{
    const char *v = json_get(obj, key);
    return v && *v >= '0' && *v <= '9' ? strtoll(v, NULL, 10) : -1;
}

/* Element `i` of the JSON array at `arr`, or NULL past its end. */
static const char *json_at(const char *arr, int i)
{
    const char *p = json_ws(arr);
    if (*p++ != '[')
        return NULL;
    p = json_ws(p);
    if (*p == ']')
        return NULL;
    for (; i > 0; i--) {
        if (!(p = json_skip(p)))
            return NULL;
        p = json_ws(p);
        if (*p++ != ',')
            return NULL;
        p = json_ws(p);
    }
    return p;
}

/* ------------------------------------------------------------ the migration */

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

/* One disk the target exports: `drive` (e.g. ide0), its NBD `uri` and `socket`, and the
 * new volume on the target (`volid`, without the drive options). */
struct nbd_export {
    char drive[64], uri[512], socket[256], volid[256];
};

/* Runs `argv` (NULL-terminated) on the target over ssh, with `input` on stdin (may be NULL),
 * a non-zero exit an error. `*result_out` (may be NULL) as for mtunnel_ssh_run. */
static int remote_run(const char *prefix, const char *const *argv, const char *input, char **result_out)
{
    char opts[8192];
    snprintf(opts, sizeof opts, "{\"ssh\":%s,\"command\":[", prefix);
    for (int i = 0; argv[i]; i++) {
        if ((i && append(opts, sizeof opts, ",") < 0) || json_string(opts, sizeof opts, argv[i]) < 0)
            return MTUNNEL_ERR_INVALID_ARGUMENT;
    }
    if (append(opts, sizeof opts, "]") < 0)
        return MTUNNEL_ERR_INVALID_ARGUMENT;
    if (input && (append(opts, sizeof opts, ",\"input\":") < 0 || json_string(opts, sizeof opts, input) < 0))
        return MTUNNEL_ERR_INVALID_ARGUMENT;
    if (append(opts, sizeof opts, "}") < 0)
        return MTUNNEL_ERR_INVALID_ARGUMENT;
    return mtunnel_ssh_run(opts, result_out);
}

/* State of one migration, for the cleanup. */
struct migration {
    const char *vmid, *node, *prefix, *qmp;
    int with_disks;
    int target_started, ram_started, mirrors_done, target_resumed;
    struct nbd_export nbd[MAX_NBD];
    int n_nbd;
    char jobs[4096]; /* JSON array of the mirror jobs started, "" before any */
    mtunnel_tunnel *tunnel;
};

/* As the Perl driver's phase2_cleanup, for a storage migration that failed: the source keeps
 * running with its disks, the target's VM and its new volumes go. */
static void phase2_cleanup(struct migration *m)
{
    char *reply = NULL;
    int target_stopped = 0;

    if (m->target_resumed)
        return;
    printf("aborting: cleaning up\n");
    if (m->ram_started) {
        if (qmp_migrate_cancel(m->qmp, 30000, NULL) == MTUNNEL_OK)
            printf("cleanup: migration cancelled\n");
        else
            fprintf(stderr, "migrate: cleanup: migrate_cancel failed: %s\n", mtunnel_last_error());
    }
    /* the source is left in postmigrate if the failure came after RAM converged */
    if (qmp_execute(m->qmp, "query-status", NULL, 10000, &reply) == MTUNNEL_OK) {
        char status[64];
        if (json_str(reply, "status", status, sizeof status) == 0 && !strcmp(status, "postmigrate")) {
            if (qmp_execute(m->qmp, "cont", NULL, 10000, NULL) == MTUNNEL_OK)
                printf("cleanup: source VM %s continued\n", m->vmid);
            else
                fprintf(stderr, "migrate: cleanup: resuming the source failed: %s\n", mtunnel_last_error());
        }
    } else {
        fprintf(stderr, "migrate: cleanup: query-status failed: %s\n", mtunnel_last_error());
    }
    mtunnel_string_free(reply);
    reply = NULL;
    if (m->jobs[0] && !m->mirrors_done) {
        if (qmp_mirror_cancel(m->qmp, m->jobs, 60000, &reply) == MTUNNEL_OK)
            printf("cleanup: mirror jobs cancelled: %s\n", reply);
        else
            fprintf(stderr, "migrate: cleanup: cancelling the mirror jobs failed: %s\n", mtunnel_last_error());
        mtunnel_string_free(reply);
        reply = NULL;
    }
    if (m->target_started) {
        const char *stop[] = {"qm", "stop", m->vmid, "--skiplock", "--migratedfrom", m->node, NULL};
        if (remote_run(m->prefix, stop, NULL, NULL) == MTUNNEL_OK) {
            target_stopped = 1;
            printf("cleanup: VM %s stopped on the target\n", m->vmid);
        } else {
            fprintf(stderr, "migrate: cleanup: stopping the target VM failed: %s\n", mtunnel_last_error());
        }
    }
    /* the target's new volumes, once its QEMU is gone */
    for (int i = 0; i < m->n_nbd; i++) {
        const char *vol = m->nbd[i].volid;
        const char *free_cmd[] = {"pvesm", "free", vol, NULL};
        if (!target_stopped)
            fprintf(stderr, "migrate: cleanup: volume '%s' left on the target: run 'pvesm free %s' there\n", vol, vol);
        else if (remote_run(m->prefix, free_cmd, NULL, NULL) == MTUNNEL_OK)
            printf("cleanup: volume %s freed on the target\n", vol);
        else
            fprintf(stderr, "migrate: cleanup: freeing '%s' on the target failed: %s\n", vol, mtunnel_last_error());
    }
    /* only after the target is stopped; the tunnel is broken or idle, do not wait long */
    if (m->tunnel && tunnel_close(m->tunnel, "{\"quit_timeout_ms\":5000,\"exit_timeout_ms\":2000}") != MTUNNEL_OK)
        fprintf(stderr, "migrate: cleanup: closing the tunnel failed: %s\n", mtunnel_last_error());
}

/* Mirrors every exported disk into its NBD export and waits until all mirrors are ready. */
static int start_mirrors(struct migration *m)
{
    char *status = NULL;
    double t0 = now();

    strcpy(m->jobs, "[");
    for (int i = 0; i < m->n_nbd; i++) {
        char device[80], *job = NULL, *method = NULL;
        snprintf(device, sizeof device, "drive-%s", m->nbd[i].drive);
        /* only informative: qmp_mirror_start decides the same way by itself */
        if (qmp_mirror_method(m->qmp, device, 10000, &method) == MTUNNEL_OK)
            printf("mirror method for %s: %s\n", device, method);
        else
            fprintf(stderr, "migrate: qmp_mirror_method %s failed: %s\n", device, mtunnel_last_error());
        mtunnel_string_free(method);
        if (qmp_mirror_start(m->qmp, device, m->nbd[i].uri, NULL, &job) != MTUNNEL_OK) {
            fprintf(stderr, "migrate: qmp_mirror_start %s failed: %s\n", device, mtunnel_last_error());
            if (!strcmp(m->jobs, "["))
                m->jobs[0] = '\0';
            else
                append(m->jobs, sizeof m->jobs, "]");
            return -1;
        }
        if ((i && append(m->jobs, sizeof m->jobs, ",") < 0) || json_string(m->jobs, sizeof m->jobs, job) < 0) {
            fprintf(stderr, "migrate: too many mirror jobs\n");
            mtunnel_string_free(job);
            return -1;
        }
        printf("mirror started: %s -> %s\n", job, m->nbd[i].uri);
        mtunnel_string_free(job);
    }
    append(m->jobs, sizeof m->jobs, "]");

    /* 10 minutes is plenty for the lab; a real tool would poll qmp_mirror_status and watch
     * for progress instead */
    if (qmp_mirror_wait_ready(m->qmp, m->jobs, 600000, &status) != MTUNNEL_OK) {
        fprintf(stderr, "migrate: qmp_mirror_wait_ready failed: %s\n", mtunnel_last_error());
        return -1;
    }
    {
        const char *jobs = json_get(status, "jobs"), *job;
        for (int i = 0; jobs && (job = json_at(jobs, i)); i++) {
            char id[80];
            if (json_str(job, "id", id, sizeof id) < 0)
                strcpy(id, "?");
            printf("mirror ready: %s %lld of %lld bytes after %.3f s\n", id, json_num(job, "offset"),
                   json_num(job, "len"), now() - t0);
        }
    }
    mtunnel_string_free(status);
    return 0;
}

#define FAIL(what)                                                                     \
    do {                                                                               \
        fprintf(stderr, "migrate: %s failed: %s\n", what, mtunnel_last_error());       \
        goto out;                                                                      \
    } while (0)

int main(int argc, char **argv)
{
    char prefix[4096], opts[8192], qmp[128], uri[256], sock[128], status[64];
    char *result = NULL, *reply = NULL, *listen = NULL;
    struct migration m;
    const char *vmid, *node;
    int rc = 1;
    double t_open, t_ready, t_migrate;

    memset(&m, 0, sizeof m);
    if (argc == 5 && !strcmp(argv[4], "--with-local-disks"))
        m.with_disks = 1;
    if (argc != 4 && !m.with_disks) {
        fprintf(stderr, "usage: %s VMID SOURCE_NODE SSH_PREFIX_FILE [--with-local-disks]\n", argv[0]);
        return 2;
    }
    vmid = m.vmid = argv[1];
    node = m.node = argv[2];
    if (read_prefix(argv[3], prefix, sizeof prefix) < 0) {
        fprintf(stderr, "migrate: cannot read ssh prefix from %s\n", argv[3]);
        return 2;
    }
    m.prefix = prefix;
    snprintf(qmp, sizeof qmp, "/run/qemu-server/%s.qmp", vmid);
    m.qmp = qmp;

    /* phase 2: start the target and learn where it listens */
    {
        const char *start[] = {"qm", "start", vmid, "--skiplock", "--migratedfrom", node, "--migration_type", "secure",
                               "--stateuri", "unix", m.with_disks ? "--targetstorage" : NULL, "1", NULL};
        /* with --targetstorage the target allocates volumes; from here on a failure must
         * stop it and free them */
        m.target_started = m.with_disks;
        if (remote_run(prefix, start, "nbd_protocol_version: 1\n", &result) != MTUNNEL_OK)
            FAIL("starting the target VM");
    }
    {
        /* The parser wants the raw stdout: take it from the JSON result. */
        static char stdout_text[65536];
        const char *v = json_get(result, "stdout");
        if (!v || *v != '"' || !json_decode(v, stdout_text, sizeof stdout_text))
            FAIL("reading qm start output");
        mtunnel_string_free(result);
        result = NULL;
        if (mtunnel_migrate_listen_parse(stdout_text, vmid, &listen) != MTUNNEL_OK)
            FAIL("parsing the target's listen address");
        if (json_str(listen, "uri", uri, sizeof uri) < 0 || json_str(listen, "socket", sock, sizeof sock) < 0) {
            fprintf(stderr, "migrate: target did not report a UNIX socket\n");
            goto out;
        }
    }
    printf("target listens on %s\n", uri);

    /* the disks the target exports over NBD (only with --targetstorage) */
    {
        const char *nbd = json_get(listen, "nbd"), *e;
        for (int i = 0; nbd && (e = json_at(nbd, i)); i++) {
            struct nbd_export *x = &m.nbd[m.n_nbd];
            if (m.n_nbd == MAX_NBD) {
                fprintf(stderr, "migrate: more than %d disks exported\n", MAX_NBD);
                goto out;
            }
            if (json_str(e, "drive", x->drive, sizeof x->drive) < 0 || json_str(e, "uri", x->uri, sizeof x->uri) < 0
                || json_str(e, "volume", x->volid, sizeof x->volid) < 0) {
                fprintf(stderr, "migrate: cannot read the target's NBD export %d\n", i);
                goto out;
            }
            x->volid[strcspn(x->volid, ",")] = '\0'; /* the volume id, without size=… */
            m.n_nbd++;
            /* the tunnel carries UNIX sockets only */
            if (json_str(e, "socket", x->socket, sizeof x->socket) < 0) {
                fprintf(stderr, "migrate: target answered '%s' for a secure migration: only UNIX sockets can go "
                                "through the tunnel\n", x->uri);
                goto out;
            }
            printf("target exports drive-%s on %s (new volume %s)\n", x->drive, x->uri, x->volid);
        }
        if (m.n_nbd && !m.with_disks) {
            fprintf(stderr, "migrate: target exported disks for storage migration but --with-local-disks was not given\n");
            goto out;
        }
        if (m.with_disks && !m.n_nbd)
            printf("target exports no disks: no local disk to mirror\n");
    }

    /* forwards: the RAM socket, then each distinct NBD socket (disks share one server) */
    snprintf(opts, sizeof opts, "{\"ssh\":%s,\"forwards\":[", prefix);
    json_string(opts, sizeof opts, sock);
    for (int i = 0; i < m.n_nbd; i++) {
        int seen = !strcmp(m.nbd[i].socket, sock);
        for (int j = 0; j < i && !seen; j++)
            seen = !strcmp(m.nbd[i].socket, m.nbd[j].socket);
        if (!seen && (append(opts, sizeof opts, ",") < 0 || json_string(opts, sizeof opts, m.nbd[i].socket) < 0)) {
            fprintf(stderr, "migrate: too many forwards\n");
            goto out;
        }
    }
    strncat(opts, "]}", sizeof opts - strlen(opts) - 1);
    t_open = now();
    if (tunnel_open(opts, on_log, NULL, &m.tunnel) != MTUNNEL_OK)
        FAIL("tunnel_open");
    if (tunnel_wait_ready(m.tunnel, 70000) != MTUNNEL_OK)
        FAIL("tunnel_wait_ready");
    t_ready = now();
    printf("tunnel ready after %.3f s\n", t_ready - t_open);

    /* storage: every mirror ready (and kept in sync) before RAM moves */
    if (m.n_nbd && start_mirrors(&m) < 0)
        goto out;

    m.ram_started = 1;
    /* "events": QEMU's MIGRATION events end qmp_wait_migration as soon as the migration ends */
    if (qmp_migrate(qmp, uri, "{\"capabilities\":{\"auto-converge\":true,\"events\":true},\"parameters\":{\"downtime-limit\":100}}") != MTUNNEL_OK)
        FAIL("qmp_migrate");
    t_migrate = now();
    for (;;) {
        /* holds the monitor 250 ms at most per call: other clients get in between */
        if (qmp_wait_migration(qmp, "{\"hold_ms\":250}", &result) != MTUNNEL_OK)
            FAIL("qmp_wait_migration");
        if (json_str(result, "status", status, sizeof status) < 0)
            strcpy(status, "none");
        mtunnel_string_free(result);
        result = NULL;
        if (!strcmp(status, "completed"))
            break;
        if (!strcmp(status, "failed") || !strcmp(status, "cancelled")) {
            fprintf(stderr, "migrate: migration %s\n", status);
            goto out;
        }
    }
    printf("migration completed in %.3f s\n", now() - t_migrate);

    if (m.jobs[0]) {
        /* block-job-cancel on ready mirrors: the target has every write, the source lets go */
        const char *jobs, *job;
        if (qmp_mirror_finish(qmp, m.jobs, "cancel", 600000, &result) != MTUNNEL_OK)
            FAIL("qmp_mirror_finish");
        m.mirrors_done = 1;
        jobs = json_get(result, "jobs");
        for (int i = 0; jobs && (job = json_at(jobs, i)); i++) {
            char id[80];
            if (json_str(job, "id", id, sizeof id) < 0)
                strcpy(id, "?");
            printf("mirror finished: %s %lld of %lld bytes\n", id, json_num(job, "offset"), json_num(job, "len"));
        }
        /* blockdev-mirror only: the target nodes deleted, and any that could not be */
        {
            const char *nodes = json_get(result, "detached"), *errs = json_get(result, "detach_errors"), *e;
            char name[64], msg[1024];
            for (int i = 0; nodes && (e = json_at(nodes, i)); i++)
                if (*e == '"' && json_decode(e, name, sizeof name))
                    printf("mirror target node deleted: %s\n", name);
            for (int i = 0; errs && (e = json_at(errs, i)); i++)
                if (*e == '"' && json_decode(e, msg, sizeof msg))
                    fprintf(stderr, "migrate: warning: a mirror target node is left: %s\n", msg);
        }
        mtunnel_string_free(result);
        result = NULL;
    }
    if (m.n_nbd) {
        /* as upstream: the target's NBD server stops before the VM resumes there; a failure
         * only warns */
        const char *nbdstop[] = {"qm", "nbdstop", vmid, NULL};
        if (remote_run(prefix, nbdstop, NULL, NULL) == MTUNNEL_OK)
            printf("NBD server stopped on the target\n");
        else
            fprintf(stderr, "migrate: warning: stopping the target's NBD server failed: %s\n", mtunnel_last_error());
    }

    /* phase 3: resume on the target, close, stop the source */
    {
        char cmd[64];
        snprintf(cmd, sizeof cmd, "resume %s", vmid);
        if (tunnel_command(m.tunnel, cmd, 30000, &reply) != MTUNNEL_OK)
            FAIL("resume through the tunnel");
        m.target_resumed = 1;
        printf("resume %s: %s\n", vmid, reply);
    }
    if (tunnel_close(m.tunnel, NULL) != MTUNNEL_OK)
        FAIL("tunnel_close");
    if (qmp_execute(qmp, "quit", NULL, 10000, NULL) != MTUNNEL_OK)
        FAIL("stopping the source");
    if (m.n_nbd)
        printf("source volumes kept on %s (remove them there with pvesm free)\n", node);
    printf("RESULT: VM %s migrated from %s, tunnel closed, source stopped\n", vmid, node);
    rc = 0;
out:
    if (rc && m.with_disks)
        phase2_cleanup(&m);
    mtunnel_string_free(result);
    mtunnel_string_free(reply);
    mtunnel_string_free(listen);
    tunnel_free(m.tunnel);
    if (rc)
        printf("RESULT: migration of VM %s FAILED\n", vmid);
    return rc;
}
