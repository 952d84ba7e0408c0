/*
 * tinylstm Cortex-M DSP kernel (M4/M7/M33 with the DSP extension): helpers for the layer step functions that
 * tinylstm generates per model (see docs/performance.md). Same results as the reference kernel, bit for bit.
 *
 * Matrix part. The generator stores the weights of two gate rows a and b of one hidden unit interleaved in
 * 32-bit words, for two consecutive inputs k, k+1: bytes (a[k] + 128, b[k], a[k+1] + 128, b[k+1]). Read as
 * two int16 halves, each half is (a + 128) + 256 b, so one SMLAD against the input pair (x[k], x[k+1]) adds
 * S_b * 256 + S_a + 128 * sum(x) to accumulator A, and one SMLAD of UXTB16(word) adds S_a + 128 * sum(x) to
 * accumulator B. Both start at the same value; B then holds row a's sum (the 128 * sum(x) term is taken off
 * through the start value) and (A - B) / 256 is row b's sum, exact while |S_b| < 2^23 (at most 504 inputs
 * per pass; longer rows are split into passes). Three instructions per four multiply-accumulates, and the
 * four gate rows of one unit (i with f, g with o) share every loaded input pair.
 *
 * Elsewhere the generated code passes the model's multipliers and shifts as constants, so the compiler
 * specialises requantization (tl_rq_fast: SMMULR and a rounding shift, used where the generator has proved
 * that |value * 2^left| < 2^30) and the activations.
 *
 * Off target (no __ARM_FEATURE_DSP) every instruction used here has a portable C definition with the
 * instruction's exact semantics, so the same code path runs on a host compiler for testing.
 */
#ifndef TINYLSTM_KERNEL_ARM_DSP_H
#define TINYLSTM_KERNEL_ARM_DSP_H

#include <stdint.h>
#include <string.h>

#include "tinylstm_kernel.h"

/* Inputs per pass of tl_dsp_mac: |S_b| <= 128 * 128 * 504 < 2^23. */
#define TL_DSP_MAX_PASS 504

/* Constants live in flash: program-memory reads on AVR, plain reads elsewhere. */
#if defined(__AVR__)
#define TL_READ_I32(p) ((int32_t)pgm_read_dword(p))
#define TL_READ_I8(p) ((int8_t)pgm_read_byte(p))
#else
#define TL_READ_I32(p) (*(p))
#define TL_READ_I8(p) (*(p))
#endif

static inline uint32_t tl_u32(int32_t v)
{
    return (uint32_t)v;
}

/* The int32 with the bits of u (two's complement). */
static inline int32_t tl_i32(uint32_t u)
{
    return u <= (uint32_t)INT32_MAX ? (int32_t)u : (int32_t)(u - UINT32_C(0x80000000)) + INT32_MIN;
}

/* floor(v / 2^n) */
static inline int32_t tl_asr(int32_t v, unsigned n)
{
    return v < 0 ? ~(~v >> n) : v >> n;
}

#if defined(__ARM_FEATURE_DSP) && defined(__GNUC__)
#include <arm_acle.h>

#define tl_smlad(a, b, acc) ((uint32_t)__smlad((a), (b), (acc)))
#define tl_ssat16(v) __ssat((v), 16)
#define tl_ssat8(v) __ssat((v), 8)

/* (a * b + 2^31) >> 32 */
static inline int32_t tl_smmulr(int32_t a, int32_t b)
{
    int32_t r;
    __asm__("smmulr %0, %1, %2" : "=r"(r) : "r"(a), "r"(b));
    return r;
}

