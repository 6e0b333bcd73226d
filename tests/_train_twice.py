"""Run by tests/test_train.py in a fresh process, as a notebook would: JAX starts first (one CPU
device), then train_and_evaluate runs twice in the same process. Prints one JSON line of results."""

import json
import sys
from pathlib import Path

if __name__ == "__main__":  # grain starts its workers as fresh processes
    import jax

    jax.devices()  # any JAX call: the backend starts with its default (one CPU device)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from alexnet_jax import train
    from configs import demo

    out = []
    for run in ("first", "second"):
        c = demo.get_config()
        c.model.width, c.batch_size, c.eval_batch_size = 0.125, 32, 100
        c.eval_ten_crop, c.total_steps, c.log_every = False, 3, 1
        r = train.train_and_evaluate(c, Path(sys.argv[1]) / run)
        out.append({"step": r["step"], "top1": r["val/top1_error"], "devices": jax.device_count()})
    print("RESULT " + json.dumps(out))
