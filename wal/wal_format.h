/*
 * wal_format.h - the WAL's on-disk format, byte by byte, and the rule for when a frame is valid.
 * Internal to wal/ (tools read frames through wal_frame_decode in wal.h).
 *
 * WHERE RECORDS LIVE. The log is three named LMDB databases inside the engine's environment:
 *
 *   "wal.log"   key: sequence number, 8 bytes big-endian (so LMDB's byte order is numeric order;
 *               written with MDB_APPEND). value: one frame (below). Sequence numbers start at 1,
 *               are assigned in append order and never reused, even after truncation.
 *   "wal.key"   the key index. key: 16 bytes, XXH3-64 of the record's key bytes (big-endian)
 *               followed by the sequence number (big-endian); value: empty. So one key's records
 *               are adjacent and in sequence order, and every entry has the same small size
 *               whatever the key length. Records with an empty key are not indexed. Two keys
 *               with the same hash share a range: readers compare the frame's key and skip the
 *               other key's records. Entries are written in sorted chunks behind the log (see
 *               "indexed"), not in each group commit: a batch would otherwise dirty one index
 *               leaf per distinct key, which measured 3-4x the commit time of the log pages.
 *   "wal.meta"  "format" -> 4 bytes little-endian u32, WAL_FORMAT_VERSION of the log's layout;
 *               "high"   -> 8 bytes big-endian u64, the highest sequence number committed when
 *                           the last truncation ran (so a log truncated to nothing does not
 *                           restart at 1). The next sequence number after open is
 *                           max(last key of wal.log, "high") + 1.
 *               "indexed" -> 8 bytes big-endian u64: every record with seq <= this has its
 *                           wal.key entry (written with it, in the same transaction). Records
 *                           after it are found by scanning wal.log from there (the tail is
 *                           bounded by wal_opts_t.index_lag).
 *
 * A FRAME (all integers little-endian):
 *
 *   offset size  field
 *        0    4  magic       0x4C415743 (the bytes "CWAL")
 *        4    1  version     codec version, WAL_CODEC_VERSION (1)
 *        5    1  kind        record kind, 1..255 (0 is invalid)
 *        6    2  key_len     0..511 (WAL_MAX_KEY)
 *        8    8  seq         sequence number; equals the wal.log key holding the frame
 *       16    4  body_len    bytes of body
 *       20    4  reserved    0
 *       24    8  checksum    see below
 *       32    key_len        key bytes
 *   32+key_len body_len      body: a tpl image of format "A(uUB)", one array element per field:
 *                            u = tag (u32), U = integer (u64), B = byte string (u32 length).
 *
 *   checksum = XXH3_64bits(C), where C is 32 bytes: frame bytes 0..23 followed by the
 *   little-endian u64 XXH3_64bits(frame bytes 32..end) (the hash of key and body). Two hashes
 *   instead of one so that a producer hashes its key and body in its own thread and the sequence
 *   number, assigned later under the log's lock, costs one 32-byte hash to seal.
 *
 * THE VALIDITY RULE. A frame is valid only if, in this order:
 *   1. its length is at least 32 and equals 32 + key_len + body_len;
 *   2. magic matches, version is one this build knows, kind != 0, key_len <= 511, reserved == 0;
 *   3. the checksum matches;
 *   4. (when reading from the log) seq equals the wal.log key it is stored under.
 * Only then is the body given to tpl, and only after tpl_peek confirms the format "A(uUB)", the
 * image loads with exactly body_len bytes, and the array count is at most body_len / 16 (the
 * smallest encoded element). Anything else is CAP_ECORRUPT with the sequence number.
 *
 * THE JOURNAL (WAL_SYNC only): "wal.journal" in the data directory, a file of fixed size
 * (wal_opts_t.journal_bytes, default 16 MiB, a multiple of 4096), zero-filled when created. Each
 * group commit writes its frames (the same bytes as in wal.log) as one block, then fdatasyncs
 * the file, before the LMDB transaction commits without a flush. A block starts at a multiple of
 * 4096, is padded with zeros to the next one, and starts with a 64-byte header (little-endian):
 *
 *   offset size  field
 *        0    4  magic       0x4C4E4A43 (the bytes "CJNL")
 *        4    4  version     WAL_JVERSION (1)
 *        8    8  epoch       random, chosen when the log opens (stale blocks of earlier opens
 *                            carry another)
 *       16    8  lap         times the writer wrapped to offset 0 within this epoch
 *       24    8  first_seq   seq of the first frame
 *       32    4  count       frames in the block (>= 1)
 *       36    4  reserved    0
 *       40    8  frames_len  bytes of frames after the header
 *       48    8  frames_sum  XXH3-64 of those bytes
 *       56    8  checksum    XXH3-64 of header bytes 0..55
 *   64           count frames, back to back, then zeros up to the block's end.
 *
 * A block that does not fit between its offset and the end of the file goes to offset 0 with
 * lap + 1. The position of the next block {epoch, lap, offset, next seq} is saved with every
 * checkpoint (store.ckpt's caller area). A BLOCK IS VALID only if, in this order: its header fits
 * the file, magic and checksum match, version is known and reserved 0, epoch and lap are the
 * expected ones, first_seq is the expected next seq, count >= 1 and frames_len fits the file,
 * frames_sum matches, and the frames are valid (the frame rule above) with seqs first_seq,
 * first_seq+1, ... filling frames_len exactly. A scan starts at the checkpoint's position; when
 * the block there is not valid it tries offset 0 of the next lap; it stops at the first block
 * that is not valid.
 */
