"""Session-wide test data, generated with ASE EMT in a temporary directory."""

import importlib.util
import logging
import signal
import sys

import pytest
import torch
from helpers.structures import write_dataset

# A run started in the background by a non-interactive shell (`nohup make test &`) inherits SIGINT
# ignored, and so would every process a test starts: the Ctrl-C tests need it delivered.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# the fuzzers need hypothesis (the test extra has it; the legacy DGL environment does not)
collect_ignore = [] if importlib.util.find_spec("hypothesis") else ["fuzz"]


class _CurrentStderr:
    """Whatever ``sys.stderr`` is when a record is written (capsys swaps it per test phase)."""

    def write(self, text: str) -> None:
        sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


@pytest.fixture(autouse=True)
def lightning_logs_into_the_current_stderr():
    """Lightning adds a ``StreamHandler`` to its loggers when first imported (if the root logger has
    none), bound to the ``sys.stderr`` of that moment: a test's capture, closed after it. Later tests
    would then print "--- Logging error ---" tracebacks; so after each test the handlers follow
    whatever ``sys.stderr`` is."""
    yield
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        for handler in logging.getLogger(name).handlers:
            if type(handler) is logging.StreamHandler and not isinstance(handler.stream, _CurrentStderr):
                handler.stream = _CurrentStderr()  # not setStream: it would flush the closed stream


@pytest.fixture(autouse=True, scope="session")
def one_thread_per_test_process():
    """Tests run in two xdist processes on two cores and their tensors are small: a second
    intra-op thread per process only adds OpenMP contention (tenfold under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def s2ef_path(tmp_path_factory):
    """12 S2EF records in three shards (5, 5, 2)."""
    return write_dataset(tmp_path_factory.mktemp("s2ef") / "train", 12, "s2ef", records_per_shard=5)


@pytest.fixture(scope="session")
def is2re_path(tmp_path_factory):
    """6 IS2RE records in one data.lmdb."""
    return write_dataset(tmp_path_factory.mktemp("is2re") / "train", 6, "is2re")
