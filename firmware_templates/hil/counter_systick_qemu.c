/*
 * Counter for QEMU Cortex-M machines: SysTick at the machine's system clock, extended to 32 bits by its wrap
 * interrupt. QEMU models no cycles; run with -icount shift=0, one instruction takes one nanosecond of virtual
 * time, so counts * 1e9 / port_counter_hz are instructions retired (to within one count).
 */
#include "hil_config.h"
#include "hil_port.h"

#define SYST_CSR (*(volatile uint32_t *)0xE000E010UL)
#define SYST_RVR (*(volatile uint32_t *)0xE000E014UL)
#define SYST_CVR (*(volatile uint32_t *)0xE000E018UL)
#define SYSTICK_MAX 0x00FFFFFFUL

const uint32_t port_counter_hz = HIL_CPU_HZ;
const uint8_t port_counter_kind = HIL_COUNTER_QEMU_ICOUNT;

static volatile uint32_t systick_wraps;

void SysTick_Handler(void)
{
    systick_wraps++;
}

/* SysTick runs freely from counter_init(); a measurement is the difference of two extended readings. */
static uint32_t now(void)
{
    uint32_t wraps, value;
    do {
        wraps = systick_wraps;
        value = SYST_CVR;
    } while (wraps != systick_wraps);
    return wraps * (SYSTICK_MAX + 1) + (SYSTICK_MAX - value);
}

static uint32_t counts_at_start;

void counter_init(void)
{
    SYST_CSR = 0;
    SYST_RVR = SYSTICK_MAX;
    SYST_CVR = 0;
    systick_wraps = 0;
    SYST_CSR = 7; /* enable, interrupt on wrap, processor clock */
    while (SYST_CVR == 0) /* the first reload happens on the first tick */
        ;
}

void counter_start(void)
{
    counts_at_start = now();
}

uint32_t counter_read(void)
{
    return now() - counts_at_start;
}
