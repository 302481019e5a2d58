"""Importing TensorFlow once, without its start-up noise on stderr.

TensorFlow 2.21 prints half a dozen lines from its C++ side while it is imported and runs
its first operation: absl's "All log messages before absl::InitializeLog() is called...",
oneDNN's "custom operations are on", "Could not find cuda drivers", the CPU-instructions
notice and, with no GPU, a failed ``cuInit``.  ``TF_CPP_MIN_LOG_LEVEL`` no longer silences
them, and neither do absl's or glog's own settings; ``TF_ENABLE_ONEDNN_OPTS=0`` removes
two but changes the numerics, and so the codes.

``tensorflow()`` imports TensorFlow (and Keras) with the process's stderr file descriptor
passed through a filter that drops exactly those known lines and forwards every other
line as it comes, so real warnings and errors still show.  It is the one place the
project imports TensorFlow first; later imports are free.

Keras also imports pandas, SciPy, scikit-learn and matplotlib when they are installed,
for DataFrame inputs, sparse inputs, its scikit-learn wrappers and its plotting helpers.
imgenc uses none of these through Keras, and the four cost about a third of the import:
2.7 of 6.4 CPU-seconds on a 2-core EPYC, paid again by every command, worker and pool
process.  While Keras is imported, those not yet imported are hidden from it (Keras then
treats them as absent), and afterwards they import normally for whoever needs them.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from collections.abc import Iterator
from types import ModuleType

# The start-up lines, by the C++ file that prints them (absl's "I0000 00:00:... file.cc:N]").
KNOWN_NOISE = re.compile(
    rb"^(WARNING: All log messages before absl::InitializeLog\(\) is called"
    rb"|[IWE]\d{4} [\d:.]+ +\d+ (port|cudart_stub|cpu_feature_guard)\.cc:\d+\]"
    rb"|E\d{4} [\d:.]+ +\d+ cuda_(platform|executor)\.cc:\d+\] failed call to cuInit"
    rb"|To enable the following instructions: .* in other operations, rebuild TensorFlow)"
)

# Optional Keras dependencies that imgenc never uses through Keras (see the docstring).
KERAS_EXTRAS_HIDDEN = ("pandas", "scipy", "sklearn", "matplotlib")

_lock = threading.Lock()
_module: ModuleType | None = None


@contextlib.contextmanager
def keras_extras_hidden() -> Iterator[None]:
    """Make ``import X`` fail for each ``KERAS_EXTRAS_HIDDEN`` module not yet imported."""
    hidden = [name for name in KERAS_EXTRAS_HIDDEN if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  (import raises ImportError)
    try:
        yield
    finally:
        for name in hidden:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]


@contextlib.contextmanager
def known_noise_filtered() -> Iterator[None]:
    """Route file descriptor 2 through a filter of ``KNOWN_NOISE`` for the duration."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all: nothing to filter
        yield
        return
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward() -> None:
        with os.fdopen(read_end, "rb") as lines:
            for line in lines:
                if not KNOWN_NOISE.match(line):
                    os.write(saved, line)

    forwarder = threading.Thread(target=forward, name="stderr-filter", daemon=True)
    forwarder.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the forwarder sees its end
        forwarder.join(timeout=5)
        os.close(saved)


def tensorflow() -> ModuleType:
    """The ``tensorflow`` module, imported quietly (see the module docstring)."""
    global _module
    with _lock:
        if _module is None:
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # its Python-side logging
            with known_noise_filtered(), keras_extras_hidden():
                import keras  # noqa: F401  (Keras 3 imports its TensorFlow backend)
                import tensorflow as tf

                tf.constant(0.0) + 1.0  # the first operation: devices are looked for here
            _module = tf
        return _module
