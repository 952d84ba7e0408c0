/*
 * tinylstm AVR kernel (ATmega, avr-gcc): the layer step routine, tl_avr_layer, that the code tinylstm generates
 * per model calls (see docs/performance.md). Same results as the reference kernel, bit for bit.
 *
 * Matrix part. Each step first copies the layer input and h to RAM as unsigned bytes x' = x + 128, and the
 * generator stores every weight as w' = w + 128 in flash, the four gates of one input side by side. Then
 * sum(w x) = sum(w' x') - 128 sum(w) - 128 sum(x'): the middle term is folded into the stored bias and the last
 * is one correction per step, so the inner loop multiplies unsigned bytes (MUL) and adds the unsigned 16-bit
 * product into a 24-bit accumulator with no sign handling: LPM Z+ (3 cycles), MUL (2), ADD/ADC/ADC (3) per
 * multiply-accumulate, and the input byte (LD X+, 2 cycles) is shared by the unit's four gate rows. A pass
 * covers at most 255 inputs, so a 24-bit accumulator never overflows (255 * 255 * 255 < 2^24); longer rows
 * take several passes, added up in 32 bits.
 *
 * Gate arithmetic. Requantization is the reference's, with its 32 x 32 -> 64-bit rounding doubling high
 * multiply as sixteen MULs in assembly (a multiplier of 2^30, TFLite's power-of-two cell scales, is a rounding
 * halving instead) and the rounding right shift done bytewise; sigmoid and tanh interpolate the shared table in
 * 16-bit arithmetic.
 *
 * tl_avr_layer reads every size and constant of a layer from its flash struct, so its code is the same for every
 * layer and model, and the planner's code figure is exact. The assembly and the always-inlined helpers keep -O2
 * and -Os within a few percent of each other.
 */
#ifndef TINYLSTM_KERNEL_AVR_H
#define TINYLSTM_KERNEL_AVR_H

#include <stdint.h>

#include "tinylstm_kernel.h"

#if defined(__AVR__)
#define TL_AVR_READ_I32(p) ((int32_t)pgm_read_dword(p))
#define TL_AVR_READ_I8(p) ((int8_t)pgm_read_byte(p))
#define TL_AVR_READ_STRUCT(dst, src) memcpy_P((dst), (src), sizeof *(dst))
#define TL_AVR_TABLE(i) pgm_read_word(&tinylstm_sigmoid_table[i])
#else
#include <string.h>
#define TL_AVR_READ_I32(p) (*(p))
#define TL_AVR_READ_I8(p) (*(p))
#define TL_AVR_READ_STRUCT(dst, src) memcpy((dst), (src), sizeof *(dst))
#define TL_AVR_TABLE(i) tinylstm_sigmoid_table[i]
#endif

/*
 * One layer's constants (in flash; tinylstm/export.py writes them). Per unit, the weights hold the input half then
 * the h half, for each input the four gates' w + 128; the biases, multipliers and shifts are in the order x half
 * i f g o, h half i f g o. Gate multipliers and shifts are per unit (gate_step 8) or shared (gate_step 0).
 */
typedef struct {
    const uint8_t *weights;
    const int32_t *bias;       /* bias + zero-point terms - 128 * rowsum(w), per unit */
    const int32_t *multiplier;
    const int8_t *shift;
    int32_t forget_to_cell_multiplier;
    int32_t input_to_cell_multiplier;
    int32_t output_multiplier;
    uint16_t input_size;
    uint16_t hidden_size;
    int16_t cell_min; /* the cell's bounds: -cell_clip and cell_clip, or the int16 range when cell_clip is 0 */
    int16_t cell_max;
    int8_t forget_to_cell_shift;
    int8_t input_to_cell_shift;
    int8_t output_shift;
    int8_t cell_tanh_shift;
    int8_t output_zero_point;
    uint8_t gate_step;
} tinylstm_avr_layer_params;