#ifndef WAL_FORMAT_H
#define WAL_FORMAT_H

#include <stddef.h>
#include <stdint.h>

#define WAL_FRAME_MAGIC     0x4C415743u
#define WAL_CODEC_VERSION   1u
#define WAL_FORMAT_VERSION  1u
#define WAL_FRAME_HDR       32u
#define WAL_BODY_FMT        "A(uUB)"
#define WAL_MIN_FIELD_BYTES 16u /* u32 tag + u64 integer + u32 byte-string length */

#define WAL_DB_LOG       "wal.log"
#define WAL_DB_KEY       "wal.key"
#define WAL_DB_META      "wal.meta"
#define WAL_META_FORMAT  "format"
#define WAL_META_HIGH    "high"
#define WAL_META_INDEXED "indexed"

#define WAL_JOURNAL_FILE    "wal.journal"
#define WAL_JMAGIC          0x4C4E4A43u
#define WAL_JVERSION        1u
#define WAL_JHDR            64u
#define WAL_JBLOCK          4096u
#define WAL_JOURNAL_DEFAULT ((uint64_t)16 << 20)
#define WAL_JOURNAL_MIN     ((uint64_t)64 << 10)

/* The header as a struct, to pin the layout down (the code reads and writes it byte by byte with
 * the little-endian helpers of cap.h, never by casting). */
struct wal_frame_hdr {
    uint32_t magic;
    uint8_t version;
    uint8_t kind;
    uint16_t key_len;
    uint64_t seq;
    uint32_t body_len;
    uint32_t reserved;
    uint64_t checksum;
};
_Static_assert(sizeof(struct wal_frame_hdr) == WAL_FRAME_HDR, "frame header is 32 bytes");
_Static_assert(offsetof(struct wal_frame_hdr, kind) == 5, "kind at 5");
_Static_assert(offsetof(struct wal_frame_hdr, key_len) == 6, "key_len at 6");
_Static_assert(offsetof(struct wal_frame_hdr, seq) == 8, "seq at 8");
_Static_assert(offsetof(struct wal_frame_hdr, body_len) == 16, "body_len at 16");
_Static_assert(offsetof(struct wal_frame_hdr, reserved) == 20, "reserved at 20");
_Static_assert(offsetof(struct wal_frame_hdr, checksum) == 24, "checksum at 24");

#endif /* WAL_FORMAT_H */
