/* tcpcount: a line service over a small TCP/IP stack of its own, on the
 * castor paravirtual NIC (guests/README.md, "tcpcount").
 *
 * - ARP: answers requests for its address; keeps a small cache of peers
 *   (learned from ARP and from valid IPv4 frames addressed to it); asks
 *   (broadcast request) when it must send to an address it does not know.
 * - IPv4: header checksum verified (bad frames dropped) and computed;
 *   fragments and options-bearing frames for other hosts ignored.
 * - ICMP echo (ping).
 * - TCP server on port 7000, up to NCONN connections. Each request line
 *   (bytes up to "\n") gets the reply "<counter>\n", the counter a u64 that
 *   increases by one per answered line, over all connections.
 *
 * TCP, in brief (RFC 793 without the parts a passive server never needs):
 * - Three-way handshake; MSS option read from the SYN and sent in the
 *   SYN-ACK; no window scaling, SACK or timestamps (never offered).
 * - Receive: only the segment starting at rcv_nxt is taken (a segment that
 *   overlaps already-received data is trimmed). A duplicate (all old) is
 *   re-ACKed and, when replies are outstanding, the oldest unacknowledged
 *   reply is retransmitted at once: the peer evidently lost it. An
 *   out-of-order segment (starting beyond rcv_nxt) is DROPPED and
 *   re-ACKed; the peer's retransmission fills the hole. Each byte is
 *   consumed exactly once (at rcv_nxt), so no request is counted twice.
 * - Send: replies go into a per-connection ring indexed by sequence
 *   number; segments up to the peer's MSS and window. One retransmission
 *   timer per connection (guest clock): RTO_INIT, doubled per expiry up to
 *   RTO_MAX, go-back-N from snd_una; after MAX_RETRIES expiries the
 *   connection is reset.
 * - Flow control: a line is consumed only when its reply fits in the
 *   ring; bytes not consumed are not acknowledged (the peer resends them).
 *   The advertised window is the ring's free space.
 * - FIN: the server closes after the client (CLOSE_WAIT → LAST_ACK at
 *   once). RST in the window drops the connection; segments for no
 *   connection get an RST.
 *
 * Every byte of state is in this image's .bss, i.e. guest memory: a
 * restored replica continues each connection where its checkpoint was,
 * and segments the dead primary produced but never released are simply
 * retransmitted (by the restored guest's timer or on the client's
 * retransmission). No interrupts: the loop polls the NIC. */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#include "../abi.h"
#include "../lib.h"
#include "../net.h"

#define PORT 7000
#define FRAME_BUF 1536
#define NCONN 4
#define SNDBUF 2048 /* power of two: ring indexed by sequence number */
#define SNDMASK (SNDBUF - 1)
#define REPLY_MAX 21 /* 20 digits and "\n" */
#define MSS_MAX 1460
#define RTO_INIT_NS 200000000ull
#define RTO_MAX_NS 1600000000ull
#define MAX_RETRIES 10
#define ARP_SLOTS 8
/* Polls between two timer checks (each check is two clock reads). */
#define TIMER_EVERY 8

#define TH_FIN 0x01
#define TH_SYN 0x02
#define TH_RST 0x04
#define TH_PSH 0x08
#define TH_ACK 0x10

enum { CLOSED = 0, SYN_RCVD, ESTABLISHED, LAST_ACK };

/* One connection. Sequence invariants (all mod 2^32):
 * iss < snd_una <= snd_nxt <= snd_max <= data_end + fin_queued, except
 * snd_una == iss while the SYN is unacknowledged;
 * data_end - (iss + 1) bytes of reply were queued in total; the bytes in
 * [max(snd_una, iss + 1), data_end) are in ring[seq & SNDMASK], so
 * data_end - snd_una <= SNDBUF. */
