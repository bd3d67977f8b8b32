/*
 * tcmu-py ring binding: the C surface of tcmu_py._tcmu_ring.
 *
 * This file is both a C header (included by _ring.c) and the cffi `cdef` (read by
 * _ffi_build.py), so it holds only plain declarations: fixed-width types, no
 * preprocessor, no attributes. The kernel's own structs come from
 * <linux/target_core_user.h>; they are declared to cffi in _ffi_build.py.
 *
 * Threading: none of these functions lock. One thread owns a ring (see ring.py).
 */

/* Return codes: >= 0 success (a count), < 0 one of these. */
enum tcmu_py_status {
    TCMU_PY_OK = 0,
    TCMU_PY_E_MAILBOX = -1,   /* mailbox version/cmdr_off/cmdr_size inconsistent with the mapping */
    TCMU_PY_E_HEAD = -2,      /* cmd_head or cmd_tail out of the ring or not 8-byte aligned */
    TCMU_PY_E_ENTRY = -3,     /* an entry's length is 0, crosses the ring end or cmd_head */
    TCMU_PY_E_CDB = -4,       /* cdb_off/CDB length outside the entry */
    TCMU_PY_E_IOV = -5,       /* an iovec outside the data area, or too many for the entry */
    TCMU_PY_E_TMR = -6,       /* TMR entry too short for its cmd_cnt */
    TCMU_PY_E_NOSLOT = -7,    /* complete: no CMD slot between cmd_tail and the cursor */
    TCMU_PY_E_SENSE = -8      /* complete: sense longer than TCMU_SENSE_BUFFERSIZE */
};

/* One ring, as the binding sees it. Filled by tcmu_py_ring_init; `cursor` is the
 * consumer cursor (ring-relative offset of the next entry to parse). */
struct tcmu_py_ring {
    uint8_t *map;            /* start of the mapping = the mailbox */
    uint64_t map_len;
    uint64_t data_off;       /* first byte after the command ring (mapping-relative) */
    uint32_t cmdr_off;       /* command ring start (mapping-relative) */
    uint32_t cmdr_size;
    uint32_t cursor;
    uint32_t bad_off;        /* after an error: ring-relative offset of the offending entry */
    uint64_t unknown_ops;    /* entries with an unknown TCMU opcode, marked UNKNOWN_OP */
};

/* One CMD or TMR entry found by tcmu_py_dequeue (PAD and unknown opcodes are not reported).
 * No implicit padding: ring.py reads an array of these with one struct.Struct. */
struct tcmu_py_entry {
    uint64_t cdb_off;        /* CMD: mapping-relative offset of the CDB */
    uint64_t array_off;      /* mapping-relative offset of req.iov[0] (CMD) or cmd_ids[0] (TMR) */
    uint32_t offset;         /* ring-relative offset of the entry */
    uint32_t length;         /* entry length in bytes */
    uint32_t op;             /* TCMU_OP_CMD or TCMU_OP_TMR */
    uint32_t cmd_id;         /* CMD: hdr.cmd_id; TMR: 0 */
    uint32_t iov_cnt;        /* CMD: req.iov_cnt; TMR: cmd_cnt */
    uint32_t iov_bidi_cnt;   /* CMD: req.iov_bidi_cnt; TMR: tmr_type */
    uint32_t cdb_len;        /* CMD: scsi_command_size() of the CDB */
    uint32_t reserved;
    uint32_t error;          /* a hand-off record of a command the native loop tried and
                              * failed: the errno its I/O failed with (librbd's); else 0 */
    uint32_t retried;        /* a hand-off record of a native loop's RBD job that failed (1):
                              * it goes before the commands handed while it ran (fence_seq) */
    uint64_t arrived_ns;     /* CLOCK_MONOTONIC when it was dequeued (a native loop's record
                              * reaches Python later: a command's time counts from here) */
};

/* One completion for tcmu_py_complete_batch. */
struct tcmu_py_rsp {
    uint32_t cmd_id;
    uint32_t scsi_status;
    uint32_t sense_len;
    uint32_t has_read_len;
    uint32_t read_len;
    uint8_t sense[96];
};

