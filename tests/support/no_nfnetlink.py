"""Run a command as on a kernel without nf_tables' netlink family: a seccomp filter makes
socket(AF_NETLINK, *, NETLINK_NETFILTER) fail with EPROTONOSUPPORT, the error such a kernel
returns, then the command is executed (the filter is inherited by everything it starts, nft
included).

    python3 -m tests.support.no_nfnetlink COMMAND [ARG...]

x86_64 only (the filter checks the architecture and lets everything through elsewhere)."""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import sys

AUDIT_ARCH_X86_64 = 0xC000003E
NR_SOCKET = 41
AF_NETLINK, NETLINK_NETFILTER = 16, 12
LD_ABS, JEQ, RET = 0x20, 0x15, 0x06
RET_ALLOW, RET_ERRNO = 0x7FFF0000, 0x00050000
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def program() -> bytes:
    """seccomp_data: nr at 0, arch at 4, args[i] at 16 + 8 i (low half first)."""
    return b"".join(
        [
            _insn(LD_ABS, 0, 0, 4),
            _insn(JEQ, 0, 6, AUDIT_ARCH_X86_64),
            _insn(LD_ABS, 0, 0, 0),
            _insn(JEQ, 0, 4, NR_SOCKET),
            _insn(LD_ABS, 0, 0, 16),
            _insn(JEQ, 0, 2, AF_NETLINK),
            _insn(LD_ABS, 0, 0, 32),
            _insn(JEQ, 1, 0, NETLINK_NETFILTER),
            _insn(RET, 0, 0, RET_ALLOW),
            _insn(RET, 0, 0, RET_ERRNO | errno.EPROTONOSUPPORT),
        ]
    )


def install() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    code = program()
    buf = ctypes.create_string_buffer(code, len(code))

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    prog = Prog(len(code) // 8, ctypes.cast(buf, ctypes.c_void_p))
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")


if __name__ == "__main__":
    install()
    os.execvp(sys.argv[1], sys.argv[1:])
