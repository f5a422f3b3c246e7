/*
 * The tape stager: moves records between ordinary files and emulated tape volumes.
 *
 * A volume is a file <VSN>.vol of fixed logical capacity. Records are appended at
 * its end of data (EOD), which the caller's catalog keeps; this library keeps no
 * state. A record is a 64-byte header followed by the file's bytes, and the next
 * record starts right after it (no padding). Header, integers little-endian:
 *
 *   0..7    magic "PLTAPE\0\1"
 *   8..15   file id (u64)
 *   16..23  data size in bytes (u64)
 *   24..55  sha-256 of the data
 *   56..63  reserved, zero
 *
 * A plain shared library (no Python.h), bound by pacifica_like/storage/tape/stager.py with
 * ctypes, which releases the GIL during each call: transfers on different drives
 * overlap in time. Every function returns 0, or -1 with errno set by the failing
 * step (the three meanings of our own are listed below); none prints.
 *
 *   ENODATA  the volume ends before the record does (short read)
 *   EILSEQ   the header is not the record the caller expects (magic, id, size, sha)
 *   EBADMSG  the data does not hash to the expected sha-256
 *
 * sha-256 comes from OpenSSL's EVP interface, which uses the CPU's SHA extensions.
 */

#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include <openssl/evp.h>

/* Bump when a signature or a meaning changes; stager.py refuses any other value. */
#define STG_ABI_VERSION 1
#define HEADER_SIZE 64
#define SHA256_SIZE 32
/* Bytes per read/write call, and the unit the pacing works in. */
#define CHUNK_SIZE (1 << 20)

static const unsigned char MAGIC[8] = {'P', 'L', 'T', 'A', 'P', 'E', 0, 1};

/* The exported API. */
int stg_abi_version(void);
int stg_append(const char *volume, uint64_t offset, uint64_t capacity, const char *src_path,
               uint64_t file_id, uint64_t rate_bps, uint64_t *size_out, unsigned char *sha256_out);
int stg_copy_out(const char *volume, uint64_t offset, uint64_t file_id, uint64_t size,
                 const unsigned char *expected_sha256, const char *dest_path, uint64_t rate_bps);
int stg_verify(const char *volume, uint64_t offset, uint64_t file_id, uint64_t size,
               const unsigned char *expected_sha256, uint64_t rate_bps);

static void put_le64(unsigned char *p, uint64_t value)
{
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(value >> (8 * i));
}

static uint64_t get_le64(const unsigned char *p)
{
    uint64_t value = 0;
    for (int i = 7; i >= 0; i--)
        value = value << 8 | p[i];
    return value;
}

/* Read up to len bytes at off, fewer only where the file ends; return the count, or -1. */
static ssize_t read_some(int fd, unsigned char *buf, size_t len, uint64_t off)
{
    size_t got = 0;
    while (got < len) {
        ssize_t n = pread(fd, buf + got, len - got, (off_t)(off + got));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (n == 0)
            break;
        got += (size_t)n;
    }
    return (ssize_t)got;
}

/* Read exactly len bytes at off; a file that ends first is ENODATA. */
static int read_full(int fd, unsigned char *buf, size_t len, uint64_t off)
{
    ssize_t got = read_some(fd, buf, len, off);
    if (got < 0)
        return -1;
    if ((size_t)got < len) {
        errno = ENODATA;
        return -1;
    }
    return 0;
}

