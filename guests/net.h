/* The network layer shared by the network guests (counter, tcpcount):
 * byte order and Internet checksums, the NIC (frame buffers, send, poll),
 * Ethernet and IPv4 headers, ARP and ICMP echo. Each guest adds its own
 * transport (UDP, TCP) on top. Static, so each guest gets its own copy;
 * the state below is in the guest's .bss, i.e. guest memory, so a
 * checkpoint carries it. Include after lib.h. */
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

/* ---- State (guest memory) ---- */

#define FRAME_BUF 1536 /* holds any frame (CASTOR_NET_MAX_FRAME) */
#define ETH_HLEN 14
#define IP_HLEN 20 /* headers we send carry no options */
#define ETHERTYPE_IPV4 0x0800
#define ETHERTYPE_ARP 0x0806
#define IPPROTO_ICMP 1
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17

/* The NIC writes rxbuf only during the IN from RX_POLL (net_poll). */
static u8 rxbuf[FRAME_BUF] __attribute__((aligned(16)));
static u8 txbuf[FRAME_BUF] __attribute__((aligned(16)));
static u8 mac[6];
static u8 myip[4];
static u16 ip_ident;
static u32 booted; /* the banner was printed (not again after a restore) */
/* Frames dropped for a bad IPv4, ICMP, UDP or TCP checksum (diagnostic,
 * visible in a memory image). */
static u64 bad_csum;

/* Prints an IPv4 address as A.B.C.D. */
static void put_ip(const u8 *ip)
{
    u32 i;
    for (i = 0; i < 4; i++) {
        putu(ip[i]);
        if (i < 3)
            putc_('.');
    }
}

/* ---- NIC ---- */

/* Reads the MAC from the NIC, takes the IPv4 address from the boot params
 * (first octet in the low byte) and points the NIC's receive buffer at
 * rxbuf. Run at every boot, restored or not: the MAC comes from the
 * restoring VMM's spec. */
static void net_init(const struct castor_boot_params *p)
{
    u32 lo = inl(CASTOR_NET_MAC_LO), hi = inl(CASTOR_NET_MAC_HI), i;
    for (i = 0; i < 4; i++)
        mac[i] = (u8)(lo >> (8 * i));
    mac[4] = (u8)hi;
    mac[5] = (u8)(hi >> 8);
    for (i = 0; i < 4; i++)
        myip[i] = (u8)(p->ip >> (8 * i));
    outl(CASTOR_NET_RX_ADDR, (u32)rxbuf);
    outl(CASTOR_NET_RX_SIZE, FRAME_BUF);
}

/* Starts a network guest: checks the boot params (halts on a mismatch),
 * brings up the NIC and, at first boot only, prints
 * "NAME ip=A.B.C.D port PORT link=L". */
static void net_boot(const struct castor_boot_params *p, const char *name, u16 port)
{
    if (p->magic != CASTOR_BOOT_MAGIC || p->version != CASTOR_BOOT_VERSION) {
        puts_("FAIL bootparams\n");
        halt_forever();
    }
    net_init(p);
    if (!booted) {
        booted = 1;
        puts_(name);
        puts_(" ip=");
        put_ip(myip);
        puts_(" port ");
        putu(port);
        puts_(" link=");
        putu(inl(CASTOR_NET_LINK));
        putc_('\n');
    }
}

/* Takes one received frame into rxbuf. Returns its length, or 0 when none
 * is queued or the length is unusable (shorter than an Ethernet header,
 * longer than rxbuf, or the device's error value). */
static u32 net_poll(void)
{
    u32 n = inl(CASTOR_NET_RX_POLL);
    if (n == CASTOR_NET_RX_ERROR || n < ETH_HLEN || n > FRAME_BUF)
        return 0;
    return n;
}

/* Each network guest defines these two: what to do with the n-byte ARP
 * or IPv4 frame in rxbuf (n >= 14). */
static void on_arp(u32 n);
static void on_ipv4(u32 n);

/* Hands the n-byte frame in rxbuf (as net_poll returned it, 0 for none) to
 * the guest's handler for its ethertype; ignores other types. */
static void net_dispatch(u32 n)
{
    if (n == 0)
        return;
    switch (get16(rxbuf + 12)) {
    case ETHERTYPE_ARP:
        on_arp(n);
        break;
    case ETHERTYPE_IPV4:
        on_ipv4(n);
        break;
    }
}

/* Sends the first `len` bytes of txbuf (len <= FRAME_BUF), zero-padded to
 * the 60-byte Ethernet minimum. */
static void net_send(u32 len)
{
    if (len < 60) {
        memset(txbuf + len, 0, 60 - len);
        len = 60;
    }
    outl(CASTOR_NET_TX_ADDR, (u32)txbuf);
    outl(CASTOR_NET_TX_LEN, len);
}

/* ---- Ethernet, IPv4 output ---- */

/* Fills the Ethernet header of txbuf: to `dst`, from our MAC. */
static void eth_hdr(const u8 *dst, u16 type)
{
    memcpy(txbuf, dst, 6);
    memcpy(txbuf + 6, mac, 6);
    put16(txbuf + 12, type);
}