struct conn {
    u32 state;
    u8 ip[4];
    u16 port;
    u16 mss;
    u32 iss, irs;
    u32 snd_una, snd_nxt, snd_max, data_end;
    u32 snd_wnd; /* peer's advertised window */
    u32 rcv_nxt;
    u32 fin_queued; /* our FIN follows data_end */
    u32 retries;
    u64 rto_ns;
    u64 rto_at; /* 0: timer off */
    u64 lines;
    u8 ring[SNDBUF];
};

struct arp_entry {
    u8 ip[4];
    u8 mac[6];
    u8 used;
};

static u8 rxbuf[FRAME_BUF] __attribute__((aligned(16)));
static u8 txbuf[FRAME_BUF] __attribute__((aligned(16)));
static u8 mac[6];
static u8 myip[4];
static u64 counter;
static u16 ip_ident;
static u32 booted;
static struct conn conns[NCONN];
static struct arp_entry arp_cache[ARP_SLOTS];
static u32 arp_next;
static u64 now;
/* Diagnostics, visible in a memory image. */
static u64 bad_csum, dropped_ooo, dup_segs, timeouts, resets_sent;

static int seq_lt(u32 a, u32 b) { return (int)(a - b) < 0; }
static int seq_le(u32 a, u32 b) { return (int)(a - b) <= 0; }

static u64 clock_ns(void)
{
    u32 lo = inl(CASTOR_CLOCK_LO);
    u32 hi = inl(CASTOR_CLOCK_HI);
    now = ((u64)hi << 32) | lo;
    return now;
}

static void put_ip(const u8 *ip)
{
    u32 i;
    for (i = 0; i < 4; i++) {
        putu(ip[i]);
        if (i < 3)
            putc_('.');
    }
}

static void send(u32 len)
{
    if (len < 60) {
        memset(txbuf + len, 0, 60 - len);
        len = 60;
    }
    outl(CASTOR_NET_TX_ADDR, (u32)txbuf);
    outl(CASTOR_NET_TX_LEN, len);
}

static void eth_hdr(const u8 *dst, u16 type)
{
    memcpy(txbuf, dst, 6);
    memcpy(txbuf + 6, mac, 6);
    put16(txbuf + 12, type);
}

/* ---- ARP ---- */

static const u8 *arp_lookup(const u8 *ip)
{
    u32 i;
    for (i = 0; i < ARP_SLOTS; i++)
        if (arp_cache[i].used && memcmp(arp_cache[i].ip, ip, 4) == 0)
            return arp_cache[i].mac;
    return 0;
}

static void arp_learn(const u8 *ip, const u8 *hw)
{
    u32 i;
    if (hw[0] & 1)
        return; /* never cache a multicast/broadcast source */
    for (i = 0; i < ARP_SLOTS; i++)
        if (arp_cache[i].used && memcmp(arp_cache[i].ip, ip, 4) == 0) {
            memcpy(arp_cache[i].mac, hw, 6);
            return;
        }
    i = arp_next++ % ARP_SLOTS;
    memcpy(arp_cache[i].ip, ip, 4);
    memcpy(arp_cache[i].mac, hw, 6);
    arp_cache[i].used = 1;
}

static void arp_send(u16 op, const u8 *dst_mac, const u8 *tha, const u8 *tpa)
{
    u8 *r = txbuf + 14;
    eth_hdr(dst_mac, 0x0806);
    put16(r, 1);
    put16(r + 2, 0x0800);
    r[4] = 6;
    r[5] = 4;
    put16(r + 6, op);
    memcpy(r + 8, mac, 6);
    memcpy(r + 14, myip, 4);
    memcpy(r + 18, tha, 6);
    memcpy(r + 24, tpa, 4);
    send(42);
}

static void arp_request(const u8 *ip)
{
    static const u8 bcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    static const u8 zero[6] = {0, 0, 0, 0, 0, 0};
    arp_send(1, bcast, zero, ip);
}

static void arp(u32 n)
{
    const u8 *a = rxbuf + 14;
    u16 op;
    if (n < 42 || get16(a) != 1 || get16(a + 2) != 0x0800 || a[4] != 6 || a[5] != 4)
        return;
    op = get16(a + 6);
    if ((op != 1 && op != 2) || memcmp(a + 24, myip, 4) != 0)
        return;
    arp_learn(a + 14, a + 8);
    if (op == 1)
        arp_send(2, a + 8, a + 8, a + 14);
}