/* Always inlined, so the small helpers compile the same at -Os as at -O2. */
#define TL_AVR_INLINE inline __attribute__((always_inline))

/* Out of line and never specialised to constant arguments: code size does not depend on the model's constants. */
#if defined(__GNUC__) && !defined(__clang__)
#define TL_AVR_OUT_OF_LINE __attribute__((noinline, noclone, unused))
#else
#define TL_AVR_OUT_OF_LINE __attribute__((noinline, unused))
#endif

/* x'[k] = x[k] + 128 as unsigned bytes; returns -128 * sum(x') (two's complement), the per-step correction. */
static TL_AVR_INLINE uint32_t tl_avr_expand(const int8_t *x, uint16_t n, uint8_t *out)
{
    uint32_t sum = 0;
    for (uint16_t k = 0; k < n; ++k) {
        const uint8_t v = (uint8_t)((uint8_t)x[k] ^ 0x80u);
        out[k] = v;
        sum += v;
    }
    return (uint32_t)0 - (sum << 7);
}

#if defined(__AVR__)

#define TL_AVR_MAC_ROW(t) \
    "lpm %[wt], Z+\n\tmul %[wt], %[in]\n\tadd %A[" t "], r0\n\tadc %B[" t "], r1\n\tadc %C[" t "], %[zero]\n\t"
/* One input byte against the unit's four gate rows: 34 cycles for four multiply-accumulates. */
#define TL_AVR_MAC_INPUT \
    "ld %[in], X+\n\t" TL_AVR_MAC_ROW("t0") TL_AVR_MAC_ROW("t1") TL_AVR_MAC_ROW("t2") TL_AVR_MAC_ROW("t3")

/*
 * The four gate rows of one unit over n inputs (1..255), added to s0..s3: sum(w'[k][g] * x'[k]) in 24 bits;
 * w advances by 4 n. Inline assembly, two inputs per loop turn, so the loop is the same at every optimisation
 * level.
 */
#define TL_AVR_MAC_PASS(w, x, n, s0, s1, s2, s3)                                                                      \
    do {                                                                                                              \
        __uint24 t0 = 0, t1 = 0, t2 = 0, t3 = 0;                                                                      \
        uint8_t input, weight, count = (n);                                                                           \
        const uint8_t *xp = (x);                                                                                      \
        __asm__ volatile("sbrs %[count], 0\n\t"                                                                       \
                         "rjmp 2f\n\t"                                                                                \
                         TL_AVR_MAC_INPUT                                                                             \
                         "2:\n\t"                                                                                     \
                         "lsr %[count]\n\t"                                                                           \
                         "breq 3f\n\t"                                                                                \
                         "1:\n\t"                                                                                     \
                         TL_AVR_MAC_INPUT TL_AVR_MAC_INPUT                                                            \
                         "dec %[count]\n\t"                                                                           \
                         "brne 1b\n\t"                                                                                \
                         "3:\n\t"                                                                                     \
                         "clr r1\n\t"                                                                                 \
                         : [t0] "+r"(t0), [t1] "+r"(t1), [t2] "+r"(t2), [t3] "+r"(t3), [in] "=&r"(input),             \
                           [wt] "=&r"(weight), [count] "+r"(count), "+x"(xp), "+z"(w)                                 \
                         : [zero] "r"((uint8_t)0)                                                                     \
                         : "r0", "memory");                                                                           \
        (s0) += t0;                                                                                                   \
        (s1) += t1;                                                                                                   \
        (s2) += t2;                                                                                                   \
        (s3) += t3;                                                                                                   \
    } while (0)

#else /* the same sums in portable C (for host tests of the generated code) */

#define TL_AVR_MAC_PASS(w, x, n, s0, s1, s2, s3)           \
    do {                                                   \
        for (uint8_t k = 0; k < (n); ++k, (w) += 4) {      \
            (s0) += (uint32_t)((uint16_t)(w)[0] * (x)[k]); \
            (s1) += (uint32_t)((uint16_t)(w)[1] * (x)[k]); \
            (s2) += (uint32_t)((uint16_t)(w)[2] * (x)[k]); \
            (s3) += (uint32_t)((uint16_t)(w)[3] * (x)[k]); \
        }                                                  \
    } while (0)

