/*
 * Benchmark and check firmware for the QEMU Cortex-M boards (tinylstm.perf builds it; no HIL, no UART).
 *
 * It steps the model generated with the prefix "bm" through the window in bench_model.h. Around every step (and
 * once around nothing, the marks' own cost) it calls bench_mark(); between steps it appends h and cell of every
 * layer to bench.out, then the model's output (bench_cortexm.h).
 */
#include <stdint.h>

#include "bench_cortexm.h"
#include "bench_model.h"

int main(void)
{
    if (bench_open() != 0) {
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
            bench_put(bm_hidden(layer), bench_hidden[layer]);
            bench_put(bm_cell(layer), 2u * bench_hidden[layer]);
        }
    }
    int8_t out[BM_OUTPUT_SIZE];
    bench_mark();
    bm_output(out);
    bench_mark();
    bench_put(out, BM_OUTPUT_SIZE);
    bench_close();
    return 0;
}