/* ---- IPv4 ---- */

/* Fills the IPv4 header at txbuf+14 for `payload` bytes to `dst`. */
static void ip_hdr(const u8 *dst, u8 proto, u32 payload)
{
    u8 *h = txbuf + 14;
    h[0] = 0x45;
    h[1] = 0;
    put16(h + 2, (u16)(20 + payload));
    put16(h + 4, ip_ident++);
    put16(h + 6, 0x4000); /* DF */
    h[8] = 64;
    h[9] = proto;
    put16(h + 10, 0);
    memcpy(h + 12, myip, 4);
    memcpy(h + 16, dst, 4);
    put16(h + 10, csum_fold(csum_add(0, h, 20)));
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
    eth_hdr(rxbuf + 6, 0x0800);
    ip_hdr(ip + 12, 1, len);
    memcpy(r, m, len);
    r[0] = 0;
    put16(r + 2, 0);
    put16(r + 2, csum_fold(csum_add(0, r, len)));
    send(14 + 20 + len);
}

/* ---- TCP output ---- */

static u32 ring_used(const struct conn *c)
{
    u32 from = c->state == SYN_RCVD ? c->iss + 1 : c->snd_una;
    return c->data_end - from;
}

static u16 rcv_window(const struct conn *c)
{
    u32 free = SNDBUF - ring_used(c);
    return (u16)(free < REPLY_MAX ? 0 : free);
}

/* Sends one segment of connection c: `len` ring bytes from `seq`. Needs
 * the peer's MAC; without it asks by ARP and sends nothing (the
 * retransmission timer covers the loss). */
static void tcp_send(struct conn *c, u32 seq, u8 flags, u32 len)
{
    u8 *t = txbuf + 14 + 20;
    const u8 *dmac = arp_lookup(c->ip);
    u32 hl = (flags & TH_SYN) ? 24 : 20, i;
    if (!dmac) {
        arp_request(c->ip);
        return;
    }
    eth_hdr(dmac, 0x0800);
    ip_hdr(c->ip, 6, hl + len);
    put16(t, PORT);
    put16(t + 2, c->port);
    put32(t + 4, seq);
    put32(t + 8, c->rcv_nxt);
    t[12] = (u8)((hl / 4) << 4);
    t[13] = flags;
    put16(t + 14, rcv_window(c));
    put16(t + 16, 0);
    put16(t + 18, 0);
    if (flags & TH_SYN) {
        t[20] = 2; /* MSS */
        t[21] = 4;
        put16(t + 22, MSS_MAX);
    }
    for (i = 0; i < len; i++)
        t[hl + i] = c->ring[(seq + i) & SNDMASK];
    put16(t + 16, csum_fold(csum_add(pseudo(myip, c->ip, 6, hl + len), t, hl + len)));
    send(14 + 20 + hl + len);
}

static void timer_arm(struct conn *c)
{
    if (!c->rto_at)
        c->rto_at = clock_ns() + c->rto_ns;
}

/* Sends what is due from snd_nxt: the SYN-ACK, reply bytes within the
 * peer's window, then the FIN. `force` sends one segment even into a zero
 * window (a retransmission or window probe). Returns segments sent. */