/* Validate the mailbox and fill `r`; the cursor starts at cmd_tail (entries the kernel
 * published and userspace has not handed back are parsed again). */
int tcmu_py_ring_init(struct tcmu_py_ring *r, uint8_t *map, uint64_t map_len);

/* mailbox->cmd_head with acquire ordering (the kernel publishes it with store-release). */
uint32_t tcmu_py_load_head(const struct tcmu_py_ring *r);
/* mailbox->cmd_tail (only userspace writes it). */
uint32_t tcmu_py_load_tail(const struct tcmu_py_ring *r);
/* mailbox->cmd_tail = tail with release ordering (responses written before become visible). */
void tcmu_py_store_tail(struct tcmu_py_ring *r, uint32_t tail);

/* Walk from r->cursor up to cmd_head (one acquire load), filling at most max_out
 * descriptors; PAD skipped, unknown opcodes marked UNKNOWN_OP and skipped. Then
 * steps cmd_tail over PAD/TMR/unknown slots that sit at the tail. Returns the number
 * of descriptors, or a negative status if the first entry examined is malformed
 * (r->bad_off names it; entries before it were already returned by earlier calls). */
int tcmu_py_dequeue(struct tcmu_py_ring *r, struct tcmu_py_entry *out, int max_out);

/* Complete one command by slot stealing: step cmd_tail over PAD/TMR/unknown slots,
 * write cmd_id, status, sense (zero-filled to 96 bytes) and, if has_read_len,
 * read_len with uflags READ_LEN into the CMD slot at the tail, then advance cmd_tail
 * past it and past any PAD/TMR/unknown slots that follow (release store). Returns TCMU_PY_OK or a negative status (nothing written). */
int tcmu_py_complete(struct tcmu_py_ring *r, uint32_t cmd_id, uint32_t scsi_status,
                     const uint8_t *sense, uint32_t sense_len,
                     uint32_t has_read_len, uint32_t read_len);

/* Complete n commands like tcmu_py_complete, with a single release store of cmd_tail
 * at the end. Returns n, or a negative status; on error the completions before the
 * failing one are published and *done says how many. */
int tcmu_py_complete_batch(struct tcmu_py_ring *r, const struct tcmu_py_rsp *rsps, int n,
                           int *done);

/* ---- The data plane (issue 17, stage 1): plain READ/WRITE executed in C ----
 *
 * A device whose data is a file extent declares it (struct tcmu_py_extent); one call per
 * wake-up dequeues, executes every qualifying READ/WRITE(6/10/12/16) with preadv/pwritev
 * between the image and the data area, completes those GOOD, and hands everything else back
 * to Python in ring order. Python decides every other answer: C never builds sense data, and a
 * command whose I/O fails or comes up short goes back to Python unanswered (Python runs it
 * again and chooses the sense). No command C took is in flight when the call returns. */

enum tcmu_py_dp_consts {
    TCMU_PY_DP_HIST = 128,   /* latency histogram buckets (tcmu_py.device.latency) */
    TCMU_PY_DP_MAX = 1024    /* most entries one tcmu_py_dp_batch call takes */
};

/* ---- A mirror's write fan-out (issue 16): regions C may write, and NBD writers ----
 *
 * struct tcmu_py_wi: the write-intent regions of a mirror as the native loop sees them. A
 * region is *armed* when the backend (Python) knows its write-intent bit is set and durable on
 * every leg: C writes only there. Every C write marks its regions with the current *epoch*
 * when it starts and when it ends, and counts itself in flight there. The backend bumps the
 * epoch when a flush starts; after the flush, it clears the bit of a region only if
 * tcmu_py_wi_disarm says no C write touched it since (and none is in flight there), which
 * disarms it in the same step (under the wi's mutex), so C never writes a region whose bit
 * may be cleared. Thread-safe. */
