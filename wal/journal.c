/*
 * journal.c - the wal's journal file (wal.journal): the per-batch flush of WAL_SYNC.
 *
 * The format and the validity rule are at the end of wal_format.h. Invariants:
 *   - The file has a fixed size, written with zeros and fsynced when created (its directory too),
 *     so a batch write never changes the file's size or allocates blocks (an append would cost
 *     an ext4 journal commit per flush).
 *   - A block starts on a 4 KiB boundary and is padded to one: a torn write can only damage the
 *     block being written, never an earlier, acknowledged one.
 *   - Writer and scanner place blocks with the same rule (wal__journal_place): a block that does
 *     not fit before the end of the file starts the next lap at offset 0.
 *   - A scan stops at the first block that fails a check: nothing after it was acknowledged.
 *   - The writer's descriptor is O_DIRECT | O_DSYNC when the file system takes it (one syscall
 *     per durable block, no page-cache copy: measured 10-14% below pwrite + fdatasync at p50 on
 *     this machine's disk), with a 4 KiB-aligned buffer and whole 4 KiB blocks at 4 KiB offsets;
 *     otherwise pwrite + fdatasync. Scans use a buffered descriptor.
 */
#define _GNU_SOURCE
#include "wal_int.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

struct wal_journal {
    int fd;
    int direct; /* fd is O_DIRECT | O_DSYNC: a returned write is durable */
    uint64_t size;
    char *path;
    uint8_t *buf; /* block assembly (writer) and reads (scanner); 4 KiB-aligned */
    size_t cap;
};

void wal__jpos_put(uint8_t out[32], const struct wal_jpos *p)
{
    cap_put_le64(out, p->epoch);
    cap_put_le64(out + 8, p->lap);
    cap_put_le64(out + 16, p->pos);
    cap_put_le64(out + 24, p->next_seq);
}

void wal__jpos_get(const uint8_t in[32], struct wal_jpos *p)
{
    p->epoch = cap_get_le64(in);
    p->lap = cap_get_le64(in + 8);
    p->pos = cap_get_le64(in + 16);
    p->next_seq = cap_get_le64(in + 24);
}

uint64_t wal__jblock_len(size_t frame_bytes)
{
    uint64_t n = WAL_JHDR + (uint64_t)frame_bytes;
    return (n + WAL_JBLOCK - 1) / WAL_JBLOCK * WAL_JBLOCK;
}

void wal__journal_place(const wal_journal_t *j, struct wal_jpos *p, uint64_t blen)
{
    if (p->pos + blen > j->size) {
        p->pos = 0;
        p->lap++;
    }
}

uint64_t wal__journal_size(const wal_journal_t *j)
{
    return j->size;
}

static void wal__jpath(const char *dir, char *buf, size_t len)
{
    snprintf(buf, len, "%s/%s", dir, WAL_JOURNAL_FILE);
}

int wal__journal_create(const char *dir, uint64_t size)
{
    char path[4200], tmp[4300];
    uint8_t *z = NULL;
    int fd = -1, rc = 0;
    wal__jpath(dir, path, sizeof path);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    fd = open(tmp, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        goto fail;
    z = cap_calloc(1, (size_t)1 << 20);
    for (uint64_t off = 0; off < size;) {
        size_t n = size - off < ((size_t)1 << 20) ? (size_t)(size - off) : ((size_t)1 << 20);
        ssize_t w = pwrite(fd, z, n, (off_t)off);
        if (w <= 0)
            goto fail;
        off += (uint64_t)w;
    }
    if (fsync(fd) != 0 || rename(tmp, path) != 0)
        goto fail;
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0 || fsync(dfd) != 0) {
        if (dfd >= 0)
            close(dfd);
        goto fail;
    }
    close(dfd);
    goto out;
fail:
    rc = errno ? -errno : -EIO;
    cap_log(CAP_LOG_ERROR, "wal", "cannot create the journal %s (%llu bytes): %s", path,
            (unsigned long long)size, strerror(-rc));
    unlink(tmp);
out:
    if (fd >= 0)
        close(fd);
    cap_free(z);
    return rc;
}

int wal__journal_open(const char *dir, int readonly, wal_journal_t **out)
{
    char path[4200];
    struct stat st;
    wal__jpath(dir, path, sizeof path);
    int fd = open(path, (readonly ? O_RDONLY : O_RDWR) | O_CLOEXEC);
    if (fd < 0) {
        int rc = -errno;
        if (rc != -ENOENT)
            cap_log(CAP_LOG_ERROR, "wal", "cannot open the journal %s: %s", path, strerror(-rc));
        return rc;
    }
    if (fstat(fd, &st) != 0) {
        int rc = -errno;
        close(fd);
        return rc;
    }
    wal_journal_t *j = cap_calloc(1, sizeof(*j));
    j->fd = fd;
    j->size = (uint64_t)st.st_size / WAL_JBLOCK * WAL_JBLOCK;
    j->path = cap_strdup(path);
    *out = j;
    return 0;
}

void wal__journal_close(wal_journal_t *j)
{
    if (!j)
        return;
    close(j->fd);
    cap_free(j->path);
    free(j->buf); /* posix_memalign */
    cap_free(j);
}

static void wal__jbuf(wal_journal_t *j, size_t need)
{
    if (j->cap >= need)
        return;
    free(j->buf);
    j->cap = need < ((size_t)1 << 16) ? ((size_t)1 << 16) : need;
    j->cap = (j->cap + WAL_JBLOCK - 1) / WAL_JBLOCK * WAL_JBLOCK;
    void *p = NULL;
    if (posix_memalign(&p, WAL_JBLOCK, j->cap) != 0)
        cap_fatal("wal", "out of memory (%zu bytes for the journal buffer)", j->cap);
    j->buf = p;
}

