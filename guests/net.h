/* Byte-order and Internet-checksum helpers shared by the network guests
 * (counter, tcpcount). Pure functions on byte buffers: every caller
 * bounds-checks lengths before calling. Include after lib.h. */
#ifndef CASTOR_NET_H
#define CASTOR_NET_H

static u16 get16(const u8 *p) { return (u16)((p[0] << 8) | p[1]); }

static void put16(u8 *p, u16 v)
{
    p[0] = (u8)(v >> 8);
    p[1] = (u8)v;
}

static __attribute__((unused)) u32 get32(const u8 *p)
{
    return ((u32)p[0] << 24) | ((u32)p[1] << 16) | ((u32)p[2] << 8) | p[3];
}

static __attribute__((unused)) void put32(u8 *p, u32 v)
{
    p[0] = (u8)(v >> 24);
    p[1] = (u8)(v >> 16);
    p[2] = (u8)(v >> 8);
    p[3] = (u8)v;
}

/* One's-complement sum of big-endian 16-bit words (odd tail padded). */
static u32 csum_add(u32 sum, const u8 *p, u32 len)
{
    while (len > 1) {
        sum += (u32)((p[0] << 8) | p[1]);
        p += 2;
        len -= 2;
    }
    if (len)
        sum += (u32)(p[0] << 8);
    return sum;
}

static u16 csum_fold(u32 sum)
{
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (u16)~sum;
}

/* Sum of the TCP/UDP pseudo header: addresses, protocol, length. */
static u32 pseudo(const u8 *src, const u8 *dst, u8 proto, u32 len)
{
    u32 s = csum_add(0, src, 4);
    s = csum_add(s, dst, 4);
    return s + proto + len;
}

#endif
