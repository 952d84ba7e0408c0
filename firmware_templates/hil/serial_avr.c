/* HIL serial port on the ATmega328P's USART0 (bare avr-libc), polled. */
#include <avr/interrupt.h>
#include <avr/io.h>

#include "hil_config.h"
#include "hil_port.h"

void port_init(void)
{
    /* Double speed mode: UBRR = F_CPU / (8 * baud) - 1, rounded. */
    uint16_t ubrr = (uint16_t)((F_CPU + 4UL * HIL_BAUD) / (8UL * HIL_BAUD) - 1);
    UBRR0H = (uint8_t)(ubrr >> 8);
    UBRR0L = (uint8_t)ubrr;
    UCSR0A = _BV(U2X0);
    UCSR0B = _BV(RXEN0) | _BV(TXEN0);
    UCSR0C = _BV(UCSZ01) | _BV(UCSZ00);
    sei();
}

uint8_t port_read_byte(void)
{
    while (!(UCSR0A & _BV(RXC0)))
        ;
    return UDR0;
}

void port_write_byte(uint8_t byte)
{
    while (!(UCSR0A & _BV(UDRE0)))
        ;
    UDR0 = byte;
}

uint32_t port_free_ram(void)
{
    extern char __heap_start;
    char top;
    return (uint32_t)(&top - &__heap_start);
}
