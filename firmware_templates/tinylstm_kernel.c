/*
 * tinylstm reference kernel (see tinylstm_kernel.h). Written for clarity: one hidden unit at a time,
 * one multiply-accumulate at a time. Every intermediate is kept in a type wide enough for it, and the
 * few places where a 32-bit register wraps (bias + dot product, the requantize left shift) are computed
 * in uint32_t and converted back explicitly, so there is no signed overflow anywhere.
 */
#include "tinylstm_kernel.h"

#include <string.h>

/* Reading constants from flash: AVR needs explicit program-memory loads, every other target reads memory. */
#if defined(__AVR__)
#define READ_I8(p) ((int8_t)pgm_read_byte(p))
#define READ_U16(p) ((uint16_t)pgm_read_word(p))
#define READ_I32(p) ((int32_t)pgm_read_dword(p))
#define READ_STRUCT(dst, src) memcpy_P((dst), (src), sizeof *(dst))
#else
#define READ_I8(p) (*(p))
#define READ_U16(p) (*(p))
#define READ_I32(p) (*(p))
#define READ_STRUCT(dst, src) memcpy((dst), (src), sizeof *(dst))
#endif

const uint16_t tinylstm_sigmoid_table[256] TINYLSTM_FLASH = {
    32768, 33451, 34133, 34813, 35493, 36169, 36843, 37513, 38180, 38841, 39498, 40149, 40794, 41432, 42064, 42688,
    43304, 43912, 44511, 45102, 45683, 46255, 46817, 47369, 47911, 48443, 48964, 49475, 49975, 50464, 50942, 51409,
    51865, 52311, 52745, 53169, 53581, 53983, 54374, 54755, 55125, 55485, 55834, 56174, 56503, 56823, 57133, 57433,
    57724, 58007, 58280, 58544, 58800, 59048, 59288, 59519, 59743, 59959, 60168, 60370, 60565, 60753, 60935, 61110,
    61279, 61441, 61599, 61750, 61896, 62036, 62172, 62302, 62428, 62549, 62666, 62778, 62886, 62990, 63090, 63186,
    63279, 63368, 63454, 63536, 63615, 63691, 63765, 63835, 63903, 63968, 64030, 64090, 64148, 64204, 64257, 64308,
    64357, 64405, 64450, 64494, 64536, 64576, 64614, 64652, 64687, 64721, 64754, 64786, 64816, 64845, 64873, 64900,
    64926, 64950, 64974, 64997, 65019, 65039, 65060, 65079, 65097, 65115, 65132, 65149, 65164, 65179, 65194, 65208,
    65221, 65234, 65246, 65258, 65269, 65280, 65291, 65301, 65310, 65319, 65328, 65337, 65345, 65352, 65360, 65367,
    65374, 65381, 65387, 65393, 65399, 65404, 65410, 65415, 65420, 65425, 65429, 65433, 65438, 65442, 65445, 65449,
    65453, 65456, 65459, 65462, 65465, 65468, 65471, 65474, 65476, 65479, 65481, 65483, 65485, 65488, 65489, 65491,
    65493, 65495, 65497, 65498, 65500, 65501, 65503, 65504, 65505, 65507, 65508, 65509, 65510, 65511, 65512, 65513,
    65514, 65515, 65516, 65517, 65517, 65518, 65519, 65520, 65520, 65521, 65522, 65522, 65523, 65523, 65524, 65524,
    65525, 65525, 65526, 65526, 65526, 65527, 65527, 65528, 65528, 65528, 65529, 65529, 65529, 65529, 65530, 65530,
    65530, 65530, 65531, 65531, 65531, 65531, 65531, 65532, 65532, 65532, 65532, 65532, 65532, 65533, 65533, 65533,
    65533, 65533, 65533, 65533, 65533, 65534, 65534, 65534, 65534, 65534, 65534, 65534, 65534, 65534, 65534, 65535,
};

/* ---- integer helpers ---------------------------------------------------------------------------------- */

/* The int32 with the same 32 bits as u (two's complement), without implementation-defined conversion. */
static int32_t wrap_int32(uint32_t u)
{
    return u <= (uint32_t)INT32_MAX ? (int32_t)u : (int32_t)(u - UINT32_C(0x80000000)) + INT32_MIN;
}

/* floor(v / 2^n): an arithmetic right shift, spelled so that negative v is well defined in C99. */
static int32_t floor_shift32(int32_t v, unsigned n)
{
    return v < 0 ? ~(~v >> n) : v >> n;
}