struct tcmu_py_wi;
struct tcmu_py_wi *tcmu_py_wi_new(uint64_t region, uint64_t n_regions);
void tcmu_py_wi_free(struct tcmu_py_wi *w);
/* Arm regions [lo, hi] (clamped). */
void tcmu_py_wi_arm(struct tcmu_py_wi *w, uint64_t lo, uint64_t hi);
/* Start a new epoch (a flush starts): returns it. */
uint32_t tcmu_py_wi_epoch(struct tcmu_py_wi *w);
/* 1 and region r disarmed, when no C write touched r in `epoch` or later and none is in flight
 * there; else 0 (r stays as it was). */
int tcmu_py_wi_disarm(struct tcmu_py_wi *w, uint64_t r, uint32_t epoch);
/* Whether region r is armed (tests, status). */
int tcmu_py_wi_armed(struct tcmu_py_wi *w, uint64_t r);
/* C writes started through w since it was made. */
uint64_t tcmu_py_wi_writes(struct tcmu_py_wi *w);
/* struct tcmu_py_nbdq: one libnbd handle (a connection of its own, made by the caller). The
 * thread submitting a write (the loop, or a worker) sends it with nbd_aio_pwrite itself,
 * holding none of our locks; the writer's own thread polls the socket, lets libnbd read the
 * replies and answers each write. A write not answered within timeout_ms (0: never) makes
 * the writer *dead*: every write in flight fails at once, and later ones are refused (the
 * mirror then fails the leg in Python). The six functions are
 * libnbd's (nbd_aio_pwrite, nbd_aio_get_fd, nbd_aio_get_direction, nbd_aio_notify_read,
 * nbd_aio_notify_write, nbd_close) from the caller's dlopen: this library does not link
 * libnbd. The writer closes the handle in tcmu_py_nbdq_free. NULL: no memory or thread. */
struct tcmu_py_nbdq;
struct tcmu_py_nbdq *tcmu_py_nbdq_new(void *handle, void *aio_pwrite, void *aio_get_fd,
                                      void *aio_get_direction, void *aio_notify_read,
                                      void *aio_notify_write, void *close, uint32_t timeout_ms);
/* 1 once the writer is dead. */
int tcmu_py_nbdq_dead(struct tcmu_py_nbdq *q);
/* Stop the thread, close the handle, free. No loop may use q any more (the extent that named
 * it was replaced, or the loop stopped). */
void tcmu_py_nbdq_free(struct tcmu_py_nbdq *q);
/* ---- A dedup disk's chunk locations (issue 14) ----
 *
 * struct tcmu_py_cm: where the chunks of one dedup disk lie, as far as the backend told it: a
 * bounded, direct-mapped table (2**slots_log2 slots in an anonymous mapping, a page resident
 * once a slot in it is set) from a chunk index to a container file's fd and the byte offset
 * of the chunk's bytes there (stored uncompressed), or to "zeros" (the chunk is not mapped).
 * The native loop serves a READ from it when every chunk the READ touches has an entry; any
 * miss sends the whole READ to Python. The backend sets an entry only to where the chunk's
 * current bytes are, and changes it (set or forget) before a write it
 * acknowledges moves the chunk, before the bytes it names may change, and before it closes the
 * fd (tcmu_py_cm_drop_fd). A READ holds the table's mutex from its lookups to the end of its
 * reads, so when a change returns no READ uses what it replaced. Thread-safe. */
struct tcmu_py_cm;
/* A table for chunks of `chunk` bytes (a power of two); NULL: no memory. */
struct tcmu_py_cm *tcmu_py_cm_new(uint32_t chunk, uint32_t slots_log2);
void tcmu_py_cm_free(struct tcmu_py_cm *m);
/* n entries: chunk idx[k] is at (fd[k], off[k]); fd[k] == -1: zeros; fd[k] == -2: forget it. */
void tcmu_py_cm_set(struct tcmu_py_cm *m, const uint64_t *idx, const int32_t *fd,
                    const uint64_t *off, uint32_t n);
