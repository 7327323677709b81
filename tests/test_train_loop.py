import math

from textune.loop import lr_factor


def test_lr_schedule_warms_up_then_decays():
    total, warm = 100, 10
    f = [lr_factor(s, total, warm, "linear") for s in range(total)]
    assert f[0] < f[5] < f[9] <= 1.0
    assert f[10] == 1.0 and f[-1] < 0.02 and all(a >= b for a, b in zip(f[10:], f[11:]))
    c = [lr_factor(s, total, 0, "cosine") for s in range(total)]
    assert math.isclose(c[0], 1.0) and c[50] < 0.55 and c[-1] < 0.01
    assert lr_factor(99, total, 0, "constant") == 1.0


def test_training_batches_pad_per_device():
    from textune.config import TrainArgs

    assert TrainArgs().padding_multiple("cpu") == 1  # a CPU pays for every padded token
    assert TrainArgs().padding_multiple("cuda") == 8  # tensor cores, fewer shapes
    assert TrainArgs(compile=True).padding_multiple("cpu") == 64  # few compiled shapes
    assert TrainArgs(pad_multiple=16).padding_multiple("cpu") == 16


def test_global_batches_give_every_process_a_row():
    import numpy as np

    from textune.config import TrainArgs
    from textune.loop import _global_batches

    lengths = np.random.default_rng(0).integers(5, 400, size=3009)
    data = type("D", (), {"lengths": lengths, "__len__": lambda self: len(lengths)})()
    rows = TrainArgs(batch_size=32, seed=1)
    # 3009 rows in 32s: a 1-row batch, which the shuffle puts anywhere
    assert min(len(b) for b in _global_batches(data, rows, 0, 1)) == 1
    for args in (rows, TrainArgs(batch_tokens=4096, seed=1)):
        batches = _global_batches(data, args, 0, 4)
        assert min(len(b) for b in batches) >= 4  # each of 4 processes gets a row of each
        assert sorted(i for b in batches for i in b) == list(range(3009))
