/* The run-time of the QEMU Cortex-M benchmark firmware: see bench_cortexm.h. */
#include "bench_cortexm.h"

#include <string.h>

extern uint32_t _sidata, _sdata, _edata, _sbss, _ebss, _estack;

int main(void);

static int semihost(int operation, const void *argument)
{
    register int r0 __asm__("r0") = operation;
    register const void *r1 __asm__("r1") = argument;
    __asm__ volatile("bkpt 0xab" : "+r"(r0) : "r"(r1) : "memory");
    return r0;
}

static void bench_exit(int status)
{
    const uint32_t block[2] = {0x20026u, (uint32_t)status}; /* ADP_Stopped_ApplicationExit */
    semihost(0x20, block);                                   /* SYS_EXIT_EXTENDED */
    for (;;) {
    }
}

void Reset_Handler(void)
{
    memcpy(&_sdata, &_sidata, (size_t)((char *)&_edata - (char *)&_sdata));
    memset(&_sbss, 0, (size_t)((char *)&_ebss - (char *)&_sbss));
    bench_exit(main());
}

static void Fault_Handler(void)
{
    bench_exit(3);
}

__attribute__((section(".vectors"), used)) static const void *const vectors[16] = {
    &_estack, (const void *)Reset_Handler, (const void *)Fault_Handler, (const void *)Fault_Handler,
    (const void *)Fault_Handler, (const void *)Fault_Handler, (const void *)Fault_Handler,
};

__attribute__((noinline)) void bench_mark(void)
{
    __asm__ volatile("" ::: "memory");
}

static int out_file = -1;

int bench_open(void)
{
    static const char name[] = "bench.out";
    const uint32_t block[3] = {(uint32_t)name, 5u /* "wb" */, sizeof name - 1u};
    out_file = semihost(0x01, block); /* SYS_OPEN */
    return out_file < 0;
}

void bench_put(const void *data, uint32_t size)
{
    const uint32_t block[3] = {(uint32_t)out_file, (uint32_t)data, size};
    semihost(0x05, block); /* SYS_WRITE */
}

void bench_close(void)
{
    const uint32_t block[1] = {(uint32_t)out_file};
    semihost(0x02, block); /* SYS_CLOSE */
}