static int64_t floor_shift64(int64_t v, unsigned n)
{
    return v < 0 ? ~(~v >> n) : v >> n;
}

static int32_t clamp32(int32_t v, int32_t lo, int32_t hi)
{
    return v < lo ? lo : (v > hi ? hi : v);
}

/*
 * clamp(wide + narrow, lo, hi) for |narrow| <= 2^15 and [lo, hi] inside the int16 range, without int32
 * overflow: beyond +-2^16 the wide term decides the result alone.
 */
static int32_t add_clamp(int32_t wide, int32_t narrow, int32_t lo, int32_t hi)
{
    if (wide > INT32_C(65536)) {
        return hi;
    }
    if (wide < -INT32_C(65536)) {
        return lo;
    }
    return clamp32(wide + narrow, lo, hi);
}

/* v / 2^exponent rounded to nearest, ties away from zero (gemmlowp RoundingDivideByPOT); exponent <= 31. */
static int32_t rounding_divide_by_pot(int32_t v, unsigned exponent)
{
    const uint32_t mask = (UINT32_C(1) << exponent) - 1u;
    const uint32_t remainder = (uint32_t)v & mask;
    const int32_t result = floor_shift32(v, exponent);
    const uint32_t threshold = (mask >> 1) + (result < 0 ? 1u : 0u);
    return result + (remainder > threshold ? 1 : 0);
}

int32_t tinylstm_requantize(int32_t value, int32_t multiplier, int shift)
{
    const unsigned left = shift > 0 ? (unsigned)shift : 0u;
    const unsigned right = shift > 0 ? 0u : (unsigned)-shift;
    /* 1. left shift, wrapping to 32 bits */
    const int32_t shifted = wrap_int32((uint32_t)value << left);
    /* 2. rounding doubling high multiply: (shifted * multiplier + 2^30) >> 31; fits int32 for multiplier < 2^31 */
    const int32_t high = (int32_t)floor_shift64((int64_t)shifted * multiplier + (INT64_C(1) << 30), 31);
    /* 3. rounding right shift */
    return rounding_divide_by_pot(high, right);
}

/*
 * sigmoid (table step 2^9) or tanh (table step 2^8, tanh(x) = 2 sigmoid(2x) - 1) through the table with
 * linear interpolation. The input is first scaled by 3 * 2^left_shift (a negative left_shift divides,
 * rounding half up), which maps Q3.12 onto the table's grid of 1/24.
 */
static int16_t activation(int16_t x, int left_shift, int is_tanh)
{
    int32_t v;
    if (left_shift >= 0) {
        v = (int32_t)x * (INT32_C(3) << left_shift);
    } else {
        v = floor_shift32((int32_t)x * 3 + (INT32_C(1) << (-left_shift - 1)), (unsigned)-left_shift);
    }
    const uint32_t magnitude = v < 0 ? (uint32_t)-v : (uint32_t)v;
    const unsigned step = is_tanh ? 8u : 9u;
    const uint32_t index = magnitude >> step;
    int32_t r;
    if (index < 255u) {
        const int32_t lo = (int32_t)READ_U16(&tinylstm_sigmoid_table[index]);
        const int32_t hi = (int32_t)READ_U16(&tinylstm_sigmoid_table[index + 1u]);
        const int32_t fraction = (int32_t)(magnitude & ((UINT32_C(1) << step) - 1u));
        r = lo * (INT32_C(1) << step) + fraction * (hi - lo);
    } else {
        r = is_tanh ? INT32_C(0xFFFF) << 8 : INT32_C(0x7FFF) << 10;
    }
    int32_t out;
    if (is_tanh) {
        out = v >= 0 ? floor_shift32(r - (INT32_C(1) << 23) + (INT32_C(1) << 7), 8)
                     : floor_shift32((INT32_C(1) << 23) - r + (INT32_C(1) << 7) - 1, 8);
    } else {
        out = v >= 0 ? floor_shift32(r + (INT32_C(1) << 9), 10)
                     : floor_shift32((INT32_C(1) << 25) - r + (INT32_C(1) << 9) - 1, 10);
    }
    return (int16_t)out;
}

int16_t tinylstm_sigmoid(int16_t x)
{
    return activation(x, 0, 0);
}

int16_t tinylstm_tanh(int16_t x, int left_shift)
{
    return activation(x, left_shift, 1);
}

/* ---- layers -------------------------------------------------------------------------------------------- */

