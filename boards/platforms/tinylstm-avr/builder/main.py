"""Build script of the tinylstm AVR platform: bare avr-libc with Debian's avr-gcc (the toolchain-atmelavr
package links to it). "Upload" runs the project's upload_command, which starts simavr with the built ELF.
"""

import os

from SCons.Script import AlwaysBuild, Default, DefaultEnvironment

env = DefaultEnvironment()
board = env.BoardConfig()
machine_flags = ["-mmcu=" + board.get("build.mcu")]
common_flags = ["-Os", "-ffunction-sections", "-fdata-sections", "-Wall"]

env.Replace(
    AR="avr-gcc-ar",
    AS="avr-gcc",
    CC="avr-gcc",
    CXX="avr-g++",
    OBJCOPY="avr-objcopy",
    RANLIB="avr-gcc-ranlib",
    SIZETOOL="avr-size",
    PROGNAME="firmware",
    PROGSUFFIX=".elf",
    SIZEPRINTCMD="$SIZETOOL -B -d $SOURCES",
)
toolchain_dir = env.PioPlatform().get_package_dir("toolchain-atmelavr")
if toolchain_dir:
    env.PrependENVPath("PATH", os.path.join(toolchain_dir, "bin"))

env.Append(
    ASFLAGS=machine_flags,
    CCFLAGS=common_flags + machine_flags,
    CFLAGS=["-std=gnu11"],
    CXXFLAGS=["-fno-exceptions", "-fno-rtti"],
    CPPDEFINES=[("F_CPU", "$BOARD_F_CPU")],
    LINKFLAGS=common_flags + machine_flags + ["-Wl,--gc-sections"],
)

target_elf = env.BuildProgram()
target_size = env.Alias("size", target_elf, env.VerboseAction("$SIZEPRINTCMD", "Calculating size $SOURCE"))
AlwaysBuild(target_size)

upload_command = env.GetProjectOption("upload_command", "")
if upload_command:
    env.Replace(UPLOADCMD=upload_command)
    AlwaysBuild(env.Alias("upload", target_elf, env.VerboseAction("$UPLOADCMD", "Starting the emulator")))

Default([target_elf, target_size])
