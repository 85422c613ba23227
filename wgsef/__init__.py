"""wgsef: learning structured-sparse neural networks (see README.md)."""
import logging


def _no_cuda_runtime_warning(record: logging.LogRecord) -> bool:
    # torch.utils.cpp_extension (imported by torch.utils.benchmark) warns on every CPU-only machine that has a
    # CUDA toolkit folder; nothing here compiles extensions, so that one message is dropped, nothing else
    return not record.getMessage().startswith("No CUDA runtime is found")


logging.getLogger("torch.utils.cpp_extension").addFilter(_no_cuda_runtime_warning)
