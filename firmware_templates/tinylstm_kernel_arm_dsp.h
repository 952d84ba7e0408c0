/*
 * tinylstm Cortex-M DSP kernel (M4/M7/M33 with the DSP extension): the layer step routine that the code tinylstm
 * generates per model calls (see docs/performance.md). Same results as the reference kernel, bit for bit.
 *
 * Matrix part. The generator stores the weights of two gate rows a and b of one hidden unit interleaved in
 * 32-bit words, for two consecutive inputs k, k+1: bytes (a[k] + 128, b[k], a[k+1] + 128, b[k+1]). Read as
 * two int16 halves, each half is (a + 128) + 256 b, so one SMLAD against the input pair (x[k], x[k+1]) adds
 * S_b * 256 + S_a + 128 * sum(x) to accumulator A, and one SMLAD of UXTB16(word) adds S_a + 128 * sum(x) to
 * accumulator B. Both start at the same value; B then holds row a's sum (the 128 * sum(x) term is taken off
 * through the start value) and (A - B) / 256 is row b's sum, exact while |S_b| < 2^23 (at most 504 inputs
 * per pass; longer rows are split into passes). Three instructions per four multiply-accumulates, and the
 * four gate rows of one unit (i with f, g with o) share every loaded input pair. Each pass of a unit's half
 * (input or h) is stored as the biases of rows i and g, the words, then the biases of rows f and o (zero after a
 * row's first pass), so one pointer walks a layer's weights and biases in order.
 *
 * Gate arithmetic. One out-of-line function, tl_dsp_layer, steps every layer of every model: the generator gives it
 * the layer's packed weights and biases, a table of its constants (sizes, and three words per requantization,
 * see tl_rq); the activation table is the kernel's, so its code is the same whatever the model's constants and
 * sizes, and the planner's code figure is exact. Every requantization is the exact one for any int32 value:
 * SMMLAR for the rounding doubling high multiply, SMLAL for the rounding right shift. Sigmoid and tanh are one
 * multiply-accumulate each (tl_dsp_sigmoid).
 *
 * Off target (no __ARM_FEATURE_DSP with Thumb-2) every instruction used here has a portable C definition with
 * the instruction's exact semantics, so the same code path runs on a host compiler for testing.
 */
#ifndef TINYLSTM_KERNEL_ARM_DSP_H
#define TINYLSTM_KERNEL_ARM_DSP_H

#include <stdint.h>

#include "tinylstm_kernel.h"

/* sigmoid and tanh as one multiply-accumulate (tl_dsp_sigmoid): the same for every model, stored once per firmware
 * (tinylstm_kernel_arm_dsp.c). */
extern const int32_t tinylstm_dsp_activation_table[512];

/* Groups of four inputs per pass of tl_dsp_pass: |S_b| <= 128 * 128 * 504 < 2^23. */
#define TL_DSP_PASS_GROUPS 126u

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

#if defined(__ARM_FEATURE_DSP) && defined(__thumb2__) && defined(__GNUC__)
#include <arm_acle.h>

#define tl_smlad(a, b, acc) ((uint32_t)__smlad((a), (b), (acc)))
#define tl_ssat16(v) __ssat((v), 16)
#define tl_ssat8(v) __ssat((v), 8)

/* a + b, saturated to the int32 range */
static inline int32_t tl_qadd(int32_t a, int32_t b)
{
    int32_t r;
    __asm__("qadd %0, %1, %2" : "=r"(r) : "r"(a), "r"(b));
    return r;
}

/* tl_rq's instructions: LSL, SMMLAR (with its accumulate word), SMLAL (with its start words). */
static inline int32_t tl_rq_words(int32_t v, int32_t left, int32_t m2, int32_t p)
{
    int32_t t, lo, hi;
    __asm__("lsl %[v], %[v], %[left]\n\t"
            "and %[t], %[v], %[m2], asr #31\n\t"
            "smmlar %[v], %[v], %[m2], %[t]\n\t"
            "add %[lo], %[half], %[v], asr #31\n\t"
            "and %[hi], %[v], %[p], asr #31\n\t"
            "smlal %[lo], %[hi], %[v], %[p]\n\t"
            : [v] "+&r"(v), [t] "=&r"(t), [lo] "=&r"(lo), [hi] "=&r"(hi)
            : [left] "r"(left), [m2] "r"(m2), [p] "r"(p), [half] "r"(INT32_MIN));
    return hi;
}

