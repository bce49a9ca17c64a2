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
 * memory, so a checkpoint carries them (the network layer, ARP and ICMP
 * are in ../net.h). There are no interrupts: the loop polls the NIC's
 * RX_POLL register. IPv4 header checksums are verified on
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

static u64 counter;

static void on_arp(u32 n)
{
    const u8 *a = rxbuf + ETH_HLEN;
    if (arp_input(n) == 1)
        arp_send(2, rxbuf + 6, a + 8, a + 14); /* to the requester's MAC and IP */
}

static void udp(const struct ipv4_in *in)
{
    const u8 *ip = in->ip, *u = in->payload;
    u32 ulen = in->len;
    u8 *r = txbuf + ETH_HLEN + IP_HLEN;
    u32 i;
    u64 c;
    if (ulen < 8 || get16(u + 4) != ulen || get16(u + 2) != PORT)
        return;
    if (get16(u + 6) != 0 &&
        csum_fold(csum_add(pseudo(ip + 12, ip + 16, IPPROTO_UDP, ulen), u, ulen)) != 0) {
        bad_csum++;
        return;
    }
    if (ulen < 16)
        return; /* no request id */
    c = ++counter;
    eth_hdr(rxbuf + 6, ETHERTYPE_IPV4);
    ip_hdr(ip + 12, IPPROTO_UDP, 8 + 16);
    put16(r, PORT);
    memcpy(r + 2, u, 2); /* sender's port */
    put16(r + 4, 8 + 16);
    put16(r + 6, 0);
    memcpy(r + 8, u + 8, 8); /* the request id, as sent */
    for (i = 0; i < 8; i++)
        r[16 + i] = (u8)(c >> (8 * i));
    put16(r + 6, csum_fold(csum_add(pseudo(myip, ip + 12, IPPROTO_UDP, 24), r, 24)));
    if (get16(r + 6) == 0)
        put16(r + 6, 0xffff);
    net_send(ETH_HLEN + IP_HLEN + 24);
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

static void on_ipv4(u32 n)
{
    struct ipv4_in in;
    if (!ipv4_input(n, &in))
        return;
    if (in.proto == IPPROTO_UDP)
        udp(&in);
    else if (in.proto == IPPROTO_ICMP)
        icmp_input(&in);
}

void guest_main(const struct castor_boot_params *p)
{
    net_boot(p, "counter", PORT);
    for (;;) {
        u32 n = net_poll();
        net_dispatch(n);
    }
}