/* Write all len bytes at off. */
static int write_full(int fd, const unsigned char *buf, size_t len, uint64_t off)
{
    while (len > 0) {
        ssize_t n = pwrite(fd, buf, len, (off_t)off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (n == 0) {
            /* No progress and no error: give up rather than spin. */
            errno = EIO;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
        off += (uint64_t)n;
    }
    return 0;
}

/* Paces a transfer to a drive's streaming rate; rate 0 means unpaced. */
struct pacer {
    uint64_t rate;
    struct timespec start;
};

static void pace_start(struct pacer *pacer, uint64_t rate)
{
    pacer->rate = rate;
    if (rate != 0)
        clock_gettime(CLOCK_MONOTONIC, &pacer->start);
}

/* Sleep until `done` bytes since the start are no faster than the rate. */
static void pace(const struct pacer *pacer, uint64_t done)
{
    struct timespec now, nap;
    double due, elapsed, wait;
    int saved = errno;

    if (pacer->rate == 0)
        return;
    clock_gettime(CLOCK_MONOTONIC, &now);
    due = (double)done / (double)pacer->rate;
    elapsed = (double)(now.tv_sec - pacer->start.tv_sec) + (double)(now.tv_nsec - pacer->start.tv_nsec) / 1e9;
    wait = due - elapsed;
    if (wait <= 0)
        return;
    nap.tv_sec = (time_t)wait;
    nap.tv_nsec = (long)((wait - (double)nap.tv_sec) * 1e9);
    /* A signal cuts the sleep short; sleep the remainder. */
    while (nanosleep(&nap, &nap) != 0 && errno == EINTR)
        ;
    errno = saved;
}

/* A sha-256 context ready for data; NULL with errno set if OpenSSL cannot make one. */
static EVP_MD_CTX *sha256_begin(void)
{
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    if (md == NULL) {
        errno = ENOMEM;
        return NULL;
    }
    if (EVP_DigestInit_ex(md, EVP_sha256(), NULL) != 1) {
        EVP_MD_CTX_free(md);
        errno = EIO;
        return NULL;
    }
    return md;
}

/* fsync the directory holding path, so a newly created entry in it survives a crash. */
static int sync_parent(const char *path)
{
    const char *slash = strrchr(path, '/');
    char *dir;
    int fd, rc, saved;

    if (slash == NULL)
        dir = strdup(".");
    else if (slash == path)
        dir = strdup("/");
    else
        dir = strndup(path, (size_t)(slash - path));
    if (dir == NULL)
        return -1;
    fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    free(dir);
    if (fd < 0)
        return -1;
    rc = fsync(fd);
    saved = errno;
    close(fd);
    errno = saved;
    return rc;
}

int stg_abi_version(void)
{
    return STG_ABI_VERSION;
}

int stg_append(const char *volume, uint64_t offset, uint64_t capacity, const char *src_path,
               uint64_t file_id, uint64_t rate_bps, uint64_t *size_out, unsigned char *sha256_out)
{
    unsigned char header[HEADER_SIZE] = {0};
    unsigned char digest[SHA256_SIZE];
    unsigned char *buf = NULL;
    EVP_MD_CTX *md = NULL;
    struct stat src_st, vol_st;
    struct pacer pacer;
    uint64_t room, done = 0;
    int src = -1, vol = -1, rc = -1, at_eod = 0, saved;

    /* Every offset must be expressible as an off_t. */
    if (capacity > INT64_MAX)
        capacity = INT64_MAX;
    if (offset > INT64_MAX) {
        errno = EOVERFLOW;
        return -1;
    }
    src = open(src_path, O_RDONLY | O_CLOEXEC);
    if (src < 0 || fstat(src, &src_st) != 0)
        goto out;
    /* Only the first record may bring a volume into existence. */
    vol = open(volume, O_RDWR | O_CLOEXEC | (offset == 0 ? O_CREAT : 0), 0644);
    if (vol < 0 || fstat(vol, &vol_st) != 0)
        goto out;
    /* A volume shorter than the catalog's end of data has lost records; extending it
       would hide the loss behind zeros, so refuse and leave it as it is. */
    if ((uint64_t)vol_st.st_size < offset) {
        errno = ENODATA;
        goto out;
    }
    /* Like a drive writing at EOD: anything past it is an interrupted write's leftovers. */
    if (ftruncate(vol, (off_t)offset) != 0)
        goto out;
    at_eod = 1; /* from here on, a failure truncates back to offset */
    if (capacity < offset || capacity - offset < HEADER_SIZE) {
        errno = ENOSPC;
        goto out;
    }
    room = capacity - offset - HEADER_SIZE;
    if ((uint64_t)src_st.st_size > room) {
        errno = ENOSPC;
        goto out;
    }
    buf = malloc(CHUNK_SIZE);
    if (buf == NULL)
        goto out;
    md = sha256_begin();
    if (md == NULL)
        goto out;

    /* The data first, hashed on the way; read to the end of the source rather than
       to its stat size, so the record holds exactly the bytes that were hashed. */
    pace_start(&pacer, rate_bps);
    for (;;) {
        ssize_t n = read_some(src, buf, CHUNK_SIZE, done);
        if (n < 0)
            goto out;
        if (n == 0)
            break;
        if ((uint64_t)n > room - done) {
            /* The source grew past the room the size check allowed. */
            errno = ENOSPC;
            goto out;
        }
        if (EVP_DigestUpdate(md, buf, (size_t)n) != 1) {
            errno = EIO;
            goto out;
        }
        if (write_full(vol, buf, (size_t)n, offset + HEADER_SIZE + done) != 0)
            goto out;
        done += (uint64_t)n;
        pace(&pacer, done);
    }
    if (EVP_DigestFinal_ex(md, digest, NULL) != 1) {
        errno = EIO;
        goto out;
    }

    put_le64(header + 8, file_id);
    put_le64(header + 16, done);
    memcpy(header + 24, digest, SHA256_SIZE);
    /* The header without its magic, then a sync: data and header are on disk before
       the magic is written, so a record torn anywhere has no valid header. */
    if (write_full(vol, header + 8, HEADER_SIZE - 8, offset + 8) != 0 || fdatasync(vol) != 0)
        goto out;
    /* The magic last, and synced: the record is complete when this returns. */
    if (write_full(vol, MAGIC, sizeof MAGIC, offset) != 0 || fdatasync(vol) != 0)
        goto out;
    /* The volume may be new: make its directory entry durable too. */
    if (offset == 0 && sync_parent(volume) != 0)
        goto out;

    *size_out = done;
    memcpy(sha256_out, digest, SHA256_SIZE);
    rc = 0;
out:
    saved = errno;
    if (rc != 0 && at_eod && ftruncate(vol, (off_t)offset) != 0) {
        /* Keep the first error; the next append at this offset truncates again. */
    }
    EVP_MD_CTX_free(md);
    free(buf);
    /* Closing after a successful fdatasync cannot lose data; errors here are moot. */
    if (vol >= 0)
        close(vol);
    if (src >= 0)
        close(src);
    errno = saved;
    return rc;
}

/* Check the record at offset and hash its data, copying it to dest_path when that is
   not NULL. The dest exists afterwards only if this returns 0. */
static int read_record(const char *volume, uint64_t offset, uint64_t file_id, uint64_t size,
                       const unsigned char *expected_sha256, const char *dest_path, uint64_t rate_bps)
{
    unsigned char header[HEADER_SIZE];
    unsigned char digest[SHA256_SIZE];
    unsigned char *buf = NULL;
    EVP_MD_CTX *md = NULL;
    struct pacer pacer;
    uint64_t done;
    int vol, dest = -1, rc = -1, saved;

    if (offset > INT64_MAX || size > INT64_MAX - offset || INT64_MAX - offset - size < HEADER_SIZE) {
        errno = EOVERFLOW;
        return -1;
    }
    vol = open(volume, O_RDONLY | O_CLOEXEC);
    if (vol < 0)
        return -1;
    if (read_full(vol, header, HEADER_SIZE, offset) != 0)
        goto out;
    if (memcmp(header, MAGIC, sizeof MAGIC) != 0 || get_le64(header + 8) != file_id
        || get_le64(header + 16) != size || memcmp(header + 24, expected_sha256, SHA256_SIZE) != 0) {
        errno = EILSEQ;
        goto out;
    }
    buf = malloc(CHUNK_SIZE);
    if (buf == NULL)
        goto out;
    md = sha256_begin();
    if (md == NULL)
        goto out;
    /* Created only once the header is known good, so a wrong record makes no file;
       O_EXCL so an existing file is never overwritten (or removed below). */
    if (dest_path != NULL) {
        dest = open(dest_path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        if (dest < 0)
            goto out;
    }

    pace_start(&pacer, rate_bps);
    for (done = 0; done < size;) {
        size_t n = size - done < CHUNK_SIZE ? (size_t)(size - done) : CHUNK_SIZE;
        if (read_full(vol, buf, n, offset + HEADER_SIZE + done) != 0)
            goto out;
        if (EVP_DigestUpdate(md, buf, n) != 1) {
            errno = EIO;
            goto out;
        }
        if (dest >= 0 && write_full(dest, buf, n, done) != 0)
            goto out;
        done += n;
        pace(&pacer, done);
    }
    if (EVP_DigestFinal_ex(md, digest, NULL) != 1) {
        errno = EIO;
        goto out;
    }
    if (memcmp(digest, expected_sha256, SHA256_SIZE) != 0) {
        errno = EBADMSG;
        goto out;
    }
    if (dest >= 0 && fsync(dest) != 0)
        goto out;
    rc = 0;
out:
    saved = errno;
    if (dest >= 0) {
        if (close(dest) != 0 && rc == 0) {
            rc = -1;
            saved = errno;
        }
        /* Never leave a partial or unverified copy behind. */
        if (rc != 0)
            unlink(dest_path);
    }
    EVP_MD_CTX_free(md);
    free(buf);
    close(vol);
    errno = saved;
    return rc;
}

int stg_copy_out(const char *volume, uint64_t offset, uint64_t file_id, uint64_t size,
                 const unsigned char *expected_sha256, const char *dest_path, uint64_t rate_bps)
{
    /* NULL would turn the copy into a verify that reports success with no file. */
    if (dest_path == NULL) {
        errno = EINVAL;
        return -1;
    }
    return read_record(volume, offset, file_id, size, expected_sha256, dest_path, rate_bps);
}

int stg_verify(const char *volume, uint64_t offset, uint64_t file_id, uint64_t size,
               const unsigned char *expected_sha256, uint64_t rate_bps)
{
    return read_record(volume, offset, file_id, size, expected_sha256, NULL, rate_bps);
}