static u32 tcp_push(struct conn *c, int force)
{
    u32 sent = 0;
    if (c->state == SYN_RCVD) {
        if (c->snd_nxt == c->iss) {
            tcp_send(c, c->iss, TH_SYN | TH_ACK, 0);
            c->snd_nxt = c->iss + 1;
            if (seq_lt(c->snd_max, c->snd_nxt))
                c->snd_max = c->snd_nxt;
            timer_arm(c);
            sent++;
        }
        return sent;
    }
    while (seq_lt(c->snd_nxt, c->data_end)) {
        u32 len = c->data_end - c->snd_nxt;
        u32 wnd_end = c->snd_una + c->snd_wnd;
        u32 room = seq_lt(c->snd_nxt, wnd_end) ? wnd_end - c->snd_nxt : 0;
        if (len > c->mss)
            len = c->mss;
        if (len > room)
            len = room;
        if (len == 0) {
            if (!force)
                break;
            len = 1;
        }
        force = 0;
        tcp_send(c, c->snd_nxt, TH_ACK | TH_PSH, len);
        c->snd_nxt += len;
        if (seq_lt(c->snd_max, c->snd_nxt))
            c->snd_max = c->snd_nxt;
        timer_arm(c);
        sent++;
    }
    if (c->fin_queued && c->snd_nxt == c->data_end) {
        tcp_send(c, c->data_end, TH_FIN | TH_ACK, 0);
        c->snd_nxt = c->data_end + 1;
        if (seq_lt(c->snd_max, c->snd_nxt))
            c->snd_max = c->snd_nxt;
        timer_arm(c);
        sent++;
    }
    return sent;
}

/* Go-back-N from the oldest unacknowledged sequence number. */
static void tcp_retransmit(struct conn *c)
{
    c->snd_nxt = c->snd_una;
    c->rto_at = 0;
    tcp_push(c, 1);
}

static void tcp_free(struct conn *c, const char *why)
{
    puts_("tcp close ");
    put_ip(c->ip);
    putc_(':');
    putu(c->port);
    puts_(" lines ");
    putu(c->lines);
    putc_(' ');
    puts_(why);
    putc_('\n');
    c->state = CLOSED;
    c->rto_at = 0;
}

static void tcp_timers(void)
{
    u32 i;
    clock_ns();
    for (i = 0; i < NCONN; i++) {
        struct conn *c = &conns[i];
        if (c->state == CLOSED || !c->rto_at || now < c->rto_at)
            continue;
        timeouts++;
        if (++c->retries > MAX_RETRIES) {
            tcp_send(c, c->snd_nxt, TH_RST | TH_ACK, 0);
            tcp_free(c, "timeout");
            continue;
        }
        c->rto_ns *= 2;
        if (c->rto_ns > RTO_MAX_NS)
            c->rto_ns = RTO_MAX_NS;
        puts_("tcp rto ");
        putu(c->retries);
        putc_('\n');
        tcp_retransmit(c);
    }
}

/* ---- TCP input ---- */

/* Answers a segment that belongs to no connection (RFC 793 "reset
 * generation"), replying to the frame's sender. */
static void tcp_rst_reply(const u8 *ip, const u8 *t, u32 seglen)
{
    u8 *r = txbuf + 14 + 20;
    u8 flags = t[13];
    if (flags & TH_RST)
        return;
    resets_sent++;
    eth_hdr(rxbuf + 6, 0x0800);
    ip_hdr(ip + 12, 6, 20);
    memcpy(r, t + 2, 2);
    memcpy(r + 2, t, 2);
    if (flags & TH_ACK) {
        memcpy(r + 4, t + 8, 4);
        put32(r + 8, 0);
        r[13] = TH_RST;
    } else {
        put32(r + 4, 0);
        put32(r + 8, get32(t + 4) + seglen);
        r[13] = TH_RST | TH_ACK;
    }
    r[12] = 5 << 4;
    put16(r + 14, 0);
    put16(r + 16, 0);
    put16(r + 18, 0);
    put16(r + 16, csum_fold(csum_add(pseudo(myip, ip + 12, 6, 20), r, 20)));
    send(14 + 40);
}

/* MSS option of a SYN; 536 (RFC 1122 default) without one. Options are
 * walked with bounds checks: a malformed list ends the walk. */
static u16 syn_mss(const u8 *t, u32 hl)
{
    u32 i = 20;
    while (i < hl) {
        u8 kind = t[i];
        if (kind == 0)
            break;
        if (kind == 1) {
            i++;
            continue;
        }
        if (i + 1 >= hl || t[i + 1] < 2 || i + t[i + 1] > hl)
            break;
        if (kind == 2 && t[i + 1] == 4) {
            u16 m = get16(t + i + 2);
            if (m < 64)
                m = 64;
            return m > MSS_MAX ? MSS_MAX : m;
        }
        i += t[i + 1];
    }
    return 536;
}