/* Chunk idx's entry: 1 and *fd, *off (fd -1: zeros) when it has one, else 0. */
int tcmu_py_cm_get(struct tcmu_py_cm *m, uint64_t idx, int32_t *fd, uint64_t *off);
/* Forget every entry. */
void tcmu_py_cm_clear(struct tcmu_py_cm *m);
/* Forget the entries naming fd (its file is about to be closed or deleted). */
void tcmu_py_cm_drop_fd(struct tcmu_py_cm *m, int32_t fd);
/* READs served from the table, and READs that missed (went to Python), since it was made. */
uint64_t tcmu_py_cm_hits(struct tcmu_py_cm *m);
uint64_t tcmu_py_cm_misses(struct tcmu_py_cm *m);
/* Entries naming a dedup pool's write journal (fd `jfd`) carry the number of the record that
 * holds the chunk (its low 32 bits: records in the journal at once are far fewer than 2**31),
 * so that an older location never replaces a newer one, whoever learns of which first:
 * tcmu_py_cm_set leaves alone an entry naming the journal (a WRITE the loop appended that the
 * backend does not know of yet); tcmu_py_cm_set_journal sets chunk idx[k] to off[k] of jfd
 * unless its entry names a newer record; tcmu_py_cm_set_drained, for the chunks of record
 * `seq` just moved into the index, sets (or forgets, fd -2) unless the entry names a record
 * newer than `seq`. */
void tcmu_py_cm_set_journal(struct tcmu_py_cm *m, const uint64_t *idx, const uint64_t *off,
                            uint32_t n, int32_t jfd, uint64_t seq);
void tcmu_py_cm_set_drained(struct tcmu_py_cm *m, const uint64_t *idx, const int32_t *fd,
                            const uint64_t *off, uint32_t n, uint64_t seq);
/* ---- A dedup pool's write journal, appended to by the native loop (issue 14) ----
 *
 * struct tcmu_py_jl: a *lease* the pool's journal (handlers/dedup/journal.py) gives the native
 * loops of its disks: the journal's bytes [pos, end) and record numbers from `seq` on, with
 * `epoch`, for at most `budget` bytes of chunks (what fits under the pool's capacity and soft
 * threshold) and records of at most `max_record` bytes. While the lease is active, a loop
 * serves a plain WRITE of whole chunks of a disk whose extent names it (write cache on, no
 * FUA) by appending one record there, in the format of journal.py (a 64-byte header: magic
 * "TCMUJNL1", epoch, flags 0, seq, disk, first chunk, count; the XXH3-64 of its first 48 bytes
 * and the data; then the data), pointing the disk's chunk table at the record's chunks
 * (tcmu_py_cm_set_journal) and completing it GOOD; the journal learns of the record from its
 * *notice* (tcmu_py_jl_take). Anything else (no lease, no room, no budget, the notices full)
 * goes to Python. A record whose write failed gets a notice marked void, ends the lease, and
 * its command goes to Python. The lease's mutex is held from the checks to the notice, so a
 * revoke returns only when no append is under way. Thread-safe. */
struct tcmu_py_jl_rec {
    uint64_t seq;
    uint64_t pos;            /* of its header */
    uint64_t disk;
    uint64_t first;          /* chunk index */
    uint32_t count;          /* chunks */
    uint32_t failed;         /* 1: its write failed (void: never drained) */
};
struct tcmu_py_jl;
/* A lease object for the journal file `fd`, chunks of `chunk` bytes, at most `max_notices`
 * notices not yet taken; inactive. NULL: no memory. */
struct tcmu_py_jl *tcmu_py_jl_new(int32_t fd, uint32_t chunk, uint32_t max_notices);
/* Free; no extent may name it any more. */
void tcmu_py_jl_free(struct tcmu_py_jl *j);
/* Activate the lease (see above); any earlier lease ends. */
void tcmu_py_jl_grant(struct tcmu_py_jl *j, uint64_t pos, uint64_t end, uint64_t seq,
                      uint32_t epoch, uint64_t budget, uint64_t max_record);
/* End the lease: when it returns, no append is under way and none starts until a grant. */
void tcmu_py_jl_revoke(struct tcmu_py_jl *j);
/* Move up to `max` notices, oldest first, into out: their number. */
uint32_t tcmu_py_jl_take(struct tcmu_py_jl *j, struct tcmu_py_jl_rec *out, uint32_t max);
/* The record checksum as the loop computes it (XXH3-64 of head[0..head_len) then data[0..n)):
 * build 0 with the SIMD the compiler picked for this CPU, 1 without; the loop uses the one that
 * ran faster when the first lease was made (tcmu_py_jl_sum_build: which). */