/* Fills the IPv4 header at txbuf+14 for `payload` bytes (at most
 * FRAME_BUF - 34) from us to `dst`: no options, DF, TTL 64. */
static void ip_hdr(const u8 *dst, u8 proto, u32 payload)
{
    u8 *h = txbuf + ETH_HLEN;
    h[0] = 0x45;
    h[1] = 0;
    put16(h + 2, (u16)(IP_HLEN + payload));
    put16(h + 4, ip_ident++);
    put16(h + 6, 0x4000); /* DF */
    h[8] = 64;
    h[9] = proto;
    put16(h + 10, 0);
    memcpy(h + 12, myip, 4);
    memcpy(h + 16, dst, 4);
    put16(h + 10, csum_fold(csum_add(0, h, IP_HLEN)));
}

/* ---- ARP ---- */

/* Checks the ARP packet of the n-byte frame in rxbuf: Ethernet/IPv4, a
 * request (1) or reply (2), whose target protocol address is ours.
 * Returns the operation, 0 for anything else. The sender's MAC is at
 * rxbuf+22, its IPv4 address at rxbuf+28. */
static u16 arp_input(u32 n)
{
    const u8 *a = rxbuf + ETH_HLEN;
    u16 op;
    if (n < 42 || get16(a) != 1 || get16(a + 2) != ETHERTYPE_IPV4 || a[4] != 6 || a[5] != 4)
        return 0;
    op = get16(a + 6);
    if ((op != 1 && op != 2) || memcmp(a + 24, myip, 4) != 0)
        return 0;
    return op;
}

/* Sends an ARP packet (op 1 request, 2 reply) from us to Ethernet address
 * `dst_mac`, with target hardware address `tha` and protocol address
 * `tpa`. */
static void arp_send(u16 op, const u8 *dst_mac, const u8 *tha, const u8 *tpa)
{
    u8 *r = txbuf + ETH_HLEN;
    eth_hdr(dst_mac, ETHERTYPE_ARP);
    put16(r, 1);
    put16(r + 2, ETHERTYPE_IPV4);
    r[4] = 6;
    r[5] = 4;
    put16(r + 6, op);
    memcpy(r + 8, mac, 6);
    memcpy(r + 14, myip, 4);
    memcpy(r + 18, tha, 6);
    memcpy(r + 24, tpa, 4);
    net_send(42);
}

/* ---- IPv4 input ---- */

/* A valid IPv4 packet for us, inside rxbuf. */
struct ipv4_in {
    const u8 *ip;      /* its header; source address at ip+12 */
    const u8 *payload; /* ip + header length */
    u32 len;           /* payload bytes, all inside the received frame */
    u8 proto;
};

/* Checks the IPv4 packet of the n-byte frame in rxbuf: version 4, header
 * and total lengths inside the frame, header checksum (a bad one is
 * counted in bad_csum), addressed to us, not a fragment. Returns 1 and
 * fills *in when it is one to handle, 0 to drop it. */
static int ipv4_input(u32 n, struct ipv4_in *in)
{
    const u8 *ip = rxbuf + ETH_HLEN;
    u32 ihl, total;
    if (n < ETH_HLEN + IP_HLEN || (ip[0] >> 4) != 4)
        return 0;
    ihl = (u32)(ip[0] & 15) * 4;
    total = get16(ip + 2);
    if (ihl < IP_HLEN || total < ihl || total > n - ETH_HLEN)
        return 0;
    if (csum_fold(csum_add(0, ip, ihl)) != 0) {
        bad_csum++;
        return 0;
    }
    if (memcmp(ip + 16, myip, 4) != 0 || (get16(ip + 6) & 0x3fff) != 0)
        return 0; /* not for us, or a fragment */
    in->ip = ip;
    in->payload = ip + ihl;
    in->len = total - ihl;
    in->proto = ip[9];
    return 1;
}

/* ---- ICMP ---- */

/* Answers an ICMP echo request (checksum checked; a bad one is counted in
 * bad_csum) with an echo reply carrying the same data, to the frame's
 * sender. Other ICMP messages are ignored. */
static void icmp_input(const struct ipv4_in *in)
{
    const u8 *m = in->payload;
    u32 len = in->len;
    u8 *r = txbuf + ETH_HLEN + IP_HLEN;
    if (len < 8 || m[0] != 8 || len > FRAME_BUF - ETH_HLEN - IP_HLEN)
        return;
    if (csum_fold(csum_add(0, m, len)) != 0) {
        bad_csum++;
        return;
    }
    eth_hdr(rxbuf + 6, ETHERTYPE_IPV4);
    ip_hdr(in->ip + 12, IPPROTO_ICMP, len);
    memcpy(r, m, len);
    r[0] = 0;
    put16(r + 2, 0);
    put16(r + 2, csum_fold(csum_add(0, r, len)));
    net_send(ETH_HLEN + IP_HLEN + len);
}

#endif
