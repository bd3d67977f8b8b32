/*
 * tcmu-py ring binding: implementation (compiled into tcmu_py._tcmu_ring by _ffi_build.py).
 *
 * Every offset read from the ring is checked against the mapping before it is used, so a
 * corrupt ring yields an error code instead of a wild memory access. Facts about the ring
 * protocol are in tcmu_py/ring.py's module docstring.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE                             /* SEEK_HOLE (Python.h defines it in the build) */
#endif
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <linux/target_core_user.h>

#include "_ring.h"

#define TCMU_PY_CMD_BASE sizeof(struct tcmu_cmd_entry)               /* 112 */
#define TCMU_PY_IOV0 offsetof(struct tcmu_cmd_entry, req.iov)          /* 48 */
#define TCMU_PY_TMR_BASE sizeof(struct tcmu_tmr_entry)                /* 32 */

static inline struct tcmu_mailbox *tcmu_py_mb(const struct tcmu_py_ring *r)
{
    return (struct tcmu_mailbox *)r->map;
}

static inline struct tcmu_cmd_entry_hdr *tcmu_py_hdr(const struct tcmu_py_ring *r, uint32_t off)
{
    return (struct tcmu_cmd_entry_hdr *)(r->map + r->cmdr_off + off);
}

/* The kernel's scsi_command_size(): 6,10,10,12,16,12,10,10 by opcode group; 0x7F
 * (VARIABLE LENGTH) is 8 + additional CDB length (byte 7). */
static inline uint32_t tcmu_py_cdb_len(const uint8_t *cdb)
{
    static const uint8_t by_group[8] = {6, 10, 10, 12, 16, 12, 10, 10};

    if (cdb[0] == 0x7f)
        return 8u + cdb[7];
    return by_group[(cdb[0] >> 5) & 7];
}

int tcmu_py_ring_init(struct tcmu_py_ring *r, uint8_t *map, uint64_t map_len)
{
    struct tcmu_mailbox *mb = (struct tcmu_mailbox *)map;
    uint32_t head, tail;

    memset(r, 0, sizeof(*r));
    if (map_len < sizeof(struct tcmu_mailbox))
        return TCMU_PY_E_MAILBOX;
    r->map = map;
    r->map_len = map_len;
    r->cmdr_off = mb->cmdr_off;
    r->cmdr_size = mb->cmdr_size;
    if (mb->version != TCMU_MAILBOX_VERSION || r->cmdr_off < sizeof(struct tcmu_mailbox) ||
        r->cmdr_size < TCMU_PY_CMD_BASE || r->cmdr_size % TCMU_OP_ALIGN_SIZE ||
        (uint64_t)r->cmdr_off + r->cmdr_size > map_len)
        return TCMU_PY_E_MAILBOX;
    r->data_off = (uint64_t)r->cmdr_off + r->cmdr_size;
    head = tcmu_py_load_head(r);
    tail = tcmu_py_load_tail(r);
    if (head >= r->cmdr_size || head % TCMU_OP_ALIGN_SIZE ||
        tail >= r->cmdr_size || tail % TCMU_OP_ALIGN_SIZE)
        return TCMU_PY_E_HEAD;
    r->cursor = tail;
    return TCMU_PY_OK;
}

uint32_t tcmu_py_load_head(const struct tcmu_py_ring *r)
{
    return __atomic_load_n(&tcmu_py_mb(r)->cmd_head, __ATOMIC_ACQUIRE);
}

uint32_t tcmu_py_load_tail(const struct tcmu_py_ring *r)
{
    return __atomic_load_n(&tcmu_py_mb(r)->cmd_tail, __ATOMIC_RELAXED);
}

void tcmu_py_store_tail(struct tcmu_py_ring *r, uint32_t tail)
{
    __atomic_store_n(&tcmu_py_mb(r)->cmd_tail, tail, __ATOMIC_RELEASE);
}

/* Bytes from `from` forward to `to` on the ring (0 when equal). */
static inline uint32_t tcmu_py_dist(const struct tcmu_py_ring *r, uint32_t from, uint32_t to)
{
    return to >= from ? to - from : r->cmdr_size - from + to;
}

/* Length of the entry at `off`, or 0 if it is malformed: shorter than a header, not
 * contiguous (would cross the ring end) or longer than the `avail` bytes before the
 * producer's position. */
static inline uint32_t tcmu_py_entry_len(const struct tcmu_py_ring *r, uint32_t off, uint32_t avail)
{
    uint32_t len;

    if (r->cmdr_size - off < sizeof(struct tcmu_cmd_entry_hdr))
        return 0;
    len = tcmu_hdr_get_len(tcmu_py_hdr(r, off)->len_op);
    if (len < sizeof(struct tcmu_cmd_entry_hdr) || len > r->cmdr_size - off || len > avail)
        return 0;
    return len;
}

static int tcmu_py_parse_cmd(struct tcmu_py_ring *r, uint32_t off, uint32_t len,
                             struct tcmu_py_entry *e)
{
    struct tcmu_cmd_entry *ent = (struct tcmu_cmd_entry *)tcmu_py_hdr(r, off);
    uint64_t start = (uint64_t)r->cmdr_off + off, end = start + len;
    uint64_t n_iov, cdb_off;
    uint32_t cdb_len, i;

    if (len < TCMU_PY_CMD_BASE)
        return TCMU_PY_E_ENTRY;
    n_iov = (uint64_t)ent->req.iov_cnt + ent->req.iov_bidi_cnt;
    if (n_iov > (len - TCMU_PY_IOV0) / sizeof(struct iovec))
        return TCMU_PY_E_IOV;
    for (i = 0; i < n_iov; i++) {
        uint64_t base = (uint64_t)(uintptr_t)ent->req.iov[i].iov_base;
        uint64_t ilen = ent->req.iov[i].iov_len;

        if (base < r->data_off || ilen > r->map_len || base > r->map_len - ilen)
            return TCMU_PY_E_IOV;
    }
    cdb_off = ent->req.cdb_off;
    if (cdb_off < start + TCMU_PY_IOV0 + n_iov * sizeof(struct iovec) || cdb_off >= end)
        return TCMU_PY_E_CDB;
    if (r->map[cdb_off] == 0x7f && cdb_off + 8 > end)
        return TCMU_PY_E_CDB;
    cdb_len = tcmu_py_cdb_len(r->map + cdb_off);
    if (cdb_off + cdb_len > end)
        return TCMU_PY_E_CDB;

    e->cmd_id = ent->hdr.cmd_id;
    e->iov_cnt = ent->req.iov_cnt;
    e->iov_bidi_cnt = ent->req.iov_bidi_cnt;
    e->cdb_len = cdb_len;
    e->cdb_off = cdb_off;
    e->reserved = 0;
    e->array_off = start + TCMU_PY_IOV0;
    return TCMU_PY_OK;
}

static int tcmu_py_parse_tmr(struct tcmu_py_ring *r, uint32_t off, uint32_t len,
                             struct tcmu_py_entry *e)
{
    struct tcmu_tmr_entry *ent = (struct tcmu_tmr_entry *)tcmu_py_hdr(r, off);

    if (len < TCMU_PY_TMR_BASE ||
        ent->cmd_cnt > (len - TCMU_PY_TMR_BASE) / sizeof(ent->cmd_ids[0]))
        return TCMU_PY_E_TMR;
    e->cmd_id = 0;
    e->iov_cnt = ent->cmd_cnt;
    e->iov_bidi_cnt = ent->tmr_type;
    e->cdb_len = 0;
    e->cdb_off = 0;
    e->reserved = 0;
    e->array_off = (uint64_t)r->cmdr_off + off + offsetof(struct tcmu_tmr_entry, cmd_ids);
    return TCMU_PY_OK;
}

/* Step cmd_tail over slots that need no completion (PAD, TMR, unknown opcodes), never
 * past `limit`. Returns the new tail, or cmdr_size if the ring is malformed. */
static uint32_t tcmu_py_skip_tail(struct tcmu_py_ring *r, uint32_t tail, uint32_t limit)
{
    while (tail != limit) {
        uint32_t len = tcmu_py_entry_len(r, tail, tcmu_py_dist(r, tail, limit));

        if (!len)
            return r->cmdr_size;
        if (tcmu_hdr_get_op(tcmu_py_hdr(r, tail)->len_op) == TCMU_OP_CMD)
            break;
        tail = (tail + len) % r->cmdr_size;
    }
    return tail;
}