uint64_t tcmu_py_jl_checksum(const uint8_t *head, size_t head_len, const uint8_t *data,
                             size_t n, int build);
int tcmu_py_jl_sum_build(void);
/* WRITEs appended, and WRITEs of whole chunks the loop offered it and it declined, since it was
 * made. */
uint64_t tcmu_py_jl_appends(struct tcmu_py_jl *j);
uint64_t tcmu_py_jl_declined(struct tcmu_py_jl *j);
/* What Python declares for one device. Any change (resize, new fd) is declared again. */
struct tcmu_py_extent {
    int32_t fd;              /* image file (the backend owns it); < 0: no extent */
    uint32_t block_size;
    uint64_t base;           /* byte offset of LBA 0 in the file */
    uint64_t num_blocks;     /* capacity in logical blocks */
    uint64_t max_blocks;     /* MAXIMUM TRANSFER LENGTH in logical blocks */
    uint32_t flush_fua;      /* 1: fdatasync after a FUA write (volatile write cache) */
    uint32_t enabled;        /* 0: execute nothing this call (a unit attention is pending...) */
    /* Thin: one byte per allocation unit of unit_blocks blocks, nonzero = allocated. With a map
     * (unit_blocks > 0) C takes only commands whose every unit is allocated, and a command's
     * range counts, for the fences, as the whole units it touches. units == NULL: no map. */
    const uint8_t *units;
    uint64_t n_units;
    uint64_t unit_blocks;
    /* 1: C executes READs only; every WRITE goes to Python, whose fence keeps C's READs off
     * its LBAs until it completes (a mirror reads one local leg and writes every leg). */
    uint32_t reads_only;
    /* An RBD image (tcmu_py.backend.RbdExtent): fd < 0 and rbd_image set. Only the native loop
     * serves it (tcmu_py_dp_batch never does): a plain READ/WRITE becomes a job submitted with
     * rbd_aio_readv/rbd_aio_writev, and librbd's completion callback completes it GOOD, or
     * hands it to Python with its fence on any error. A FUA WRITE with flush_fua goes to
     * Python. The five functions are librbd's own, from the caller's dlopen of librbd.so.1
     * (this library does not link librbd): rbd_aio_create_completion, rbd_aio_readv,
     * rbd_aio_writev, rbd_aio_get_return_value, rbd_aio_release. */
    void *rbd_image;
    void *rbd_create_completion;
    void *rbd_aio_readv;
    void *rbd_aio_writev;
    void *rbd_aio_get_return_value;
    void *rbd_aio_release;
    /* A mirror's writes (tcmu_py.backend.FanOutExtent; the native loop only): with wi set, a
     * plain WRITE whose every region wi has armed is written by C to every leg: pwritev to
     * each of mw_fds[0..mw_n_fds) and, through each NBD writer mw_nbd[0..mw_n_nbd), to its
     * export; it completes GOOD when every leg took it, and goes to Python (which writes it
     * again and decides what failed) if any did not. A FUA WRITE with flush_fua, and a WRITE
     * touching a region not armed, go to Python. READs are the fd's, as with reads_only. */
    struct tcmu_py_wi *wi;
    int32_t mw_fds[3];
    uint32_t mw_n_fds;
    struct tcmu_py_nbdq *mw_nbd[3];
    uint32_t mw_n_nbd;
    /* A dedup disk (tcmu_py.backend.ChunkExtent; the native loop only): fd < 0, reads_only,
     * and a READ is served from the chunk table cm when it knows every chunk the READ touches
     * (LBA n is at byte n * block_size of the disk). With jl set (its pool's journal lease) and
     * flush_fua (write cache on), a plain WRITE of whole chunks without FUA is appended to the
     * journal as a record of disk jl_disk (see struct tcmu_py_jl). */
    struct tcmu_py_cm *cm;
    struct tcmu_py_jl *jl;
    uint64_t jl_disk;
};

