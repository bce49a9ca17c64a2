/* Helpers shared by the castor kvm guests: port I/O, serial output and the
 * few libc routines gcc may emit calls to. Static, so each guest gets its
 * own copy. Include after abi.h. */
#ifndef CASTOR_LIB_H
#define CASTOR_LIB_H

static inline void outb(unsigned short port, unsigned char v)
{
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

/* 32-bit port accesses are also device doorbells that read or write guest
 * memory (NIC TX/RX, block commands): the "memory" clobber makes the
 * compiler finish stores to a buffer before the OUT and reload it after,
 * instead of assuming a buffer only the device writes stays zero. */
static inline void outl(unsigned short port, u32 v)
{
    __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port) : "memory");
}

static inline u32 inl(unsigned short port)
{
    u32 v;
    __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port) : "memory");
    return v;
}

static void putc_(char c) { outb(CASTOR_SERIAL_BASE, (unsigned char)c); }

static void puts_(const char *s)
{
    while (*s)
        putc_(*s++);
}

/* Writes the decimal digits of v ending just before `end` (the caller's
 * buffer has room for 20 digits before it); returns the first digit. */
static char *fmt_u64(char *end, u64 v)
{
    char *p = end;
    do {
        /* 64-bit division would need libgcc; split into 32-bit steps. */
        u32 hi = (u32)(v >> 32), lo = (u32)v;
        u32 qhi = hi / 10, rhi = hi % 10;
        u64 rest = ((u64)rhi << 32) | lo;
        u32 qlo, r;
        __asm__("divl %4" : "=a"(qlo), "=d"(r) : "a"((u32)rest), "d"((u32)(rest >> 32)), "rm"(10u));
        *--p = (char)('0' + r);
        v = ((u64)qhi << 32) | qlo;
    } while (v);
    return p;
}

static void putu(u64 v)
{
    char buf[21];
    buf[20] = 0;
    puts_(fmt_u64(&buf[20], v));
}

static __attribute__((unused)) void puthex(u32 v)
{
    static const char d[] = "0123456789abcdef";
    int i;
    puts_("0x");
    for (i = 28; i >= 0; i -= 4)
        putc_(d[(v >> i) & 15]);
}

/* gcc may turn loops and struct copies into calls to these. */
void *memcpy(void *dst, const void *src, unsigned int n)
{
    unsigned char *d = dst;
    const unsigned char *s = src;
    while (n--)
        *d++ = *s++;
    return dst;
}

void *memset(void *dst, int c, unsigned int n)
{
    unsigned char *d = dst;
    while (n--)
        *d++ = (unsigned char)c;
    return dst;
}

int memcmp(const void *a, const void *b, unsigned int n)
{
    const unsigned char *x = a, *y = b;
    for (; n; n--, x++, y++)
        if (*x != *y)
            return *x - *y;
    return 0;
}

static __attribute__((unused)) void halt_forever(void)
{
    for (;;)
        __asm__ volatile("cli; hlt");
}

#endif
