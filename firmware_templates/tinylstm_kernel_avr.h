/*
 * tinylstm AVR kernel (ATmega, avr-gcc): helpers for the layer step functions that tinylstm generates per model.
 * Same results as the reference kernel, bit for bit; the gate arithmetic after the matrix part is shared with
 * the Cortex-M DSP kernel (tinylstm_kernel_arm_dsp.h, its portable definitions).
 *
 * Matrix part. Each step first copies the layer input and h to RAM as unsigned bytes x' = x + 128, and the
 * generator stores every weight as w' = w + 128 in flash, the four gates of one input side by side. Then
 * sum(w x) = sum(w' x') - 128 sum(w) - 128 sum(x'): the middle term is folded into the stored bias and the last
 * is one correction per step, so the inner loop multiplies unsigned bytes (MUL) and adds the unsigned 16-bit
 * product into a 24-bit accumulator with no sign handling: LPM Z+ (3 cycles), MUL (2), ADD/ADC/ADC (3) per
 * multiply-accumulate, and the input byte (LD X+, 2 cycles) is shared by the unit's four gate rows. A pass
 * covers at most 255 inputs, so a 24-bit accumulator never overflows (255 * 255 * 255 < 2^24); longer rows
 * take several passes, added up in 32 bits. The loop is in inline assembly, so its speed does not depend on
 * the optimisation level.
 */
#ifndef TINYLSTM_KERNEL_AVR_H
#define TINYLSTM_KERNEL_AVR_H

#include <stdint.h>

#include "tinylstm_kernel.h"
#include "tinylstm_kernel_arm_dsp.h"

/* x'[k] = x[k] + 128 as unsigned bytes; returns -128 * sum(x') (two's complement), the per-step correction. */
static inline uint32_t tl_avr_expand(const int8_t *x, uint16_t n, uint8_t *out)
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

typedef __uint24 tl_u24;

/* The four gate rows of one unit over n inputs (1..255): s[g] += sum(w'[k][g] * x'[k]); *w advances by 4 n. */
static inline void tl_avr_mac(const uint8_t **w, const uint8_t *x, uint8_t n, tl_u24 s[4])
{
    tl_u24 s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    uint8_t input, weight;
    const uint8_t zero = 0;
    const uint8_t *wp = *w;
    __asm__ volatile(
        "1:\n\t"
        "ld %[in], X+\n\t"
        "lpm %[wt], Z+\n\t"
        "mul %[wt], %[in]\n\t"
        "add %A[s0], r0\n\t"
        "adc %B[s0], r1\n\t"
        "adc %C[s0], %[zero]\n\t"
        "lpm %[wt], Z+\n\t"
        "mul %[wt], %[in]\n\t"
        "add %A[s1], r0\n\t"
        "adc %B[s1], r1\n\t"
        "adc %C[s1], %[zero]\n\t"
        "lpm %[wt], Z+\n\t"
        "mul %[wt], %[in]\n\t"
        "add %A[s2], r0\n\t"
        "adc %B[s2], r1\n\t"
        "adc %C[s2], %[zero]\n\t"
        "lpm %[wt], Z+\n\t"
        "mul %[wt], %[in]\n\t"
        "add %A[s3], r0\n\t"
        "adc %B[s3], r1\n\t"
        "adc %C[s3], %[zero]\n\t"
        "dec %[n]\n\t"
        "brne 1b\n\t"
        "clr r1\n\t"
        : [s0] "+r"(s0), [s1] "+r"(s1), [s2] "+r"(s2), [s3] "+r"(s3), [in] "=&r"(input), [wt] "=&r"(weight),
          [n] "+r"(n), "+x"(x), "+z"(wp)
        : [zero] "r"(zero)
        : "r0", "memory");
    *w = wp;
    s[0] = s0;
    s[1] = s1;
    s[2] = s2;
    s[3] = s3;
}

#else /* the same sums in portable C (for host tests of the generated code) */

typedef uint32_t tl_u24;

static inline void tl_avr_mac(const uint8_t **w, const uint8_t *x, uint8_t n, tl_u24 s[4])
{
    const uint8_t *wp = *w;
    s[0] = s[1] = s[2] = s[3] = 0;
    for (uint8_t k = 0; k < n; ++k, wp += 4) {
        for (uint8_t g = 0; g < 4; ++g) {
            s[g] += (tl_u24)((uint16_t)wp[g] * x[k]);
        }
    }
    *w = wp;
}

#endif

/*
 * One half (layer input or h) of one unit: acc[0..3] = bias + the dot products of gates i, f, g, o, wrapping
 * at 32 bits like the reference. correction is tl_avr_expand's result for x; n >= 1.
 */
static inline void tl_avr_half(const uint8_t **w, const uint8_t *x, uint16_t n, uint32_t correction,
                               const int32_t *bias, uint32_t *acc)
{
    for (uint8_t g = 0; g < 4; ++g) {
        acc[g] = (uint32_t)TL_READ_I32(&bias[g]) + correction;
    }
    while (n > 0u) {
        const uint8_t pass = n < 255u ? (uint8_t)n : 255u;
        tl_u24 s[4];
        tl_avr_mac(w, x, pass, s);
        for (uint8_t g = 0; g < 4; ++g) {
            acc[g] += s[g];
        }
        x += pass;
        n -= pass;
    }
}

#endif /* TINYLSTM_KERNEL_AVR_H */