/* LBAs [start, end) that a command running in Python may touch; start == end: none. */
struct tcmu_py_fence {
    uint64_t start;
    uint64_t end;
};

/* What one tcmu_py_dp_batch call did (overwritten by each call), and the commands it executed,
 * for tcmu_py_dp_complete. */
struct tcmu_py_dp_stats {
    uint32_t dequeued;       /* CMD and TMR entries taken off the ring */
    uint32_t done;           /* commands executed (and, after tcmu_py_dp_complete, completed) */
    uint32_t reads;
    uint32_t writes;
    uint64_t bytes_read;
    uint64_t bytes_written;
    double latency_seconds;  /* summed over the `done` commands */
    uint32_t hist_lo;        /* buckets [hist_lo, hist_hi) of hist may be non-zero */
    uint32_t hist_hi;
    uint32_t hist[128];
    uint16_t done_ids[1024]; /* cmd_ids of the `done` commands, in ring order */
};

/* Dequeue up to max_out (at most TCMU_PY_DP_MAX) entries as tcmu_py_dequeue does, execute the
 * qualifying commands, and leave in out[0..n) the entries for Python, in ring order.
 * fences[0..n_fences) are the LBA ranges of commands Python is running; fences[n_fences + k]
 * receives the range of out[k] (the caller provides room for n_fences + max_out). A command
 * qualifies when the extent is enabled, no TMR entry came in the same call, it is a non-BIDI
 * READ/WRITE(6/10/12/16) without protection bits, its range lies inside the device and within
 * max_blocks, its buffers hold exactly its blocks, with a unit map every unit it touches is
 * allocated, and it overlaps no fence (including those of entries handed to Python before it in
 * this call; with a unit map, no fence may touch any unit it touches). Returns n, or a negative status
 * (nothing executed).
 *
 * The executed commands are not completed yet: their responses will steal the oldest slots,
 * which may be those of out[] entries, so the caller first copies what it needs of out[] (CDB,
 * iovecs), then calls tcmu_py_dp_complete before anything else touches the ring. */
int tcmu_py_dp_batch(struct tcmu_py_ring *r, const struct tcmu_py_extent *x,
                     struct tcmu_py_fence *fences, int n_fences,
                     struct tcmu_py_entry *out, int max_out, struct tcmu_py_dp_stats *st);

/* Complete GOOD every command of st->done_ids[0..st->done), one release store of cmd_tail (no
 * kick: the caller kicks). Returns the number completed, or a negative status (the ring is
 * broken; those before the failing one are published). */
int tcmu_py_dp_complete(struct tcmu_py_ring *r, struct tcmu_py_dp_stats *st);

/* ---- Stage 2 (issue 17): a native loop thread per device ----
 *
 * tcmu_py_loop_start runs a pthread that owns the ring's consumer side: it polls the uio fd,
 * clears the event, calls tcmu_py_dp_batch until the ring is empty, completes and kicks C's
 * commands itself, and copies every other entry (CDB, iovecs, TMR ids) into a hand-off buffer
 * for Python, then signals `notify_fd` (an eventfd). Python takes the records
 * (tcmu_py_loop_take), runs them, and completes them with tcmu_py_loop_complete, which holds
 * the loop's mutex (ring tail, fences) and drops the command's fence. The loop keeps the fence
 * of every command it handed over until Python completes it. No Python code and no GIL are on
 * the path of a command C executes. */

struct tcmu_py_loop;

/* The busy-poll's judge. Busy-polling pays only when the next command comes sooner because of
 * it (an initiator at queue depth 1, whose next command follows our completion); with a deep
 * queue commands come as fast without it and the poll only burns CPU. The daemon cannot see
 * the initiator's queue depth, so the judge measures: every `every_ns` it counts the commands
 * of a window of `probe_ns` with the current setting, then of one with the other setting, and
 * keeps polling only if polling brought at least 5/4 of the commands of not polling (windows
 * with fewer than TCMU_PY_PROBE_MIN commands decide nothing). every_ns == 0: always poll. */
enum tcmu_py_poll_consts {
    TCMU_PY_PROBE_MIN = 20
};