#endif

/*
 * One half (layer input or h) of one unit: acc[0..3] = bias + the dot products of gates i, f, g, o, wrapping
 * at 32 bits like the reference. correction is tl_avr_expand's result for x; n >= 1.
 */
static TL_AVR_OUT_OF_LINE void tl_avr_half(const uint8_t **w, const uint8_t *x, uint16_t n, uint32_t correction,
                                           const int32_t *bias, uint32_t *acc)
{
    for (uint8_t g = 0; g < 4u; ++g) {
        acc[g] = (uint32_t)TL_AVR_READ_I32(&bias[g]) + correction;
    }
    do {
        const uint8_t pass = n < 255u ? (uint8_t)n : 255u;
        TL_AVR_MAC_PASS(*w, x, pass, acc[0], acc[1], acc[2], acc[3]);
        x += pass;
        n -= pass;
    } while (n > 0u);
}

/* ---- gate arithmetic ---------------------------------------------------------------------------------------- */

/* The int32 with the bits of u (two's complement). */
static TL_AVR_INLINE int32_t tl_avr_i32(uint32_t u)
{
    return u <= (uint32_t)INT32_MAX ? (int32_t)u : (int32_t)(u - UINT32_C(0x80000000)) + INT32_MIN;
}

#if defined(__AVR__)

/*
 * floor((a * m + 2^30) / 2^31) for m in [0, 2^31): the rounding doubling high multiply of the reference. The
 * unsigned 64-bit product is summed column by column in a rolling window of three bytes (a column's carries
 * stay within the byte above it, so bytes 0..2 are dropped once their column is done), a negative a takes m off
 * the high half, and the result is bits 31..62.
 */
static TL_AVR_INLINE int32_t tl_avr_srdhm(int32_t a, int32_t m)
{
    uint32_t high;
    uint8_t b0, b1, b2, zero;
#define TL_AVR_MAC3(ai, mj, c0, c1, c2) \
    "mul %" ai "[a], %" mj "[m]\n\tadd %" c0 ", r0\n\tadc %" c1 ", r1\n\tadc %" c2 ", %[zero]\n\t"
    __asm__(
        "clr %[zero]\n\tclr %[b0]\n\tclr %[b1]\n\tclr %[b2]\n\t"
        TL_AVR_MAC3("A", "A", "[b0]", "[b1]", "[b2]")
        "clr %[b0]\n\t" /* b0 now holds byte 3 */
        TL_AVR_MAC3("A", "B", "[b1]", "[b2]", "[b0]")
        TL_AVR_MAC3("B", "A", "[b1]", "[b2]", "[b0]")
        "clr %A[hi]\n\t"
        TL_AVR_MAC3("A", "C", "[b2]", "[b0]", "A[hi]")
        TL_AVR_MAC3("B", "B", "[b2]", "[b0]", "A[hi]")
        TL_AVR_MAC3("C", "A", "[b2]", "[b0]", "A[hi]")
        "clr %B[hi]\n\t"
        TL_AVR_MAC3("A", "D", "[b0]", "A[hi]", "B[hi]")
        TL_AVR_MAC3("B", "C", "[b0]", "A[hi]", "B[hi]")
        TL_AVR_MAC3("C", "B", "[b0]", "A[hi]", "B[hi]")
        TL_AVR_MAC3("D", "A", "[b0]", "A[hi]", "B[hi]")
        "clr %C[hi]\n\t"
        TL_AVR_MAC3("B", "D", "A[hi]", "B[hi]", "C[hi]")
        TL_AVR_MAC3("C", "C", "A[hi]", "B[hi]", "C[hi]")
        TL_AVR_MAC3("D", "B", "A[hi]", "B[hi]", "C[hi]")
        "clr %D[hi]\n\t"
        TL_AVR_MAC3("C", "D", "B[hi]", "C[hi]", "D[hi]")
        TL_AVR_MAC3("D", "C", "B[hi]", "C[hi]", "D[hi]")
        "mul %D[a], %D[m]\n\tadd %C[hi], r0\n\tadc %D[hi], r1\n\t"
        "sbrs %D[a], 7\n\t"
        "rjmp 1f\n\t"
        "sub %A[hi], %A[m]\n\tsbc %B[hi], %B[m]\n\tsbc %C[hi], %C[m]\n\tsbc %D[hi], %D[m]\n\t"
        "1:\n\t"
        "ldi %[b1], 0x40\n\t"
        "add %[b0], %[b1]\n\t"
        "adc %A[hi], %[zero]\n\tadc %B[hi], %[zero]\n\tadc %C[hi], %[zero]\n\tadc %D[hi], %[zero]\n\t"
        "lsl %[b0]\n\t"
        "rol %A[hi]\n\trol %B[hi]\n\trol %C[hi]\n\trol %D[hi]\n\t"
        "clr r1\n\t"
        : [hi] "=&r"(high), [b0] "=&r"(b0), [b1] "=&d"(b1), [b2] "=&r"(b2), [zero] "=&r"(zero)
        : [a] "r"(a), [m] "r"(m)
        : "r0");
#undef TL_AVR_MAC3
    return (int32_t)high;
}