/* One group of four inputs (see tl_dsp_mac): two input pairs against the four words of the unit's gate pairs. */
#define TL_DSP_GROUP                                      \
    "ldm %[wp]!, {%[w0], %[w1], %[w2], %[w3]}\n\t"        \
    "ldrd %[x0], %[x1], [%[x]], #8\n\t"                  \
    "smlad %[aif], %[w0], %[x0], %[aif]\n\t"             \
    "uxtb16 %[w0], %[w0]\n\t"                            \
    "smlad %[bif], %[w0], %[x0], %[bif]\n\t"             \
    "smlad %[ago], %[w1], %[x0], %[ago]\n\t"             \
    "uxtb16 %[w1], %[w1]\n\t"                            \
    "smlad %[bgo], %[w1], %[x0], %[bgo]\n\t"             \
    "smlad %[aif], %[w2], %[x1], %[aif]\n\t"             \
    "uxtb16 %[w2], %[w2]\n\t"                            \
    "smlad %[bif], %[w2], %[x1], %[bif]\n\t"             \
    "smlad %[ago], %[w3], %[x1], %[ago]\n\t"             \
    "uxtb16 %[w3], %[w3]\n\t"                            \
    "smlad %[bgo], %[w3], %[x1], %[bgo]\n\t"

#define TL_DSP_OPERANDS                                                                                      \
    : [wp] "+r"(wp), [x] "+r"(x), [aif] "+r"(aif), [bif] "+r"(bif), [ago] "+r"(ago), [bgo] "+r"(bgo),       \
      [w0] "=&r"(w0), [w1] "=&r"(w1), [w2] "=&r"(w2), [w3] "=&r"(w3), [x0] "=&r"(x0), [x1] "=&r"(x1)       \
    : [end] "r"(end)                                                                                         \
    : "cc", "memory"

/*
 * Accumulates `groups` groups of four inputs into the four accumulators of one unit (A and B of the gate pairs
 * i/f and g/o). Per group: the words W_if(k, k+1), W_go(k, k+1), W_if(k+2, k+3), W_go(k+2, k+3) at *w, and the
 * input pairs (x[k], x[k+1]), (x[k+2], x[k+3]) at x. One LDM loads the four words, so a group of 16
 * multiply-accumulates takes 14 instructions; the loop runs two groups per iteration. groups >= 1.
 */
static inline void tl_dsp_mac(const uint32_t **w, const uint32_t *x, uint32_t groups, uint32_t *a_if,
                              uint32_t *b_if, uint32_t *a_go, uint32_t *b_go)
{
    register uint32_t w0 __asm__("r8");
    register uint32_t w1 __asm__("r9");
    register uint32_t w2 __asm__("r10");
    register uint32_t w3 __asm__("r11");
    uint32_t x0, x1;
    const uint32_t *end = x + 2u * groups;
    uint32_t aif = *a_if, bif = *b_if, ago = *a_go, bgo = *b_go;
    const uint32_t *wp = *w;
    if (groups & 1u) {
        __asm__ volatile(TL_DSP_GROUP TL_DSP_OPERANDS);
    }
    if (groups >= 2u) {
        __asm__ volatile("1:\n\t" TL_DSP_GROUP TL_DSP_GROUP "cmp %[x], %[end]\n\tbne 1b\n\t" TL_DSP_OPERANDS);
    }
    *w = wp;
    *a_if = aif;
    *b_if = bif;
    *a_go = ago;
    *b_go = bgo;
}

#else /* portable definitions of the same instructions */

/* SMLAD: acc + lo(a) * lo(b) + hi(a) * hi(b), halves signed, wrapping at 32 bits. */
static inline uint32_t tl_smlad(uint32_t a, uint32_t b, uint32_t acc)
{
    const int32_t a_lo = (int32_t)(a & 0xFFFFu) - (int32_t)((a & 0x8000u) << 1);
    const int32_t a_hi = (int32_t)(a >> 16) - (int32_t)((a >> 15) & 0x10000u);
    const int32_t b_lo = (int32_t)(b & 0xFFFFu) - (int32_t)((b & 0x8000u) << 1);
    const int32_t b_hi = (int32_t)(b >> 16) - (int32_t)((b >> 15) & 0x10000u);
    return acc + (uint32_t)(a_lo * b_lo) + (uint32_t)(a_hi * b_hi);
}

