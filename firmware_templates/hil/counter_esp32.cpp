/* Cycle counter on ESP32 chips: the CPU cycle counter (CCOUNT on Xtensa, mcycle on RISC-V), 32 bits. */
#include <Arduino.h>

#include "hil_config.h"
#include "hil_port.h"

const uint32_t port_counter_hz = HIL_CPU_HZ;
const uint8_t port_counter_kind = HIL_COUNTER_CYCLES;

static uint32_t cycles_at_start;

void counter_init(void)
{
}

void counter_start(void)
{
    cycles_at_start = ESP.getCycleCount();
}

uint32_t counter_read(void)
{
    return ESP.getCycleCount() - cycles_at_start;
}