#else /* the same function in portable C (host tests of the generated code) */

static TL_AVR_INLINE int32_t tl_avr_srdhm(int32_t a, int32_t m)
{
    const int64_t p = (int64_t)a * m + (INT64_C(1) << 30);
    return (int32_t)(p < 0 ? ~(~p >> 31) : p >> 31);
}

#endif

/* floor(v / 2^n) for n < 32, bytewise where it can: avr-gcc shifts 32-bit values one bit per loop turn. */
static TL_AVR_INLINE int32_t tl_avr_floor_shift(int32_t v, uint8_t n)
{
    const uint8_t negative = v < 0;
    uint32_t u = negative ? ~(uint32_t)v : (uint32_t)v;
    if (n & 16u) {
        u >>= 16;
    }
    if (n & 8u) {
        u >>= 8;
    }
    for (n &= 7u; n != 0u; --n) {
        u >>= 1;
    }
    return negative ? (int32_t)~u : (int32_t)u;
}

/* tinylstm_requantize, bit for bit: value * multiplier * 2^(shift - 31) with the reference's two roundings. */
static TL_AVR_OUT_OF_LINE int32_t tl_avr_requantize(int32_t value, int32_t multiplier, int8_t shift)
{
    uint32_t shifted = (uint32_t)value;
    uint8_t right = 0;
    if (shift > 0) {
        for (int8_t k = shift; k > 0; --k) {
            shifted <<= 1;
        }
    } else {
        right = (uint8_t)-shift;
    }
    const int32_t a = tl_avr_i32(shifted);
    int32_t high;
    if (multiplier == INT32_C(0x40000000)) { /* floor((a + 1) / 2) without overflow */
        high = tl_avr_floor_shift(a, 1) + (int32_t)(shifted & 1u);
    } else {
        high = tl_avr_srdhm(a, multiplier);
    }
    if (right == 0u) {
        return high;
    }
    /* rounding half away from zero: floor((floor((high - [high < 0]) / 2^(right - 1)) + 1) / 2); |high| < 2^31 - 1 */
    const int32_t v = tl_avr_floor_shift(high - (high < 0 ? 1 : 0), (uint8_t)(right - 1u));
    return tl_avr_floor_shift(v + 1, 1);
}

