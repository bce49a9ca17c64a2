/* Entry of every castor test guest: the VMM starts the vCPU here in 32-bit protected mode with
 * flat segments, paging off, interrupts off, ESP set to the top of the boot
 * stack and EBX holding the guest-physical address of the boot params. */
    .section .text.entry, "ax"
    .code32
    .globl _start
_start:
    cli
    cld
    pushl %ebx
    call guest_main      /* each guest's main.c defines it */
1:  cli
    hlt
    jmp 1b
