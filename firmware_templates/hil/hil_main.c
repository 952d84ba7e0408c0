/*
 * The HIL firmware: serves the models linked into it over the serial port (protocol: docs/hil-protocol.md).
 *
 * Frames are COBS-encoded and end with a 0x00 byte. Decoded, a frame is
 *   version(1) command(1) sequence(1) payload(n) crc16(2, little endian, CRC-16/CCITT-FALSE over the rest).
 * One buffer holds the encoded request, is decoded in place, and then holds the reply. Whatever arrives, the
 * device writes only inside that buffer: bytes past its end are dropped and the frame is reported as oversized.
 */
#include <stdint.h>
#include <string.h>

#include "hil_config.h"
#include "hil_port.h"

#define HIL_VERSION 1

enum {
    CMD_INFO = 0x01,
    CMD_RESET = 0x02,
    CMD_STEP = 0x03,
    CMD_RUN = 0x04,
    CMD_SELECT = 0x05,
    CMD_BENCH = 0x06,
    CMD_ERROR = 0x7F,
    REPLY = 0x80,
};

enum {
    ERR_BAD_CRC = 1,
    ERR_BAD_LENGTH = 2,
    ERR_UNKNOWN_COMMAND = 3,
    ERR_WRONG_MODEL = 4,
    ERR_BAD_VERSION = 5,
    ERR_OVERSIZED = 6,
    ERR_BAD_FRAMING = 7,
    ERR_BAD_STATE = 8,
    ERR_BAD_ARGUMENT = 9,
};

#define STEP_WITH_OUTPUT 0x01
#define RUN_FIRST 0x01
#define RUN_LAST 0x02
#define BENCH_SEEDED 0
#define BENCH_UPLOADED 1
#define BENCH_WITH_OUTPUT 0x01

#define HEADER 3
#define CRC_SIZE 2
#define INFO_SIZE (2 + 16 + 7 + 9 + 2 + 4 + 1 + sizeof(HIL_BOARD) - 1)
#define MAX3(a, b, c) ((a) > (b) ? ((a) > (c) ? (a) : (c)) : ((b) > (c) ? (b) : (c)))
/* The largest decoded frame, request or reply; its COBS form needs one more byte per 254 and the first. */
#define FRAME_MAX (HEADER + MAX3(HIL_MAX_PAYLOAD, 6 + HIL_MAX_OUTPUT, INFO_SIZE) + CRC_SIZE)
#define BUFFER_SIZE (FRAME_MAX + FRAME_MAX / 254 + 1)

static uint8_t frame[BUFFER_SIZE];
static uint8_t current_model;
static uint32_t counter_offset; /* what an empty measurement reads */
static uint32_t run_cycles;
static uint16_t run_steps;
static uint8_t run_open;

static uint16_t crc16(const uint8_t *data, uint16_t length)
{
    uint16_t crc = 0xFFFF;
    while (length--) {
        crc ^= (uint16_t)(*data++) << 8;
        for (uint8_t bit = 0; bit < 8; bit++)
            crc = (crc & 0x8000) ? (uint16_t)((crc << 1) ^ 0x1021) : (uint16_t)(crc << 1);
    }
    return crc;
}

/* Decodes COBS in place; returns the decoded length, or -1 if the encoding is broken. */
static int32_t cobs_decode(uint8_t *buf, uint16_t length)
{
    uint16_t read = 0, write = 0;
    while (read < length) {
        uint8_t code = buf[read++];
        if (code == 0 || (uint16_t)(read + code - 1) > length)
            return -1;
        for (uint8_t i = 1; i < code; i++)
            buf[write++] = buf[read++];
        if (code != 0xFF && read < length)
            buf[write++] = 0;
    }
    return write;
}

static void send_cobs(const uint8_t *data, uint16_t length)
{
    uint16_t start = 0;
    for (;;) {
        uint16_t end = start;
        while (end < length && data[end] != 0 && end - start < 254)
            end++;
        uint8_t code = (uint8_t)(end - start + 1);
        port_write_byte(code);
        for (uint16_t i = start; i < end; i++)
            port_write_byte(data[i]);
        if (end == length)
            break;
        start = code == 0xFF ? end : end + 1;
    }
    port_write_byte(0);
}

