/* The platform layer under the HIL firmware: one serial_*.c and one counter_*.c per target implement it. */
#ifndef HIL_PORT_H
#define HIL_PORT_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Counter kinds reported in INFO (docs/hil-protocol.md). */
#define HIL_COUNTER_CYCLES 1      /* exact CPU cycles: AVR Timer1, DWT->CYCCNT, ESP32 CCOUNT */
#define HIL_COUNTER_QEMU_ICOUNT 2 /* SysTick under QEMU -icount shift=0: counts * 1e9 / counter_hz = instructions */
#define HIL_COUNTER_MICROS 3      /* the framework's microsecond clock (cores without a cycle counter) */

#define HIL_FREE_RAM_UNKNOWN 0xFFFFFFFFUL

void port_init(void);
uint8_t port_read_byte(void); /* blocks until a byte arrives */
void port_write_byte(uint8_t byte);
uint32_t port_free_ram(void); /* bytes between the static data and the stack, or HIL_FREE_RAM_UNKNOWN */

void counter_init(void);
void counter_start(void);    /* restart the counter from zero */
uint32_t counter_read(void); /* counts since counter_start(), extended to 32 bits */
extern const uint32_t port_counter_hz;
extern const uint8_t port_counter_kind;

void hil_run(void);

#ifdef __cplusplus
}
#endif

#endif
