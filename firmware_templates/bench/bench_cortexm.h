/*
 * The run-time of the QEMU Cortex-M benchmark firmware (bench_cortexm_runtime.c): start-up, the marks the
 * instruction-count plugin (boards/emulators/qemu_insn_count.c) watches, and the host file bench.out written
 * through semihosting. A benchmark main() opens the file, marks around what it measures, writes its results and
 * returns 0; the run-time then exits QEMU with main()'s status (3 after a fault).
 */
#ifndef BENCH_CORTEXM_H
#define BENCH_CORTEXM_H

#include <stdint.h>

/* The plugin samples the instruction count when this function is entered. */
void bench_mark(void);

/* Open bench.out on the host for writing; 0 on success. */
int bench_open(void);

/* Append size bytes to bench.out. */
void bench_put(const void *data, uint32_t size);

void bench_close(void);

#endif /* BENCH_CORTEXM_H */