static void put_u16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

static void put_u32(uint8_t *p, uint32_t v)
{
    put_u16(p, (uint16_t)v);
    put_u16(p + 2, (uint16_t)(v >> 16));
}

/* Sends frame[0..HEADER+payload) with the reply command, the request's sequence number and a CRC. */
static void send_reply(uint8_t command, uint8_t sequence, uint16_t payload)
{
    frame[0] = HIL_VERSION;
    frame[1] = command;
    frame[2] = sequence;
    uint16_t length = HEADER + payload;
    put_u16(frame + length, crc16(frame, length));
    send_cobs(frame, length + CRC_SIZE);
}

static void send_error(uint8_t code, uint8_t command, uint8_t sequence)
{
    frame[HEADER] = code;
    frame[HEADER + 1] = command;
    send_reply(CMD_ERROR, sequence, 2);
}

static uint32_t get_u32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static uint16_t write_info(uint8_t *p)
{
    const hil_model_t *m = &hil_models[current_model];
    uint8_t *start = p;
    *p++ = HIL_MODEL_COUNT;
    *p++ = current_model;
    memcpy(p, m->hash, 16);
    p += 16;
    put_u16(p, m->input_size);
    put_u16(p + 2, m->window);
    put_u16(p + 4, m->output_size);
    p[6] = m->layers;
    p += 7;
    put_u32(p, (uint32_t)HIL_CPU_HZ);
    put_u32(p + 4, port_counter_hz);
    p[8] = port_counter_kind;
    p += 9;
    put_u16(p, HIL_MAX_PAYLOAD);
    put_u32(p + 2, port_free_ram());
    p += 6;
    *p++ = (uint8_t)(sizeof(HIL_BOARD) - 1);
    memcpy(p, HIL_BOARD, sizeof(HIL_BOARD) - 1);
    p += sizeof(HIL_BOARD) - 1;
    return (uint16_t)(p - start);
}

static uint32_t elapsed(void)
{
    uint32_t counts = counter_read();
    return counts > counter_offset ? counts - counter_offset : 0;
}

static void handle_step(uint8_t sequence, uint16_t payload)
{
    const hil_model_t *m = &hil_models[current_model];
    uint8_t *body = frame + HEADER;
    if (payload != 1u + m->input_size) {
        send_error(ERR_BAD_LENGTH, CMD_STEP, sequence);
        return;
    }
    uint8_t with_output = body[0] & STEP_WITH_OUTPUT;
    run_open = 0;
    counter_start();
    m->step((const int8_t *)(body + 1));
    if (with_output)
        m->output((int8_t *)(body + 4));
    uint32_t cycles = elapsed();
    put_u32(body, cycles);
    send_reply(CMD_STEP | REPLY, sequence, with_output ? 4u + m->output_size : 4u);
}

static void handle_run(uint8_t sequence, uint16_t payload)
{
    const hil_model_t *m = &hil_models[current_model];
    uint8_t *body = frame + HEADER;
    if (payload < 1 || (payload - 1u) % m->input_size != 0) {
        send_error(ERR_BAD_LENGTH, CMD_RUN, sequence);
        return;
    }
    uint8_t flags = body[0];
    uint16_t steps = (uint16_t)((payload - 1u) / m->input_size);
    if (!(flags & RUN_FIRST) && !run_open) {
        send_error(ERR_BAD_STATE, CMD_RUN, sequence);
        return;
    }
    counter_start();
    if ((flags & RUN_FIRST) && (flags & RUN_LAST) && steps == m->window) {
        /* A whole window in one frame: the model's own run(); the output is written after the last read. */
        m->run((const int8_t *)(body + 1), (int8_t *)(body + 6));
    } else {
        if (flags & RUN_FIRST)
            m->reset();
        for (uint16_t t = 0; t < steps; t++)
            m->step((const int8_t *)(body + 1 + (uint32_t)t * m->input_size));
        if (flags & RUN_LAST)
            m->output((int8_t *)(body + 6));
    }
    uint32_t cycles = elapsed();
    if (flags & RUN_FIRST) {
        run_cycles = 0;
        run_steps = 0;
    }
    run_cycles += cycles;
    run_steps += steps;
    run_open = !(flags & RUN_LAST);
    put_u32(body, run_cycles);
    put_u16(body + 4, run_steps);
    send_reply(CMD_RUN | REPLY, sequence, (flags & RUN_LAST) ? 6u + m->output_size : 6u);
}

