/* Fallback counter for cores without a cycle counter (Cortex-M0/M0+): the framework's micros(). */
#include <Arduino.h>

#include "hil_port.h"

const uint32_t port_counter_hz = 1000000UL;
const uint8_t port_counter_kind = HIL_COUNTER_MICROS;

static uint32_t micros_at_start;

void counter_init(void)
{
}

void counter_start(void)
{
    micros_at_start = micros();
}

uint32_t counter_read(void)
{
    return micros() - micros_at_start;
}
