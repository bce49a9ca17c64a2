/* counter: a minimal network service over the castor paravirtual NIC.
 *
 * - Answers ARP requests for its IPv4 address (boot params `ip`).
 * - Answers ICMP echo requests (ping).
 * - UDP port 7777: a request's payload starts with a 64-bit request id
 *   (little-endian); the reply (to the sender's address and port) carries
 *   16 bytes: that id, then the counter (u64 LE), which increases by one
 *   per reply and never goes back.
 * - Prints `counter N id I` for the first reply and every 16th.
 *
 * The counter and all other state live in this image's .bss, i.e. in guest
 * memory, so a checkpoint carries them. There are no interrupts: the loop
 * polls the NIC's RX_POLL register. IPv4 header checksums are verified on
 * receive (bad ones dropped) and computed on send; UDP checksums are
 * verified when present and always computed. */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#include "../abi.h"
#include "../lib.h"
#include "../net.h"

#define PORT 7777
#define FRAME_BUF 1536

static u8 rxbuf[FRAME_BUF] __attribute__((aligned(16)));
static u8 txbuf[FRAME_BUF] __attribute__((aligned(16)));
static u8 mac[6];
static u8 myip[4];
static u64 counter;
static u16 ip_ident;
static u32 booted;
static u64 bad_csum;

static void send(u32 len)
{
    if (len < 60) {
        memset(txbuf + len, 0, 60 - len);
        len = 60;
    }
    outl(CASTOR_NET_TX_ADDR, (u32)txbuf);
    outl(CASTOR_NET_TX_LEN, len);
}

static void eth_reply(const u8 *req, u16 type)
{
    memcpy(txbuf, req + 6, 6);
    memcpy(txbuf + 6, mac, 6);
    put16(txbuf + 12, type);
}

static void arp(u32 n)
{
    const u8 *a = rxbuf + 14;
    u8 *r = txbuf + 14;
    if (n < 42 || get16(a) != 1 || get16(a + 2) != 0x0800 || a[4] != 6 || a[5] != 4 ||
        get16(a + 6) != 1 || memcmp(a + 24, myip, 4) != 0)
        return;
    eth_reply(rxbuf, 0x0806);
    put16(r, 1);
    put16(r + 2, 0x0800);
    r[4] = 6;
    r[5] = 4;
    put16(r + 6, 2);
    memcpy(r + 8, mac, 6);
    memcpy(r + 14, myip, 4);
    memcpy(r + 18, a + 8, 10); /* requester's MAC and IP */
    send(42);
}

/* Fills an IPv4 header at txbuf+14 replying to `req`. */
static void ip_reply(const u8 *req, u8 proto, u32 payload)
{
    u8 *h = txbuf + 14;
    u32 total = 20 + payload;
    h[0] = 0x45;
    h[1] = 0;
    put16(h + 2, (u16)total);
    put16(h + 4, ip_ident++);
    put16(h + 6, 0x4000); /* DF */
    h[8] = 64;
    h[9] = proto;
    put16(h + 10, 0);
    memcpy(h + 12, myip, 4);
    memcpy(h + 16, req + 12, 4);
    put16(h + 10, csum_fold(csum_add(0, h, 20)));
}

static void udp(const u8 *ip, const u8 *u, u32 ulen)
{
    u8 *r = txbuf + 14 + 20;
    u32 i;
    u64 c;
    if (ulen < 8 || get16(u + 4) != ulen || get16(u + 2) != PORT)
        return;
    if (get16(u + 6) != 0 && csum_fold(csum_add(pseudo(ip + 12, ip + 16, 17, ulen), u, ulen)) != 0) {
        bad_csum++;
        return;
    }
    if (ulen < 16)
        return; /* no request id */
    c = ++counter;
    eth_reply(rxbuf, 0x0800);
    ip_reply(ip, 17, 8 + 16);
    put16(r, PORT);
    memcpy(r + 2, u, 2); /* sender's port */
    put16(r + 4, 8 + 16);
    put16(r + 6, 0);
    memcpy(r + 8, u + 8, 8); /* the request id, as sent */
    for (i = 0; i < 8; i++)
        r[16 + i] = (u8)(c >> (8 * i));
    put16(r + 6, csum_fold(csum_add(pseudo(myip, ip + 12, 17, 24), r, 24)));
    if (get16(r + 6) == 0)
        put16(r + 6, 0xffff);
    send(14 + 20 + 24);
    if (c == 1 || (c & 15) == 0) {
        u64 id = 0;
        for (i = 0; i < 8; i++)
            id |= (u64)u[8 + i] << (8 * i);
        puts_("counter ");
        putu(c);
        puts_(" id ");
        putu(id);
        putc_('\n');
    }
}

static void icmp(const u8 *ip, const u8 *m, u32 len)
{
    u8 *r = txbuf + 14 + 20;
    if (len < 8 || m[0] != 8 || len > FRAME_BUF - 14 - 20)
        return;
    if (csum_fold(csum_add(0, m, len)) != 0) {
        bad_csum++;
        return;
    }
    eth_reply(rxbuf, 0x0800);
    ip_reply(ip, 1, len);
    memcpy(r, m, len);
    r[0] = 0;
    put16(r + 2, 0);
    put16(r + 2, csum_fold(csum_add(0, r, len)));
    send(14 + 20 + len);
}

static void ipv4(u32 n)
{
    const u8 *ip = rxbuf + 14;
    u32 ihl, total;
    if (n < 14 + 20 || (ip[0] >> 4) != 4)
        return;
    ihl = (u32)(ip[0] & 15) * 4;
    total = get16(ip + 2);
    if (ihl < 20 || total < ihl || total > n - 14)
        return;
    if (csum_fold(csum_add(0, ip, ihl)) != 0) {
        bad_csum++;
        return;
    }
    if (memcmp(ip + 16, myip, 4) != 0 || (get16(ip + 6) & 0x3fff) != 0)
        return; /* not for us, or a fragment */
    if (ip[9] == 17)
        udp(ip, ip + ihl, total - ihl);
    else if (ip[9] == 1)
        icmp(ip, ip + ihl, total - ihl);
}

void guest_main(const struct castor_boot_params *p)
{
    u32 lo, hi, i;
    if (p->magic != CASTOR_BOOT_MAGIC || p->version != CASTOR_BOOT_VERSION) {
        puts_("FAIL bootparams\n");
        halt_forever();
    }
    lo = inl(CASTOR_NET_MAC_LO);
    hi = inl(CASTOR_NET_MAC_HI);
    for (i = 0; i < 4; i++)
        mac[i] = (u8)(lo >> (8 * i));
    mac[4] = (u8)hi;
    mac[5] = (u8)(hi >> 8);
    for (i = 0; i < 4; i++)
        myip[i] = (u8)(p->ip >> (8 * i));
    if (!booted) {
        booted = 1;
        puts_("counter ip=");
        for (i = 0; i < 4; i++) {
            putu(myip[i]);
            if (i < 3)
                putc_('.');
        }
        puts_(" port 7777 link=");
        putu(inl(CASTOR_NET_LINK));
        putc_('\n');
    }
    outl(CASTOR_NET_RX_ADDR, (u32)rxbuf);
    outl(CASTOR_NET_RX_SIZE, FRAME_BUF);
    for (;;) {
        u32 n = inl(CASTOR_NET_RX_POLL);
        if (n == 0 || n == CASTOR_NET_RX_ERROR || n < 14)
            continue;
        switch (get16(rxbuf + 12)) {
        case 0x0806:
            arp(n);
            break;
        case 0x0800:
            ipv4(n);
            break;
        }
    }
}