/* The protocol's window generator: xorshift32 (13, 17, 5) from a state derived from the seed and the window
 * index; each input byte is the top byte of the next state. The host reproduces it (tinylstm.hil.seeded_windows). */
static uint32_t bench_state(uint32_t seed, uint32_t index)
{
    uint32_t state = seed ^ ((index + 1u) * 0x9E3779B9UL);
    return state ? state : 0x6D2B79F5UL;
}

static int8_t bench_next(uint32_t *state)
{
    uint32_t x = *state;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    *state = x;
    return (int8_t)(x >> 24);
}

/*
 * BENCH: count windows, each reset + window steps + (optionally) the output, with one count per window. The
 * reply's records (counts, output) are written into the frame buffer as the windows complete:
 * - seeded windows are generated one time step at a time into the last input_size bytes of the payload area,
 *   past the last record (so a seeded reply may take max_payload - input_size bytes);
 * - uploaded windows sit in the request right after the header, and a record never overtakes the next window
 *   as long as it is no longer than a window (otherwise only one window per request is accepted).
 * Each part (reset, every step, output) is measured on its own so generating inputs is never counted.
 */
static void handle_bench(uint8_t sequence, uint16_t payload)
{
    const hil_model_t *m = &hil_models[current_model];
    uint8_t *body = frame + HEADER;
    if (payload < 4) {
        send_error(ERR_BAD_LENGTH, CMD_BENCH, sequence);
        return;
    }
    uint8_t source = body[0], with_output = body[1] & BENCH_WITH_OUTPUT;
    uint16_t count = (uint16_t)(body[2] | (body[3] << 8));
    uint16_t record = with_output ? 4u + m->output_size : 4u;
    uint32_t window_bytes = (uint32_t)m->window * m->input_size;
    uint32_t seed = 0, first = 0;
    uint32_t limit = HIL_MAX_PAYLOAD;
    int8_t *scratch = (int8_t *)(body + HIL_MAX_PAYLOAD - m->input_size);
    if (source == BENCH_SEEDED) {
        if (payload != 12) {
            send_error(ERR_BAD_LENGTH, CMD_BENCH, sequence);
            return;
        }
        seed = get_u32(body + 4);
        first = get_u32(body + 8);
        limit = HIL_MAX_PAYLOAD - m->input_size;
    } else if (source == BENCH_UPLOADED) {
        if (count > HIL_MAX_PAYLOAD || payload != 4u + count * window_bytes
            || (count > 1 && record > window_bytes)) {
            send_error(ERR_BAD_LENGTH, CMD_BENCH, sequence);
            return;
        }
    } else {
        send_error(ERR_BAD_ARGUMENT, CMD_BENCH, sequence);
        return;
    }
    if (count == 0) {
        send_error(ERR_BAD_ARGUMENT, CMD_BENCH, sequence);
        return;
    }
    if (2u + (uint32_t)count * record > limit) {
        send_error(ERR_BAD_LENGTH, CMD_BENCH, sequence);
        return;
    }
    run_open = 0;
    uint8_t *out = body + 2;
    const int8_t *uploaded = (const int8_t *)(body + 4);
    for (uint16_t k = 0; k < count; k++) {
        uint32_t state = bench_state(seed, first + k);
        counter_start();
        m->reset();
        uint32_t counts = elapsed();
        for (uint16_t t = 0; t < m->window; t++) {
            const int8_t *x_t = uploaded;
            if (source == BENCH_SEEDED) {
                for (uint16_t i = 0; i < m->input_size; i++)
                    scratch[i] = bench_next(&state);
                x_t = scratch;
            } else {
                uploaded += m->input_size;
            }
            counter_start();
            m->step(x_t);
            counts += elapsed();
        }
        if (with_output) {
            counter_start();
            m->output((int8_t *)(out + 4));
            counts += elapsed();
        }
        put_u32(out, counts);
        out += record;
    }
    put_u16(body, count);
    send_reply(CMD_BENCH | REPLY, sequence, (uint16_t)(2u + (uint32_t)count * record));
}

