/*
 * Cycle counter on AVR Timer1: it runs at the CPU clock (prescaler 1) and its overflow interrupt extends it
 * to 32 bits, so the count is exact. The writes to GPIOR0 mark the start and the sample for simavr's own
 * cycle count (boards/emulators/simavr_uart.c); on hardware they are plain register writes. Both functions
 * stay out of line so every measurement runs the same instructions; the firmware subtracts their cost.
 */
#include <avr/interrupt.h>
#include <avr/io.h>

#include "hil_port.h"

const uint32_t port_counter_hz = F_CPU;
const uint8_t port_counter_kind = HIL_COUNTER_CYCLES;

static volatile uint16_t timer1_overflows;

ISR(TIMER1_OVF_vect)
{
    timer1_overflows++;
}

void counter_init(void)
{
    TCCR1A = 0;
    TCCR1B = 0;
}

__attribute__((noinline)) void counter_start(void)
{
    TCCR1B = 0;
    TCNT1 = 0;
    TIFR1 = _BV(TOV1);
    timer1_overflows = 0;
    TIMSK1 = _BV(TOIE1);
    GPIOR0 = 1;
    TCCR1B = _BV(CS10);
}

__attribute__((noinline)) uint32_t counter_read(void)
{
    GPIOR0 = 2;
    uint8_t sreg = SREG;
    cli();
    uint16_t low = TCNT1;
    uint16_t high = timer1_overflows;
    /* An overflow after cli() is pending, not yet counted. */
    if ((TIFR1 & _BV(TOV1)) && low < 0x8000)
        high++;
    SREG = sreg;
    return ((uint32_t)high << 16) | low;
}
