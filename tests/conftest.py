"""Settings shared by every test.

A ``Trainer`` applies ``train.threads`` and ``train.deterministic`` process-wide (``torch.set_num_threads``,
``torch.use_deterministic_algorithms``), as it should for a real run. Inside one pytest process that
leaked into every later test: after the first test that trained with ``train.threads=1``, the rest of the
suite ran on one thread (test_maccap's colour test: 193 s there, 117 s alone). Both are put back after
each test.
"""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_torch_process_settings():
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)
