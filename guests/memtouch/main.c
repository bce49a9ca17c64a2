/* memtouch: a test guest that dirties memory in configurable patterns and
 * continuously verifies it, so a replica resumed from a torn or stale
 * checkpoint reports FAIL.
 *
 * Memory it owns (see guests/README.md for the ABI):
 *   sums page  at params->sums_gpa: one u32 checksum per region;
 *   regions    at params->data_gpa: `regions` x `region_pages` pages.
 * The checksum of a region lives in a different page from the region's data,
 * so a copy that has one but not the other disagrees on the next check.
 * All state (sequence number, RNG, cursors) lives in this image's .bss, i.e.
 * in guest memory, so a checkpoint carries it. */

typedef unsigned int u32;
typedef unsigned long long u64;

#include "../abi.h"
#include "../lib.h"

static u64 clock_ns(void)
{
    u32 lo = inl(CASTOR_CLOCK_LO); /* latches the full 64-bit value */
    u32 hi = inl(CASTOR_CLOCK_HI);
    return ((u64)hi << 32) | lo;
}

/* Guest state: all in .bss, carried by checkpoints. */
static u64 seq;
static u32 rng;
static u32 cursor;
static u32 verify_cursor;
static u32 sweep_cursor;
static u64 last_clock;
static u32 booted;

static u32 xorshift(void)
{
    u32 x = rng;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    rng = x;
    return x;
}

static void fail(const char *what, u32 a, u32 b, u32 c)
{
    puts_("FAIL ");
    puts_(what);
    putc_(' ');
    puthex(a);
    putc_(' ');
    puthex(b);
    putc_(' ');
    puthex(c);
    puts_(" at seq ");
    putu(seq);
    putc_('\n');
    for (;;)
        __asm__ volatile("cli; hlt");
}

static u32 region_sum(const struct castor_boot_params *p, u32 r)
{
    const u32 *w = (const u32 *)(p->data_gpa + r * p->region_pages * 4096u);
    u32 n = p->region_pages * 1024u, i, s = 0;
    for (i = 0; i < n; i++)
        s += w[i] ^ i;
    return s;
}

static void verify(const struct castor_boot_params *p, u32 r)
{
    const u32 *sums = (const u32 *)p->sums_gpa;
    u32 got = region_sum(p, r);
    if (got != sums[r])
        fail("region", r, got, sums[r]);
}

/* Writes a fresh value to word `idx` of region `r`, keeping the region's
 * checksum (in the separate sums page) in step. */
static void touch_word(const struct castor_boot_params *p, u32 r, u32 idx)
{
    u32 *sums = (u32 *)p->sums_gpa;
    u32 *base = (u32 *)(p->data_gpa + r * p->region_pages * 4096u);
    u32 nv = xorshift();
    u32 old = base[idx];
    base[idx] = nv;
    sums[r] += (nv ^ idx) - (old ^ idx);
}

void guest_main(const struct castor_boot_params *p)
{
    u32 *sums = (u32 *)p->sums_gpa;
    u32 t;

    if (p->magic != CASTOR_BOOT_MAGIC || p->version != CASTOR_BOOT_VERSION)
        fail("bootparams", p->magic, p->version, 0);
    if (!booted) {
        /* Data pages start zeroed; every region then has the same
         * xor-index checksum, computed once. */
        u32 r, i, n = p->region_pages * 1024u, s = 0;
        for (i = 0; i < n; i++)
            s += i;
        for (r = 0; r < p->regions; r++)
            sums[r] = s;
        rng = p->seed | 1;
        booted = 1;
        puts_("memtouch regions=");
        putu(p->regions);
        puts_(" region_pages=");
        putu(p->region_pages);
        puts_(" touch=");
        putu(p->touch);
        putc_('\n');
    }
    for (;;) {
        u32 r = 0, now_lo, now_hi;
        u64 now;
        if (p->pattern == CASTOR_PATTERN_SWEEP) {
            /* One word in each of `touch` consecutive pages, wrapping over
             * all regions: the most pages dirtied per instruction. */
            u32 total = p->regions * p->region_pages;
            for (t = 0; t < p->touch; t++) {
                u32 g = sweep_cursor++ % total;
                r = g / p->region_pages;
                touch_word(p, r, (g % p->region_pages) * 1024u + (xorshift() & 1023u));
            }
        } else {
            if (p->pattern == CASTOR_PATTERN_SEQUENTIAL)
                r = cursor++ % p->regions;
            else
                r = xorshift() % p->regions;
            for (t = 0; t < p->touch; t++) {
                u32 page = p->pattern == CASTOR_PATTERN_SEQUENTIAL
                               ? t % p->region_pages
                               : xorshift() % p->region_pages;
                touch_word(p, r, page * 1024u + (xorshift() & 1023u));
            }
        }
        verify(p, r);
        verify(p, verify_cursor++ % p->regions);
        now = clock_ns();
        if (now < last_clock) {
            now_lo = (u32)now;
            now_hi = (u32)(now >> 32);
            fail("clock", now_hi, now_lo, (u32)last_clock);
        }
        last_clock = now;
        seq++;
        puts_("seq ");
        putu(seq);
        puts_(" ok\n");
    }
}
