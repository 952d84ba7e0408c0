/* HIL serial port over the Arduino framework's Serial (USB CDC or the board's USB-serial bridge). */
#include <Arduino.h>

#include "hil_config.h"
#include "hil_port.h"

void port_init(void)
{
    Serial.begin(HIL_BAUD);
    while (!Serial) /* native USB boards: wait for the host to open the port */
        ;
}

uint8_t port_read_byte(void)
{
    int byte;
    while ((byte = Serial.read()) < 0)
        ;
    return (uint8_t)byte;
}

void port_write_byte(uint8_t byte)
{
    Serial.write(byte);
}

uint32_t port_free_ram(void)
{
    return HIL_FREE_RAM_UNKNOWN;
}

void setup()
{
    hil_run();
}

void loop()
{
}
