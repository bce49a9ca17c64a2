/* castor kvm guest ABI, shared by the VMM (src/domain/kvm) and guest
 * authors; guests/README.md is the prose version. Keep both in sync. */
#ifndef CASTOR_ABI_H
#define CASTOR_ABI_H

/* Boot params: the VMM writes this struct at CASTOR_BOOT_PARAMS_GPA before
 * the first instruction and passes its address in EBX. */
#define CASTOR_BOOT_PARAMS_GPA 0x1000u
#define CASTOR_BOOT_MAGIC 0x31504243u /* "CBP1" little-endian */
#define CASTOR_BOOT_VERSION 1u

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
};

/* 16550-style UART (COM1). */
#define CASTOR_SERIAL_BASE 0x3f8
/* Paravirtual clock: 32-bit IN from CLOCK_LO latches the 64-bit guest time
 * in ns and returns its low half; IN from CLOCK_HI returns the latched high
 * half. */
#define CASTOR_CLOCK_LO 0x5f0
#define CASTOR_CLOCK_HI 0x5f4

#endif