/* One group of four inputs (see tl_dsp_pass): two input pairs against the four words of the unit's gate pairs. */
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

/*
 * One pass over `groups` groups of four inputs (1..126) of one unit's half: acc[0..3] = the sums of gate rows
 * i, f, g, o plus their biases (and `correction` for rows i and g). Per group: the words W_if(k, k+1),
 * W_go(k, k+1), W_if(k+2, k+3), W_go(k+2, k+3) at *w, and the input pairs (x[k], x[k+1]), (x[k+2], x[k+3]) at
 * x. One LDM loads the four words, so a group of 16 multiply-accumulates takes 14 instructions. The loop runs
 * eight groups per turn; TBB enters it where the remainder of groups / 8 is left (Duff's device).
 */
static inline void tl_dsp_pass(const uint32_t **w, const uint32_t *x, uint32_t groups, uint32_t correction,
                               uint32_t *acc)
{
    register uint32_t w0 __asm__("r8");
    register uint32_t w1 __asm__("r9");
    register uint32_t w2 __asm__("r10");
    register uint32_t w3 __asm__("r11");
    uint32_t x0 = groups, x1 = correction, aif, bif, ago, bgo;
    const uint32_t *wp = *w, *end;
    __asm__ volatile("ldrd %[bif], %[bgo], [%[wp]], #8\n\t"
                     "add %[bif], %[bif], %[x1]\n\t"
                     "add %[bgo], %[bgo], %[x1]\n\t"
                     "mov %[aif], %[bif]\n\t"
                     "mov %[ago], %[bgo]\n\t"
                     "add %[end], %[x], %[x0], lsl #3\n\t"
                     "and %[x0], %[x0], #7\n\t"
                     "tbb [pc, %[x0]]\n\t"
                     "0:\n\t"
                     ".byte (8f - 0b) / 2, (1f - 0b) / 2, (2f - 0b) / 2, (3f - 0b) / 2\n\t"
                     ".byte (4f - 0b) / 2, (5f - 0b) / 2, (6f - 0b) / 2, (7f - 0b) / 2\n\t"
                     "8:\n\t" TL_DSP_GROUP "7:\n\t" TL_DSP_GROUP "6:\n\t" TL_DSP_GROUP "5:\n\t" TL_DSP_GROUP
                     "4:\n\t" TL_DSP_GROUP "3:\n\t" TL_DSP_GROUP "2:\n\t" TL_DSP_GROUP "1:\n\t" TL_DSP_GROUP
                     "cmp %[x], %[end]\n\t"
                     "bne 8b\n\t"
                     "ldrd %[x0], %[x1], [%[wp]], #8\n\t"
                     "sub %[aif], %[aif], %[bif]\n\t"
                     "add %[aif], %[x0], %[aif], asr #8\n\t"
                     "sub %[ago], %[ago], %[bgo]\n\t"
                     "add %[ago], %[x1], %[ago], asr #8\n\t"
                     : [wp] "+r"(wp), [x] "+r"(x), [x0] "+r"(x0), [x1] "+r"(x1), [aif] "=&r"(aif),
                       [bif] "=&r"(bif), [ago] "=&r"(ago), [bgo] "=&r"(bgo), [end] "=&r"(end), [w0] "=&r"(w0),
                       [w1] "=&r"(w1), [w2] "=&r"(w2), [w3] "=&r"(w3)
                     :
                     : "cc", "memory");
    *w = wp;
    acc[0] = bif;
    acc[1] = aif;
    acc[2] = bgo;
    acc[3] = ago;
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

static inline int32_t tl_qadd(int32_t a, int32_t b)
{
    const int64_t sum = (int64_t)a + b;
    return sum > INT32_MAX ? INT32_MAX : (sum < INT32_MIN ? INT32_MIN : (int32_t)sum);
}

static inline int32_t tl_rq_words(int32_t v, int32_t left, int32_t m2, int32_t p)
{
    const int32_t s = tl_i32(tl_u32(v) << left);
    /* SMMLAR s, m2, (m2 < 0 ? s : 0): the accumulate word plus the rounded high word of the product */
    const int64_t product = (int64_t)s * m2 + (INT64_C(1) << 31);
    const int32_t rounded = (int32_t)(product < 0 ? ~(~product >> 32) : product >> 32);
    const int32_t high = tl_i32(tl_u32(m2 < 0 ? s : 0) + tl_u32(rounded));
    /* SMLAL high, p onto (hi, lo) = (p < 0 ? high : 0, 2^31 + (high < 0 ? -1 : 0)); the result is hi */
    const uint32_t lo = UINT32_C(0x80000000) - (high < 0 ? 1u : 0u);
    const uint64_t start = ((uint64_t)tl_u32(p < 0 ? high : 0) << 32) | lo;
    return tl_i32((uint32_t)((start + (uint64_t)((int64_t)high * p)) >> 32));
}

static inline void tl_dsp_pass(const uint32_t **w, const uint32_t *x, uint32_t groups, uint32_t correction,
                               uint32_t *acc)
{
    const uint32_t *wp = *w;
    uint32_t b_if = wp[0] + correction, b_go = wp[1] + correction;
    uint32_t a_if = b_if, a_go = b_go;
    wp += 2;
    for (uint32_t g = 0; g < groups; ++g, wp += 4, x += 2) {
        a_if = tl_smlad(wp[0], x[0], a_if);
        b_if = tl_smlad(tl_uxtb16(wp[0]), x[0], b_if);
        a_go = tl_smlad(wp[1], x[0], a_go);
        b_go = tl_smlad(tl_uxtb16(wp[1]), x[0], b_go);
        a_if = tl_smlad(wp[2], x[1], a_if);
        b_if = tl_smlad(tl_uxtb16(wp[2]), x[1], b_if);
        a_go = tl_smlad(wp[3], x[1], a_go);
        b_go = tl_smlad(tl_uxtb16(wp[3]), x[1], b_go);
    }
    acc[0] = b_if;
    acc[1] = wp[0] + (uint32_t)tl_asr(tl_i32(a_if - b_if), 8);
    acc[2] = b_go;
    acc[3] = wp[1] + (uint32_t)tl_asr(tl_i32(a_go - b_go), 8);
    *w = wp + 2;
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

/* Out of line and never specialised (no inlining, cloning or constant propagation): one copy per model source,
 * with the same code whatever the model's constants and sizes. */
#if defined(__GNUC__) && !defined(__clang__)
#define TL_DSP_OUT_OF_LINE __attribute__((noipa, unused))
#else
#define TL_DSP_OUT_OF_LINE __attribute__((noinline, unused))
#endif

/* tl_dsp_half for rows of more than 504 inputs: the passes' sums added up, wrapping at 32 bits. */
static TL_DSP_OUT_OF_LINE void tl_dsp_long_half(const uint32_t **w, const uint32_t *x, uint32_t groups,
                                                uint32_t correction, uint32_t *acc)
{
    uint32_t part[4];
    acc[0] = acc[1] = acc[2] = acc[3] = 0u;
    while (groups > 0u) {
        const uint32_t pass = groups < TL_DSP_PASS_GROUPS ? groups : TL_DSP_PASS_GROUPS;
        tl_dsp_pass(w, x, pass, correction, part);
        for (unsigned k = 0; k < 4u; ++k) {
            acc[k] += part[k];
        }
        correction = 0u;
        x += 2u * pass;
        groups -= pass;
    }
}

/*
 * One half (layer input or h) of one unit: acc[0..3] = bias + the dot products of gates i, f, g, o, wrapping
 * at 32 bits like the reference; *w advances past the half's passes. correction is tl_dsp_expand's result for
 * x; groups >= 1.
 */
static inline void tl_dsp_half(const uint32_t **w, const uint32_t *x, uint32_t groups, uint32_t correction,
                               uint32_t *acc)
{
    if (groups <= TL_DSP_PASS_GROUPS) {
        tl_dsp_pass(w, x, groups, correction, acc);
    } else {
        tl_dsp_long_half(w, x, groups, correction, acc);
    }
}

static inline int32_t tl_clamp(int32_t v, int32_t lo, int32_t hi)
{
    return v < lo ? lo : (v > hi ? hi : v);
}

/*
 * tinylstm_requantize(v, multiplier, shift) for every int32 v, in six instructions whatever the constants, from
 * the three words k = {left, m2, p} the generator derives from (multiplier, shift): left = max(shift, 0);
 * m2 = 2 multiplier, wrapped to an int32; p = 2^(32 - right), wrapped to an int32, for right = max(-shift, 0) > 0,
 * and p = -1 for right = 0.
 * 1. s = v << left, wrapping like the reference.
 * 2. high = (2 s multiplier + 2^31) >> 32 (the rounding doubling high multiply) = SMMLAR s, m2 with the accumulate
 *    word s when m2 wrapped (s m2 = 2 s multiplier - s 2^32), else 0.
 * 3. The rounding right shift, ties away from zero: SMLAL high, p onto the start words (hi, lo) =
 *    (p < 0 ? high : 0, 2^31 - [high < 0]); the result is hi. For right >= 2 that is
 *    floor(high / 2^right + 1/2 - [high < 0] 2^-32), exact in 64 bits (the 2^-32 only moves ties of negative
 *    values down); for right = 1 p wraps to -2^31 and the start word high adds the missing high 2^32 back; for
 *    right = 0 hi stays high, since |high| < 2^31 - 1 keeps 2^31 - [high < 0] - high within 0 .. 2^32 - 1.
 */
static inline int32_t tl_rq(int32_t v, const int32_t *k)
{
    return tl_rq_words(v, k[0], k[1], k[2]);
}

/*
 * A layer's constant table (int32 words; tinylstm/export.py writes it): its sizes, the cell's bounds (-cell_clip
 * and cell_clip, or -32768 and 32767 when cell_clip is 0), h's zero point, the scaling of tanh(c)'s input
 * ((c * multiplier + round) >> shift: the reference's 3 * 2^left_shift), three requantizations for the cell and h,
 * then eight per unit for the gates, or eight for all units with per-tensor scales (TL_K_GATE_STEP is 0 then).
 */
#define TL_K_INPUTS 0
#define TL_K_HIDDEN 1
#define TL_K_GATE_STEP 2 /* words from one unit's gate requantizations to the next's: 24 or 0 */
#define TL_K_CELL_MIN 3
#define TL_K_CELL_MAX 4
#define TL_K_ZERO_POINT 5
#define TL_K_TANH_MULTIPLIER 6
#define TL_K_TANH_ROUND 7
#define TL_K_TANH_SHIFT 8
#define TL_K_CELL 9   /* f * c, i * g, o * tanh(c): 3 words each */
#define TL_K_GATES 18 /* per gate i, f, g, o: the input half, then the h half, 3 words each */

/*
 * sigmoid and tanh through the activation table (tinylstm_dsp_activation_table): for each index n
 * of the shared table T, the pair {T[n + 1] - T[n], 512 (T[n] - n (T[n + 1] - T[n])) + 512}, so the reference's
 * interpolation T[n] 2^k + (a mod 2^k) (T[n + 1] - T[n]) with its rounding is one multiply-accumulate of a = |v|.
 * Entry 255 (diff 0) is tanh's saturation, 32767.
 */
static inline int32_t tl_dsp_sigmoid(int32_t x, const int32_t *table)
{
    const int32_t v = 3 * x;
    const uint32_t a = (uint32_t)(v < 0 ? -v : v); /* < 2^17: the index stays below 193 */
    const int32_t *entry = table + 2u * (a >> 9);
    const int32_t out = (int32_t)((a * (uint32_t)entry[0] + (uint32_t)entry[1]) >> 10);
    return v < 0 ? 32768 - out : out;
}

/* tanh of v = x * 3 * 2^left_shift (the scaled input of the reference's tanh). */
static inline int32_t tl_dsp_tanh(int32_t v, const int32_t *table)
{
    const uint32_t a = (uint32_t)(v < 0 ? -v : v);
    const uint32_t index = a >> 8;
    const int32_t *entry = table + 2u * (index < 255u ? index : 255u);
    const int32_t out = (int32_t)((a * (uint32_t)entry[0] + (uint32_t)(entry[1] >> 1) - UINT32_C(0x800080)) >> 8);
    return v < 0 ? -out : out;
}

/* The pre-activation of gate g: clamp16(requantized h half + clamp16(requantized input half)), as the reference. */
static inline int32_t tl_dsp_gate(const uint32_t *acc, const int32_t *q, unsigned g)
{
    const int32_t from_x = tl_ssat16(tl_rq(tl_i32(acc[g]), q + 6u * g));
    return tl_ssat16(tl_qadd(tl_rq(tl_i32(acc[4u + g]), q + 6u * g + 3u), from_x));
}

/*
 * One time step of one layer: x [inputs] -> h [hidden], cell [hidden] updated in place. k: the constant table;
 * w: per unit, the biases and packed words of the input half, then of the h half; scratch: at least
 * 2 (ceil(inputs / 4) + ceil(hidden / 4)) words.
 */
static TL_DSP_OUT_OF_LINE void tl_dsp_layer(const int32_t *k, const uint32_t *w, const int8_t *x, int8_t *h,
                                            int16_t *cell, uint32_t *scratch)
{
    const int32_t *const table = tinylstm_dsp_activation_table;
    const uint32_t inputs = (uint32_t)k[TL_K_INPUTS], hidden = (uint32_t)k[TL_K_HIDDEN];
    const uint32_t x_groups = (inputs + 3u) >> 2, h_groups = (hidden + 3u) >> 2;
    uint32_t *const xs = scratch;
    uint32_t *const hs = scratch + 2u * x_groups;
    const uint32_t cx = tl_dsp_expand(x, inputs, xs);
    const uint32_t ch = tl_dsp_expand(h, hidden, hs);
    const int32_t *q = k + TL_K_GATES;
    for (uint32_t j = 0; j < hidden; ++j) {
        uint32_t acc[8];
        tl_dsp_half(&w, xs, x_groups, cx, acc);
        tl_dsp_half(&w, hs, h_groups, ch, acc + 4);
        const int32_t i = tl_dsp_sigmoid(tl_dsp_gate(acc, q, 0u), table);
        const int32_t f = tl_dsp_sigmoid(tl_dsp_gate(acc, q, 1u), table);
        const int32_t g = tl_dsp_tanh(3 * tl_dsp_gate(acc, q, 2u), table);
        const int32_t o = tl_dsp_sigmoid(tl_dsp_gate(acc, q, 3u), table);
        const int32_t kept = tl_ssat16(tl_rq(f * cell[j], k + TL_K_CELL));
        const int32_t c = tl_clamp(tl_qadd(tl_rq(i * g, k + TL_K_CELL + 3), kept), k[TL_K_CELL_MIN], k[TL_K_CELL_MAX]);
        cell[j] = (int16_t)c;
        const int32_t scaled = tl_asr(c * k[TL_K_TANH_MULTIPLIER] + k[TL_K_TANH_ROUND], (unsigned)k[TL_K_TANH_SHIFT]);
        const int32_t out = tl_rq(o * tl_dsp_tanh(scaled, table), k + TL_K_CELL + 6);
        h[j] = (int8_t)tl_ssat8(tl_qadd(out, k[TL_K_ZERO_POINT]));
        q += k[TL_K_GATE_STEP];
    }
}

#endif /* TINYLSTM_KERNEL_ARM_DSP_H */
