/*
 * Benchmark and check firmware for simavr (tinylstm.perf builds it; no HIL).
 *
 * It steps the model generated with the prefix "bm" through the window in bench_model.h (in flash). Around
 * every step (and once around nothing, the marks' own cost) it writes GPIOR0, where the harness
 * boards/emulators/simavr_bench.c prints simavr's cycle counter; between steps it sends h and cell of every
 * layer over UART0, then the model's output, and stops (sleep with interrupts off).
 */
#include <avr/interrupt.h>
#include <avr/io.h>
#include <avr/pgmspace.h>
#include <avr/sleep.h>
#include <stdint.h>

#include "bench_model.h"

#define MARK() (GPIOR0 = 1)

static void put(const void *data, uint16_t size)
{
    const uint8_t *bytes = data;
    for (uint16_t k = 0; k < size; ++k) {
        while (!(UCSR0A & _BV(UDRE0))) {
        }
        UDR0 = bytes[k];
    }
}

int main(void)
{
    static int8_t x[BM_INPUT_SIZE];
    static int8_t out[BM_OUTPUT_SIZE];
    UBRR0 = 0;
    UCSR0A = _BV(U2X0);
    UCSR0B = _BV(TXEN0);
    MARK();
    MARK();
    bm_reset();
    for (uint16_t t = 0; t < BM_WINDOW; ++t) {
        memcpy_P(x, bench_window + (uint16_t)(t * BM_INPUT_SIZE), BM_INPUT_SIZE);
        MARK();
        bm_step(x);
        MARK();
        for (uint8_t layer = 0; layer < BM_LAYERS; ++layer) {
            put(bm_hidden(layer), bench_hidden[layer]);
            put(bm_cell(layer), 2u * bench_hidden[layer]);
        }
    }
    MARK();
    bm_output(out);
    MARK();
    put(out, BM_OUTPUT_SIZE);
    while (!(UCSR0A & _BV(TXC0))) {
    }
    cli();
    sleep_mode();
    return 0;
}
