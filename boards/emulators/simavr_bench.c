/*
 * Runs an AVR benchmark firmware under simavr to its end (tinylstm.perf).
 *
 *   simavr_bench [-m MCU] [-f HZ] [-c MARK_FILE] firmware.elf
 *
 * - Every byte the firmware sends on UART0 is written to stdout (simavr's own messages go to stderr).
 * - Every firmware write to GPIOR0 appends "mark <cycle>" (simavr's cycle counter) to MARK_FILE (default
 *   stderr), so differences between marks are exact cycle counts.
 * - Exits 0 when the firmware stops (sleep with interrupts off), 1 if it crashes or cannot be loaded.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "avr_uart.h"
#include "sim_avr.h"
#include "sim_elf.h"
#include "sim_io.h"
#include "sim_irq.h"

#define GPIOR0_DATA_ADDR 0x3E /* I/O 0x1E on the ATmega328P, seen in data space */

static FILE *marks;
static FILE *uart_out;

static void on_gpior0_write(struct avr_t *avr, avr_io_addr_t addr, uint8_t v, void *param)
{
    (void)param;
    avr->data[addr] = v;
    fprintf(marks, "mark %llu\n", (unsigned long long)avr->cycle);
}

static void on_uart_output(struct avr_irq_t *irq, uint32_t value, void *param)
{
    (void)irq;
    (void)param;
    fputc((int)(value & 0xFF), uart_out);
}

int main(int argc, char **argv)
{
    const char *mcu = "atmega328p";
    unsigned long frequency = 16000000;
    const char *mark_path = NULL;
    int opt;
    while ((opt = getopt(argc, argv, "m:f:c:")) != -1) {
        if (opt == 'm') {
            mcu = optarg;
        } else if (opt == 'f') {
            frequency = strtoul(optarg, NULL, 10);
        } else if (opt == 'c') {
            mark_path = optarg;
        } else {
            return 2;
        }
    }
    if (optind != argc - 1) {
        fprintf(stderr, "usage: simavr_bench [-m MCU] [-f HZ] [-c MARK_FILE] firmware.elf\n");
        return 2;
    }
    /* simavr reports on stdout while loading: keep stdout for the UART bytes only. */
    uart_out = fdopen(dup(STDOUT_FILENO), "wb");
    if (uart_out == NULL || dup2(STDERR_FILENO, STDOUT_FILENO) < 0) {
        perror("simavr_bench");
        return 1;
    }
    marks = mark_path ? fopen(mark_path, "w") : stderr;
    if (marks == NULL) {
        perror(mark_path);
        return 1;
    }
    elf_firmware_t firmware;
    memset(&firmware, 0, sizeof firmware);
    if (elf_read_firmware(argv[optind], &firmware) != 0) {
        fprintf(stderr, "simavr_bench: cannot read %s\n", argv[optind]);
        return 1;
    }
    avr_t *avr = avr_make_mcu_by_name(mcu);
    if (avr == NULL) {
        fprintf(stderr, "simavr_bench: unknown MCU %s\n", mcu);
        return 1;
    }
    avr_init(avr);
    avr->frequency = frequency;
    avr->log = LOG_NONE;
    avr_load_firmware(avr, &firmware);
    avr_register_io_write(avr, GPIOR0_DATA_ADDR, on_gpior0_write, NULL);
    uint32_t flags = 0;
    avr_ioctl(avr, AVR_IOCTL_UART_GET_FLAGS('0'), &flags);
    flags &= ~AVR_UART_FLAG_STDIO;
    avr_ioctl(avr, AVR_IOCTL_UART_SET_FLAGS('0'), &flags);
    avr_irq_register_notify(avr_io_getirq(avr, AVR_IOCTL_UART_GETIRQ('0'), UART_IRQ_OUTPUT), on_uart_output, NULL);
    int state = cpu_Running;
    while (state != cpu_Done && state != cpu_Crashed) {
        state = avr_run(avr);
    }
    fflush(uart_out);
    fflush(marks);
    return state == cpu_Done ? 0 : 1;
}