/* clamp(wide + narrow, lo, hi) for |narrow| <= 2^15 and [lo, hi] inside the int16 range, as the reference. */
static TL_AVR_INLINE int16_t tl_avr_add_clamp(int32_t wide, int16_t narrow, int16_t lo, int16_t hi)
{
    if (wide > INT32_C(65536)) {
        return hi;
    }
    if (wide < -INT32_C(65536)) {
        return lo;
    }
    const int32_t v = wide + narrow;
    return v < lo ? lo : (v > hi ? hi : (int16_t)v);
}

static TL_AVR_INLINE int16_t tl_avr_sat16(int32_t v)
{
    return v < INT16_MIN ? INT16_MIN : (v > INT16_MAX ? INT16_MAX : (int16_t)v);
}

/*
 * sigmoid of a Q3.12 value as Q0.15, as the reference. With a = |3 x| = 512 i + f (f = 256 f1 + f0) and
 * d = table[i + 1] - table[i] = 256 d1 + d0 (d <= 683): floor((512 table[i] + f d + 512) / 1024) =
 * floor((table[i] + 1 + floor(f d / 512)) / 2), and floor(f d / 512) = floor((floor(f0 d0 / 256) + f0 d1 + f1 d) / 2);
 * 32768 less that for x < 0. Only 8 x 8-bit products and 16-bit sums.
 */
static TL_AVR_OUT_OF_LINE int16_t tl_avr_sigmoid(int16_t x)
{
    const uint16_t magnitude = x < 0 ? (uint16_t)(0u - (uint16_t)x) : (uint16_t)x;
    const uint16_t low3 = (uint16_t)((magnitude & 511u) * 3u); /* 3 |x| = 512 (3 (|x| >> 9)) + low3 */
    const uint8_t index = (uint8_t)(3u * (uint8_t)(magnitude >> 9) + (uint8_t)(low3 >> 9)); /* <= 192 */
    const uint8_t f0 = (uint8_t)low3;
    const uint16_t lo = TL_AVR_TABLE(index);
    const uint16_t d = (uint16_t)(TL_AVR_TABLE(index + 1u) - lo);
    const uint16_t upper = (uint16_t)((uint16_t)f0 * (uint8_t)(d >> 8) + ((low3 & 256u) ? d : 0u));
    const uint16_t scaled = (uint16_t)(((uint16_t)((uint16_t)f0 * (uint8_t)d) >> 8) + upper) >> 1;
    const uint16_t out = (uint16_t)((lo >> 1) + (((lo & 1u) + 1u + scaled) >> 1));
    return (int16_t)(x < 0 ? 32768u - out : out);
}

/*
 * tanh of x * 2^(left_shift - 12) as Q0.15, as the reference. With a = |v| = 256 i + f and d as above:
 * floor((256 table[i] + f d + 128) / 256) - 32768 = table[i] - 32768 + floor((f d0 + 128) / 256) + f d1; 32767
 * from index 255 on (a >= 65280); negated for v < 0.
 */
static TL_AVR_OUT_OF_LINE int16_t tl_avr_tanh(int16_t x, int8_t left_shift)
{
    uint16_t a = 65280u; /* saturated unless computed below */
    uint8_t negative;
    if (left_shift >= 0) {
        const uint16_t magnitude = x < 0 ? (uint16_t)(0u - (uint16_t)x) : (uint16_t)x;
        negative = x < 0;
        if (magnitude < 21760u) { /* 3 * 21760 = 65280 */
            a = (uint16_t)(magnitude * 3u);
            for (int8_t k = left_shift; k > 0; --k) {
                if (a >= 32640u) {
                    a = 65280u;
                    break;
                }
                a = (uint16_t)(a << 1);
            }
        }
    } else {
        const uint8_t n = (uint8_t)-left_shift;
        const int32_t v = tl_avr_floor_shift((int32_t)x * 3 + (int32_t)(UINT32_C(1) << (n - 1u)), n);
        const uint32_t magnitude = v < 0 ? (uint32_t)-v : (uint32_t)v;
        negative = v < 0;
        if (magnitude < 65280u) {
            a = (uint16_t)magnitude;
        }
    }
    int16_t out = 32767;
    if (a < 65280u) {
        const uint8_t index = (uint8_t)(a >> 8);
        const uint8_t f = (uint8_t)a;
        const uint16_t lo = TL_AVR_TABLE(index);
        const uint16_t d = (uint16_t)(TL_AVR_TABLE(index + 1u) - lo);
        const uint16_t scaled = (uint16_t)(((uint16_t)((uint16_t)f * (uint8_t)d + 128u) >> 8) +
                                           (uint16_t)f * (uint8_t)(d >> 8));
        out = (int16_t)(uint16_t)(lo - 32768u + scaled);
    }
    return negative ? (int16_t)-out : out;
}

