/*
 * tinylstm reference kernel: the int8 LSTM (TFLite-Micro / CMSIS-NN arithmetic) and the int8 dense head.
 *
 * Portable C99, no allocation, no floating point. Every function is bit-exact with tinylstm/reference.py;
 * docs/quantization.md gives the rounding rules. Optimized variants keep this API and these results.
 *
 * Model constants (weights, biases, multipliers, shifts, the parameter structs and the sigmoid table) are
 * read-only and live in flash. On AVR they are declared PROGMEM and read with pgm_read_* / memcpy_P, so they
 * must lie in the first 64 KB of flash. State and scratch buffers are in RAM and owned by the caller
 * (the generated model code keeps them in static arrays).
 *
 * Assumption: int8_t, int16_t, int32_t and int64_t exist (C99 guarantees they are two's complement).
 */
#ifndef TINYLSTM_KERNEL_H
#define TINYLSTM_KERNEL_H

#include <stddef.h>
#include <stdint.h>

#if defined(__AVR__)
#include <avr/pgmspace.h>
#define TINYLSTM_FLASH PROGMEM
#else
#define TINYLSTM_FLASH
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* sigmoid(i / 24) in unsigned Q0.16 for i = 0..255; stored once per firmware. */
extern const uint16_t tinylstm_sigmoid_table[256] TINYLSTM_FLASH;

/*
 * One LSTM layer. Arrays in [4][...] order are per gate: input, forget, cell, output.
 * The zero points of the layer input and of h are folded into the two effective biases.
 */
typedef struct {
    const int8_t *input_weights;      /* [4][hidden_size][input_size] */
    const int8_t *hidden_weights;     /* [4][hidden_size][hidden_size] */
    const int32_t *input_bias;        /* [4][hidden_size]: bias - input_zero_point * rowsum(input_weights) */
    const int32_t *hidden_bias;       /* [4][hidden_size]: -output_zero_point * rowsum(hidden_weights) */
    const int32_t *input_multiplier;  /* [4], or [4][hidden_size] when per_channel */
    const int8_t *input_shift;        /* same shape as input_multiplier */
    const int32_t *hidden_multiplier; /* same shape as input_multiplier */
    const int8_t *hidden_shift;       /* same shape as input_multiplier */
    int32_t forget_to_cell_multiplier; /* forget * cell -> cell */
    int32_t input_to_cell_multiplier;  /* input * candidate -> cell */
    int32_t output_multiplier;         /* output * tanh(cell) -> h */
    uint16_t input_size;
    uint16_t hidden_size;
    int16_t cell_min;                  /* cell_min <= cell <= cell_max: -cell_clip and cell_clip, */
    int16_t cell_max;                  /* or -32768 and 32767 when cell_clip is 0 (no clipping) */
    int8_t forget_to_cell_shift;
    int8_t input_to_cell_shift;
    int8_t output_shift;
    int8_t cell_tanh_shift;            /* cell_scale_power + 12: tanh input scaling of the cell state */
    int8_t output_zero_point;          /* zero point of h */
    uint8_t per_channel;               /* 1: gate multipliers and shifts per gate row */
} tinylstm_lstm_params;

/* The dense head on the last hidden state (TFLite FULLY_CONNECTED arithmetic). */
typedef struct {
    const int8_t *weights;      /* [output_size][input_size] */
    const int32_t *bias;        /* [output_size]: bias - input_zero_point * rowsum(weights) */
    const int32_t *multiplier;  /* [1], or [output_size] when per_channel */
    const int8_t *shift;        /* same shape as multiplier */
    uint16_t input_size;
    uint16_t output_size;
    int8_t output_zero_point;
    uint8_t per_channel;
} tinylstm_dense_params;

/* h = output zero point, cell = 0. params points to flash. */
void tinylstm_lstm_reset(const tinylstm_lstm_params *params, int8_t *h, int16_t *cell);

/*
 * One time step: reads x [input_size] and the previous h, updates h and cell [hidden_size] in place.
 * scratch holds hidden_size bytes; x must not alias h or scratch.
 */
void tinylstm_lstm_step(const tinylstm_lstm_params *params, const int8_t *x, int8_t *h, int16_t *cell,
                        int8_t *scratch);

/* out [output_size] = the head applied to x [input_size]. */
void tinylstm_dense(const tinylstm_dense_params *params, const int8_t *x, int8_t *out);

/*
 * value * multiplier * 2^(shift - 31), rounded as TFLite's MultiplyByQuantizedMultiplier.
 * multiplier in [0, 2^31), shift in [-31, 30].
 */
int32_t tinylstm_requantize(int32_t value, int32_t multiplier, int shift);

/* sigmoid of a Q3.12 value, as Q0.15. */
int16_t tinylstm_sigmoid(int16_t x);

/* tanh of x * 2^(left_shift - 12), as Q0.15. left_shift in [-31, 11]. */
int16_t tinylstm_tanh(int16_t x, int left_shift);

#ifdef __cplusplus
}
#endif

#endif /* TINYLSTM_KERNEL_H */