struct tcmu_py_poll_judge {
    uint64_t every_ns;
    uint64_t probe_ns;
    uint32_t polling;        /* the current choice (1: busy-poll) */
    uint32_t phase;          /* 0: between probes; 1: counting the current setting; 2: the other */
    uint64_t phase_start;    /* ns (CLOCK_MONOTONIC) */
    uint64_t next_probe;
    uint64_t count;          /* commands in this phase */
    uint64_t base_count;     /* phase 1's count and length */
    uint64_t base_ns;
    uint64_t probes;         /* probes completed */
    uint64_t switches;       /* choices changed */
};

/* Start a judge at `now` (polling; the first probe after every_ns). */
void tcmu_py_poll_judge_init(struct tcmu_py_poll_judge *j, uint64_t every_ns, uint64_t probe_ns,
                             uint64_t now);
/* `commands` more came by `now`: whether to busy-poll after this wake-up: 0 no, 1 yes (when
 * the gap between commands is shorter than the watch), 2 yes whatever the gap (a probe of the
 * poll: without it a slow queue-depth-1 initiator has gaps too long to ever try it). */
int tcmu_py_poll_judge_step(struct tcmu_py_poll_judge *j, uint64_t now, uint64_t commands);

/* Cumulative figures of a loop, taken (and reset) by tcmu_py_loop_figures. */
struct tcmu_py_loop_figures {
    uint64_t done;           /* commands executed and completed in C */
    uint64_t reads;
    uint64_t writes;
    uint64_t bytes_read;
    uint64_t bytes_written;
    double latency_seconds;
    uint64_t wakeups;        /* returns from poll(2) with an event */
    uint64_t polled;         /* wake-ups saved by the busy-poll */
    uint64_t poll_misses;    /* busy-poll watches that found nothing */
    uint64_t batches;        /* wake-ups with work */
    uint64_t handed;         /* entries handed to Python */
    uint64_t mapped;         /* of `done`: bytes moved through the mapped image (memcpy) */
    uint64_t probes;         /* the busy-poll judge's probes, and its changes of mind */
    uint64_t poll_switches;
    uint64_t merged;         /* of `done`: RBD commands sent within an adjacent one's operation */
    uint32_t hist[128];
};

/* A loop over ring `r` (which must outlive it and must not be used by anyone else for
 * dequeuing). uio_fd: polled for POLLIN, cleared with a read of event_size bytes (4 for uio,
 * 8 for an eventfd). kick_fd: written (kick_size bytes of 1) after C's completions. notify_fd:
 * an eventfd written when records wait for Python or the loop stopped on an error. poll_us:
 * the busy-poll watch after a wake-up that brought one command (0: off). workers (at most 8):
 * threads that execute, complete and kick C's commands of at least `big` bytes, so that their
 * copies overlap the loop's next command and the kernel's completion work (which runs in the
 * kicking thread); an entry that overlaps a command still on a worker waits for the workers
 * first, so ring order holds for overlapping commands. NULL: out of memory or no eventfd
 * (errno says). The extent starts undeclared (everything goes to Python). */
struct tcmu_py_loop *tcmu_py_loop_new(struct tcmu_py_ring *r, int uio_fd, uint32_t event_size,
                                      int kick_fd, uint32_t kick_size, int notify_fd,
                                      uint32_t poll_us, uint32_t workers, uint32_t big);
/* Start the thread: 0, or an errno. */
int tcmu_py_loop_start(struct tcmu_py_loop *l);
/* Ask the thread to stop and join it and the workers (idempotent; waits for the batch it is
 * in, for every command on a worker and for every librbd operation in flight). */
void tcmu_py_loop_stop(struct tcmu_py_loop *l);
/* Stop, then free. Records not taken are lost: take them first. */
void tcmu_py_loop_free(struct tcmu_py_loop *l);

/* Copy the extent (x->enabled is ignored: see tcmu_py_loop_enable), once no worker runs. A
 * regular file on tmpfs with every byte of the extent allocated (the rest of the file may have
 * holes: a mirror leg's metadata area) is also mapped (MAP_SHARED, until the next
 * declare or free): C's commands then copy with memcpy instead of preadv/pwritev, and a fault
 * in that copy (the file truncated, tmpfs full) fails the command over to Python. */
