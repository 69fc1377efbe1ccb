"""Small builders shared by several test files."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from robust_ebm.models import ModelConfig, build_model

TINY_CNN = ModelConfig(arch="tiny_cnn", width=4)


def tiny_classifier(seed=0, classes=3, channels=1, size=8):
    """A seeded tiny CNN classifier in eval mode (1x8x8 inputs by default)."""
    torch.manual_seed(seed)
    return build_model(TINY_CNN, num_classes=classes, in_channels=channels, image_size=size).eval()


def sigkill_when(script, ckpt, ready, timeout: float) -> int:
    """Run `script` in a child Python and SIGKILL it once its checkpoint `ckpt` exists and
    `ready(progress)` holds; the child's return code. Same intra-op thread count as this process
    (float reductions differ between thread counts)."""
    from robust_ebm.checkpoint import load_checkpoint

    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"child exited before it could be killed: {proc.stderr.read().decode()[-2000:]}")
            if ckpt.exists() and ready(load_checkpoint(ckpt)["progress"]):
                break
            time.sleep(0.02)
        else:
            pytest.fail(f"no checkpoint at {ckpt} reached the kill point within {timeout:.0f} s")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    return proc.returncode
