/* castor kvm guest ABI, shared by the VMM (src/domain/kvm) and guest
 * authors; guests/README.md is the prose version. Keep both in sync. */
#ifndef CASTOR_ABI_H
#define CASTOR_ABI_H

/* Boot params: the VMM writes this struct at CASTOR_BOOT_PARAMS_GPA before
 * the first instruction and passes its address in EBX. */
#define CASTOR_BOOT_PARAMS_GPA 0x1000u
#define CASTOR_BOOT_MAGIC 0x31504243u /* "CBP1" little-endian */
#define CASTOR_BOOT_VERSION 2u /* v2 appended ip */

#define CASTOR_PATTERN_SEQUENTIAL 0u
#define CASTOR_PATTERN_RANDOM 1u
#define CASTOR_PATTERN_SWEEP 2u

struct castor_boot_params {
    u32 magic;
    u32 version;
    u32 mem_size;     /* bytes of guest RAM from gpa 0 */
    u32 sums_gpa;     /* memtouch: page of per-region checksums */
    u32 data_gpa;     /* memtouch: first data region */
    u32 regions;      /* memtouch: number of regions */
    u32 region_pages; /* memtouch: pages per region */
    u32 touch;        /* memtouch: words written per iteration */
    u32 pattern;      /* memtouch: CASTOR_PATTERN_* */
    u32 seed;         /* memtouch: RNG seed (non-zero) */
    u32 ip;           /* guest IPv4 address, first octet in the low byte; 0 if none */
};

/* 16550-style UART (COM1). */
#define CASTOR_SERIAL_BASE 0x3f8
/* Paravirtual clock: 32-bit IN from CLOCK_LO latches the 64-bit guest time
 * in ns and returns its low half; IN from CLOCK_HI returns the latched high
 * half. */
#define CASTOR_CLOCK_LO 0x5f0
#define CASTOR_CLOCK_HI 0x5f4

/* Paravirtual NIC (guests/README.md): 32-bit port registers. */
#define CASTOR_NET_BASE 0x6000
#define CASTOR_NET_MAC_LO (CASTOR_NET_BASE + 0x00)  /* IN: MAC bytes 0..3 */
#define CASTOR_NET_MAC_HI (CASTOR_NET_BASE + 0x04)  /* IN: MAC bytes 4..5 */
#define CASTOR_NET_TX_ADDR (CASTOR_NET_BASE + 0x08) /* IN/OUT: frame gpa */
#define CASTOR_NET_TX_LEN (CASTOR_NET_BASE + 0x0c)  /* OUT: send; IN: status */
#define CASTOR_NET_RX_ADDR (CASTOR_NET_BASE + 0x10) /* IN/OUT: buffer gpa */
#define CASTOR_NET_RX_SIZE (CASTOR_NET_BASE + 0x14) /* IN/OUT: buffer bytes */
#define CASTOR_NET_RX_POLL (CASTOR_NET_BASE + 0x18) /* IN: frame length or 0 */
#define CASTOR_NET_LINK (CASTOR_NET_BASE + 0x1c)    /* IN: 1 = backend */
#define CASTOR_NET_TX_OK 0u
#define CASTOR_NET_TX_BAD_LEN 1u
#define CASTOR_NET_TX_BAD_ADDR 2u
#define CASTOR_NET_TX_NO_LINK 3u
#define CASTOR_NET_RX_ERROR 0xffffffffu
#define CASTOR_NET_MAX_FRAME 1514u

/* Paravirtual block device (guests/README.md): 32-bit port registers. */
#define CASTOR_BLK_BASE 0x6100
#define CASTOR_BLK_SECTOR_LO (CASTOR_BLK_BASE + 0x00)
#define CASTOR_BLK_SECTOR_HI (CASTOR_BLK_BASE + 0x04)
#define CASTOR_BLK_COUNT (CASTOR_BLK_BASE + 0x08) /* 1..=256 sectors */
#define CASTOR_BLK_BUF (CASTOR_BLK_BASE + 0x0c)   /* buffer gpa */
#define CASTOR_BLK_CMD (CASTOR_BLK_BASE + 0x10)   /* OUT: runs the command */
#define CASTOR_BLK_STATUS (CASTOR_BLK_BASE + 0x14)
#define CASTOR_BLK_CAP_LO (CASTOR_BLK_BASE + 0x18) /* image size in sectors */
#define CASTOR_BLK_CAP_HI (CASTOR_BLK_BASE + 0x1c)
#define CASTOR_BLK_SECTOR_SIZE 512u
#define CASTOR_BLK_CMD_READ 1u
#define CASTOR_BLK_CMD_WRITE 2u
#define CASTOR_BLK_CMD_FLUSH 3u
#define CASTOR_BLK_OK 0u
#define CASTOR_BLK_NO_DISK 1u
#define CASTOR_BLK_BAD_SECTOR 2u
#define CASTOR_BLK_BAD_BUFFER 3u
#define CASTOR_BLK_IO_ERROR 4u
#define CASTOR_BLK_BAD_COMMAND 5u
#define CASTOR_BLK_BAD_COUNT 6u

#endif