void tcmu_py_loop_declare(struct tcmu_py_loop *l, const struct tcmu_py_extent *x);
/* 1 while the declared file is mapped. */
int tcmu_py_loop_mapped(struct tcmu_py_loop *l);
/* Whether C may execute commands (0 while a unit attention is pending ...). Turning it off
 * also waits for the workers and for every librbd operation submitted (an RBD extent): once it
 * returns, C touches the declared file or image no more until it is turned on again (the owner
 * of the fd may then close it). */
void tcmu_py_loop_enable(struct tcmu_py_loop *l, uint32_t enabled);
/* Hold the loop's mutex (the loop thread dequeues nothing until tcmu_py_loop_release). */
void tcmu_py_loop_hold(struct tcmu_py_loop *l);
void tcmu_py_loop_release(struct tcmu_py_loop *l);

/* Move whole hand-off records into buf[0..cap), in ring order. Each record is a
 * struct tcmu_py_entry whose cdb_off and array_off are offsets from the record's start and
 * whose `reserved` is the record's size (a multiple of 8), followed by the CDB and the iovec
 * (CMD) or cmd_id (TMR) array. Returns the number of records, *used their bytes; if the
 * first record does not fit, returns minus its size. */
int tcmu_py_loop_take(struct tcmu_py_loop *l, uint8_t *buf, uint32_t cap, uint32_t *used);

/* As tcmu_py_complete, under the loop's mutex, and the command's fence goes. */
int tcmu_py_loop_complete(struct tcmu_py_loop *l, uint32_t cmd_id, uint32_t scsi_status,
                          const uint8_t *sense, uint32_t sense_len,
                          uint32_t has_read_len, uint32_t read_len);
/* As tcmu_py_complete_batch, under the loop's mutex; the fences of those completed go. */
int tcmu_py_loop_complete_batch(struct tcmu_py_loop *l, const struct tcmu_py_rsp *rsps, int n,
                                int *done);

/* Add the figures since the last call to *out and reset them. */
void tcmu_py_loop_figures(struct tcmu_py_loop *l, struct tcmu_py_loop_figures *out);
/* Why the thread stopped by itself: 0 (it did not), a negative ring status, or an errno
 * (> 0: the uio failed, e.g. EIO/ENODEV once the kernel removed the device). */
int tcmu_py_loop_error(struct tcmu_py_loop *l);
/* Probe the busy-poll's worth every `every_us` for `probe_us` (every_us 0: always busy-poll;
 * the default is TCMU_PY_PROBE_EVERY_US / TCMU_PY_PROBE_US); takes effect at once. */
void tcmu_py_loop_probe(struct tcmu_py_loop *l, uint64_t every_us, uint64_t probe_us);
/* Whether the loop busy-polls now (its judge's choice). */
int tcmu_py_loop_polling(struct tcmu_py_loop *l);
enum tcmu_py_probe_defaults {
    TCMU_PY_PROBE_EVERY_US = 2000000,
    TCMU_PY_PROBE_US = 100000
};

/* Whether a job of the loop's (a worker's copy, a librbd operation) still conflicts with the
 * fence of command cmd_id, which Python holds, after waiting up to wait_ms for it to end (0:
 * do not wait). On an RBD extent the loop hands over a command that overlaps a job at once
 * rather than wait for the job itself (a stalled cluster's job would hold up every command
 * after it for an osd_op_timeout); Python waits here before it runs the command, so the
 * command still comes after the job. Such a command is *ordered*, as is any command handed
 * over that overlaps an older ordered one: it also waits here until the older ordered
 * commands it overlaps are completed, so C's ring order among plain READ/WRITEs holds as when
 * the loop waited. (Other extents' jobs are waited for by the loop.) */
int tcmu_py_loop_fence_busy(struct tcmu_py_loop *l, uint32_t cmd_id, uint32_t wait_ms);
/* Fences held for Python's commands (tests). */
int tcmu_py_loop_fences(struct tcmu_py_loop *l);
