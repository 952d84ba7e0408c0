/* HIL serial port on USART1 of the STM32F4 (0x40011000), polled. */
#include "hil_port.h"

#define USART_SR (*(volatile uint32_t *)0x40011000UL)
#define USART_DR (*(volatile uint32_t *)0x40011004UL)
#define USART_CR1 (*(volatile uint32_t *)0x4001100CUL)
#define SR_RXNE (1u << 5)
#define SR_TXE (1u << 7)

void port_init(void)
{
    USART_CR1 = (1u << 13) | (1u << 3) | (1u << 2); /* UE, TE, RE */
}

uint8_t port_read_byte(void)
{
    while (!(USART_SR & SR_RXNE))
        ;
    return (uint8_t)USART_DR;
}

void port_write_byte(uint8_t byte)
{
    while (!(USART_SR & SR_TXE))
        ;
    USART_DR = byte;
}

uint32_t port_free_ram(void)
{
    extern char _ebss;
    char top;
    return (uint32_t)(&top - &_ebss);
}
