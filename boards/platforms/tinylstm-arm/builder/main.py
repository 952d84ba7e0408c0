"""Build script of the tinylstm Cortex-M platform: bare metal with Debian's arm-none-eabi-gcc and newlib-nano
(the toolchain-gccarmnoneeabi package links to it). The project provides its start-up code and the linker
script named by board_build.ldscript. "Upload" runs the project's upload_command, which starts QEMU.
"""

import os

from SCons.Script import AlwaysBuild, Default, DefaultEnvironment

env = DefaultEnvironment()
board = env.BoardConfig()
# Soft-float ABI: the firmware uses no floating point, and every core here has a soft-float multilib.
machine_flags = ["-mcpu=" + board.get("build.cpu"), "-mthumb", "-mfloat-abi=soft"]
common_flags = ["-Os", "-ffunction-sections", "-fdata-sections", "-Wall"]

ldscript = env.GetProjectOption("board_build.ldscript", board.get("build.ldscript", ""))
if not ldscript:
    raise SystemExit("tinylstm-arm: set board_build.ldscript to the project's linker script")
if not os.path.isabs(ldscript):
    ldscript = os.path.join(env.subst("$PROJECT_DIR"), ldscript)

env.Replace(
    AR="arm-none-eabi-gcc-ar",
    AS="arm-none-eabi-gcc",
    CC="arm-none-eabi-gcc",
    CXX="arm-none-eabi-g++",
    OBJCOPY="arm-none-eabi-objcopy",
    RANLIB="arm-none-eabi-gcc-ranlib",
    SIZETOOL="arm-none-eabi-size",
    PROGNAME="firmware",
    PROGSUFFIX=".elf",
    SIZEPRINTCMD="$SIZETOOL -B -d $SOURCES",
    LDSCRIPT_PATH=ldscript,  # PlatformIO adds "-T $LDSCRIPT_PATH" to the link
)
toolchain_dir = env.PioPlatform().get_package_dir("toolchain-gccarmnoneeabi")
if toolchain_dir:
    env.PrependENVPath("PATH", os.path.join(toolchain_dir, "bin"))

env.Append(
    ASFLAGS=machine_flags,
    CCFLAGS=common_flags + machine_flags,
    CFLAGS=["-std=gnu11"],
    CXXFLAGS=["-fno-exceptions", "-fno-rtti"],
    CPPDEFINES=[("F_CPU", "$BOARD_F_CPU")],
    LINKFLAGS=common_flags
    + machine_flags
    + ["-nostartfiles", "--specs=nano.specs", "--specs=nosys.specs", "-Wl,--gc-sections"],
)
env.Depends("$BUILD_DIR/${PROGNAME}.elf", ldscript)

target_elf = env.BuildProgram()
target_size = env.Alias("size", target_elf, env.VerboseAction("$SIZEPRINTCMD", "Calculating size $SOURCE"))
AlwaysBuild(target_size)

upload_command = env.GetProjectOption("upload_command", "")
if upload_command:
    env.Replace(UPLOADCMD=upload_command)
    AlwaysBuild(env.Alias("upload", target_elf, env.VerboseAction("$UPLOADCMD", "Starting the emulator")))

Default([target_elf, target_size])
