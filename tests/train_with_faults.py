"""scripts/train.py with the faults of the GANFORGE_TEST_* variables (tests/faults.py) as the training loop's hooks."""
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from faults import Faults  # noqa: E402

from training import loop  # noqa: E402

TRAIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "train.py")

if __name__ == "__main__":
    loop.training_loop = functools.partial(loop.training_loop, hooks=Faults.from_env())
    sys.argv[0] = TRAIN
    sys.path[0] = os.path.dirname(TRAIN)
    exec(compile(open(TRAIN).read(), TRAIN, "exec"), {"__name__": "__main__", "__file__": TRAIN})
