/* blkcheck: exercises the castor paravirtual block device, then writes a
 * checked sequence forever.
 *
 * Writes a pattern to sectors 1..=8, flushes, reads them back into another
 * buffer and compares; then checks that out-of-range requests (sector past
 * the image, buffer past guest memory, zero count, unknown command) fail
 * with the documented status. Prints `blk ok`, or `blk FAIL step S status X`
 * at the first mismatch and halts.
 *
 * Pattern byte i (0..4096) = (i * 31 + 7) ^ (i >> 8), as u8.
 *
 * Then the sequence: write n (n = 0, 1, ...) fills sector 16 + n % slots
 * (slots = min(capacity - 16, 4096)) with seq_pattern(n). Before write n
 * it reads back sector slot(n-1), which must hold seq_pattern(n-1), and
 * sector slot(n), which must still hold what write n - slots left there
 * (zeros for n < slots): the disk holds exactly writes 0..n-1. The counter
 * lives in guest memory, so a restored replica continues the sequence and
 * checks that its disk is exactly as old as its memory. Prints `blk seq N`
 * every 64 writes, `blk FAIL seq N behind|ahead` on a mismatch (and
 * halts). */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#include "../abi.h"
#include "../lib.h"

static u8 wbuf[4096] __attribute__((aligned(16)));
static u8 rbuf[4096] __attribute__((aligned(16)));

static u32 cmd(u32 c, u32 sector, u32 count, u32 buf)
{
    outl(CASTOR_BLK_SECTOR_LO, sector);
    outl(CASTOR_BLK_SECTOR_HI, 0);
    outl(CASTOR_BLK_COUNT, count);
    outl(CASTOR_BLK_BUF, buf);
    outl(CASTOR_BLK_CMD, c);
    return inl(CASTOR_BLK_STATUS);
}

static void expect(u32 step, u32 got, u32 want)
{
    if (got == want)
        return;
    puts_("blk FAIL step ");
    putu(step);
    puts_(" status ");
    putu(got);
    puts_(" want ");
    putu(want);
    putc_('\n');
    halt_forever();
}

static u32 seq_n;

/* Word w of write n's sector (0 for "never written": n is 1-based inside). */
static void seq_pattern(u32 n, u8 *out)
{
    u32 *w = (u32 *)out, i;
    for (i = 0; i < 128; i++)
        w[i] = (n + 1) * 2654435761u ^ (i << 24) ^ (n + 1);
}

static void seq_fail(const char *why)
{
    puts_("blk FAIL seq ");
    putu(seq_n);
    putc_(' ');
    puts_(why);
    putc_('\n');
    halt_forever();
}

static void sequence(u32 cap)
{
    u32 slots = cap - 16;
    if (slots > 4096)
        slots = 4096;
    for (;;) {
        u32 n = seq_n;
        if (n > 0) {
            expect(20, cmd(CASTOR_BLK_CMD_READ, 16 + (n - 1) % slots, 1, (u32)rbuf), CASTOR_BLK_OK);
            seq_pattern(n - 1, wbuf);
            if (memcmp(rbuf, wbuf, 512) != 0)
                seq_fail("behind");
        }
        expect(21, cmd(CASTOR_BLK_CMD_READ, 16 + n % slots, 1, (u32)rbuf), CASTOR_BLK_OK);
        if (n >= slots)
            seq_pattern(n - slots, wbuf);
        else
            memset(wbuf, 0, 512);
        if (memcmp(rbuf, wbuf, 512) != 0)
            seq_fail("ahead");
        seq_pattern(n, wbuf);
        expect(22, cmd(CASTOR_BLK_CMD_WRITE, 16 + n % slots, 1, (u32)wbuf), CASTOR_BLK_OK);
        seq_n = n + 1;
        if (seq_n % 64 == 0) {
            puts_("blk seq ");
            putu(seq_n);
            putc_('\n');
        }
    }
}

void guest_main(const struct castor_boot_params *p)
{
    u32 cap = inl(CASTOR_BLK_CAP_LO), i;
    puts_("blkcheck sectors=");
    putu(cap);
    putc_('\n');
    expect(0, cap >= 16, 1);
    for (i = 0; i < sizeof wbuf; i++)
        wbuf[i] = (u8)((i * 31 + 7) ^ (i >> 8));
    expect(1, cmd(CASTOR_BLK_CMD_WRITE, 1, 8, (u32)wbuf), CASTOR_BLK_OK);
    expect(2, cmd(CASTOR_BLK_CMD_FLUSH, 0, 0, 0), CASTOR_BLK_OK);
    memset(rbuf, 0, sizeof rbuf);
    expect(3, cmd(CASTOR_BLK_CMD_READ, 1, 8, (u32)rbuf), CASTOR_BLK_OK);
    expect(4, memcmp(rbuf, wbuf, sizeof rbuf) == 0, 1);
    expect(5, cmd(CASTOR_BLK_CMD_READ, cap, 1, (u32)rbuf), CASTOR_BLK_BAD_SECTOR);
    expect(6, cmd(CASTOR_BLK_CMD_WRITE, cap - 1, 2, (u32)wbuf), CASTOR_BLK_BAD_SECTOR);
    expect(7, cmd(CASTOR_BLK_CMD_READ, 0, 1, p->mem_size - 100), CASTOR_BLK_BAD_BUFFER);
    expect(8, cmd(CASTOR_BLK_CMD_READ, 0, 0, (u32)rbuf), CASTOR_BLK_BAD_COUNT);
    expect(9, cmd(42, 0, 1, (u32)rbuf), CASTOR_BLK_BAD_COMMAND);
    puts_("blk ok\n");
    sequence(cap);
}