/* The pre-activation of gate g: clamp16(requantized h half + clamp16(requantized input half)), as the reference. */
static TL_AVR_INLINE int16_t tl_avr_gate(const uint32_t *acc, const int32_t *m, const int8_t *s, uint8_t g)
{
    const int16_t from_x =
        tl_avr_sat16(tl_avr_requantize(tl_avr_i32(acc[g]), TL_AVR_READ_I32(&m[g]), TL_AVR_READ_I8(&s[g])));
    return tl_avr_add_clamp(tl_avr_requantize(tl_avr_i32(acc[4u + g]), TL_AVR_READ_I32(&m[4u + g]),
                                              TL_AVR_READ_I8(&s[4u + g])),
                            from_x, INT16_MIN, INT16_MAX);
}

/*
 * One time step of one layer: x [input_size] -> h [hidden_size], cell updated in place; scratch holds
 * input_size + hidden_size bytes. Every size and constant comes from the flash struct, so the code is the same
 * for every layer and model.
 */
static TL_AVR_OUT_OF_LINE void tl_avr_layer(const tinylstm_avr_layer_params *params, const int8_t *x, int8_t *h,
                                            int16_t *cell, uint8_t *scratch)
{
    tinylstm_avr_layer_params p;
    TL_AVR_READ_STRUCT(&p, params);
    uint8_t *const xs = scratch;
    uint8_t *const hs = scratch + p.input_size;
    const uint32_t cx = tl_avr_expand(x, p.input_size, xs);
    const uint32_t ch = tl_avr_expand(h, p.hidden_size, hs);
    const uint8_t *w = p.weights;
    const int32_t *b = p.bias;
    const int32_t *m = p.multiplier;
    const int8_t *s = p.shift;
    for (uint16_t j = 0; j < p.hidden_size; ++j) {
        uint32_t acc[8];
        tl_avr_half(&w, xs, p.input_size, cx, b, acc);
        tl_avr_half(&w, hs, p.hidden_size, ch, b + 4, acc + 4);
        const int16_t i = tl_avr_sigmoid(tl_avr_gate(acc, m, s, 0u));
        const int16_t f = tl_avr_sigmoid(tl_avr_gate(acc, m, s, 1u));
        const int16_t g = tl_avr_tanh(tl_avr_gate(acc, m, s, 2u), 0);
        const int16_t o = tl_avr_sigmoid(tl_avr_gate(acc, m, s, 3u));
        const int16_t kept =
            tl_avr_sat16(tl_avr_requantize((int32_t)f * cell[j], p.forget_to_cell_multiplier, p.forget_to_cell_shift));
        const int16_t c = tl_avr_add_clamp(
            tl_avr_requantize((int32_t)i * g, p.input_to_cell_multiplier, p.input_to_cell_shift), kept, p.cell_min,
            p.cell_max);
        cell[j] = c;
        const int32_t out =
            tl_avr_requantize((int32_t)o * tl_avr_tanh(c, p.cell_tanh_shift), p.output_multiplier, p.output_shift);
        h[j] = (int8_t)tl_avr_add_clamp(out, p.output_zero_point, INT8_MIN, INT8_MAX);
        b += 8;
        m += p.gate_step;
        s += p.gate_step;
    }
}

#endif /* TINYLSTM_KERNEL_AVR_H */
