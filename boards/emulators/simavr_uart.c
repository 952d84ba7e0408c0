/*
 * Runs an AVR firmware under simavr with UART0 bridged to a raw pseudo-terminal.
 *
 *   simavr_uart [-m MCU] [-f HZ] [-l LINK] [-c CYCLE_LOG] firmware.elf
 *
 * - The pty slave path is printed on stdout as "uart: /dev/pts/N" once the bridge is up, and LINK
 *   (when given) is made a symlink to it, so several instances can run side by side.
 * - Cycle markers: a firmware write of 1 to GPIOR0 records the current cycle; a later write of 2 appends
 *   "cycles <elapsed>" to CYCLE_LOG. This is simavr's own count of the code between the two writes.
 * - Exits when the firmware stops (sleep with interrupts off) or on SIGTERM/SIGINT, removing LINK.
 */
#include <errno.h>
#include <fcntl.h>
#include <pty.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <termios.h>
#include <unistd.h>

#include "avr_uart.h"
#include "sim_avr.h"
#include "sim_elf.h"
#include "sim_io.h"
#include "sim_irq.h"

#define GPIOR0_DATA_ADDR 0x3E /* I/O 0x1E on the ATmega328P, seen in data space */

static const char *link_path;
static FILE *cycle_log;
static avr_cycle_count_t marker_start;
static int pty_master = -1;
static volatile int uart_input_full;

/* Instructions run between two polls of the pty for host bytes. */
#define POLL_INTERVAL 256

static void on_signal(int sig)
{
	(void)sig;
	if (link_path)
		unlink(link_path);
	_exit(0);
}

static void on_gpior0_write(struct avr_t *avr, avr_io_addr_t addr, uint8_t v, void *param)
{
	(void)param;
	avr->data[addr] = v;
	if (v == 1) {
		marker_start = avr->cycle;
	} else if (v == 2 && cycle_log) {
		fprintf(cycle_log, "cycles %llu\n", (unsigned long long)(avr->cycle - marker_start));
		fflush(cycle_log);
	}
}

/* A byte the firmware sent: straight to the host (blocking, so the host paces a chatty firmware). */
static void on_uart_output(struct avr_irq_t *irq, uint32_t value, void *param)
{
	(void)irq;
	(void)param;
	uint8_t byte = (uint8_t)value;
	while (write(pty_master, &byte, 1) < 0 && (errno == EINTR || errno == EAGAIN))
		usleep(100);
}

static void on_uart_xon(struct avr_irq_t *irq, uint32_t value, void *param)
{
	(void)irq;
	(void)value;
	(void)param;
	uart_input_full = 0;
}

static void on_uart_xoff(struct avr_irq_t *irq, uint32_t value, void *param)
{
	(void)irq;
	(void)value;
	(void)param;
	uart_input_full = 1;
}

/* Moves host bytes into the UART's receive FIFO while it has room; the rest waits in the pty. */
static void pump_input(avr_irq_t *uart_input)
{
	uint8_t byte;
	while (!uart_input_full && read(pty_master, &byte, 1) == 1)
		avr_raise_irq(uart_input, byte);
}

static void usage(const char *prog)
{
	fprintf(stderr, "usage: %s [-m MCU] [-f HZ] [-l LINK] [-c CYCLE_LOG] firmware.elf\n", prog);
	exit(2);
}

int main(int argc, char **argv)
{
	const char *mcu = "atmega328p";
	unsigned long frequency = 16000000UL;
	const char *cycle_path = NULL;
	int opt;

	while ((opt = getopt(argc, argv, "m:f:l:c:")) != -1) {
		switch (opt) {
		case 'm': mcu = optarg; break;
		case 'f': frequency = strtoul(optarg, NULL, 10); break;
		case 'l': link_path = optarg; break;
		case 'c': cycle_path = optarg; break;
		default: usage(argv[0]);
		}
	}
	if (optind != argc - 1)
		usage(argv[0]);

	elf_firmware_t firmware;
	memset(&firmware, 0, sizeof(firmware));
	if (elf_read_firmware(argv[optind], &firmware) != 0) {
		fprintf(stderr, "simavr_uart: cannot read %s\n", argv[optind]);
		return 1;
	}
	if (firmware.mmcu[0])
		mcu = firmware.mmcu;
	avr_t *avr = avr_make_mcu_by_name(mcu);
	if (!avr) {
		fprintf(stderr, "simavr_uart: unknown MCU %s\n", mcu);
		return 1;
	}
	avr_init(avr);
	avr->frequency = firmware.frequency ? firmware.frequency : frequency;
	avr_load_firmware(avr, &firmware);

	if (cycle_path) {
		cycle_log = fopen(cycle_path, "w");
		if (!cycle_log) {
			perror(cycle_path);
			return 1;
		}
	}
	avr_register_io_write(avr, GPIOR0_DATA_ADDR, on_gpior0_write, NULL);

	/* Bridge UART0 to a raw pty. The harness keeps the slave open too, so the master never sees a hang-up
	 * while the host reconnects. */
	int pty_slave;
	char slave_name[256];
	if (openpty(&pty_master, &pty_slave, slave_name, NULL, NULL) != 0) {
		perror("openpty");
		return 1;
	}
	struct termios raw;
	tcgetattr(pty_slave, &raw);
	cfmakeraw(&raw);
	tcsetattr(pty_slave, TCSANOW, &raw);
	fcntl(pty_master, F_SETFL, fcntl(pty_master, F_GETFL) | O_NONBLOCK);

	uint32_t flags = 0;
	avr_ioctl(avr, AVR_IOCTL_UART_GET_FLAGS('0'), &flags);
	flags &= ~AVR_UART_FLAG_STDIO;
	avr_ioctl(avr, AVR_IOCTL_UART_SET_FLAGS('0'), &flags);
	avr_irq_t *uart_input = avr_io_getirq(avr, AVR_IOCTL_UART_GETIRQ('0'), UART_IRQ_INPUT);
	avr_irq_register_notify(avr_io_getirq(avr, AVR_IOCTL_UART_GETIRQ('0'), UART_IRQ_OUTPUT), on_uart_output, NULL);
	avr_irq_register_notify(avr_io_getirq(avr, AVR_IOCTL_UART_GETIRQ('0'), UART_IRQ_OUT_XON), on_uart_xon, NULL);
	avr_irq_register_notify(avr_io_getirq(avr, AVR_IOCTL_UART_GETIRQ('0'), UART_IRQ_OUT_XOFF), on_uart_xoff, NULL);

	signal(SIGTERM, on_signal);
	signal(SIGINT, on_signal);
	signal(SIGHUP, on_signal);
	if (link_path) {
		unlink(link_path);
		if (symlink(slave_name, link_path) != 0) {
			perror(link_path);
			return 1;
		}
	}
	printf("uart: %s\n", slave_name);
	fflush(stdout);

	int state = cpu_Running;
	while (state != cpu_Done && state != cpu_Crashed) {
		for (int i = 0; i < POLL_INTERVAL && state != cpu_Done && state != cpu_Crashed; i++)
			state = avr_run(avr);
		pump_input(uart_input);
	}
	if (link_path)
		unlink(link_path);
	_exit(state == cpu_Done ? 0 : 1);
}
