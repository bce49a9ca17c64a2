/* blkcheck: exercises the castor paravirtual block device once and halts.
 *
 * Writes a pattern to sectors 1..=8, flushes, reads them back into another
 * buffer and compares; then checks that out-of-range requests (sector past
 * the image, buffer past guest memory, zero count, unknown command) fail
 * with the documented status. Prints `blk ok`, or `blk FAIL step S status X`
 * at the first mismatch, then halts.
 *
 * Pattern byte i (0..4096) = (i * 31 + 7) ^ (i >> 8), as u8. */

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
    halt_forever();
}
