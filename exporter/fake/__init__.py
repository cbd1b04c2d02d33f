"""The simulator users run: simulated GPUs (--fake-gpus), scenarios, replayed nvidia-smi dumps."""
