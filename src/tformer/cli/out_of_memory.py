"""What running out of memory looks like, recognised without importing torch (the CLI's entry point loads
none before a command runs)."""

from __future__ import annotations

# torch's RuntimeErrors for a tensor that cannot be allocated: the CPU allocator's refusal, and the size
# check of a tensor whose byte count overflows 64 bits (translate --beam 10**18)
OUT_OF_MEMORY = ("DefaultCPUAllocator: can't allocate memory", "Storage size calculation overflowed")
ADVICE = "a smaller beam, batch or model needs less"  # what lowers a decoding command's memory


def is_out_of_memory(error: BaseException) -> bool:
    """Python's MemoryError, torch.OutOfMemoryError (a GPU's), or the plain RuntimeError of torch's CPU
    allocator, or of a tensor too large to count its bytes (recognised by their messages)."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in OUT_OF_MEMORY)


def reason(error: BaseException) -> str:
    """The first line of the error's message, or its type's name where it has none (a bare MemoryError)."""
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def out_of_memory_line(error: BaseException) -> str:
    """A decoding command's error line for `error`, without `error: `."""
    return f"out of memory ({reason(error)}); {ADVICE}"
