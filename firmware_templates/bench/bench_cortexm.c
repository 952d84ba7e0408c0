/*
 * Benchmark and check firmware for the QEMU Cortex-M boards (tinylstm.perf builds it; no HIL, no UART).
 *
 * It steps the model generated with the prefix "bm" through the window in bench_model.h. Around every step it
 * (and once around nothing, the marks' own cost) calls bench_mark(), whose entry the instruction-count plugin (boards/emulators/qemu_insn_count.c) watches;
 * between steps it appends h and cell of every layer to the host file bench.out through semihosting, then the
 * model's output, and exits through semihosting with status 0.
 */
#include <stdint.h>
#include <string.h>

#include "bench_model.h"

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

/* The instruction-count plugin samples its counter when this function is entered. */
__attribute__((noinline)) void bench_mark(void)
{
    __asm__ volatile("" ::: "memory");
}

static int out_file;

static void put(const void *data, uint32_t size)
{
    const uint32_t block[3] = {(uint32_t)out_file, (uint32_t)data, size};
    semihost(0x05, block); /* SYS_WRITE */
}

int main(void)
{
    static const char name[] = "bench.out";
    const uint32_t open_block[3] = {(uint32_t)name, 5u /* "wb" */, sizeof name - 1u};
    out_file = semihost(0x01, open_block); /* SYS_OPEN */
    if (out_file < 0) {
        return 2;
    }
    bench_mark(); /* an empty pair: the cost of the marks themselves */
    bench_mark();
    bm_reset();
    for (uint32_t t = 0; t < BM_WINDOW; ++t) {
        bench_mark();
        bm_step(bench_window + t * BM_INPUT_SIZE);
        bench_mark();
        for (uint8_t layer = 0; layer < BM_LAYERS; ++layer) {
            put(bm_hidden(layer), bench_hidden[layer]);
            put(bm_cell(layer), 2u * bench_hidden[layer]);
        }
    }
    int8_t out[BM_OUTPUT_SIZE];
    bench_mark();
    bm_output(out);
    bench_mark();
    put(out, BM_OUTPUT_SIZE);
    const uint32_t close_block[1] = {(uint32_t)out_file};
    semihost(0x02, close_block); /* SYS_CLOSE */
    return 0;
}
