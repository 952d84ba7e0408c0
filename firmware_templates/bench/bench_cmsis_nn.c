/*
 * CMSIS-NN's arm_lstm_unidirectional_s8 on a tinylstm model, for the side-by-side comparison of
 * `tinylstm bench --suite --cmsis-nn DIR` (tinylstm.perf builds it with CMSIS-NN's sources from DIR, the same
 * compiler and flags as the tinylstm kernels, and the run-time of bench_cortexm.h).
 *
 * bench_cmsis_nn_model.h (generated from the model) holds the layer's weights, effective biases (TFLite Micro's
 * preparation: bias - input zero point * rowsum(input weights) for the input half, -h's zero point *
 * rowsum(hidden weights) for the h half) and constants, and CM_STEPS input samples. CMSIS-NN starts every call
 * from h = h's zero point and cell = 0 (no hidden_state given), so the firmware marks around one call of 1 step
 * and one of CM_STEPS steps (and once around nothing, the marks' own cost): the steady step is their difference
 * over CM_STEPS - 1. It then writes h after every step of the long call and the final cell to bench.out.
 */
#include <stdint.h>

#include "arm_nnfunctions.h"
#include "bench_cmsis_nn_model.h"
#include "bench_cortexm.h"

static int16_t temp1[CM_HIDDEN_SIZE], temp2[CM_HIDDEN_SIZE], cell[CM_HIDDEN_SIZE];
static int8_t out[CM_STEPS * CM_HIDDEN_SIZE];

/* Gate g of the tinylstm order (input, forget, cell, output). */
static cmsis_nn_lstm_gate gate(unsigned g, arm_nn_activation_type activation)
{
    const cmsis_nn_lstm_gate result = {
        .input_multiplier = cm_scales[g][0],
        .input_shift = cm_scales[g][1],
        .input_weights = cm_input_weights[g],
        .input_effective_bias = cm_input_bias[g],
        .hidden_multiplier = cm_scales[g][2],
        .hidden_shift = cm_scales[g][3],
        .hidden_weights = cm_hidden_weights[g],
        .hidden_effective_bias = cm_hidden_bias[g],
        .bias = cm_bias[g],
        .activation_type = activation,
    };
    return result;
}

static arm_cmsis_nn_status call(int32_t steps)
{
    const cmsis_nn_lstm_params params = {
        .time_major = 1,
        .batch_size = 1,
        .time_steps = steps,
        .input_size = CM_INPUT_SIZE,
        .hidden_size = CM_HIDDEN_SIZE,
        .input_offset = -CM_INPUT_ZERO_POINT,
        .forget_to_cell_multiplier = CM_FORGET_TO_CELL_MULTIPLIER,
        .forget_to_cell_shift = CM_FORGET_TO_CELL_SHIFT,
        .input_to_cell_multiplier = CM_INPUT_TO_CELL_MULTIPLIER,
        .input_to_cell_shift = CM_INPUT_TO_CELL_SHIFT,
        .cell_clip = CM_CELL_CLIP,
        .cell_scale_power = CM_CELL_SCALE_POWER,
        .output_multiplier = CM_OUTPUT_MULTIPLIER,
        .output_shift = CM_OUTPUT_SHIFT,
        .output_offset = CM_OUTPUT_ZERO_POINT,
        .forget_gate = gate(1u, ARM_SIGMOID),
        .input_gate = gate(0u, ARM_SIGMOID),
        .cell_gate = gate(2u, ARM_TANH),
        .output_gate = gate(3u, ARM_SIGMOID),
    };
    cmsis_nn_lstm_context buffers = {.temp1 = temp1, .temp2 = temp2, .cell_state = cell};
    bench_mark();
    const arm_cmsis_nn_status status = arm_lstm_unidirectional_s8(cm_window, out, &params, &buffers);
    bench_mark();
    return status;
}

int main(void)
{
    if (bench_open() != 0) {
        return 2;
    }
    bench_mark(); /* an empty pair: the cost of the marks themselves */
    bench_mark();
    if (call(1) != ARM_CMSIS_NN_SUCCESS || call(CM_STEPS) != ARM_CMSIS_NN_SUCCESS) {
        return 4;
    }
    bench_put(out, sizeof out);
    bench_put(cell, sizeof cell);
    bench_close();
    return 0;
}