int wal__journal_writer(wal_journal_t *j)
{
    int fd = open(j->path, O_RDWR | O_DIRECT | O_DSYNC | O_CLOEXEC);
    if (fd < 0) {
        if (errno == EINVAL) {
            cap_log(CAP_LOG_DEBUG, "wal", "%s: no O_DIRECT here; pwrite + fdatasync", j->path);
            return 0;
        }
        int rc = -errno;
        cap_log(CAP_LOG_ERROR, "wal", "cannot open the journal %s: %s", j->path, strerror(-rc));
        return rc;
    }
    close(j->fd);
    j->fd = fd;
    j->direct = 1;
    return 0;
}

int wal__journal_put(wal_journal_t *j, struct wal_jpos *at, uint64_t first_seq, uint32_t count,
                     const struct wal_jframe *f, size_t nf, size_t bytes, int sync)
{
    uint64_t blen = wal__jblock_len(bytes);
    if (blen > j->size)
        return CAP_ETOOBIG;
    wal__journal_place(j, at, blen);
    wal__jbuf(j, (size_t)blen);
    uint8_t *b = j->buf, *p = b + WAL_JHDR;
    for (size_t i = 0; i < nf; i++) {
        memcpy(p, f[i].p, f[i].len);
        p += f[i].len;
    }
    memset(p, 0, (size_t)(b + blen - p));
    cap_put_le32(b, WAL_JMAGIC);
    cap_put_le32(b + 4, WAL_JVERSION);
    cap_put_le64(b + 8, at->epoch);
    cap_put_le64(b + 16, at->lap);
    cap_put_le64(b + 24, first_seq);
    cap_put_le32(b + 32, count);
    cap_put_le32(b + 36, 0);
    cap_put_le64(b + 40, bytes);
    cap_put_le64(b + 48, cap_hash64(b + WAL_JHDR, bytes));
    cap_put_le64(b + 56, cap_hash64(b, 56));
    for (uint64_t off = 0; off < blen;) {
        ssize_t w = pwrite(j->fd, b + off, (size_t)(blen - off), (off_t)(at->pos + off));
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return errno ? -errno : -EIO;
        off += (uint64_t)w;
    }
    if (sync && !j->direct && fdatasync(j->fd) != 0)
        return -errno;
    at->pos += blen;
    at->next_seq = first_seq + count;
    return 0;
}

/* Reads and checks the block at p; 0 with the frames in j->buf + WAL_JHDR, or a reason. */
static const char *wal__jblock_read(wal_journal_t *j, const struct wal_jpos *p, uint32_t *count,
                                    uint64_t *bytes)
{
    uint8_t h[WAL_JHDR];
    if (p->pos + WAL_JHDR > j->size)
        return "no room for a block";
    if (pread(j->fd, h, WAL_JHDR, (off_t)p->pos) != WAL_JHDR)
        return "short read";
    if (cap_get_le32(h) != WAL_JMAGIC)
        return "bad magic";
    if (cap_get_le64(h + 56) != cap_hash64(h, 56))
        return "header checksum mismatch";
    if (cap_get_le32(h + 4) != WAL_JVERSION || cap_get_le32(h + 36) != 0)
        return "unknown version";
    if (cap_get_le64(h + 8) != p->epoch)
        return "another epoch (stale)";
    if (cap_get_le64(h + 16) != p->lap)
        return "another lap (stale)";
    if (cap_get_le64(h + 24) != p->next_seq)
        return "sequence does not continue";
    uint32_t n = cap_get_le32(h + 32);
    uint64_t len = cap_get_le64(h + 40);
    if (n == 0 || len < (uint64_t)n * WAL_FRAME_HDR || len > j->size - p->pos - WAL_JHDR)
        return "bad count or length";
    wal__jbuf(j, (size_t)(WAL_JHDR + len));
    uint8_t *f = j->buf + WAL_JHDR;
    if (pread(j->fd, f, (size_t)len, (off_t)(p->pos + WAL_JHDR)) != (ssize_t)len)
        return "short read";
    if (cap_hash64(f, (size_t)len) != cap_get_le64(h + 48))
        return "frames checksum mismatch (torn write)";
    uint64_t off = 0;
    for (uint32_t i = 0; i < n; i++) {
        wal_entry_t e;
        if (len - off < WAL_FRAME_HDR)
            return "frame past the block";
        size_t fl = wal__frame_len(f + off);
        if (fl > len - off || wal__frame_decode(f + off, fl, 0, NULL, &e, NULL) != 0)
            return "invalid frame";
        if (e.seq != p->next_seq + i)
            return "frame sequence out of order";
        off += fl;
    }
    if (off != len)
        return "bytes after the last frame";
    *count = n;
    *bytes = len;
    return NULL;
}

int wal__journal_scan(wal_journal_t *j, struct wal_jpos *p, wal_jscan_fn fn, void *arg,
                      uint64_t *blocks, const char **stop)
{
    uint64_t nb = 0;
    int rc = 0;
    for (;;) {
        uint32_t n;
        uint64_t len;
        const char *why = wal__jblock_read(j, p, &n, &len);
        if (why && p->pos != 0) {
            /* the writer starts a lap over when a block does not fit before the end */
            struct wal_jpos w = *p;
            w.pos = 0;
            w.lap++;
            if (!wal__jblock_read(j, &w, &n, &len)) {
                *p = w;
                why = NULL;
            }
        }
        if (why) {
            if (stop)
                *stop = why;
            break;
        }
        rc = fn(arg, j->buf + WAL_JHDR, (size_t)len, p->next_seq, n);
        if (rc)
            break;
        nb++;
        p->pos += wal__jblock_len((size_t)len);
        p->next_seq += n;
    }
    if (blocks)
        *blocks = nb;
    return rc;
}