/* UXTB16: bytes 0 and 2, zero-extended into the two halves. */
static inline uint32_t tl_uxtb16(uint32_t a)
{
    return a & 0x00FF00FFu;
}

static inline int32_t tl_ssat(int32_t v, int32_t lo, int32_t hi)
{
    return v < lo ? lo : (v > hi ? hi : v);
}

#define tl_ssat16(v) tl_ssat((v), INT16_MIN, INT16_MAX)
#define tl_ssat8(v) tl_ssat((v), INT8_MIN, INT8_MAX)

static inline int32_t tl_smmulr(int32_t a, int32_t b)
{
    const int64_t p = (int64_t)a * b + (INT64_C(1) << 31);
#if defined(__AVR__)
    /* The high word of the little-endian product: avr-gcc would shift 64 bits one bit at a time. */
    int32_t high;
    memcpy(&high, (const uint8_t *)&p + 4, sizeof high);
    return high;
#else
    return (int32_t)(p < 0 ? ~(~p >> 32) : p >> 32);
#endif
}

static inline void tl_dsp_mac(const uint32_t **w, const uint32_t *x, uint32_t groups, uint32_t *a_if,
                              uint32_t *b_if, uint32_t *a_go, uint32_t *b_go)
{
    const uint32_t *wp = *w;
    for (uint32_t g = 0; g < groups; ++g, wp += 4, x += 2) {
        *a_if = tl_smlad(wp[0], x[0], *a_if);
        *b_if = tl_smlad(tl_uxtb16(wp[0]), x[0], *b_if);
        *a_go = tl_smlad(wp[1], x[0], *a_go);
        *b_go = tl_smlad(tl_uxtb16(wp[1]), x[0], *b_go);
        *a_if = tl_smlad(wp[2], x[1], *a_if);
        *b_if = tl_smlad(tl_uxtb16(wp[2]), x[1], *b_if);
        *a_go = tl_smlad(wp[3], x[1], *a_go);
        *b_go = tl_smlad(tl_uxtb16(wp[3]), x[1], *b_go);
    }
    *w = wp;
}

#endif

/*
 * x [n] as int16 pairs (x[k], x[k+1]) in `words` (n rounded up to 4, zero padded); returns -128 * sum(x)
 * as a 32-bit two's-complement word, the start-value correction of the B accumulators.
 */
static inline uint32_t tl_dsp_expand(const int8_t *x, uint32_t n, uint32_t *words)
{
    int32_t sum = 0;
    uint32_t k = 0;
    for (; k + 1u < n; k += 2u) {
        sum += x[k] + x[k + 1u];
        *words++ = (uint32_t)(uint16_t)x[k] | ((uint32_t)(uint16_t)x[k + 1u] << 16);
    }
    if (k < n) {
        sum += x[k];
        *words++ = (uint32_t)(uint16_t)x[k];
        k += 2u;
    }
    for (; (k & 3u) != 0u; k += 2u) {
        *words++ = 0u;
    }
    return (uint32_t)(sum * -128);
}

/* Row b's sum from the two accumulators of a pair, plus its start value (bias), wrapping at 32 bits. */
static inline uint32_t tl_dsp_high(uint32_t a, uint32_t b, uint32_t bias);

/*
 * One half (layer input or h) of one unit: acc[0..3] = bias + the dot products of gates i, f, g, o, wrapping
 * at 32 bits like the reference. correction is tl_dsp_expand's result for x; groups >= 1.
 */
static inline void tl_dsp_half(const uint32_t **w, const uint32_t *x, uint32_t groups, uint32_t correction,
                               const int32_t *bias, uint32_t *acc)
{
    uint32_t b_if = tl_u32(bias[0]) + correction, a_if = b_if;
    uint32_t b_go = tl_u32(bias[2]) + correction, a_go = b_go;
    uint32_t f = tl_u32(bias[1]), o = tl_u32(bias[3]);
    for (;;) {
        const uint32_t pass = groups < TL_DSP_MAX_PASS / 4u ? groups : TL_DSP_MAX_PASS / 4u;
        tl_dsp_mac(w, x, pass, &a_if, &b_if, &a_go, &b_go);
        f = tl_dsp_high(a_if, b_if, f);
        o = tl_dsp_high(a_go, b_go, o);
        groups -= pass;
        if (groups == 0u) {
            break;
        }
        x += 2u * pass;
        a_if = b_if;
        a_go = b_go;
    }
    acc[0] = b_if;
    acc[1] = f;
    acc[2] = b_go;
    acc[3] = o;
}