static uint64_t tcmu_py_now_ns(void)
{
    struct timespec t;

    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

int tcmu_py_dequeue(struct tcmu_py_ring *r, struct tcmu_py_entry *out, int max_out)
{
    uint32_t head = tcmu_py_load_head(r);
    uint64_t now = r->cursor != head ? tcmu_py_now_ns() : 0;   /* no clock read when idle */
    uint32_t tail, new_tail;
    int n = 0, rc = TCMU_PY_OK;

    if (head >= r->cmdr_size || head % TCMU_OP_ALIGN_SIZE)
        return TCMU_PY_E_HEAD;
    while (r->cursor != head && n < max_out) {
        uint32_t off = r->cursor;
        uint32_t len = tcmu_py_entry_len(r, off, tcmu_py_dist(r, off, head));
        struct tcmu_cmd_entry_hdr *hdr = tcmu_py_hdr(r, off);

        if (!len) {
            rc = TCMU_PY_E_ENTRY;
            break;
        }
        switch (tcmu_hdr_get_op(hdr->len_op)) {
        case TCMU_OP_PAD:
            rc = TCMU_PY_OK;
            break;
        case TCMU_OP_CMD:
            rc = tcmu_py_parse_cmd(r, off, len, &out[n]);
            break;
        case TCMU_OP_TMR:
            rc = tcmu_py_parse_tmr(r, off, len, &out[n]);
            break;
        default:
            /* An opcode this code does not know: tell the kernel, step over it. */
            hdr->uflags |= TCMU_UFLAG_UNKNOWN_OP;
            r->unknown_ops++;
            rc = TCMU_PY_OK;
            break;
        }
        if (rc != TCMU_PY_OK)
            break;
        if (tcmu_hdr_get_op(hdr->len_op) == TCMU_OP_CMD ||
            tcmu_hdr_get_op(hdr->len_op) == TCMU_OP_TMR) {
            out[n].offset = off;
            out[n].length = len;
            out[n].op = tcmu_hdr_get_op(hdr->len_op);
            out[n].error = 0;
            out[n].retried = 0;
            out[n].arrived_ns = now;
            n++;
        }
        r->cursor = (off + len) % r->cmdr_size;
    }
    if (rc != TCMU_PY_OK) {
        r->bad_off = r->cursor;
        if (n == 0)
            return rc;
    }
    tail = tcmu_py_load_tail(r);
    if (tail >= r->cmdr_size || tail % TCMU_OP_ALIGN_SIZE) {
        r->bad_off = tail;
        return n ? n : TCMU_PY_E_HEAD;
    }
    new_tail = tcmu_py_skip_tail(r, tail, r->cursor);
    if (new_tail != tail && new_tail < r->cmdr_size)
        tcmu_py_store_tail(r, new_tail);
    return n;
}

/* Write one response into the CMD slot at or after `*tail`; advance *tail past it. */
static int tcmu_py_fill(struct tcmu_py_ring *r, uint32_t *tail, uint32_t cmd_id,
                        uint32_t scsi_status, const uint8_t *sense, uint32_t sense_len,
                        uint32_t has_read_len, uint32_t read_len)
{
    struct tcmu_cmd_entry *ent;
    uint32_t slot, len;

    if (sense_len > TCMU_SENSE_BUFFERSIZE)
        return TCMU_PY_E_SENSE;
    slot = tcmu_py_skip_tail(r, *tail, r->cursor);
    if (slot == r->cmdr_size) {
        r->bad_off = *tail;
        return TCMU_PY_E_ENTRY;
    }
    if (slot == r->cursor) {
        r->bad_off = slot;
        return TCMU_PY_E_NOSLOT;
    }
    len = tcmu_py_entry_len(r, slot, tcmu_py_dist(r, slot, r->cursor));
    if (len < TCMU_PY_CMD_BASE) {
        r->bad_off = slot;
        return TCMU_PY_E_ENTRY;
    }
    ent = (struct tcmu_cmd_entry *)tcmu_py_hdr(r, slot);
    /* Slot stealing: the kernel reaps slots in ring order and looks the command up by the
     * cmd_id it finds there, so the completing id goes into the oldest unreaped slot. */
    ent->hdr.cmd_id = (uint16_t)cmd_id;
    ent->hdr.uflags = has_read_len ? TCMU_UFLAG_READ_LEN : 0;
    ent->rsp.scsi_status = (uint8_t)scsi_status;
    ent->rsp.__pad1 = 0;
    ent->rsp.__pad2 = 0;
    ent->rsp.read_len = has_read_len ? read_len : 0;
    memcpy(ent->rsp.sense_buffer, sense, sense_len);
    memset(ent->rsp.sense_buffer + sense_len, 0, TCMU_SENSE_BUFFERSIZE - sense_len);
    /* Also hand back PAD/TMR slots that follow, so the kernel can reap them now. */
    *tail = (slot + len) % r->cmdr_size;
    slot = tcmu_py_skip_tail(r, *tail, r->cursor);
    if (slot < r->cmdr_size)
        *tail = slot;
    return TCMU_PY_OK;
}

static int tcmu_py_check_tail(struct tcmu_py_ring *r, uint32_t tail)
{
    if (tail >= r->cmdr_size || tail % TCMU_OP_ALIGN_SIZE) {
        r->bad_off = tail;
        return TCMU_PY_E_HEAD;
    }
    return TCMU_PY_OK;
}

int tcmu_py_complete(struct tcmu_py_ring *r, uint32_t cmd_id, uint32_t scsi_status,
                     const uint8_t *sense, uint32_t sense_len,
                     uint32_t has_read_len, uint32_t read_len)
{
    uint32_t tail = tcmu_py_load_tail(r);
    int rc = tcmu_py_check_tail(r, tail);

    if (rc == TCMU_PY_OK)
        rc = tcmu_py_fill(r, &tail, cmd_id, scsi_status, sense, sense_len, has_read_len,
                          read_len);
    if (rc == TCMU_PY_OK)
        tcmu_py_store_tail(r, tail);
    return rc;
}

int tcmu_py_complete_batch(struct tcmu_py_ring *r, const struct tcmu_py_rsp *rsps, int n,
                           int *done)
{
    uint32_t tail = tcmu_py_load_tail(r), start = tail;
    int i, rc = tcmu_py_check_tail(r, tail);

    *done = 0;
    if (rc != TCMU_PY_OK)
        return rc;
    for (i = 0; i < n; i++) {
        rc = tcmu_py_fill(r, &tail, rsps[i].cmd_id, rsps[i].scsi_status, rsps[i].sense,
                          rsps[i].sense_len, rsps[i].has_read_len, rsps[i].read_len);
        if (rc != TCMU_PY_OK)
            break;
        *done = i + 1;
    }
    if (tail != start)
        tcmu_py_store_tail(r, tail);
    return rc == TCMU_PY_OK ? n : rc;
}

/* ---- The data plane (see _ring.h) ---- */

#include <errno.h>
#include <math.h>
#include <unistd.h>
#include <sys/types.h>

/* <sys/uio.h> would define struct iovec a second time (<linux/uio.h>, included by the TCMU
 * header, already has it, same layout): declare the two calls instead. */
extern ssize_t preadv(int fd, const struct iovec *iov, int iovcnt, off_t offset);
extern ssize_t pwritev(int fd, const struct iovec *iov, int iovcnt, off_t offset);

#define TCMU_PY_DP_IOV_MAX 1024            /* IOV_MAX on Linux */
#define TCMU_PY_ALL_LBAS UINT64_MAX

static inline uint64_t tcmu_py_be(const uint8_t *p, int n)
{
    uint64_t v = 0;
    int i;

    for (i = 0; i < n; i++)
        v = v << 8 | p[i];
    return v;
}

/* The LBA range a command may touch, for fencing later commands off it while Python runs it.
 * Commands that touch no medium get none; a command whose range C does not know (UNMAP,
 * EXTENDED COPY, MODE SELECT, anything unknown) fences the whole device. */
static struct tcmu_py_fence tcmu_py_dp_fence(const uint8_t *cdb)
{
    struct tcmu_py_fence f = {0, TCMU_PY_ALL_LBAS};
    uint64_t lba, n;

    switch (cdb[0]) {
    case 0x00: case 0x03: case 0x12: case 0x1a: case 0x5a: case 0x25: case 0x9e:
    case 0xa0: case 0xa3: case 0x4d: case 0x35: case 0x91: case 0x84: case 0x34:
    case 0x90: case 0x1b: case 0x1e:
        /* TEST UNIT READY, REQUEST SENSE, INQUIRY, MODE SENSE, READ CAPACITY, SERVICE ACTION
         * IN(16), REPORT LUNS, MAINTENANCE IN, LOG SENSE, SYNCHRONIZE CACHE, RECEIVE COPY
         * RESULTS, PRE-FETCH, START STOP UNIT, PREVENT ALLOW: no data of the medium changes
         * and none is read that a write could tear. */
        f.end = 0;
        return f;
    case 0x08: case 0x0a:                      /* READ(6), WRITE(6): 0 means 256 blocks */
        lba = tcmu_py_be(cdb + 1, 3) & 0x1fffff;
        n = cdb[4] ? cdb[4] : 256;
        break;
    case 0x28: case 0x2a: case 0x2e: case 0x2f: case 0x41:  /* READ/WRITE/W&V/VERIFY/WS(10) */
        lba = tcmu_py_be(cdb + 2, 4);
        n = tcmu_py_be(cdb + 7, 2);
        break;
    case 0xa8: case 0xaa: case 0xae: case 0xaf:             /* (12) */
        lba = tcmu_py_be(cdb + 2, 4);
        n = tcmu_py_be(cdb + 6, 4);
        break;
    case 0x88: case 0x8a: case 0x8e: case 0x8f: case 0x93:  /* (16) */
        lba = tcmu_py_be(cdb + 2, 8);
        n = tcmu_py_be(cdb + 10, 4);
        break;
    case 0x89:                                  /* COMPARE AND WRITE */
        lba = tcmu_py_be(cdb + 2, 8);
        n = cdb[13];
        break;
    default:
        return f;
    }
    if (n == 0 || lba > TCMU_PY_ALL_LBAS - n)
        return f;                               /* odd (WRITE SAME 0 blocks...): all of it */
    f.start = lba;
    f.end = lba + n;
    return f;
}

/* (lba, blocks, fua) of a READ/WRITE C may execute; 0 if the opcode is not one, or carries
 * protection bits (Python refuses those with sense). */
static int tcmu_py_dp_rw(const uint8_t *cdb, uint32_t cdb_len, uint64_t *lba, uint64_t *n,
                         int *writing, int *fua)
{
    switch (cdb[0]) {
    case 0x08: case 0x0a:
        if (cdb_len < 6)
            return 0;
        *lba = tcmu_py_be(cdb + 1, 3) & 0x1fffff;
        *n = cdb[4] ? cdb[4] : 256;             /* SBC-4 5.18/5.48 */
        *fua = 0;
        break;
    case 0x28: case 0x2a:
        if (cdb_len < 10 || cdb[1] & 0xe0)
            return 0;
        *lba = tcmu_py_be(cdb + 2, 4);
        *n = tcmu_py_be(cdb + 7, 2);
        *fua = !!(cdb[1] & 0x08);
        break;
    case 0xa8: case 0xaa:
        if (cdb_len < 12 || cdb[1] & 0xe0)
            return 0;
        *lba = tcmu_py_be(cdb + 2, 4);
        *n = tcmu_py_be(cdb + 6, 4);
        *fua = !!(cdb[1] & 0x08);
        break;
    case 0x88: case 0x8a:
        if (cdb_len < 16 || cdb[1] & 0xe0)
            return 0;
        *lba = tcmu_py_be(cdb + 2, 8);
        *n = tcmu_py_be(cdb + 10, 4);
        *fua = !!(cdb[1] & 0x08);
        break;
    default:
        return 0;
    }
    *writing = cdb[0] == 0x0a || cdb[0] == 0x2a || cdb[0] == 0xaa || cdb[0] == 0x8a;
    return 1;
}

/* Thin: 1 if every allocation unit of LBAs [lba, lba + n) is allocated in x's map (no map: 1),
 * and [*fs, *fe) widened to those units' LBAs (what the fences must not touch). */
static int tcmu_py_dp_units(const struct tcmu_py_extent *x, uint64_t lba, uint64_t n,
                            uint64_t *fs, uint64_t *fe)
{
    uint64_t first, last, u;

    *fs = lba;
    *fe = lba + n;
    if (!x->unit_blocks)
        return 1;
    if (!x->units)
        return 0;
    first = lba / x->unit_blocks;
    last = (lba + n - 1) / x->unit_blocks + 1;
    if (last > x->n_units)
        return 0;
    for (u = first; u < last; u++)
        if (!__atomic_load_n(&x->units[u], __ATOMIC_ACQUIRE))
            return 0;
    *fs = first * x->unit_blocks;
    *fe = last * x->unit_blocks;
    return 1;
}

static int tcmu_py_dp_overlaps(const struct tcmu_py_fence *f, int n, uint64_t start,
                               uint64_t end)
{
    int i;

    for (i = 0; i < n; i++)
        if (f[i].start < end && start < f[i].end)
            return 1;
    return 0;
}

/* Move `total` bytes between the command's iovecs and the file at `pos`: 1 if every byte
 * moved, 0 on any error or short transfer (the caller hands the command to Python). */
static int tcmu_py_dp_iov(uint8_t *map, const struct iovec *src, uint32_t n_iov, int fd,
                          uint64_t pos, int writing)
{
    struct iovec iov[TCMU_PY_DP_IOV_MAX];
    uint32_t i = 0;

    while (i < n_iov) {
        uint32_t k, cnt = n_iov - i < TCMU_PY_DP_IOV_MAX ? n_iov - i : TCMU_PY_DP_IOV_MAX;
        uint64_t want = 0;
        ssize_t got;

        for (k = 0; k < cnt; k++) {
            iov[k].iov_base = map + (uintptr_t)src[i + k].iov_base;
            iov[k].iov_len = src[i + k].iov_len;
            want += iov[k].iov_len;
        }
        got = writing ? pwritev(fd, iov, (int)cnt, (off_t)pos)
                      : preadv(fd, iov, (int)cnt, (off_t)pos);
        if (got < 0 || (uint64_t)got != want)
            return 0;
        pos += want;
        i += cnt;
    }
    return 1;
}

static int tcmu_py_dp_io(struct tcmu_py_ring *r, const struct tcmu_py_entry *e, int fd,
                         uint64_t pos, int writing)
{
    return tcmu_py_dp_iov(r->map, (const struct iovec *)(r->map + e->array_off), e->iov_cnt, fd,
                          pos, writing);
}

static inline uint32_t tcmu_py_dp_bucket(double seconds)
{
    double us = seconds * 1e6;
    int b;

    if (us < 1.0)
        return 0;
    b = (int)(log2(us) * 4) + 1;                /* as tcmu_py.device.latency.latency_bucket */
    return b > TCMU_PY_DP_HIST - 1 ? TCMU_PY_DP_HIST - 1 : (uint32_t)b;
}

/* A command C may execute: its range, direction, FUA, the range the fences must keep clear
 * (whole units with a unit map) and its bytes. */
struct tcmu_py_dp_cmd {
    uint64_t lba, blocks, fs, fe, total;
    int writing, fua;
};

/* Whether entry e (CDB `cdb`, iovecs `v`, wherever they were copied) is a command C may execute
 * on x now: a CMD while x is enabled and no TMR came with it, a non-BIDI READ/WRITE (READ only
 * on a reads_only extent) without protection bits, inside the device and its transfer limit,
 * on allocated units, clear of fences[0..n_fences), whose buffers hold exactly its blocks.
 * An RBD extent only when `rbd` (the native loop), and no FUA WRITE on it with flush_fua
 * (Python flushes after the write); likewise a dedup disk's WRITE, only with a journal lease
 * and flush_fua (write cache on: the journal's append is not durable by itself). Fills *c if
 * so. */
static int tcmu_py_dp_plain(const struct tcmu_py_extent *x, const struct tcmu_py_entry *e,
                            const uint8_t *cdb, const struct iovec *v, int has_tmr,
                            const struct tcmu_py_fence *fences, int n_fences, int rbd,
                            struct tcmu_py_dp_cmd *c)
{
    uint32_t i;

    c->total = 0;
    c->writing = 0;
    if (e->op != TCMU_OP_CMD || !x->enabled || has_tmr || e->iov_bidi_cnt ||
        (x->fd < 0 && !(rbd && (x->rbd_image || x->cm))) ||
        !tcmu_py_dp_rw(cdb, e->cdb_len, &c->lba, &c->blocks, &c->writing, &c->fua) ||
        (cdb[e->cdb_len - 1] & 0x04) ||        /* NACA: Python refuses it (NORMACA is 0) */
        (x->fd < 0 && c->writing && c->fua && x->flush_fua) ||
        (c->writing && x->reads_only && !(rbd && (x->wi || (x->jl && x->flush_fua)))) ||
        (c->writing && c->fua && x->wi && x->flush_fua) || !c->blocks || c->lba > x->num_blocks ||
        c->blocks > x->num_blocks - c->lba || c->blocks > x->max_blocks || !tcmu_py_dp_units(x, c->lba, c->blocks, &c->fs, &c->fe) ||
        tcmu_py_dp_overlaps(fences, n_fences, c->fs, c->fe))
        return 0;
    for (i = 0; i < e->iov_cnt; i++)
        c->total += v[i].iov_len;
    return c->total == c->blocks * x->block_size;
}

/* Complete GOOD the commands ids[0..n), one release store of cmd_tail: n, or a negative status
 * (those before the failing one are published). */
static int tcmu_py_complete_good(struct tcmu_py_ring *r, const uint16_t *ids, uint32_t n)
{
    static const uint8_t no_sense[1] = {0};
    uint32_t tail = tcmu_py_load_tail(r), start = tail, k;
    int rc = tcmu_py_check_tail(r, tail);

    for (k = 0; rc == TCMU_PY_OK && k < n; k++)
        rc = tcmu_py_fill(r, &tail, ids[k], 0, no_sense, 0, 0, 0);
    if (tail != start)
        tcmu_py_store_tail(r, tail);
    return rc == TCMU_PY_OK ? (int)n : rc;
}

int tcmu_py_dp_batch(struct tcmu_py_ring *r, const struct tcmu_py_extent *x,
                     struct tcmu_py_fence *fences, int n_fences,
                     struct tcmu_py_entry *out, int max_out, struct tcmu_py_dp_stats *st)
{
    struct timespec t0, t1;
    int n, k, w = 0, has_tmr = 0;

    memset(st, 0, offsetof(struct tcmu_py_dp_stats, done_ids));
    if (max_out > TCMU_PY_DP_MAX)
        max_out = TCMU_PY_DP_MAX;
    n = tcmu_py_dequeue(r, out, max_out);
    if (n < 0)
        return n;
    st->dequeued = (uint32_t)n;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (k = 0; k < n; k++)
        if (out[k].op == TCMU_OP_TMR)
            has_tmr = 1;                        /* aborts: Python sees the whole call */
    for (k = 0; k < n; k++) {
        struct tcmu_py_entry *e = &out[k];
        const uint8_t *cdb = r->map + e->cdb_off;
        struct tcmu_py_dp_cmd c;

        if (tcmu_py_dp_plain(x, e, cdb, (const struct iovec *)(r->map + e->array_off), has_tmr,
                             fences, n_fences + w, 0, &c) &&
            tcmu_py_dp_io(r, e, x->fd, x->base + c.lba * x->block_size, c.writing) &&
            !(c.writing && c.fua && x->flush_fua && fdatasync(x->fd) != 0)) {
            st->done_ids[st->done++] = (uint16_t)e->cmd_id;
            if (c.writing) {
                st->writes++;
                st->bytes_written += c.total;
            } else {
                st->reads++;
                st->bytes_read += c.total;
            }
            continue;
        }
        /* Python's: it keeps its place in ring order, and fences what comes after it. */
        if (e->op == TCMU_OP_CMD)
            fences[n_fences + w] = tcmu_py_dp_fence(cdb);
        else
            fences[n_fences + w] = (struct tcmu_py_fence){0, 0};
        if (w != k)
            out[w] = *e;
        w++;
    }
    if (st->done) {
        double took;
        uint32_t b;

        clock_gettime(CLOCK_MONOTONIC, &t1);
        took = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
        b = tcmu_py_dp_bucket(took);
        st->latency_seconds = took * st->done;
        st->hist[b] = st->done;
        st->hist_lo = b;
        st->hist_hi = b + 1;
    }
    return w;
}

int tcmu_py_dp_complete(struct tcmu_py_ring *r, struct tcmu_py_dp_stats *st)
{
    return tcmu_py_complete_good(r, st->done_ids, st->done);
}

/* ---- Stage 2: the native loop thread (see _ring.h) ---- */

#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/vfs.h>

/* Name the calling thread as `top -H`, ps and perf show it (at most 15 bytes are kept; a
 * longer name is cut there). Best effort: a failure leaves the inherited name. The native
 * loop's threads: "tcmu-py-loop" (the ring's consumer), "tcmu-py-io" (its file workers),
 * "tcmu-py-nbd" (an NBD writer's sender); Python's: tcmu_py/threadname.py. */
static void tcmu_py_name_thread(const char *name)
{
    char cut[16];

    snprintf(cut, sizeof(cut), "%s", name);
    (void)pthread_setname_np(pthread_self(), cut);
}

/* A growable byte buffer of hand-off records. */
struct tcmu_py_buf {
    uint8_t *p;
    size_t len, cap;
};

/* A command C executes on a worker thread (a large transfer: its copy overlaps the loop's next
 * command and the kernel's completion work, which runs in the kicking thread). */
struct tcmu_py_job {
    int busy;
    uint32_t cmd_id, writing, fua, flush_fua;
    int fd;
    uint64_t pos, total, fs, fe, t0;
    uint8_t *rec;                          /* the command's record (malloc): Python's if it fails */
    /* An RBD job: submitted to librbd, finished by tcmu_py_rbd_done on librbd's thread. */
    struct tcmu_py_loop *loop;
    struct iovec *iov;                     /* the command's buffers as pointers (malloc) */
    void *rbd_ret, *rbd_release;           /* librbd's functions, as declared when submitted */
    /* The next job of its group (tcmu_py_rbd_join): commands adjacent in the ring and on the
     * image, sent as one librbd operation of rbd_total bytes by the first, finished with it. */
    struct tcmu_py_job *next;
    uint64_t rbd_total;
    /* Its number in ring order (from fence_next, when taken): an RBD job that fails is handed
     * to Python as an ordered command of that number, before those handed while it ran. */
    uint64_t seq;
    /* A mirror job: written to every leg (tcmu_py_mw_submit); finished when the last leg
     * answered, GOOD only if every leg took it. */
    struct tcmu_py_wi *wi;
    void *mw_buf;                          /* the data, contiguous, for the NBD legs (malloc) */
    uint32_t mw_pending;
    int mw_ok;
};

/* librbd's C API, as far as the native loop calls it (rbd/librbd.h; completions are opaque). */
typedef void (*tcmu_py_rbd_cb_t)(void *completion, void *arg);
typedef int (*tcmu_py_rbd_create_t)(void *arg, tcmu_py_rbd_cb_t cb, void **completion);
typedef int (*tcmu_py_rbd_rw_t)(void *image, const struct iovec *iov, int iovcnt, uint64_t off,
                                void *completion);
typedef ssize_t (*tcmu_py_rbd_ret_t)(void *completion);
typedef void (*tcmu_py_rbd_release_t)(void *completion);

/* Job slots: large commands on the workers, and every RBD command in flight (the kernel's queue
 * depth is 128 by default: no RBD command waits for a slot below it). */
enum { TCMU_PY_JOBS = 128, TCMU_PY_WORKERS_MAX = 8 };

struct tcmu_py_loop {
    struct tcmu_py_ring *r;
    pthread_t thread;
    int started;
    pthread_mutex_t mu;                    /* ring tail and cursor, fences, extent, records, jobs */
    pthread_cond_t work_cv, idle_cv;
    int uio_fd, kick_fd, notify_fd, stop_fd;
    uint32_t event_size, kick_size, poll_us;
    int stopping;                          /* atomic */
    int error;                             /* atomic; why the thread stopped by itself */
    struct tcmu_py_extent x;
    /* Fences of the commands Python holds: fences[0..n_fences), fence_ids alongside; room for
     * TCMU_PY_DP_MAX more. */
    struct tcmu_py_fence *fences;
    uint16_t *fence_ids;
    /* fence_seq[i]: nonzero when the command is *ordered* (an RBD extent's command handed over
     * because it overlapped a job or an older ordered command): its number in ring order, so
     * that it runs after the older ordered commands it overlaps (tcmu_py_loop_fence_busy). */
    uint64_t *fence_seq, fence_next;
    int n_fences, cap_fences;
    struct tcmu_py_entry out[TCMU_PY_DP_MAX];
    size_t at[TCMU_PY_DP_MAX];             /* where out[k]'s copy starts in `cp` */
    uint16_t done_ids[TCMU_PY_DP_MAX];
    struct tcmu_py_buf cp;                 /* this batch's entries, copied at once */
    struct tcmu_py_buf rec;                /* hand-off records for Python */
    /* Workers: jobs[] slots, a FIFO of queued slot numbers. */
    uint32_t n_workers, big;
    pthread_t workers[TCMU_PY_WORKERS_MAX];
    uint32_t n_started;
    int quit;
    struct tcmu_py_job jobs[TCMU_PY_JOBS];
    uint32_t queue[TCMU_PY_JOBS], q_head, q_tail, n_jobs;
    /* The declared file mapped (tcmu_py_loop_map), or NULL: [0, img_len) of it. Replaced
     * only with no job running, so workers read these without the mutex. */
    uint8_t *img;
    uint64_t img_len;
    uint64_t img_dev, img_ino;             /* which file is mapped, and how */
    int img_prot;
    uint64_t map_retry;                         /* ns: when an unmapped extent is looked at again */
    struct tcmu_py_poll_judge judge;       /* whether to busy-poll (the loop thread, mutex) */
    struct tcmu_py_loop_figures fig;
};

/* ---- A mirror's write fan-out: write-intent regions (struct tcmu_py_wi) ---- */

struct tcmu_py_wi {
    pthread_mutex_t mu;
    uint64_t region, n;
    uint8_t *armed;
    uint32_t *inflight, *touch;
    uint32_t epoch;
    uint64_t writes;
};

struct tcmu_py_wi *tcmu_py_wi_new(uint64_t region, uint64_t n_regions)
{
    struct tcmu_py_wi *w = calloc(1, sizeof(*w));

    if (!w || !region || !n_regions)
        goto fail;
    w->region = region;
    w->n = n_regions;
    w->epoch = 1;
    w->armed = calloc((size_t)n_regions, 1);
    w->inflight = calloc((size_t)n_regions, sizeof(*w->inflight));
    w->touch = calloc((size_t)n_regions, sizeof(*w->touch));
    if (!w->armed || !w->inflight || !w->touch || pthread_mutex_init(&w->mu, NULL) != 0)
        goto fail;
    return w;
fail:
    if (w) {
        free(w->armed);
        free(w->inflight);
        free(w->touch);
        free(w);
    }
    return NULL;
}

void tcmu_py_wi_free(struct tcmu_py_wi *w)
{
    if (!w)
        return;
    pthread_mutex_destroy(&w->mu);
    free(w->armed);
    free(w->inflight);
    free(w->touch);
    free(w);
}

void tcmu_py_wi_arm(struct tcmu_py_wi *w, uint64_t lo, uint64_t hi)
{
    uint64_t r;

    pthread_mutex_lock(&w->mu);
    for (r = lo; r <= hi && r < w->n; r++)
        w->armed[r] = 1;
    pthread_mutex_unlock(&w->mu);
}

uint32_t tcmu_py_wi_epoch(struct tcmu_py_wi *w)
{
    uint32_t e;

    pthread_mutex_lock(&w->mu);
    e = ++w->epoch;
    pthread_mutex_unlock(&w->mu);
    return e;
}

int tcmu_py_wi_disarm(struct tcmu_py_wi *w, uint64_t r, uint32_t epoch)
{
    int ok = 0;

    pthread_mutex_lock(&w->mu);
    if (r < w->n && !w->inflight[r] && (int32_t)(w->touch[r] - epoch) < 0) {
        w->armed[r] = 0;
        ok = 1;
    }
    pthread_mutex_unlock(&w->mu);
    return ok;
}

int tcmu_py_wi_armed(struct tcmu_py_wi *w, uint64_t r)
{
    int a;

    pthread_mutex_lock(&w->mu);
    a = r < w->n && w->armed[r];
    pthread_mutex_unlock(&w->mu);
    return a;
}

/* *v, read under mu. */
static uint64_t tcmu_py_locked_u64(pthread_mutex_t *mu, const uint64_t *v)
{
    uint64_t n;

    pthread_mutex_lock(mu);
    n = *v;
    pthread_mutex_unlock(mu);
    return n;
}

uint64_t tcmu_py_wi_writes(struct tcmu_py_wi *w)
{
    return tcmu_py_locked_u64(&w->mu, &w->writes);
}

/* A C write of bytes [pos, pos + len) starts: 1 (counted in flight, its regions touched) when
 * every region it touches is armed, else 0 (nothing changed). */
static int tcmu_py_wi_begin(struct tcmu_py_wi *w, uint64_t pos, uint64_t len)
{
    uint64_t r, lo = pos / w->region, hi = (pos + (len ? len : 1) - 1) / w->region;
    int ok = 1;

    pthread_mutex_lock(&w->mu);
    for (r = lo; r <= hi; r++)
        if (r >= w->n || !w->armed[r]) {
            ok = 0;
            break;
        }
    if (ok) {
        for (r = lo; r <= hi; r++) {
            w->inflight[r]++;
            w->touch[r] = w->epoch;
        }
        w->writes++;
    }
    pthread_mutex_unlock(&w->mu);
    return ok;
}

/* The write tcmu_py_wi_begin let start has ended (whatever its outcome). */
static void tcmu_py_wi_end(struct tcmu_py_wi *w, uint64_t pos, uint64_t len)
{
    uint64_t r, lo = pos / w->region, hi = (pos + (len ? len : 1) - 1) / w->region;

    pthread_mutex_lock(&w->mu);
    for (r = lo; r <= hi && r < w->n; r++) {
        w->inflight[r]--;
        w->touch[r] = w->epoch;
    }
    pthread_mutex_unlock(&w->mu);
}

/* ---- NBD writers (struct tcmu_py_nbdq) ---- */

/* libnbd's C API as far as a writer calls it (libnbd.h). */
struct tcmu_py_nbd_completion {
    int (*callback)(void *user_data, int *error);
    void *user_data;
    void (*free)(void *user_data);
};
typedef int64_t (*tcmu_py_nbd_pwrite_t)(void *h, const void *buf, size_t count, uint64_t offset,
                                        struct tcmu_py_nbd_completion cb, uint32_t flags);
typedef int (*tcmu_py_nbd_int_t)(void *h);
typedef unsigned (*tcmu_py_nbd_dir_t)(void *h);
typedef void (*tcmu_py_nbd_close_t)(void *h);
enum { TCMU_PY_NBD_DIR_WRITE = 2 };        /* LIBNBD_AIO_DIRECTION_WRITE */

typedef void (*tcmu_py_nbd_done_t)(void *arg, int ok);

/* One write, in flight from its submission until answered (libnbd's callback, or the writer's
 * death) and retired by the writer's thread (or tcmu_py_nbdq_free). */
struct tcmu_py_nbd_req {
    struct tcmu_py_nbd_req *next;
    uint64_t t0;
    tcmu_py_nbd_done_t done;
    void *arg;
    int answered;
};

/* Locks: the submitting thread calls libnbd holding none of ours; libnbd calls our callback
 * holding its handle's lock, and the callback takes the loop's mutex (tcmu_py_mw_nbd_done);
 * `mu` is taken alone, or before the loop's mutex (tcmu_py_nbdq_die), never after it. */
struct tcmu_py_nbdq {
    void *h;
    tcmu_py_nbd_pwrite_t aio_pwrite;
    tcmu_py_nbd_int_t get_fd, notify_read, notify_write;
    tcmu_py_nbd_dir_t get_direction;
    tcmu_py_nbd_close_t close;
    uint64_t timeout_ns;
    pthread_t thread;
    pthread_mutex_t mu;                    /* flight, quit, dead */
    int efd;                               /* wakes the thread: a write waits to go out, quit */
    struct tcmu_py_nbd_req *flight;
    int quit, dead;
};

static void tcmu_py_nbdq_answer(struct tcmu_py_nbd_req *r, int ok)
{
    if (r->answered)
        return;
    r->answered = 1;
    r->done(r->arg, ok);
}

/* libnbd's completion callback: on the writer's thread inside a notify call (or in nbd_close,
 * for a dead writer's writes, answered already). */
static int tcmu_py_nbdq_cb(void *user_data, int *error)
{
    tcmu_py_nbdq_answer(user_data, error && *error == 0);
    return 1;
}

static void tcmu_py_nbdq_wake(struct tcmu_py_nbdq *q)
{
    uint64_t one = 1;
    ssize_t w;

    do
        w = write(q->efd, &one, sizeof(one));
    while (w < 0 && errno == EINTR);
}

/* The writer dies (under mu): every write in flight fails now; they stay listed until
 * tcmu_py_nbdq_free (libnbd may still hold them). */
static void tcmu_py_nbdq_die(struct tcmu_py_nbdq *q)
{
    struct tcmu_py_nbd_req *r;

    q->dead = 1;
    for (r = q->flight; r; r = r->next)
        tcmu_py_nbdq_answer(r, 0);
}

/* Send a write of len bytes at off from buf (valid until done is called) on the submitting
 * thread, which holds no lock of ours: 1 (done will be called once, maybe before this returns,
 * on any thread), or 0 when the writer is dead or out of memory (done is never called). The
 * writer's thread only polls the socket and answers. */
static int tcmu_py_nbdq_push(struct tcmu_py_nbdq *q, const void *buf, uint64_t len,
                             uint64_t off, tcmu_py_nbd_done_t done, void *arg)
{
    struct tcmu_py_nbd_req *r = calloc(1, sizeof(*r));
    struct tcmu_py_nbd_completion cb = {tcmu_py_nbdq_cb, NULL, NULL};

    if (!r)
        return 0;
    r->done = done;
    r->arg = arg;
    r->t0 = tcmu_py_now_ns();
    cb.user_data = r;
    pthread_mutex_lock(&q->mu);
    if (q->dead || q->quit) {
        pthread_mutex_unlock(&q->mu);
        free(r);
        return 0;
    }
    r->next = q->flight;
    q->flight = r;
    pthread_mutex_unlock(&q->mu);
    if (q->aio_pwrite(q->h, buf, (size_t)len, off, cb, 0) < 0) {
        pthread_mutex_lock(&q->mu);             /* never issued: libnbd will not call back */
        tcmu_py_nbdq_die(q);                    /* the handle is closed or dead; r fails too */
        pthread_mutex_unlock(&q->mu);
        tcmu_py_nbdq_wake(q);
        return 1;
    }
    if (q->get_direction(q->h) & TCMU_PY_NBD_DIR_WRITE)
        tcmu_py_nbdq_wake(q);                   /* not all sent: the thread polls for POLLOUT */
    return 1;
}

static void *tcmu_py_nbdq_main(void *arg)
{
    struct tcmu_py_nbdq *q = arg;

    tcmu_py_name_thread("tcmu-py-nbd");

    for (;;) {
        struct tcmu_py_nbd_req *r, **pp;
        struct pollfd p[2];
        uint64_t now, oldest = 0;
        unsigned dir;
        int n = 1, ms = 1000, dead;

        pthread_mutex_lock(&q->mu);
        if (q->quit) {
            pthread_mutex_unlock(&q->mu);
            break;
        }
        dead = q->dead;
        /* retire the answered; note the oldest unanswered */
        for (pp = &q->flight; !dead && *pp;) {
            r = *pp;
            if (r->answered) {
                *pp = r->next;
                free(r);
            } else {
                if (!oldest || r->t0 < oldest)
                    oldest = r->t0;
                pp = &r->next;
            }
        }
        now = tcmu_py_now_ns();
        if (!dead && oldest && q->timeout_ns) {
            if (now - oldest >= q->timeout_ns) {
                tcmu_py_nbdq_die(q);            /* no answer in time */
                pthread_mutex_unlock(&q->mu);
                continue;
            }
            ms = (int)((q->timeout_ns - (now - oldest)) / 1000000u) + 1;
            if (ms > 1000)
                ms = 1000;
        }
        pthread_mutex_unlock(&q->mu);
        p[0].fd = q->efd;
        p[0].events = POLLIN;
        p[0].revents = 0;
        if (!dead) {
            /* Always POLLIN: a write another thread sends while this one sleeps is answered
             * on this socket (libnbd's direction, read before that send, may not say so). */
            dir = q->get_direction(q->h);
            p[1].fd = q->get_fd(q->h);
            p[1].events = (short)(POLLIN | (dir & TCMU_PY_NBD_DIR_WRITE ? POLLOUT : 0));
            p[1].revents = 0;
            if (p[1].fd < 0) {
                pthread_mutex_lock(&q->mu);     /* the connection is gone */
                tcmu_py_nbdq_die(q);
                pthread_mutex_unlock(&q->mu);
                continue;
            }
            n = 2;
        }
        if (poll(p, (nfds_t)n, ms) < 0 && errno != EINTR)
            continue;
        if (p[0].revents & POLLIN) {
            uint64_t v;
            ssize_t got = read(q->efd, &v, sizeof(v));

            (void)got;
        }
        if (n == 2) {
            if (p[1].revents & (POLLIN | POLLHUP | POLLERR))
                q->notify_read(q->h);
            if (p[1].revents & POLLOUT)
                q->notify_write(q->h);
        }
    }
    return NULL;
}

struct tcmu_py_nbdq *tcmu_py_nbdq_new(void *handle, void *aio_pwrite, void *aio_get_fd,
                                      void *aio_get_direction, void *aio_notify_read,
                                      void *aio_notify_write, void *close_fn, uint32_t timeout_ms)
{
    struct tcmu_py_nbdq *q = calloc(1, sizeof(*q));

    if (!q)
        return NULL;
    q->h = handle;
    q->aio_pwrite = (tcmu_py_nbd_pwrite_t)aio_pwrite;
    q->get_fd = (tcmu_py_nbd_int_t)aio_get_fd;
    q->get_direction = (tcmu_py_nbd_dir_t)aio_get_direction;
    q->notify_read = (tcmu_py_nbd_int_t)aio_notify_read;
    q->notify_write = (tcmu_py_nbd_int_t)aio_notify_write;
    q->close = (tcmu_py_nbd_close_t)close_fn;
    q->timeout_ns = (uint64_t)timeout_ms * 1000000u;
    q->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (q->efd < 0 || pthread_mutex_init(&q->mu, NULL) != 0) {
        if (q->efd >= 0)
            close(q->efd);
        free(q);
        return NULL;
    }
    if (pthread_create(&q->thread, NULL, tcmu_py_nbdq_main, q) != 0) {
        pthread_mutex_destroy(&q->mu);
        close(q->efd);
        free(q);
        return NULL;
    }
    return q;
}

int tcmu_py_nbdq_dead(struct tcmu_py_nbdq *q)
{
    int dead;

    pthread_mutex_lock(&q->mu);
    dead = q->dead;
    pthread_mutex_unlock(&q->mu);
    return dead;
}

void tcmu_py_nbdq_free(struct tcmu_py_nbdq *q)
{
    struct tcmu_py_nbd_req *r;

    if (!q)
        return;
    pthread_mutex_lock(&q->mu);
    q->quit = 1;
    pthread_mutex_unlock(&q->mu);
    tcmu_py_nbdq_wake(q);
    pthread_join(q->thread, NULL);
    pthread_mutex_lock(&q->mu);
    tcmu_py_nbdq_die(q);                        /* anything left fails (none, normally) */
    pthread_mutex_unlock(&q->mu);
    if (q->close)
        q->close(q->h);                         /* callbacks of a dead writer's: answered */
    while (q->flight) {
        r = q->flight;
        q->flight = r->next;
        free(r);
    }
    close(q->efd);
    pthread_mutex_destroy(&q->mu);
    free(q);
}

/* ---- A dedup disk's chunk table (see _ring.h) ---- */

struct tcmu_py_cm_slot {
    uint64_t key;                               /* chunk index + 1; 0: empty */
    uint64_t off;                               /* the chunk's first byte in fd */
    int32_t fd;                                 /* -1: the chunk reads as zeros */
    uint32_t tag;                               /* fd == jfd: the record's number (low bits) */
};

struct tcmu_py_cm {
    pthread_mutex_t mu;
    uint64_t mask;                              /* slots - 1: chunk i lives in slot i & mask */
    uint64_t chunk;
    uint64_t hits, misses;
    int32_t jfd;                                /* the pool's journal; -3 until one is named */
    /* An anonymous mapping: a page is resident once a slot in it was set; tcmu_py_cm_clear
     * gives the pages back (MADV_DONTNEED: they read as zeros again). */
    struct tcmu_py_cm_slot *slots;
    size_t bytes;
    /* written[p]: a slot starting in page p of slots was set since the last clear (exact, not
     * residency: a page swapped out still counts), so drop_fd looks only there. */
    uint8_t *written;
    uint64_t page, pages;                       /* page size; pages the slots span */
};

struct tcmu_py_cm *tcmu_py_cm_new(uint32_t chunk, uint32_t slots_log2)
{
    struct tcmu_py_cm *m;
    uint64_t n;

    if (!chunk || (chunk & (chunk - 1)) || slots_log2 > 30)
        return NULL;
    n = (uint64_t)1 << slots_log2;
    m = calloc(1, sizeof(*m));
    if (!m)
        return NULL;
    m->bytes = n * sizeof(m->slots[0]);
    m->page = (uint64_t)sysconf(_SC_PAGESIZE);
    m->pages = (m->bytes + m->page - 1) / m->page;
    m->written = calloc(m->pages, 1);
    m->slots = mmap(NULL, m->bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (!m->written || m->slots == MAP_FAILED) {
        if (m->slots != MAP_FAILED)
            munmap(m->slots, m->bytes);
        free(m->written);
        free(m);
        return NULL;
    }
    if (pthread_mutex_init(&m->mu, NULL)) {
        munmap(m->slots, m->bytes);
        free(m->written);
        free(m);
        return NULL;
    }
    m->mask = n - 1;
    m->chunk = chunk;
    m->jfd = -3;
    return m;
}

void tcmu_py_cm_free(struct tcmu_py_cm *m)
{
    if (!m)
        return;
    pthread_mutex_destroy(&m->mu);
    munmap(m->slots, m->bytes);
    free(m->written);
    free(m);
}

/* How an entry is set: as a location the index gave, as a journal record's, or as the index
 * location of a record's chunk just drained (see _ring.h). */
enum tcmu_py_cm_mode { TCMU_PY_CM_INDEX, TCMU_PY_CM_JOURNAL, TCMU_PY_CM_DRAINED };

/* Set entry idx (mutex held): fd -2 forgets it, < 0 zeros. An entry naming the journal is
 * always the newest record of its chunk (see tcmu_py_cm_set_journal), so it is replaced only by
 * a newer record's (JOURNAL), by its own record's drained location (DRAINED, same chunk, not an
 * older record), or by another chunk's journal entry (JOURNAL: that chunk then reads through
 * Python, which knows the record). A location from the index never replaces it: the backend
 * may not know of the record yet (the loop appended it). */
static void tcmu_py_cm_put(struct tcmu_py_cm *m, uint64_t idx, int32_t fd, uint64_t off,
                           enum tcmu_py_cm_mode mode, uint64_t seq)
{
    struct tcmu_py_cm_slot *s = &m->slots[idx & m->mask];

    if (s->key && m->jfd >= 0 && s->fd == m->jfd) {
        int same = s->key == idx + 1, newer = (int32_t)(s->tag - (uint32_t)seq) > 0;

        if (mode == TCMU_PY_CM_INDEX || (mode == TCMU_PY_CM_DRAINED && (!same || newer)) ||
            (mode == TCMU_PY_CM_JOURNAL && same && newer))
            return;
    }
    if (fd == -2) {
        if (s->key == idx + 1)
            s->key = 0;
        return;
    }
    s->key = idx + 1;
    s->fd = fd < 0 ? -1 : fd;
    s->off = off;
    s->tag = mode == TCMU_PY_CM_JOURNAL ? (uint32_t)seq : 0;
    m->written[(idx & m->mask) * sizeof(*s) / m->page] = 1;
}

void tcmu_py_cm_set(struct tcmu_py_cm *m, const uint64_t *idx, const int32_t *fd,
                    const uint64_t *off, uint32_t n)
{
    uint32_t k;

    pthread_mutex_lock(&m->mu);
    for (k = 0; k < n; k++)
        tcmu_py_cm_put(m, idx[k], fd[k], off[k], TCMU_PY_CM_INDEX, 0);
    pthread_mutex_unlock(&m->mu);
}

void tcmu_py_cm_set_journal(struct tcmu_py_cm *m, const uint64_t *idx, const uint64_t *off,
                            uint32_t n, int32_t jfd, uint64_t seq)
{
    uint32_t k;

    pthread_mutex_lock(&m->mu);
    m->jfd = jfd;
    for (k = 0; k < n; k++)
        tcmu_py_cm_put(m, idx[k], jfd, off[k], TCMU_PY_CM_JOURNAL, seq);
    pthread_mutex_unlock(&m->mu);
}

void tcmu_py_cm_set_drained(struct tcmu_py_cm *m, const uint64_t *idx, const int32_t *fd,
                            const uint64_t *off, uint32_t n, uint64_t seq)
{
    uint32_t k;

    pthread_mutex_lock(&m->mu);
    for (k = 0; k < n; k++)
        tcmu_py_cm_put(m, idx[k], fd[k], off[k], TCMU_PY_CM_DRAINED, seq);
    pthread_mutex_unlock(&m->mu);
}

int tcmu_py_cm_get(struct tcmu_py_cm *m, uint64_t idx, int32_t *fd, uint64_t *off)
{
    const struct tcmu_py_cm_slot *s;
    int found;

    pthread_mutex_lock(&m->mu);
    s = &m->slots[idx & m->mask];
    found = s->key == idx + 1;
    if (found) {
        *fd = s->fd;
        *off = s->off;
    }
    pthread_mutex_unlock(&m->mu);
    return found;
}

void tcmu_py_cm_clear(struct tcmu_py_cm *m)
{
    uint64_t i;

    pthread_mutex_lock(&m->mu);
    if (madvise(m->slots, m->bytes, MADV_DONTNEED))
        for (i = 0; i <= m->mask; i++)
            m->slots[i].key = 0;
    memset(m->written, 0, m->pages);
    pthread_mutex_unlock(&m->mu);
}

/* Only the slots starting in a page written since the last clear can be set: the others are
 * skipped, so a large table mostly never written costs no page faults here. */
void tcmu_py_cm_drop_fd(struct tcmu_py_cm *m, int32_t fd)
{
    const uint64_t size = sizeof(m->slots[0]);
    uint64_t i;

    pthread_mutex_lock(&m->mu);
    for (i = 0; i <= m->mask; i++) {
        uint64_t p = i * size / m->page;

        if (!m->written[p]) {
            i = ((p + 1) * m->page + size - 1) / size - 1;    /* to the next page's first */
            continue;
        }
        if (m->slots[i].key && m->slots[i].fd == fd)
            m->slots[i].key = 0;
    }
    pthread_mutex_unlock(&m->mu);
}

uint64_t tcmu_py_cm_hits(struct tcmu_py_cm *m)
{
    return tcmu_py_locked_u64(&m->mu, &m->hits);
}

uint64_t tcmu_py_cm_misses(struct tcmu_py_cm *m)
{
    return tcmu_py_locked_u64(&m->mu, &m->misses);
}

/* A cursor over a command's iovecs (data-area offsets into the ring mapping `map`). */
struct tcmu_py_cur {
    uint8_t *map;
    const struct iovec *v;
    uint32_t n, i;
    uint64_t in;                                /* bytes of v[i] already taken */
};

/* The iovecs (at most max, into out) of the next `len` bytes at the cursor, which moves past
 * them: their count, or 0 if the buffers end first or more than max pieces are needed. */
static uint32_t tcmu_py_cur_take(struct tcmu_py_cur *c, uint64_t len, struct iovec *out,
                                 uint32_t max)
{
    uint32_t k = 0;

    while (len) {
        uint64_t room, n;

        if (c->i >= c->n || k >= max)
            return 0;
        room = c->v[c->i].iov_len - c->in;
        n = room < len ? room : len;
        out[k].iov_base = c->map + (uintptr_t)c->v[c->i].iov_base + c->in;
        out[k].iov_len = n;
        k++;
        len -= n;
        c->in += n;
        if (c->in == c->v[c->i].iov_len) {
            c->i++;
            c->in = 0;
        }
    }
    return k;
}

/* The next `len` bytes of the command's buffers from fd at off (fd < 0: zeros): 1 if all. */
static int tcmu_py_cm_run(struct tcmu_py_cur *c, struct iovec *iov, int fd, uint64_t off,
                          uint64_t len)
{
    uint32_t k, cnt = tcmu_py_cur_take(c, len, iov, TCMU_PY_DP_IOV_MAX);
    ssize_t got;

    if (!cnt)
        return 0;
    if (fd < 0) {
        for (k = 0; k < cnt; k++)
            memset(iov[k].iov_base, 0, iov[k].iov_len);
        return 1;
    }
    got = preadv(fd, iov, (int)cnt, (off_t)off);
    return got >= 0 && (uint64_t)got == len;
}

/* Fill the command's buffers v[0..n_iov) with bytes [pos, pos + total) of the disk from m: 1 if
 * every chunk they touch has an entry and every byte was read; else 0 (the command goes to
 * Python; its buffers may hold anything meanwhile). One preadv per run of chunks lying back to
 * back in one container (a sequential write's). Holds m's mutex throughout (see _ring.h). */
static int tcmu_py_cm_read(struct tcmu_py_cm *m, uint8_t *map, const struct iovec *v,
                           uint32_t n_iov, uint64_t pos, uint64_t total)
{
    struct iovec iov[TCMU_PY_DP_IOV_MAX];
    struct tcmu_py_cur cur = {map, v, n_iov, 0, 0};
    uint64_t cs = m->chunk, end = pos + total, first = pos / cs, last = (end + cs - 1) / cs;
    uint64_t i, run_off = 0, run_len = 0;
    int run_fd = -1, ok = 1;

    pthread_mutex_lock(&m->mu);
    for (i = first; i < last; i++)
        if (m->slots[i & m->mask].key != i + 1) {
            m->misses++;
            pthread_mutex_unlock(&m->mu);
            return 0;
        }
    for (i = first; ok && i < last; i++) {
        const struct tcmu_py_cm_slot *s = &m->slots[i & m->mask];
        uint64_t a = i * cs > pos ? i * cs : pos, b = (i + 1) * cs < end ? (i + 1) * cs : end;
        uint64_t off = s->off + (a - i * cs);

        if (run_len && s->fd == run_fd && (s->fd < 0 || off == run_off + run_len)) {
            run_len += b - a;
            continue;
        }
        if (run_len)
            ok = tcmu_py_cm_run(&cur, iov, run_fd, run_off, run_len);
        run_fd = s->fd;
        run_off = off;
        run_len = b - a;
    }
    if (ok && run_len)
        ok = tcmu_py_cm_run(&cur, iov, run_fd, run_off, run_len);
    if (ok)
        m->hits++;
    else
        m->misses++;
    pthread_mutex_unlock(&m->mu);
    return ok;
}

struct tcmu_py_loop *tcmu_py_loop_new(struct tcmu_py_ring *r, int uio_fd, uint32_t event_size,
                                      int kick_fd, uint32_t kick_size, int notify_fd,
                                      uint32_t poll_us, uint32_t workers, uint32_t big)
{
    struct tcmu_py_loop *l = calloc(1, sizeof(*l));

    if (!l)
        return NULL;
    l->r = r;
    l->uio_fd = uio_fd;
    l->event_size = event_size > 8 ? 8 : event_size;
    l->kick_fd = kick_fd;
    l->kick_size = kick_size > 8 ? 8 : kick_size;
    l->notify_fd = notify_fd;
    l->poll_us = poll_us;
    l->n_workers = workers > TCMU_PY_WORKERS_MAX ? TCMU_PY_WORKERS_MAX : workers;
    l->big = big;
    l->x.fd = -1;
    tcmu_py_poll_judge_init(&l->judge, (uint64_t)TCMU_PY_PROBE_EVERY_US * 1000u,
                            (uint64_t)TCMU_PY_PROBE_US * 1000u, tcmu_py_now_ns());
    l->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    l->cap_fences = 64 + TCMU_PY_DP_MAX;
    l->fences = calloc((size_t)l->cap_fences, sizeof(*l->fences));
    l->fence_ids = calloc((size_t)l->cap_fences, sizeof(*l->fence_ids));
    l->fence_seq = calloc((size_t)l->cap_fences, sizeof(*l->fence_seq));
    if (l->stop_fd < 0 || !l->fences || !l->fence_ids || !l->fence_seq ||
        pthread_mutex_init(&l->mu, NULL) != 0) {
        if (l->stop_fd >= 0)
            close(l->stop_fd);
        free(l->fences);
        free(l->fence_ids);
        free(l->fence_seq);
        free(l);
        return NULL;
    }
    pthread_cond_init(&l->work_cv, NULL);
    pthread_cond_init(&l->idle_cv, NULL);
    return l;
}

/* Room for the fences of Python's commands plus a whole batch's. */
static int tcmu_py_loop_room(struct tcmu_py_loop *l)
{
    int cap = l->cap_fences;
    struct tcmu_py_fence *f;
    uint16_t *ids;
    uint64_t *seq;

    if (l->n_fences + TCMU_PY_DP_MAX <= cap)
        return 1;
    while (l->n_fences + TCMU_PY_DP_MAX > cap)
        cap *= 2;
    f = realloc(l->fences, (size_t)cap * sizeof(*f));
    if (!f)
        return 0;
    l->fences = f;
    ids = realloc(l->fence_ids, (size_t)cap * sizeof(*ids));
    if (!ids)
        return 0;
    l->fence_ids = ids;
    seq = realloc(l->fence_seq, (size_t)cap * sizeof(*seq));
    if (!seq)
        return 0;
    l->fence_seq = seq;
    l->cap_fences = cap;
    return 1;
}

static int tcmu_py_buf_grow(struct tcmu_py_buf *b, size_t more)
{
    size_t cap = b->cap ? b->cap : 65536;
    uint8_t *p;

    if (b->len + more <= b->cap)
        return 1;
    while (b->len + more > cap)
        cap *= 2;
    p = realloc(b->p, cap);
    if (!p)
        return 0;
    b->p = p;
    b->cap = cap;
    return 1;
}

/* Append entry e (CMD or TMR), read from the ring, to b as a record (see _ring.h). 0: no memory. */
static int tcmu_py_copy_entry(struct tcmu_py_buf *b, const uint8_t *map,
                              const struct tcmu_py_entry *e)
{
    size_t array_len = e->op == TCMU_OP_CMD
                           ? (size_t)(e->iov_cnt + e->iov_bidi_cnt) * sizeof(struct iovec)
                           : (size_t)e->iov_cnt * sizeof(uint16_t);
    size_t cdb_at = sizeof(*e), array_at = (cdb_at + e->cdb_len + 7) & ~(size_t)7;
    size_t size = (array_at + array_len + 7) & ~(size_t)7;
    struct tcmu_py_entry *h;

    if (!tcmu_py_buf_grow(b, size))
        return 0;
    h = (struct tcmu_py_entry *)(b->p + b->len);
    *h = *e;
    h->cdb_off = cdb_at;
    h->array_off = array_at;
    h->reserved = (uint32_t)size;
    if (e->cdb_len)
        memcpy(b->p + b->len + cdb_at, map + e->cdb_off, e->cdb_len);
    if (array_len)
        memcpy(b->p + b->len + array_at, map + e->array_off, array_len);
    b->len += size;
    return 1;
}

/* Append a whole record (size in its header) to b. 0: no memory. */
static int tcmu_py_put_record(struct tcmu_py_buf *b, const struct tcmu_py_entry *h)
{
    if (!tcmu_py_buf_grow(b, h->reserved))
        return 0;
    memcpy(b->p + b->len, h, h->reserved);
    b->len += h->reserved;
    return 1;
}

static void tcmu_py_loop_signal(int fd, uint32_t size);
static void tcmu_py_loop_fail(struct tcmu_py_loop *l, int error);
static void tcmu_py_loop_map(struct tcmu_py_loop *l);

/* Whether a job still queued or running touches units [start, end) in a way a new command
 * there must wait for: any such job when `writing` (the new command writes), else only a
 * writing one (two reads may run in either order). Under the mutex. */
static int tcmu_py_jobs_overlap(const struct tcmu_py_loop *l, uint64_t start, uint64_t end,
                                int writing)
{
    int i;

    if (!l->n_jobs)
        return 0;
    for (i = 0; i < TCMU_PY_JOBS; i++)
        if (l->jobs[i].busy && l->jobs[i].fs < end && start < l->jobs[i].fe &&
            (writing || l->jobs[i].writing))
            return 1;
    return 0;
}

/* Wait (under the mutex, which the wait releases) until no job conflicts with a command on
 * units [start, end) (`tcmu_py_jobs_overlap`). Only the loop thread makes jobs, so none that
 * conflicts can appear meanwhile; the jobs that do not conflict go on. */
static void tcmu_py_jobs_clear(struct tcmu_py_loop *l, uint64_t start, uint64_t end, int writing)
{
    while (tcmu_py_jobs_overlap(l, start, end, writing))
        pthread_cond_wait(&l->idle_cv, &l->mu);
}

/* Whether the extent is an RBD image's (its jobs are librbd operations). */
static inline int tcmu_py_rbd(const struct tcmu_py_extent *x)
{
    return x->fd < 0 && x->rbd_image != NULL;
}

/* Wait (under the mutex, which the wait releases) until no job is queued or running. */
static void tcmu_py_jobs_drain(struct tcmu_py_loop *l)
{
    while (l->n_jobs)
        pthread_cond_wait(&l->idle_cv, &l->mu);
}

/* Wait (as above) until a job slot is free. */
static void tcmu_py_jobs_slot(struct tcmu_py_loop *l)
{
    while (l->n_jobs >= TCMU_PY_JOBS)
        pthread_cond_wait(&l->idle_cv, &l->mu);
}

/* One command C executed: its figures (the latency is counted by the caller). */
static void tcmu_py_loop_tally(struct tcmu_py_loop *l, int writing, uint64_t total)
{
    l->fig.done++;
    if (writing) {
        l->fig.writes++;
        l->fig.bytes_written += total;
    } else {
        l->fig.reads++;
        l->fig.bytes_read += total;
    }
}

/* Whether an ordered fence (fence_seq nonzero) numbered below `below` (0: any) overlaps f.
 * Under the mutex. */
static int tcmu_py_ordered_overlap(const struct tcmu_py_loop *l, struct tcmu_py_fence f,
                                   uint64_t below)
{
    int i;

    for (i = 0; i < l->n_fences; i++)
        if (l->fence_seq[i] && (!below || l->fence_seq[i] < below) &&
            l->fences[i].start < f.end && f.start < l->fences[i].end)
            return 1;
    return 0;
}

/* Python's from now on: its record goes to the hand-off buffer, its fence is held (`seq`:
 * nonzero for an ordered command, see fence_seq). */
static int tcmu_py_loop_hand(struct tcmu_py_loop *l, const struct tcmu_py_entry *h,
                             struct tcmu_py_fence f, uint64_t seq)
{
    if (!tcmu_py_loop_room(l) || !tcmu_py_put_record(&l->rec, h))
        return 0;
    if (h->op == TCMU_OP_CMD && f.end > f.start) {
        l->fences[l->n_fences] = f;
        l->fence_ids[l->n_fences] = (uint16_t)h->cmd_id;
        l->fence_seq[l->n_fences] = seq;
        l->n_fences++;
    }
    l->fig.handed++;
    return 1;
}

/* ---- Copies through the mapped image ----
 *
 * Under emulation a preadv/pwritev of a page-cache file costs far more than a memcpy through a
 * mapping of it (the kernel walks the file page by page per call: measured in the VM, a 1 MiB
 * write cost the daemon 4.4 ms of system time with pwritev and 1.5 ms with memcpy). So the loop
 * maps a declared file that lives in memory anyway (tmpfs) and is fully allocated (no reads of
 * holes that would allocate pages a preadv would not), and copies through the mapping.
 *
 * A mapped copy can fault: the file was truncated under us, or tmpfs is full when a page must
 * be allocated. The fault is SIGBUS in the copying thread. tcmu_py_bus_handler turns it into a
 * failed copy (siglongjmp back to tcmu_py_map_copy, which returns 0) when the thread is inside
 * a mapped copy, and passes every other SIGBUS to the handler it replaced. A failed copy goes
 * to Python like any failed I/O: Python runs the command again with preadv/pwritev and answers
 * the errno's sense. */

#define TCMU_PY_TMPFS_MAGIC 0x01021994

/* Whether fd is a non-empty regular file on tmpfs (*st: its stat): one the loop may map. */
static int tcmu_py_on_tmpfs(int fd, struct stat *st)
{
    struct statfs sf;

    return fd >= 0 && fstat(fd, st) == 0 && S_ISREG(st->st_mode) && st->st_size > 0 &&
           fstatfs(fd, &sf) == 0 && sf.f_type == TCMU_PY_TMPFS_MAGIC;
}

static __thread sigjmp_buf *tcmu_py_bus_jmp;
static struct sigaction tcmu_py_bus_old;
static pthread_once_t tcmu_py_bus_once = PTHREAD_ONCE_INIT;
static int tcmu_py_bus_ok;

static void tcmu_py_bus_handler(int sig, siginfo_t *info, void *ctx)
{
    sigjmp_buf *jb = tcmu_py_bus_jmp;

    if (jb) {
        tcmu_py_bus_jmp = NULL;
        siglongjmp(*jb, 1);
    }
    if (tcmu_py_bus_old.sa_flags & SA_SIGINFO) {
        tcmu_py_bus_old.sa_sigaction(sig, info, ctx);
    } else if (tcmu_py_bus_old.sa_handler != SIG_DFL && tcmu_py_bus_old.sa_handler != SIG_IGN) {
        tcmu_py_bus_old.sa_handler(sig);
    } else {
        signal(sig, SIG_DFL);                   /* the fault comes again and kills, as before */
    }
}

static void tcmu_py_bus_install(void)
{
    struct sigaction sa;

    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = tcmu_py_bus_handler;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;      /* NODEFER: the jump leaves SIGBUS unblocked */
    sigemptyset(&sa.sa_mask);
    tcmu_py_bus_ok = sigaction(SIGBUS, &sa, &tcmu_py_bus_old) == 0;
}

/* Move the command's bytes between its iovecs and img + pos: 1, or 0 if the mapping faulted
 * (nothing is known of how much moved: the caller hands the command to Python). */
static int tcmu_py_map_copy(uint8_t *img, uint8_t *map, const struct iovec *src, uint32_t n_iov,
                            uint64_t pos, int writing)
{
    sigjmp_buf jb;
    uint32_t k;

    if (sigsetjmp(jb, 0))
        return 0;                               /* SIGBUS: tcmu_py_bus_handler jumped here */
    tcmu_py_bus_jmp = &jb;
    for (k = 0; k < n_iov; k++) {
        uint8_t *d = map + (uintptr_t)src[k].iov_base;

        if (writing)
            memcpy(img + pos, d, src[k].iov_len);
        else
            memcpy(d, img + pos, src[k].iov_len);
        pos += src[k].iov_len;
    }
    tcmu_py_bus_jmp = NULL;
    return 1;
}

/* ---- A dedup pool's write journal lease (see _ring.h) ---- */

/* Debian's libxxhash-dev header, compiled in (XXH_INLINE_ALL): the same XXH3-64 as the Python
 * `xxhash` module journal.py checks records with. */
#define XXH_INLINE_ALL
#include <xxhash.h>
#if XXH_VERSION_NUMBER < 800
#error "xxhash.h before 0.8.0: its XXH3 is not the one python-xxhash and journal.py compute"
#endif

#define TCMU_PY_JL_HEADER 64                    /* journal.py HEADER */
#define TCMU_PY_JL_SUMMED 48                    /* the header's bytes the checksum covers */

typedef uint64_t (*tcmu_py_jl_sum_fn)(const uint8_t *, size_t, const uint8_t *,
                                      const struct iovec *, uint32_t);

/* _jl_sum_scalar.c: the same checksum built without SIMD. */
uint64_t tcmu_py_jl_sum_scalar(const uint8_t *head, size_t head_len, const uint8_t *map,
                               const struct iovec *v, uint32_t n_iov);

/* The checksum in the build the compiler picked for this CPU (SSE2 on x86-64). */
#define TCMU_PY_JL_SUM_NAME tcmu_py_jl_sum_vector
#include "_jl_sum.h"
#undef TCMU_PY_JL_SUM_NAME

static tcmu_py_jl_sum_fn tcmu_py_jl_sum = tcmu_py_jl_sum_vector;
static pthread_once_t tcmu_py_jl_sum_once = PTHREAD_ONCE_INIT;

uint64_t tcmu_py_jl_checksum(const uint8_t *head, size_t head_len, const uint8_t *data,
                             size_t n, int build)
{
    struct iovec v = {(void *)(uintptr_t)0, n};

    return (build ? tcmu_py_jl_sum_scalar : tcmu_py_jl_sum_vector)(head, head_len, data, &v, 1);
}

int tcmu_py_jl_sum_build(void)
{
    return tcmu_py_jl_sum == tcmu_py_jl_sum_scalar;
}

/* Nanoseconds `fn` takes over buf, the fastest of 3 tries. */
static uint64_t tcmu_py_jl_time_sum(tcmu_py_jl_sum_fn fn, const uint8_t *buf, size_t len,
                                    uint64_t *sum)
{
    struct iovec v = {(void *)(uintptr_t)64, len - 64};
    uint64_t best = UINT64_MAX, t0, t;
    int k;

    for (k = 0; k < 3; k++) {
        t0 = tcmu_py_now_ns();
        *sum = fn(buf, 48, buf, &v, 1);
        t = tcmu_py_now_ns() - t0;
        best = t < best ? t : best;
    }
    return best;
}

/* Keep the faster of the two builds for this CPU (as the kernel picks its RAID6 and XOR
 * routines at boot): each hashes 256 KiB three times; a build that disagrees with the other
 * is never picked (it cannot: both are XXH3-64). Once per process. */
static void tcmu_py_jl_pick_sum(void)
{
    size_t len = 256u << 10, i;
    uint8_t *buf = malloc(len);
    uint64_t a, b, ta, tb;

    if (!buf)
        return;
    for (i = 0; i < len; i++)
        buf[i] = (uint8_t)(i * 2654435761u >> 13);
    ta = tcmu_py_jl_time_sum(tcmu_py_jl_sum_vector, buf, len, &a);
    tb = tcmu_py_jl_time_sum(tcmu_py_jl_sum_scalar, buf, len, &b);
    if (a == b && tb < ta)
        tcmu_py_jl_sum = tcmu_py_jl_sum_scalar;
    free(buf);
}

struct tcmu_py_jl {
    pthread_mutex_t mu;
    int32_t fd;
    uint32_t chunk;
    /* The journal file mapped when it lives in memory anyway (tmpfs) and is allocated whole
     * (journal.py writes it whole when it makes it): records are copied in as the loop copies
     * into a mapped image (see "Copies through the mapped image"); else pwrite/pwritev. */
    uint8_t *img;
    uint64_t img_len;
    uint32_t epoch;
    int active;
    uint64_t pos, end, seq, budget, max_record;
    struct tcmu_py_jl_rec *notices;
    uint32_t n_notices, max_notices;
    uint64_t appends, declined;
};

struct tcmu_py_jl *tcmu_py_jl_new(int32_t fd, uint32_t chunk, uint32_t max_notices)
{
    struct tcmu_py_jl *j;
    struct stat st;
    void *m;

    if (!chunk || !max_notices)
        return NULL;
    j = calloc(1, sizeof(*j));
    if (!j)
        return NULL;
    j->notices = calloc(max_notices, sizeof(j->notices[0]));
    if (!j->notices || pthread_mutex_init(&j->mu, NULL)) {
        free(j->notices);
        free(j);
        return NULL;
    }
    j->fd = fd;
    j->chunk = chunk;
    j->max_notices = max_notices;
    pthread_once(&tcmu_py_jl_sum_once, tcmu_py_jl_pick_sum);
    if (tcmu_py_on_tmpfs(fd, &st) && (uint64_t)st.st_blocks * 512u >= (uint64_t)st.st_size) {
        pthread_once(&tcmu_py_bus_once, tcmu_py_bus_install);
        m = tcmu_py_bus_ok ? mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED,
                                  fd, 0) : MAP_FAILED;
        if (m != MAP_FAILED) {
            j->img = m;
            j->img_len = (uint64_t)st.st_size;
        }
    }
    return j;
}

void tcmu_py_jl_free(struct tcmu_py_jl *j)
{
    if (!j)
        return;
    pthread_mutex_destroy(&j->mu);
    if (j->img)
        munmap(j->img, (size_t)j->img_len);
    free(j->notices);
    free(j);
}

/* The record (header `head`, then the command's buffers) into the mapped journal at pos: 1, or
 * 0 if the mapping faulted (tcmu_py_map_copy's rules). */
static int tcmu_py_jl_map_copy(struct tcmu_py_jl *j, const uint8_t *head, uint8_t *map,
                               const struct iovec *v, uint32_t n_iov, uint64_t pos)
{
    sigjmp_buf jb;

    if (sigsetjmp(jb, 0))
        return 0;
    tcmu_py_bus_jmp = &jb;
    memcpy(j->img + pos, head, TCMU_PY_JL_HEADER);
    tcmu_py_bus_jmp = NULL;
    return tcmu_py_map_copy(j->img, map, v, n_iov, pos + TCMU_PY_JL_HEADER, 1);
}

void tcmu_py_jl_grant(struct tcmu_py_jl *j, uint64_t pos, uint64_t end, uint64_t seq,
                      uint32_t epoch, uint64_t budget, uint64_t max_record)
{
    pthread_mutex_lock(&j->mu);
    j->pos = pos;
    j->end = end;
    j->seq = seq;
    j->epoch = epoch;
    j->budget = budget;
    j->max_record = max_record;
    j->active = 1;
    pthread_mutex_unlock(&j->mu);
}

void tcmu_py_jl_revoke(struct tcmu_py_jl *j)
{
    pthread_mutex_lock(&j->mu);
    j->active = 0;
    pthread_mutex_unlock(&j->mu);
}

uint32_t tcmu_py_jl_take(struct tcmu_py_jl *j, struct tcmu_py_jl_rec *out, uint32_t max)
{
    uint32_t n;

    pthread_mutex_lock(&j->mu);
    n = j->n_notices < max ? j->n_notices : max;
    memcpy(out, j->notices, n * sizeof(*out));
    memmove(j->notices, j->notices + n, (j->n_notices - n) * sizeof(*out));
    j->n_notices -= n;
    pthread_mutex_unlock(&j->mu);
    return n;
}

uint64_t tcmu_py_jl_appends(struct tcmu_py_jl *j)
{
    return tcmu_py_locked_u64(&j->mu, &j->appends);
}

uint64_t tcmu_py_jl_declined(struct tcmu_py_jl *j)
{
    return tcmu_py_locked_u64(&j->mu, &j->declined);
}

static void tcmu_py_le(uint8_t *p, uint64_t v, int n)
{
    int i;

    for (i = 0; i < n; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

/* Append the WRITE of the command's buffers v[0..n_iov) (`total` bytes at byte `pos` of disk
 * `disk`, whose chunk table is m) to the journal as one record, point m at its chunks and
 * queue its notice: 1. 0 (nothing written; the command goes to Python): not whole chunks, no
 * active lease, no room, budget or notice left, or the write failed (then the record's space
 * and number are spent, its notice says so, and the lease ends). */
static int tcmu_py_jl_append(struct tcmu_py_jl *j, struct tcmu_py_cm *m, uint64_t disk,
                             uint8_t *map, const struct iovec *v, uint32_t n_iov,
                             uint64_t pos, uint64_t total)
{
    uint64_t cs = j->chunk, need = TCMU_PY_JL_HEADER + total, count = total / cs, k;
    uint8_t head[TCMU_PY_JL_HEADER];
    struct tcmu_py_jl_rec *rec;
    int ok;

    if (!total || pos % cs || total % cs || count > UINT32_MAX || cs != m->chunk)
        return 0;
    pthread_mutex_lock(&j->mu);
    if (!j->active || j->n_notices >= j->max_notices || total > j->budget ||
        need > j->max_record || need > j->end - j->pos || j->pos > j->end) {
        if (j->active)
            j->declined++;
        pthread_mutex_unlock(&j->mu);
        return 0;
    }
    memset(head, 0, sizeof(head));
    memcpy(head, "TCMUJNL1", 8);
    tcmu_py_le(head + 8, j->epoch, 4);          /* flags (12..15) stay 0 */
    tcmu_py_le(head + 16, j->seq, 8);
    tcmu_py_le(head + 24, disk, 8);
    tcmu_py_le(head + 32, pos / cs, 8);
    tcmu_py_le(head + 40, count, 4);
    tcmu_py_le(head + TCMU_PY_JL_SUMMED, tcmu_py_jl_sum(head, TCMU_PY_JL_SUMMED, map, v, n_iov),
               8);
    if (j->img && j->pos + need <= j->img_len)
        ok = tcmu_py_jl_map_copy(j, head, map, v, n_iov, j->pos);
    else
        ok = pwrite(j->fd, head, sizeof(head), (off_t)j->pos) == (ssize_t)sizeof(head) &&
             tcmu_py_dp_iov(map, v, n_iov, j->fd, j->pos + TCMU_PY_JL_HEADER, 1);
    rec = &j->notices[j->n_notices++];
    rec->seq = j->seq;
    rec->pos = j->pos;
    rec->disk = disk;
    rec->first = pos / cs;
    rec->count = (uint32_t)count;
    rec->failed = !ok;
    if (ok) {
        /* Under the lease's mutex: the journal takes the notice only once the table names the
         * record, so its drain's locations come after these (tcmu_py_cm_put). */
        pthread_mutex_lock(&m->mu);
        m->jfd = j->fd;
        for (k = 0; k < count; k++)
            tcmu_py_cm_put(m, pos / cs + k, j->fd, j->pos + TCMU_PY_JL_HEADER + k * cs,
                           TCMU_PY_CM_JOURNAL, j->seq);
        pthread_mutex_unlock(&m->mu);
        j->appends++;
    } else {
        j->active = 0;
    }
    j->pos += need;
    j->seq++;
    j->budget -= total;
    pthread_mutex_unlock(&j->mu);
    return ok;
}

/* A C command's transfer: through the mapping when there is one and it covers the range,
 * else preadv/pwritev; then fdatasync for FUA when the write cache is volatile. Returns 0 on
 * any failure, 2 when the bytes moved through the mapping, 1 otherwise. */
static int tcmu_py_loop_io(struct tcmu_py_loop *l, const struct iovec *v, uint32_t n_iov,
                           int fd, uint64_t pos, uint64_t total, int writing, int fua,
                           int flush_fua)
{
    int ok;

    if (l->img && pos + total <= l->img_len && pos + total >= pos)
        ok = tcmu_py_map_copy(l->img, l->r->map, v, n_iov, pos, writing) ? 2 : 0;
    else
        ok = tcmu_py_dp_iov(l->r->map, v, n_iov, fd, pos, writing);
    return ok && !(writing && fua && flush_fua && fdatasync(fd) != 0) ? ok : 0;
}

/* Give a job slot back (under the mutex): whoever waits for the workers or a slot looks again. */
static void tcmu_py_job_free(struct tcmu_py_loop *l, struct tcmu_py_job *j)
{
    free(j->rec);
    j->rec = NULL;
    free(j->iov);
    j->iov = NULL;
    free(j->mw_buf);
    j->mw_buf = NULL;
    j->wi = NULL;
    j->busy = 0;
    l->n_jobs--;
    pthread_cond_broadcast(&l->idle_cv);
}

/* After a job's I/O (under the mutex): complete it GOOD and count it when `ok`, else hand it to
 * Python with its fence (Python runs it again and answers the sense). Returns 0, or a negative
 * status when the ring is broken or memory ran out. The caller then releases the mutex, calls
 * tcmu_py_job_signal, and frees the slot under the mutex again: only then may a drain return
 * (an RBD job's thread is librbd's, not joined: the loop must outlive its last signal). */
static int tcmu_py_job_finish(struct tcmu_py_loop *l, struct tcmu_py_job *j, int ok)
{
    static const uint8_t no_sense[1] = {0};
    const struct tcmu_py_entry *h = (const struct tcmu_py_entry *)j->rec;
    int rc = 0;

    if (ok) {
        double took = (double)(tcmu_py_now_ns() - j->t0) / 1e9;

        rc = tcmu_py_complete(l->r, j->cmd_id, 0, no_sense, 0, 0, 0);
        tcmu_py_loop_tally(l, (int)j->writing, j->total);
        l->fig.latency_seconds += took;
        l->fig.hist[tcmu_py_dp_bucket(took)]++;
    } else {
        /* An RBD job's overlapping commands were handed to Python while it ran, ordered
         * after it (they wait for it: tcmu_py_loop_fence_busy): it goes to Python ordered,
         * numbered as it came, so that they still wait for it there, and marked so that
         * Python runs it first (D124). A worker's failed job needs neither: the loop waited
         * for it before handing any command that overlaps it. */
        uint64_t seq = 0;

        if (tcmu_py_rbd(&l->x)) {
            ((struct tcmu_py_entry *)j->rec)->retried = 1;
            seq = j->seq;
        }
        if (!tcmu_py_loop_hand(l, h, tcmu_py_dp_fence(j->rec + h->cdb_off), seq))
            rc = -ENOMEM;
    }
    return rc;
}

/* After tcmu_py_job_finish, the mutex released: kick the kernel, or wake Python. */
static void tcmu_py_job_signal(struct tcmu_py_loop *l, int rc, int ok)
{
    if (rc < 0)
        tcmu_py_loop_fail(l, rc);               /* the ring is broken: the loop stops */
    else if (ok)
        tcmu_py_loop_signal(l->kick_fd, l->kick_size);
    else
        tcmu_py_loop_signal(l->notify_fd, 8);
}

/* The end of job j whose I/O is done, with the jobs chained after it (an RBD group: librbd did
 * their I/O as one operation, so they end alike), called and returning with the mutex held:
 * finish each, signal once without the mutex, then give their slots back. */
static void tcmu_py_job_end(struct tcmu_py_loop *l, struct tcmu_py_job *j, int ok)
{
    struct tcmu_py_job *m;
    int rc = 0;

    for (m = j; m; m = m->next) {
        int r = tcmu_py_job_finish(l, m, ok);

        if (r < 0 && !rc)
            rc = r;
    }
    pthread_mutex_unlock(&l->mu);
    tcmu_py_job_signal(l, rc, ok);
    pthread_mutex_lock(&l->mu);
    while (j) {
        m = j->next;
        j->next = NULL;
        tcmu_py_job_free(l, j);
        j = m;
    }
}

static void tcmu_py_mw_part(struct tcmu_py_loop *l, struct tcmu_py_job *j, int ok);

/* On a worker, under the mutex (released meanwhile): write mirror job j to its local legs (the
 * declared extent's: it is replaced only with no job running), and count that part. */
static void tcmu_py_mw_local(struct tcmu_py_loop *l, struct tcmu_py_job *j)
{
    const struct tcmu_py_entry *h = (const struct tcmu_py_entry *)j->rec;
    const struct iovec *v = (const struct iovec *)(j->rec + h->array_off);
    uint32_t i, n = l->x.mw_n_fds;
    int32_t fds[3];
    int ok = 1;

    for (i = 0; i < n && i < 3; i++)
        fds[i] = l->x.mw_fds[i];
    pthread_mutex_unlock(&l->mu);
    for (i = 0; i < n && i < 3 && ok; i++)
        ok = tcmu_py_dp_iov(l->r->map, v, h->iov_cnt, fds[i], j->pos, 1);
    pthread_mutex_lock(&l->mu);
    tcmu_py_mw_part(l, j, ok);
}

static void *tcmu_py_worker_main(void *arg)
{
    struct tcmu_py_loop *l = arg;

    tcmu_py_name_thread("tcmu-py-io");

    pthread_mutex_lock(&l->mu);
    for (;;) {
        struct tcmu_py_job *j;
        const struct tcmu_py_entry *h;
        int ok;

        while (!l->quit && l->q_head == l->q_tail)
            pthread_cond_wait(&l->work_cv, &l->mu);
        if (l->q_head == l->q_tail)
            break;                              /* quit, and nothing queued */
        j = &l->jobs[l->queue[l->q_head++ % TCMU_PY_JOBS]];
        h = (const struct tcmu_py_entry *)j->rec;
        if (j->wi) {
            tcmu_py_mw_local(l, j);             /* a mirror job's local legs */
            continue;
        }
        pthread_mutex_unlock(&l->mu);
        ok = tcmu_py_loop_io(l, (const struct iovec *)(j->rec + h->array_off), h->iov_cnt,
                             j->fd, j->pos, j->total, (int)j->writing, (int)j->fua,
                             (int)j->flush_fua);
        pthread_mutex_lock(&l->mu);
        if (ok == 2)
            l->fig.mapped++;
        tcmu_py_job_end(l, j, ok);
    }
    pthread_mutex_unlock(&l->mu);
    return NULL;
}

/* librbd's completion of an RBD group (on librbd's finisher thread): GOOD when every byte
 * moved (a read returns its length, a write 0 or its length), else each command Python's with
 * its fence. */
static void tcmu_py_rbd_done(void *completion, void *arg)
{
    struct tcmu_py_job *j = arg, *m;
    struct tcmu_py_loop *l = j->loop;
    ssize_t ret = ((tcmu_py_rbd_ret_t)j->rbd_ret)(completion);
    uint64_t total = j->rbd_total;
    int ok;

    ((tcmu_py_rbd_release_t)j->rbd_release)(completion);
    ok = j->writing ? ret == 0 || (uint64_t)ret == total : ret >= 0 && (uint64_t)ret == total;
    if (!ok && ret < 0)  /* Python answers them from the errno (a cluster that did not answer
                          * within osd_op_timeout is NOT READY at once, not tried again) */
        for (m = j; m; m = m->next)
            ((struct tcmu_py_entry *)m->rec)->error = (uint32_t)-ret;
    pthread_mutex_lock(&l->mu);
    tcmu_py_job_end(l, j, ok);
    pthread_mutex_unlock(&l->mu);
}

/* Take a free job slot for entry h (under the mutex; n_jobs < TCMU_PY_JOBS), or NULL (no
 * memory). */
static struct tcmu_py_job *tcmu_py_job_take(struct tcmu_py_loop *l, const struct tcmu_py_entry *h,
                                            const struct tcmu_py_dp_cmd *c, uint64_t pos,
                                            uint64_t t0)
{
    struct tcmu_py_job *j = NULL;
    int i;

    for (i = 0; i < TCMU_PY_JOBS; i++)
        if (!l->jobs[i].busy) {
            j = &l->jobs[i];
            break;
        }
    if (!j)
        return NULL;
    j->rec = malloc(h->reserved);
    if (!j->rec)
        return NULL;
    memcpy(j->rec, h, h->reserved);
    j->busy = 1;
    j->cmd_id = h->cmd_id;
    j->writing = (uint32_t)c->writing;
    j->fua = (uint32_t)c->fua;
    j->flush_fua = l->x.flush_fua;
    j->fd = l->x.fd;
    j->pos = pos;
    j->total = c->total;
    j->fs = c->fs;
    j->fe = c->fe;
    j->t0 = t0;
    j->loop = l;
    j->iov = NULL;
    j->next = NULL;                         /* alone, until an RBD group chains it */
    j->seq = ++l->fence_next;
    l->n_jobs++;
    return j;
}

/* A group of RBD commands the loop has taken and not yet sent (tcmu_py_rbd_join): plain
 * READs or WRITEs (one direction, one FUA), each starting where the one before it ends, that
 * came one after the other in the ring. librbd's cost is per operation (its dispatch, and a
 * RADOS op per object touched, which the OSDs pay for too): an initiator's large request split
 * into commands of hw_max_sectors costs one operation again, not one per piece. The commands
 * were all outstanding at once, so SAM-5 puts no order between them; each keeps its job, its
 * record and its fence, and is completed (or handed to Python) on its own. */
struct tcmu_py_rbd_group {
    struct tcmu_py_job *first, *last;
    uint64_t end;                          /* the byte on the image after the last command */
    uint32_t iov_cnt;
};

/* At most this much in one group: librbd's default object size (larger requests are split
 * into objects by librbd itself: no gain in joining), and an iovec count any librbd takes. */
enum { TCMU_PY_RBD_GROUP_BYTES = 4u << 20, TCMU_PY_RBD_GROUP_IOVS = 1024 };

/* Take entry h (a plain READ/WRITE of the declared RBD extent) into group g, under the mutex
 * (not released): 1 when taken (joining g, or starting it when g is empty), 0 when it does not
 * join g (send g first, then try again) or no memory (g empty: it goes to Python). */
static int tcmu_py_rbd_join(struct tcmu_py_loop *l, struct tcmu_py_rbd_group *g,
                            const struct tcmu_py_entry *h, const struct tcmu_py_dp_cmd *c,
                            uint64_t pos, uint64_t t0)
{
    struct tcmu_py_job *j;

    if (g->first && (pos != g->end || (uint32_t)c->writing != g->first->writing ||
                     (uint32_t)c->fua != g->first->fua ||
                     g->first->rbd_total + c->total > TCMU_PY_RBD_GROUP_BYTES ||
                     g->iov_cnt + h->iov_cnt > TCMU_PY_RBD_GROUP_IOVS))
        return 0;
    j = tcmu_py_job_take(l, h, c, pos, t0);
    if (!j)
        return 0;
    if (g->first) {
        g->last->next = j;
        g->first->rbd_total += c->total;
        l->fig.merged++;
    } else {
        g->first = j;
        j->rbd_total = c->total;
    }
    g->last = j;
    g->end = pos + c->total;
    g->iov_cnt += h->iov_cnt;
    return 1;
}

/* Send group g to librbd as one operation and empty it, under the mutex, which the submission
 * releases. A group librbd does not take (no memory, refused) is answered as a failed one:
 * every command Python's with its fence. */
static void tcmu_py_rbd_send(struct tcmu_py_loop *l, struct tcmu_py_rbd_group *g)
{
    const struct tcmu_py_extent *x = &l->x;
    struct tcmu_py_job *j = g->first, *m;
    tcmu_py_rbd_rw_t rw;
    void *image = x->rbd_image, *completion = NULL;
    uint32_t i, k = 0;
    int rc;

    if (!j)
        return;
    memset(g, 0, sizeof(*g));
    rw = (tcmu_py_rbd_rw_t)(j->writing ? x->rbd_aio_writev : x->rbd_aio_readv);
    j->rbd_ret = x->rbd_aio_get_return_value;
    j->rbd_release = x->rbd_aio_release;
    for (m = j; m; m = m->next)
        k += ((const struct tcmu_py_entry *)m->rec)->iov_cnt;
    j->iov = malloc((k ? k : 1) * sizeof(*j->iov));
    if (!j->iov ||
        ((tcmu_py_rbd_create_t)x->rbd_create_completion)(j, tcmu_py_rbd_done, &completion) < 0) {
        tcmu_py_job_end(l, j, 0);
        return;
    }
    k = 0;
    for (m = j; m; m = m->next) {
        const struct tcmu_py_entry *h = (const struct tcmu_py_entry *)m->rec;
        const struct iovec *v = (const struct iovec *)(m->rec + h->array_off);

        for (i = 0; i < h->iov_cnt; i++, k++) {
            j->iov[k].iov_base = l->r->map + (uintptr_t)v[i].iov_base;
            j->iov[k].iov_len = v[i].iov_len;
        }
    }
    /* Not under the mutex: librbd may complete (and so take the mutex) before it returns. No
     * one else takes a job slot, so the group is ours until this call returns. */
    pthread_mutex_unlock(&l->mu);
    rc = rw(image, j->iov, (int)k, j->pos, completion);
    pthread_mutex_lock(&l->mu);
    if (rc < 0) {
        ((tcmu_py_rbd_release_t)j->rbd_release)(completion);  /* it never completes */
        tcmu_py_job_end(l, j, 0);
    }
}

/* A leg of mirror job j answered (under the mutex): the last one finishes it. */
static void tcmu_py_mw_part(struct tcmu_py_loop *l, struct tcmu_py_job *j, int ok)
{
    if (!ok)
        j->mw_ok = 0;
    if (--j->mw_pending)
        return;
    tcmu_py_wi_end(j->wi, j->pos, j->total);
    tcmu_py_job_end(l, j, j->mw_ok);
}

/* An NBD writer's answer for a mirror job (on the writer's thread). */
static void tcmu_py_mw_nbd_done(void *arg, int ok)
{
    struct tcmu_py_job *j = arg;
    struct tcmu_py_loop *l = j->loop;

    pthread_mutex_lock(&l->mu);
    tcmu_py_mw_part(l, j, ok);
    pthread_mutex_unlock(&l->mu);
}

/* Write entry h (a plain WRITE of a fan-out extent) to every leg, under the mutex, which it
 * releases while the local legs are written: 1 when C took it (the last leg to answer
 * finishes it), 0 when it must go to Python (a region not armed, no memory). */
static int tcmu_py_mw_submit(struct tcmu_py_loop *l, const struct tcmu_py_entry *h,
                             const struct iovec *v, const struct tcmu_py_dp_cmd *c,
                             uint64_t pos, uint64_t t0)
{
    const struct tcmu_py_extent *x = &l->x;
    struct tcmu_py_job *j = tcmu_py_job_take(l, h, c, pos, t0);
    uint32_t i, failed = 0, n_fds = x->mw_n_fds, n_nbd = x->mw_n_nbd;
    struct tcmu_py_nbdq *nbd[3];
    const void *data = NULL;
    int32_t fds[3];
    int ok = 1;

    if (!j)
        return 0;
    if (!tcmu_py_wi_begin(x->wi, pos, c->total)) {
        tcmu_py_job_free(l, j);
        return 0;
    }
    j->wi = x->wi;
    for (i = 1; i < h->iov_cnt; i++)
        if ((uintptr_t)v[i - 1].iov_base + v[i - 1].iov_len != (uintptr_t)v[i].iov_base)
            break;
    if (n_nbd && h->iov_cnt && i == h->iov_cnt) {
        /* One run of the data area: sent from there (it stays the command's until it is
         * completed, which is after every leg answered; a dead writer's libnbd sends no more) */
        data = l->r->map + (uintptr_t)v[0].iov_base;
    } else if (n_nbd) {
        uint8_t *d = malloc(c->total ? c->total : 1);

        if (!d) {
            tcmu_py_wi_end(j->wi, pos, c->total);
            tcmu_py_job_free(l, j);
            return 0;
        }
        j->mw_buf = d;
        data = d;
        for (i = 0; i < h->iov_cnt; i++) {
            memcpy(d, l->r->map + (uintptr_t)v[i].iov_base, v[i].iov_len);
            d += v[i].iov_len;
        }
    }
    j->mw_ok = 1;
    j->mw_pending = 1 + n_nbd;                  /* the local legs count as one */
    for (i = 0; i < n_fds && i < 3; i++)
        fds[i] = x->mw_fds[i];
    for (i = 0; i < n_nbd && i < 3; i++)
        nbd[i] = x->mw_nbd[i];
    /* Not under the mutex (libnbd may answer before its call returns, and its callback takes
     * the mutex): the job stays ours while mw_pending > 0, and the local part is one. */
    pthread_mutex_unlock(&l->mu);
    for (i = 0; i < n_nbd && i < 3; i++)
        if (!tcmu_py_nbdq_push(nbd[i], data, c->total, pos, tcmu_py_mw_nbd_done, j))
            failed++;                           /* dead: the command goes to Python */
    if (!(l->n_started && n_fds && c->total >= l->big))
        for (i = 0; i < n_fds && i < 3 && ok; i++)
            ok = tcmu_py_dp_iov(l->r->map, v, h->iov_cnt, fds[i], pos, 1);
    pthread_mutex_lock(&l->mu);
    while (failed--)
        tcmu_py_mw_part(l, j, 0);               /* not the last part: the local one is left */
    if (l->n_started && n_fds && c->total >= l->big) {
        /* a large one: its local legs are written by a worker (tcmu_py_mw_local), so that
         * the loop goes on sending the next commands meanwhile */
        l->queue[l->q_tail++ % TCMU_PY_JOBS] = (uint32_t)(j - l->jobs);
        pthread_cond_signal(&l->work_cv);
        return 1;
    }
    tcmu_py_mw_part(l, j, ok);
    return 1;
}

/* Queue a large command for the workers (under the mutex, with a free slot): 1, or 0 (no
 * memory) if it must run here. */
static int tcmu_py_job_queue(struct tcmu_py_loop *l, const struct tcmu_py_entry *h,
                             const struct tcmu_py_dp_cmd *c, uint64_t pos, uint64_t t0)
{
    struct tcmu_py_job *j = tcmu_py_job_take(l, h, c, pos, t0);

    if (!j)
        return 0;
    l->queue[l->q_tail++ % TCMU_PY_JOBS] = (uint32_t)(j - l->jobs);
    pthread_cond_signal(&l->work_cv);
    return 1;
}

/* One wake-up's worth of entries, under the mutex. Every entry is copied first, so nothing
 * below depends on its ring slot (completions, ours or Python's while a wait releases the
 * mutex, may steal it). Then, in ring order, each entry is C's (executed here, or on a worker
 * when large) or Python's (its record handed over, its fence held); an entry that overlaps a
 * command still on a worker waits for the workers first, so nothing overtakes it. Returns the
 * entries dequeued or a negative status; *done / *handed count up. */
static int tcmu_py_loop_batch(struct tcmu_py_loop *l, int *done, int *handed)
{
    const struct tcmu_py_extent *x = &l->x;
    uint64_t t0 = tcmu_py_now_ns();
    struct tcmu_py_rbd_group g;
    int n, k, n_done = 0, has_tmr = 0, rc;

    n = tcmu_py_dequeue(l->r, l->out, TCMU_PY_DP_MAX);
    if (n <= 0)
        return n;
    if (!l->img && x->fd >= 0 && !l->n_jobs && t0 >= l->map_retry) {
        /* An extent not mapped when it was declared may be now: a mirror's leg written whole
         * through the device after it was declared. Looked at every 100 ms at most (an fstat,
         * an fstatfs and on tmpfs a SEEK_HOLE), while no worker copies (so none sees the
         * mapping appear mid-command). */
        l->map_retry = t0 + 100000000u;
        tcmu_py_loop_map(l);
    }
    l->cp.len = 0;
    memset(&g, 0, sizeof(g));
    for (k = 0; k < n; k++) {
        l->at[k] = l->cp.len;
        if (!tcmu_py_copy_entry(&l->cp, l->r->map, &l->out[k]))
            return -ENOMEM;                     /* nothing executed: the loop stops */
        if (l->out[k].op == TCMU_OP_TMR)
            has_tmr = 1;                        /* aborts: Python sees the whole batch */
    }
    for (k = 0; k < n; k++) {
        const struct tcmu_py_entry *h = (const struct tcmu_py_entry *)(l->cp.p + l->at[k]);
        const uint8_t *cdb = (const uint8_t *)h + h->cdb_off;
        const struct iovec *v = (const struct iovec *)((const uint8_t *)h + h->array_off);
        struct tcmu_py_fence f = {0, 0};
        struct tcmu_py_dp_cmd c;
        uint64_t pos;
        int io, ordered;

    again:
        if (tcmu_py_dp_plain(x, h, cdb, v, has_tmr, l->fences, l->n_fences, 1, &c)) {
            pos = x->base + c.lba * x->block_size;
            if (tcmu_py_jobs_overlap(l, c.fs, c.fe, c.writing)) {
                /* Ring order among C's own commands. An RBD job may take a whole
                 * osd_op_timeout (a stalled cluster), which every later command must not wait
                 * too: the command goes to Python, which waits for the jobs it overlaps
                 * before it runs it (tcmu_py_loop_fence_busy; a failed RBD job goes to
                 * Python ordered, numbered as it came, so the command still waits for it
                 * there: tcmu_py_job_finish, D124). A
                 * worker's copy is short, and one that fails is run again by Python, after
                 * which an overlapping command must come: the loop waits for it. The wait
                 * releases the mutex: the extent, the enable flag and the fences may have
                 * changed, so the checks run again. */
                if (tcmu_py_rbd(x))
                    goto python;
                tcmu_py_jobs_clear(l, c.fs, c.fe, c.writing);
                goto again;
            }
            if (c.writing && x->wi) {
                /* A mirror's WRITE: a job on every leg. */
                if (l->n_jobs >= TCMU_PY_JOBS) {
                    tcmu_py_jobs_slot(l);
                    goto again;
                }
                if (tcmu_py_mw_submit(l, h, v, &c, pos, t0))
                    continue;
                goto python;                    /* as for RBD below */
            }
            if (x->cm && c.writing) {
                /* A dedup disk's WRITE: a record of its pool's journal, when the lease
                 * allows (tcmu_py_dp_plain let only those with a lease through). */
                if (x->jl && tcmu_py_jl_append(x->jl, x->cm, x->jl_disk, l->r->map, v,
                                               h->iov_cnt, pos, c.total)) {
                    l->done_ids[n_done++] = (uint16_t)h->cmd_id;
                    tcmu_py_loop_tally(l, c.writing, c.total);
                    continue;
                }
                goto python;
            }
            if (x->cm) {
                /* A dedup disk's READ. */
                if (tcmu_py_cm_read(x->cm, l->r->map, v, h->iov_cnt, pos, c.total)) {
                    l->done_ids[n_done++] = (uint16_t)h->cmd_id;
                    tcmu_py_loop_tally(l, c.writing, c.total);
                    continue;
                }
                goto python;
            }
            if (x->fd < 0) {
                /* RBD: every command is a job librbd completes, sent with the ones before it
                 * when adjacent (tcmu_py_rbd_join; sent when one does not join, before
                 * anything goes to Python, and at the end of the batch). */
                if (tcmu_py_rbd_join(l, &g, h, &c, pos, t0)) {
                    if (x->wi || x->cm)         /* the branches above would release the */
                        tcmu_py_rbd_send(l, &g);    /* mutex with it unsent: no group */
                    continue;
                }
                if (g.first) {
                    tcmu_py_rbd_send(l, &g);    /* it released the mutex: the checks again */
                    goto again;
                }
                if (l->n_jobs >= TCMU_PY_JOBS) {
                    tcmu_py_jobs_slot(l);       /* every slot taken: as above */
                    goto again;
                }
                goto python;                    /* no memory */
            }
            if (l->n_started && c.total >= l->big) {
                if (l->n_jobs >= TCMU_PY_JOBS) {
                    tcmu_py_jobs_drain(l);      /* every slot taken: as above */
                    goto again;
                }
                if (tcmu_py_job_queue(l, h, &c, pos, t0))
                    continue;
            }
            io = tcmu_py_loop_io(l, v, h->iov_cnt, x->fd, pos, c.total, c.writing, c.fua,
                                 (int)x->flush_fua);
            if (io) {
                if (io == 2)
                    l->fig.mapped++;
                l->done_ids[n_done++] = (uint16_t)h->cmd_id;
                tcmu_py_loop_tally(l, c.writing, c.total);
                continue;
            }
        }
    python:
        tcmu_py_rbd_send(l, &g);                /* ring order: the group before it */
        ordered = 0;
        if (h->op == TCMU_OP_CMD)
            f = tcmu_py_dp_fence(cdb);
        if (f.end > f.start) {                  /* Python must not overtake a job either */
            if (!tcmu_py_rbd(x))
                tcmu_py_jobs_clear(l, f.start, f.end, 1);
            else                                /* it waits itself, as above, and so does */
                ordered = tcmu_py_jobs_overlap(l, f.start, f.end, 1) ||  /* what comes */
                          tcmu_py_ordered_overlap(l, f, 0);              /* after it */
        }
        if (!tcmu_py_loop_hand(l, h, f, ordered ? ++l->fence_next : 0))
            return -ENOMEM;
        (*handed)++;
    }
    tcmu_py_rbd_send(l, &g);
    if (n_done) {
        double took = (double)(tcmu_py_now_ns() - t0) / 1e9;

        l->fig.latency_seconds += took * n_done;
        l->fig.hist[tcmu_py_dp_bucket(took)] += (uint32_t)n_done;
        *done += n_done;
        rc = tcmu_py_complete_good(l->r, l->done_ids, (uint32_t)n_done);
        if (rc < 0)
            return rc;
    }
    return n;
}

static void tcmu_py_loop_signal(int fd, uint32_t size)
{
    uint64_t one = 1;
    ssize_t w;

    if (fd < 0)
        return;
    do
        w = write(fd, &one, size);
    while (w < 0 && errno == EINTR);
}

static void tcmu_py_loop_fail(struct tcmu_py_loop *l, int error)
{
    __atomic_store_n(&l->error, error, __ATOMIC_RELEASE);
    tcmu_py_loop_signal(l->notify_fd, 8);
}

void tcmu_py_poll_judge_init(struct tcmu_py_poll_judge *j, uint64_t every_ns, uint64_t probe_ns,
                             uint64_t now)
{
    memset(j, 0, sizeof(*j));
    j->every_ns = every_ns;
    j->probe_ns = probe_ns < every_ns / 2 ? probe_ns : every_ns / 2;
    j->polling = 1;
    j->next_probe = now + every_ns - 2 * j->probe_ns;
}

int tcmu_py_poll_judge_step(struct tcmu_py_poll_judge *j, uint64_t now, uint64_t commands)
{
    uint64_t took;

    if (!j->every_ns)
        return 1;
    j->count += commands;
    switch (j->phase) {
    case 0:
        if (now >= j->next_probe) {
            j->phase = 1;
            j->phase_start = now;
            j->count = 0;
        }
        break;
    case 1:
        took = now - j->phase_start;
        if (took >= j->probe_ns) {
            j->base_count = j->count;
            j->base_ns = took;
            j->phase = 2;
            j->phase_start = now;
            j->count = 0;
        }
        break;
    default:
        took = now - j->phase_start;
        if (took >= j->probe_ns) {
            /* rates as counts per the same length: n_on * t_off vs n_off * t_on */
            uint64_t n_alt = j->count, t_alt = took;
            uint64_t n_on = j->polling ? j->base_count : n_alt;
            uint64_t t_on = j->polling ? j->base_ns : t_alt;
            uint64_t n_off = j->polling ? n_alt : j->base_count;
            uint64_t t_off = j->polling ? t_alt : j->base_ns;

            if (j->base_count >= TCMU_PY_PROBE_MIN && n_alt >= TCMU_PY_PROBE_MIN) {
                uint32_t want = (double)n_on * (double)t_off * 4.0 >
                                (double)n_off * (double)t_on * 5.0;

                if (want != j->polling)
                    j->switches++;
                j->polling = want;
            }
            j->probes++;
            j->phase = 0;
            j->next_probe = now + j->every_ns - 2 * j->probe_ns;
        }
        break;
    }
    if (j->phase == 2)
        return j->polling ? 0 : 2;              /* 2: probing the poll, whatever the gap */
    return (int)j->polling;
}

/* Watch cmd_head for up to poll_us (yielding the CPU between looks): 1 if an entry came. */
static int tcmu_py_loop_watch(struct tcmu_py_loop *l, uint64_t *waited)
{
    uint64_t start = tcmu_py_now_ns(), deadline = start + (uint64_t)l->poll_us * 1000u, now;

    for (;;) {
        if (tcmu_py_load_head(l->r) != l->r->cursor) {
            *waited = tcmu_py_now_ns() - start;
            return 1;
        }
        now = tcmu_py_now_ns();
        if (now >= deadline || __atomic_load_n(&l->stopping, __ATOMIC_ACQUIRE))
            return 0;
        sched_yield();
    }
}

static void *tcmu_py_loop_main(void *arg)
{
    struct tcmu_py_loop *l = arg;
    struct pollfd pfd[2] = {{l->uio_fd, POLLIN, 0}, {l->stop_fd, POLLIN, 0}};
    uint64_t gap = 0, idle_since = 0, waited;  /* gap: running average, ns, between commands */
    uint64_t ev;
    int ready = 0;

    tcmu_py_name_thread("tcmu-py-loop");
    while (!__atomic_load_n(&l->stopping, __ATOMIC_ACQUIRE)) {
        int done = 0, handed = 0, work = 0, rc, pr, polling;
        uint64_t probes, switches;

        if (!ready) {
            pr = poll(pfd, 2, -1);
            if (pr < 0) {
                if (errno == EINTR)
                    continue;
                tcmu_py_loop_fail(l, errno);
                break;
            }
            if (pfd[1].revents)
                break;
            if (pfd[0].revents & (POLLERR | POLLHUP | POLLNVAL)) {
                tcmu_py_loop_fail(l, ENODEV);
                break;
            }
            if (read(l->uio_fd, &ev, l->event_size) < 0 && errno != EAGAIN && errno != EINTR) {
                tcmu_py_loop_fail(l, errno);
                break;
            }
            pthread_mutex_lock(&l->mu);
            l->fig.wakeups++;
            pthread_mutex_unlock(&l->mu);
            if (idle_since) {
                uint64_t g = tcmu_py_now_ns() - idle_since;
                gap = (uint64_t)((int64_t)gap + ((int64_t)g - (int64_t)gap) / 4);
            }
        }
        ready = 0;
        pthread_mutex_lock(&l->mu);
        do {
            rc = tcmu_py_loop_batch(l, &done, &handed);
            if (rc > 0)
                work += rc;
        } while (rc >= TCMU_PY_DP_MAX);
        if (work)
            l->fig.batches++;
        probes = l->judge.probes;
        switches = l->judge.switches;
        polling = tcmu_py_poll_judge_step(&l->judge, tcmu_py_now_ns(), (uint64_t)work);
        l->fig.probes += l->judge.probes - probes;
        l->fig.poll_switches += l->judge.switches - switches;
        pthread_mutex_unlock(&l->mu);
        if (done)
            tcmu_py_loop_signal(l->kick_fd, l->kick_size);
        if (handed)
            tcmu_py_loop_signal(l->notify_fd, 8);
        if (rc < 0) {
            tcmu_py_loop_fail(l, rc);
            break;
        }
        if (work) {
            idle_since = tcmu_py_now_ns();
            /* Queue depth 1 served in C: watch for the next command instead of sleeping, while
             * the judge finds that it pays. */
            if (work == 1 && done == 1 && l->poll_us && polling &&
                (polling == 2 || gap < (uint64_t)l->poll_us * 1000u)) {
                if (tcmu_py_loop_watch(l, &waited)) {
                    ready = 1;
                    gap = (uint64_t)((int64_t)gap + ((int64_t)waited - (int64_t)gap) / 4);
                    pthread_mutex_lock(&l->mu);
                    l->fig.polled++;
                    pthread_mutex_unlock(&l->mu);
                } else {
                    pthread_mutex_lock(&l->mu);
                    l->fig.poll_misses++;
                    pthread_mutex_unlock(&l->mu);
                }
            }
        }
    }
    pthread_mutex_lock(&l->mu);
    tcmu_py_jobs_drain(l);                      /* no C command in flight once stopped */
    pthread_mutex_unlock(&l->mu);
    return NULL;
}

int tcmu_py_loop_start(struct tcmu_py_loop *l)
{
    int rc;

    if (l->started)
        return EBUSY;
    for (l->n_started = 0; l->n_started < l->n_workers; l->n_started++)
        if (pthread_create(&l->workers[l->n_started], NULL, tcmu_py_worker_main, l) != 0)
            break;                              /* fewer workers (none: all in the loop) */
    rc = pthread_create(&l->thread, NULL, tcmu_py_loop_main, l);
    if (rc == 0)
        l->started = 1;
    else
        tcmu_py_loop_stop(l);
    return rc;
}

void tcmu_py_loop_stop(struct tcmu_py_loop *l)
{
    __atomic_store_n(&l->stopping, 1, __ATOMIC_RELEASE);
    if (l->started) {
        tcmu_py_loop_signal(l->stop_fd, 8);
        pthread_join(l->thread, NULL);
        l->started = 0;
    }
    if (l->n_started) {
        pthread_mutex_lock(&l->mu);
        l->quit = 1;
        pthread_cond_broadcast(&l->work_cv);
        pthread_mutex_unlock(&l->mu);
        while (l->n_started)
            pthread_join(l->workers[--l->n_started], NULL);
    }
}

void tcmu_py_loop_free(struct tcmu_py_loop *l)
{
    if (!l)
        return;
    tcmu_py_loop_stop(l);
    pthread_cond_destroy(&l->work_cv);
    pthread_cond_destroy(&l->idle_cv);
    pthread_mutex_destroy(&l->mu);
    close(l->stop_fd);
    free(l->fences);
    free(l->fence_ids);
    free(l->fence_seq);
    free(l->cp.p);
    free(l->rec.p);
    if (l->img)
        munmap(l->img, (size_t)l->img_len);
    free(l);
}

/* Whether every byte of x's extent is allocated in its file (st: the file's stat): the whole
 * file is, or SEEK_HOLE finds no hole before the extent's end (a mirror's leg: its metadata
 * area after the data may have holes). The fd's file position is put back. */
static int tcmu_py_extent_allocated(const struct tcmu_py_extent *x, const struct stat *st)
{
    uint64_t end = x->base + x->num_blocks * x->block_size;
    off_t pos, hole;

    if ((uint64_t)st->st_blocks * 512u >= (uint64_t)st->st_size)
        return 1;
    if (end > (uint64_t)st->st_size)
        return 0;
    pos = lseek(x->fd, 0, SEEK_CUR);
    hole = lseek(x->fd, (off_t)x->base, SEEK_HOLE);
    if (pos >= 0)
        lseek(x->fd, pos, SEEK_SET);
    return hole >= 0 && (uint64_t)hole >= end;
}

/* Map the declared file if it qualifies (see "Copies through the mapped image"): a regular
 * file on tmpfs, every byte of the extent allocated. Under the mutex, with no job running. The
 * mapping of the same file at the same size and protection is kept (its pages stay mapped: no
 * faults to pay again); any other is dropped first. */
static void tcmu_py_loop_map(struct tcmu_py_loop *l)
{
    const struct tcmu_py_extent *x = &l->x;
    int prot = x->reads_only ? PROT_READ : PROT_READ | PROT_WRITE;
    struct stat st;
    int ok;
    void *m;

    ok = tcmu_py_on_tmpfs(x->fd, &st) && tcmu_py_extent_allocated(x, &st);
    if (ok && l->img && l->img_dev == (uint64_t)st.st_dev && l->img_ino == (uint64_t)st.st_ino &&
        l->img_len == (uint64_t)st.st_size && l->img_prot == prot)
        return;
    if (l->img) {
        munmap(l->img, (size_t)l->img_len);
        l->img = NULL;
        l->img_len = 0;
    }
    if (!ok)
        return;
    pthread_once(&tcmu_py_bus_once, tcmu_py_bus_install);
    if (!tcmu_py_bus_ok)
        return;
    m = mmap(NULL, (size_t)st.st_size, prot, MAP_SHARED, x->fd, 0);
    if (m == MAP_FAILED)
        return;                                 /* e.g. an O_RDONLY fd: preadv/pwritev */
    l->img = m;
    l->img_len = (uint64_t)st.st_size;
    l->img_dev = (uint64_t)st.st_dev;
    l->img_ino = (uint64_t)st.st_ino;
    l->img_prot = prot;
}

void tcmu_py_loop_declare(struct tcmu_py_loop *l, const struct tcmu_py_extent *x)
{
    uint32_t enabled;

    pthread_mutex_lock(&l->mu);
    tcmu_py_jobs_drain(l);                      /* no worker uses the old extent or mapping */
    enabled = l->x.enabled;
    l->x = *x;
    l->x.enabled = enabled;
    tcmu_py_loop_map(l);
    pthread_mutex_unlock(&l->mu);
}

void tcmu_py_loop_probe(struct tcmu_py_loop *l, uint64_t every_us, uint64_t probe_us)
{
    pthread_mutex_lock(&l->mu);
    tcmu_py_poll_judge_init(&l->judge, every_us * 1000u, probe_us * 1000u, tcmu_py_now_ns());
    pthread_mutex_unlock(&l->mu);
}

int tcmu_py_loop_polling(struct tcmu_py_loop *l)
{
    int polling;

    pthread_mutex_lock(&l->mu);
    polling = l->judge.polling;
    pthread_mutex_unlock(&l->mu);
    return polling;
}

int tcmu_py_loop_mapped(struct tcmu_py_loop *l)
{
    int mapped;

    pthread_mutex_lock(&l->mu);
    mapped = l->img != NULL;
    pthread_mutex_unlock(&l->mu);
    return mapped;
}

void tcmu_py_loop_enable(struct tcmu_py_loop *l, uint32_t enabled)
{
    pthread_mutex_lock(&l->mu);
    l->x.enabled = enabled ? 1 : 0;
    if (!enabled)
        tcmu_py_jobs_drain(l);
    pthread_mutex_unlock(&l->mu);
}

void tcmu_py_loop_hold(struct tcmu_py_loop *l)
{
    pthread_mutex_lock(&l->mu);
}

void tcmu_py_loop_release(struct tcmu_py_loop *l)
{
    pthread_mutex_unlock(&l->mu);
}

int tcmu_py_loop_take(struct tcmu_py_loop *l, uint8_t *buf, uint32_t cap, uint32_t *used)
{
    size_t at = 0;
    int n = 0;

    pthread_mutex_lock(&l->mu);
    while (at < l->rec.len) {
        uint32_t size = ((const struct tcmu_py_entry *)(l->rec.p + at))->reserved;

        if (at + size > cap)
            break;
        at += size;
        n++;
    }
    if (n == 0 && l->rec.len) {
        n = -(int)((const struct tcmu_py_entry *)l->rec.p)->reserved;
        at = 0;
    }
    if (at) {
        memcpy(buf, l->rec.p, at);
        memmove(l->rec.p, l->rec.p + at, l->rec.len - at);
        l->rec.len -= at;
    }
    pthread_mutex_unlock(&l->mu);
    *used = (uint32_t)at;
    return n;
}

/* What a command Python holds on fence f (ordered: seq nonzero) must still wait for. */
static int tcmu_py_fence_conflict(const struct tcmu_py_loop *l, struct tcmu_py_fence f,
                                  uint64_t seq)
{
    return f.end > f.start && (tcmu_py_jobs_overlap(l, f.start, f.end, 1) ||
                               (seq && tcmu_py_ordered_overlap(l, f, seq)));
}

int tcmu_py_loop_fence_busy(struct tcmu_py_loop *l, uint32_t cmd_id, uint32_t wait_ms)
{
    struct tcmu_py_fence f = {0, 0};
    struct timespec until;
    uint64_t seq = 0;
    int i, busy;

    clock_gettime(CLOCK_REALTIME, &until);     /* the condition variable's clock */
    until.tv_sec += wait_ms / 1000;
    until.tv_nsec += (long)(wait_ms % 1000) * 1000000L;
    if (until.tv_nsec >= 1000000000L) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&l->mu);
    for (i = 0; i < l->n_fences; i++)
        if (l->fence_ids[i] == (uint16_t)cmd_id) {
            f = l->fences[i];
            seq = l->fence_seq[i];
            break;
        }
    /* No new job can overlap the fence while Python holds it (tcmu_py_dp_plain): only those
     * started before it was handed over, which end (a worker's copy, or librbd's operation
     * within its osd_op_timeout); and the older ordered commands it overlaps, which wait only
     * for older ones (no cycle). */
    while ((busy = tcmu_py_fence_conflict(l, f, seq)) && wait_ms)
        if (pthread_cond_timedwait(&l->idle_cv, &l->mu, &until) == ETIMEDOUT) {
            busy = tcmu_py_fence_conflict(l, f, seq);
            break;
        }
    pthread_mutex_unlock(&l->mu);
    return busy;
}

/* Drop the fence of cmd_id (under the mutex). */
static void tcmu_py_loop_unfence(struct tcmu_py_loop *l, uint32_t cmd_id)
{
    int i;

    for (i = 0; i < l->n_fences; i++)
        if (l->fence_ids[i] == (uint16_t)cmd_id) {
            if (l->fence_seq[i])                /* an ordered command may wait for it */
                pthread_cond_broadcast(&l->idle_cv);
            l->n_fences--;
            l->fences[i] = l->fences[l->n_fences];
            l->fence_ids[i] = l->fence_ids[l->n_fences];
            l->fence_seq[i] = l->fence_seq[l->n_fences];
            return;
        }
}

int tcmu_py_loop_complete(struct tcmu_py_loop *l, uint32_t cmd_id, uint32_t scsi_status,
                          const uint8_t *sense, uint32_t sense_len,
                          uint32_t has_read_len, uint32_t read_len)
{
    int rc;

    pthread_mutex_lock(&l->mu);
    rc = tcmu_py_complete(l->r, cmd_id, scsi_status, sense, sense_len, has_read_len, read_len);
    if (rc == TCMU_PY_OK)
        tcmu_py_loop_unfence(l, cmd_id);
    pthread_mutex_unlock(&l->mu);
    return rc;
}

int tcmu_py_loop_complete_batch(struct tcmu_py_loop *l, const struct tcmu_py_rsp *rsps, int n,
                                int *done)
{
    int rc, i;

    pthread_mutex_lock(&l->mu);
    rc = tcmu_py_complete_batch(l->r, rsps, n, done);
    for (i = 0; i < *done; i++)
        tcmu_py_loop_unfence(l, rsps[i].cmd_id);
    pthread_mutex_unlock(&l->mu);
    return rc;
}

void tcmu_py_loop_figures(struct tcmu_py_loop *l, struct tcmu_py_loop_figures *out)
{
    uint32_t b;

    pthread_mutex_lock(&l->mu);
    out->done += l->fig.done;
    out->reads += l->fig.reads;
    out->writes += l->fig.writes;
    out->bytes_read += l->fig.bytes_read;
    out->bytes_written += l->fig.bytes_written;
    out->latency_seconds += l->fig.latency_seconds;
    out->wakeups += l->fig.wakeups;
    out->polled += l->fig.polled;
    out->poll_misses += l->fig.poll_misses;
    out->batches += l->fig.batches;
    out->handed += l->fig.handed;
    out->mapped += l->fig.mapped;
    out->probes += l->fig.probes;
    out->poll_switches += l->fig.poll_switches;
    out->merged += l->fig.merged;
    for (b = 0; b < TCMU_PY_DP_HIST; b++)
        out->hist[b] += l->fig.hist[b];
    memset(&l->fig, 0, sizeof(l->fig));
    pthread_mutex_unlock(&l->mu);
}

int tcmu_py_loop_error(struct tcmu_py_loop *l)
{
    return __atomic_load_n(&l->error, __ATOMIC_ACQUIRE);
}

int tcmu_py_loop_fences(struct tcmu_py_loop *l)
{
    int n;

    pthread_mutex_lock(&l->mu);
    n = l->n_fences;
    pthread_mutex_unlock(&l->mu);
    return n;
}