static struct conn *tcp_accept(const u8 *ip, const u8 *t, u32 hl)
{
    u32 i;
    for (i = 0; i < NCONN; i++) {
        struct conn *c = &conns[i];
        if (c->state != CLOSED)
            continue;
        memcpy(c->ip, ip + 12, 4);
        c->port = get16(t);
        c->mss = syn_mss(t, hl);
        c->irs = get32(t + 4);
        c->rcv_nxt = c->irs + 1;
        /* ISN from the clock (4 µs ticks, as RFC 793 suggests) and the
         * slot, so a reused 4-tuple starts elsewhere. */
        c->iss = (u32)(clock_ns() >> 12) + i * 0x10000000u;
        c->snd_una = c->snd_nxt = c->snd_max = c->iss;
        c->data_end = c->iss + 1;
        c->snd_wnd = get16(t + 14);
        c->fin_queued = 0;
        c->retries = 0;
        c->rto_ns = RTO_INIT_NS;
        c->rto_at = 0;
        c->lines = 0;
        c->state = SYN_RCVD;
        puts_("tcp conn ");
        put_ip(c->ip);
        putc_(':');
        putu(c->port);
        putc_('\n');
        return c;
    }
    return 0;
}

/* Takes request bytes (the segment's payload from offset `skip`) at
 * rcv_nxt. Each "\n" appends the reply; stops when the ring could not hold
 * one more reply. Returns the bytes consumed. */
static u32 tcp_consume(struct conn *c, const u8 *data, u32 len)
{
    u32 i;
    for (i = 0; i < len; i++) {
        if (SNDBUF - ring_used(c) < REPLY_MAX)
            break;
        if (data[i] == '\n') {
            char buf[REPLY_MAX];
            char *p;
            buf[REPLY_MAX - 1] = '\n';
            p = fmt_u64(&buf[REPLY_MAX - 1], ++counter);
            while (p < buf + REPLY_MAX)
                c->ring[c->data_end++ & SNDMASK] = (u8)*p++;
            c->lines++;
            if ((counter & 1023) == 0) {
                puts_("tcp counter ");
                putu(counter);
                putc_('\n');
            }
        }
    }
    c->rcv_nxt += i;
    return i;
}