/* Row b's sum from the two accumulators of a pair, plus its start value (bias), wrapping at 32 bits. */
static inline uint32_t tl_dsp_high(uint32_t a, uint32_t b, uint32_t bias)
{
    return bias + (uint32_t)tl_asr(tl_i32(a - b), 8);
}

/* tinylstm_requantize for |v * 2^left| < 2^30, left = max(shift, 0), right = max(-shift, 0). */
static inline int32_t tl_rq_fast(int32_t v, int32_t multiplier, unsigned left, unsigned right)
{
    const int32_t high = tl_smmulr(v * (INT32_C(1) << (left + 1u)), multiplier);
    if (right == 0u) {
        return high;
    }
    return tl_asr(high + (INT32_C(1) << (right - 1u)) + (high < 0 ? -1 : 0), right);
}

static inline int32_t tl_clamp(int32_t v, int32_t lo, int32_t hi)
{
    return v < lo ? lo : (v > hi ? hi : v);
}

/* clamp(wide + narrow) for |narrow| <= 2^15, as the reference's add_clamp (any int32 wide). */
static inline int32_t tl_add_clamp(int32_t wide, int32_t narrow, int32_t lo, int32_t hi)
{
    if (wide > INT32_C(65536)) {
        return hi;
    }
    if (wide < -INT32_C(65536)) {
        return lo;
    }
    const int32_t v = wide + narrow;
    return v < lo ? lo : (v > hi ? hi : v);
}

/*
 * sigmoid (Q3.12 -> Q0.15) and tanh (x * 2^(left_shift - 12) -> Q0.15) through the shared table, as the
 * reference computes them, using sigmoid(-x) = 1 - sigmoid(x) and tanh(-x) = -tanh(x) of the rounding rules.
 */
static inline int32_t tl_table(uint32_t index)
{
#if defined(__AVR__)
    return (int32_t)pgm_read_word(&tinylstm_sigmoid_table[index]);
#else
    return (int32_t)tinylstm_sigmoid_table[index];
#endif
}

static inline int32_t tl_sigmoid(int32_t x)
{
    const int32_t v = 3 * x;
    const uint32_t a = (uint32_t)(v < 0 ? -v : v); /* < 2^17: the index stays below 193 */
    const uint32_t index = a >> 9;
    const int32_t lo = tl_table(index);
    const int32_t r = lo * 512 + (int32_t)(int16_t)(a & 511u) * (int16_t)(tl_table(index + 1u) - lo);
    const int32_t out = (r + 512) >> 10;
    return v < 0 ? 32768 - out : out;
}

static inline int32_t tl_tanh(int32_t x, int left_shift)
{
    int32_t v;
    if (left_shift >= 0) {
        v = x * (INT32_C(3) << left_shift);
    } else {
        v = tl_asr(x * 3 + (INT32_C(1) << (-left_shift - 1)), (unsigned)-left_shift);
    }
    const uint32_t a = (uint32_t)(v < 0 ? -v : v);
    const uint32_t index = a >> 8;
    int32_t out;
    if (index < 255u) {
        const int32_t lo = tl_table(index);
        const int32_t r = lo * 256 + (int32_t)(int16_t)(a & 255u) * (int16_t)(tl_table(index + 1u) - lo);
        out = ((r + 128) >> 8) - 32768;
    } else {
        out = 32767;
    }
    return v < 0 ? -out : out;
}

#endif /* TINYLSTM_KERNEL_ARM_DSP_H */