static void handle_select(uint8_t sequence, uint16_t payload)
{
    if (payload != 16) {
        send_error(ERR_BAD_LENGTH, CMD_SELECT, sequence);
        return;
    }
    for (uint8_t i = 0; i < HIL_MODEL_COUNT; i++) {
        if (memcmp(hil_models[i].hash, frame + HEADER, 16) == 0) {
            current_model = i;
            run_open = 0;
            hil_models[i].reset();
            send_reply(CMD_SELECT | REPLY, sequence, write_info(frame + HEADER));
            return;
        }
    }
    send_error(ERR_WRONG_MODEL, CMD_SELECT, sequence);
}

static void handle_frame(uint16_t encoded_length)
{
    int32_t length = cobs_decode(frame, encoded_length);
    if (length < 0) {
        send_error(ERR_BAD_FRAMING, 0, 0);
        return;
    }
    if (length < HEADER + CRC_SIZE) {
        send_error(ERR_BAD_LENGTH, 0, 0);
        return;
    }
    uint16_t body_length = (uint16_t)length - CRC_SIZE;
    uint16_t crc = (uint16_t)(frame[body_length] | (frame[body_length + 1] << 8));
    uint8_t command = frame[1], sequence = frame[2];
    if (crc16(frame, body_length) != crc) {
        send_error(ERR_BAD_CRC, command, sequence);
        return;
    }
    if (frame[0] != HIL_VERSION) {
        send_error(ERR_BAD_VERSION, command, sequence);
        return;
    }
    uint16_t payload = body_length - HEADER;
    switch (command) {
    case CMD_INFO:
        send_reply(CMD_INFO | REPLY, sequence, write_info(frame + HEADER));
        break;
    case CMD_RESET:
        run_open = 0;
        hil_models[current_model].reset();
        send_reply(CMD_RESET | REPLY, sequence, 0);
        break;
    case CMD_STEP:
        handle_step(sequence, payload);
        break;
    case CMD_RUN:
        handle_run(sequence, payload);
        break;
    case CMD_SELECT:
        handle_select(sequence, payload);
        break;
    case CMD_BENCH:
        handle_bench(sequence, payload);
        break;
    default:
        send_error(ERR_UNKNOWN_COMMAND, command, sequence);
    }
}

void hil_run(void)
{
    port_init();
    counter_init();
    counter_start();
    counter_offset = counter_read();
    for (uint8_t i = 0; i < HIL_MODEL_COUNT; i++)
        hil_models[i].reset();
    /* The ready banner: an unsolicited INFO reply with sequence 0. */
    send_reply(CMD_INFO | REPLY, 0, write_info(frame + HEADER));

    uint16_t length = 0;
    uint8_t oversized = 0;
    for (;;) {
        uint8_t byte = port_read_byte();
        if (byte == 0) {
            if (oversized)
                send_error(ERR_OVERSIZED, 0, 0);
            else if (length > 0)
                handle_frame(length);
            length = 0;
            oversized = 0;
        } else if (length < BUFFER_SIZE) {
            frame[length++] = byte;
        } else {
            oversized = 1;
        }
    }
}

#ifndef HIL_NO_MAIN
int main(void)
{
    hil_run();
    return 0;
}
#endif
