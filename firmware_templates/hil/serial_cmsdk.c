/* HIL serial port on UART0 of the Arm MPS2 FPGA images (CMSDK APB UART at 0x40004000), polled. */
#include "hil_port.h"

#define UART_DATA (*(volatile uint32_t *)0x40004000UL)
#define UART_STATE (*(volatile uint32_t *)0x40004004UL)
#define UART_CTRL (*(volatile uint32_t *)0x40004008UL)
#define UART_BAUDDIV (*(volatile uint32_t *)0x40004010UL)
#define STATE_TX_FULL 1u
#define STATE_RX_FULL 2u

void port_init(void)
{
    UART_BAUDDIV = 16;
    UART_CTRL = 3; /* TX and RX enable */
}

uint8_t port_read_byte(void)
{
    while (!(UART_STATE & STATE_RX_FULL))
        ;
    return (uint8_t)UART_DATA;
}

void port_write_byte(uint8_t byte)
{
    while (UART_STATE & STATE_TX_FULL)
        ;
    UART_DATA = byte;
}

uint32_t port_free_ram(void)
{
    extern char _ebss;
    char top;
    return (uint32_t)(&top - &_ebss);
}