static void tcp(const u8 *ip, const u8 *t, u32 len)
{
    struct conn *c = 0;
    u32 hl, seq, ack, plen, i, seglen, skip;
    u8 flags;
    int acked_new = 0;
    if (len < 20)
        return;
    if (csum_fold(csum_add(pseudo(ip + 12, ip + 16, 6, len), t, len)) != 0) {
        bad_csum++;
        return;
    }
    hl = (u32)(t[12] >> 4) * 4;
    if (hl < 20 || hl > len)
        return;
    flags = t[13];
    seq = get32(t + 4);
    ack = get32(t + 8);
    plen = len - hl;
    seglen = plen + ((flags & TH_SYN) ? 1 : 0) + ((flags & TH_FIN) ? 1 : 0);
    for (i = 0; i < NCONN; i++)
        if (conns[i].state != CLOSED && conns[i].port == get16(t) &&
            memcmp(conns[i].ip, ip + 12, 4) == 0) {
            c = &conns[i];
            break;
        }
    if (!c) {
        if ((flags & (TH_SYN | TH_ACK | TH_RST)) == TH_SYN && get16(t + 2) == PORT) {
            c = tcp_accept(ip, t, hl);
            if (c)
                tcp_push(c, 0);
            else
                tcp_rst_reply(ip, t, seglen); /* table full */
        } else {
            tcp_rst_reply(ip, t, seglen);
        }
        return;
    }
    if (get16(t + 2) != PORT)
        return;
    if (flags & TH_RST) {
        /* Accepted only at rcv_nxt or within the window (RFC 5961 would
         * challenge-ACK the latter; a server losing a connection to a
         * forged in-window RST is acceptable here). */
        if (seq_le(c->rcv_nxt, seq) && seq_lt(seq, c->rcv_nxt + SNDBUF))
            tcp_free(c, "reset by peer");
        return;
    }
    if (flags & TH_SYN) {
        if (c->state == SYN_RCVD && seq == c->irs)
            tcp_retransmit(c); /* our SYN-ACK was lost */
        else
            tcp_send(c, c->snd_nxt, TH_ACK, 0); /* challenge ACK */
        return;
    }
    if (!(flags & TH_ACK))
        return;
    if (c->state == SYN_RCVD) {
        if (ack != c->iss + 1) {
            tcp_rst_reply(ip, t, seglen);
            return;
        }
        c->state = ESTABLISHED;
    }
    /* ACK processing. */
    if (seq_lt(c->snd_max, ack)) {
        tcp_send(c, c->snd_nxt, TH_ACK, 0); /* acks what we never sent */
        return;
    }
    if (seq_lt(c->snd_una, ack)) {
        c->snd_una = ack;
        if (seq_lt(c->snd_nxt, ack))
            c->snd_nxt = ack;
        c->retries = 0;
        c->rto_ns = RTO_INIT_NS;
        c->rto_at = 0;
        if (c->snd_una != c->snd_max)
            timer_arm(c);
        acked_new = 1;
    }
    if (seq_le(c->snd_una, ack))
        c->snd_wnd = get16(t + 14);
    if (c->state == LAST_ACK && c->snd_una == c->data_end + 1) {
        tcp_free(c, "closed");
        return;
    }
    /* Data and FIN. */
    if (seglen == 0) {
        if (acked_new)
            tcp_push(c, 0);
        return;
    }
    if (c->state != ESTABLISHED) {
        /* After the peer's FIN nothing new can arrive: re-ACK. */
        tcp_send(c, c->snd_nxt, TH_ACK, 0);
        return;
    }
    if (seq_lt(c->rcv_nxt, seq)) {
        dropped_ooo++; /* out of order: drop, the duplicate ACK asks for the hole */
        tcp_send(c, c->snd_nxt, TH_ACK, 0);
        return;
    }
    skip = c->rcv_nxt - seq;
    if (skip >= seglen) {
        /* Entirely old: our ACK (and maybe our reply) was lost. */
        dup_segs++;
        if (c->snd_una != c->snd_nxt || seq_lt(c->snd_nxt, c->data_end))
            tcp_retransmit(c);
        else
            tcp_send(c, c->snd_nxt, TH_ACK, 0);
        return;
    }
    i = skip < plen ? tcp_consume(c, t + hl + skip, plen - skip) : 0;
    if ((flags & TH_FIN) && skip + i == plen) {
        c->rcv_nxt++;
        c->fin_queued = 1;
        c->state = LAST_ACK;
    }
    if (tcp_push(c, 0) == 0)
        tcp_send(c, c->snd_nxt, TH_ACK, 0);
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
    arp_learn(ip + 12, rxbuf + 6);
    if (ip[9] == 6)
        tcp(ip, ip + ihl, total - ihl);
    else if (ip[9] == 1)
        icmp(ip, ip + ihl, total - ihl);
}

void guest_main(const struct castor_boot_params *p)
{
    u32 lo, hi, i, polls = 0;
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
        puts_("tcpcount ip=");
        put_ip(myip);
        puts_(" port 7000 link=");
        putu(inl(CASTOR_NET_LINK));
        putc_('\n');
    }
    outl(CASTOR_NET_RX_ADDR, (u32)rxbuf);
    outl(CASTOR_NET_RX_SIZE, FRAME_BUF);
    for (;;) {
        u32 n = inl(CASTOR_NET_RX_POLL);
        if (++polls >= TIMER_EVERY) {
            polls = 0;
            tcp_timers();
        }
        if (n == 0 || n == CASTOR_NET_RX_ERROR || n < 14 || n > FRAME_BUF)
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