/* bias + sum weights[k] * v[k], wrapping at 32 bits like an int32 accumulator; weights in flash. */
static int32_t dot_with_bias(const int8_t *weights, const int8_t *v, uint16_t n, int32_t bias)
{
    uint32_t acc = (uint32_t)bias;
    for (uint16_t k = 0; k < n; ++k) {
        acc += (uint32_t)((int32_t)READ_I8(&weights[k]) * v[k]);
    }
    return wrap_int32(acc);
}

/* Pre-activation of one gate for hidden unit `row`, int16 Q3.12: input half and hidden half, each requantized. */
static int16_t gate_preactivation(const tinylstm_lstm_params *p, unsigned gate, uint16_t row, const int8_t *x,
                                  const int8_t *h)
{
    const size_t r = (size_t)gate * p->hidden_size + row;
    const size_t q = p->per_channel ? r : gate;
    const int32_t acc_x = dot_with_bias(p->input_weights + r * p->input_size, x, p->input_size,
                                        READ_I32(&p->input_bias[r]));
    const int32_t acc_h = dot_with_bias(p->hidden_weights + r * p->hidden_size, h, p->hidden_size,
                                        READ_I32(&p->hidden_bias[r]));
    const int32_t from_x = clamp32(
        tinylstm_requantize(acc_x, READ_I32(&p->input_multiplier[q]), READ_I8(&p->input_shift[q])),
        INT16_MIN, INT16_MAX);
    const int32_t from_h =
        tinylstm_requantize(acc_h, READ_I32(&p->hidden_multiplier[q]), READ_I8(&p->hidden_shift[q]));
    return (int16_t)add_clamp(from_h, from_x, INT16_MIN, INT16_MAX);
}

void tinylstm_lstm_reset(const tinylstm_lstm_params *params, int8_t *h, int16_t *cell)
{
    tinylstm_lstm_params p;
    READ_STRUCT(&p, params);
    for (uint16_t j = 0; j < p.hidden_size; ++j) {
        h[j] = p.output_zero_point;
        cell[j] = 0;
    }
}

void tinylstm_lstm_step(const tinylstm_lstm_params *params, const int8_t *x, int8_t *h, int16_t *cell,
                        int8_t *scratch)
{
    tinylstm_lstm_params p;
    READ_STRUCT(&p, params);
    /* Every unit reads the previous h, so the new h goes to scratch first; cell[j] is only used by unit j. */
    for (uint16_t j = 0; j < p.hidden_size; ++j) {
        const int32_t input_gate = tinylstm_sigmoid(gate_preactivation(&p, 0, j, x, h));
        const int32_t forget_gate = tinylstm_sigmoid(gate_preactivation(&p, 1, j, x, h));
        const int32_t candidate = tinylstm_tanh(gate_preactivation(&p, 2, j, x, h), 0);
        const int32_t output_gate = tinylstm_sigmoid(gate_preactivation(&p, 3, j, x, h));

        const int32_t kept = clamp32(
            tinylstm_requantize(forget_gate * cell[j], p.forget_to_cell_multiplier, p.forget_to_cell_shift),
            INT16_MIN, INT16_MAX);
        const int32_t added =
            tinylstm_requantize(input_gate * candidate, p.input_to_cell_multiplier, p.input_to_cell_shift);
        cell[j] = (int16_t)add_clamp(added, kept, p.cell_min, p.cell_max);

        const int32_t squashed = tinylstm_tanh(cell[j], p.cell_tanh_shift);
        const int32_t scaled = tinylstm_requantize(output_gate * squashed, p.output_multiplier, p.output_shift);
        scratch[j] = (int8_t)add_clamp(scaled, p.output_zero_point, INT8_MIN, INT8_MAX);
    }
    memcpy(h, scratch, p.hidden_size);
}

void tinylstm_dense(const tinylstm_dense_params *params, const int8_t *x, int8_t *out)
{
    tinylstm_dense_params p;
    READ_STRUCT(&p, params);
    for (uint16_t k = 0; k < p.output_size; ++k) {
        const size_t q = p.per_channel ? k : 0;
        const int32_t acc = dot_with_bias(p.weights + (size_t)k * p.input_size, x, p.input_size,
                                          READ_I32(&p.bias[k]));
        const int32_t scaled = tinylstm_requantize(acc, READ_I32(&p.multiplier[q]), READ_I8(&p.shift[q]));
        out[k] = (int8_t)add_clamp(scaled, p.output_zero_point, INT8_MIN, INT8_MAX);
    }
}
