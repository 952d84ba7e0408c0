/* Cycle counter on Cortex-M3/M4/M7 hardware: DWT->CYCCNT (32 bits, exact core cycles). */
#include "hil_config.h"
#include "hil_port.h"

#define DEMCR (*(volatile uint32_t *)0xE000EDFCUL)
#define DWT_CTRL (*(volatile uint32_t *)0xE0001000UL)
#define DWT_CYCCNT (*(volatile uint32_t *)0xE0001004UL)
#define DWT_LAR (*(volatile uint32_t *)0xE0001FB0UL)
#define DEMCR_TRCENA (1UL << 24)
#define DWT_CYCCNTENA 1UL

const uint32_t port_counter_hz = HIL_CPU_HZ;
const uint8_t port_counter_kind = HIL_COUNTER_CYCLES;

void counter_init(void)
{
    DEMCR |= DEMCR_TRCENA;
    DWT_LAR = 0xC5ACCE55UL; /* unlock, needed on the Cortex-M7 */
    DWT_CYCCNT = 0;
    DWT_CTRL |= DWT_CYCCNTENA;
}

static uint32_t cycles_at_start;

void counter_start(void)
{
    cycles_at_start = DWT_CYCCNT;
}

uint32_t counter_read(void)
{
    return DWT_CYCCNT - cycles_at_start;
}
