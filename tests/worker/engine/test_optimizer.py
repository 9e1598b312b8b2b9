"""The head's fused Adam is Keras' Adam: same updates, one kernel."""

from __future__ import annotations

import keras
import numpy as np

from worker.engine.pipeline import fused_adam


def test_fused_adam_matches_keras_adam_over_several_steps() -> None:
    rng = np.random.default_rng(0)
    start = rng.standard_normal((300, 20)).astype("float32")
    grads = [rng.standard_normal((300, 20)).astype("float32") for _ in range(5)]
    results = []
    for optimizer in (keras.optimizers.Adam(learning_rate=0.01), fused_adam(0.01)):
        variable = keras.Variable(start.copy())
        for grad in grads:
            optimizer.apply_gradients([(keras.ops.convert_to_tensor(grad), variable)])
        results.append(np.asarray(variable.numpy()))
    assert not np.allclose(results[0], start)
    np.testing.assert_allclose(results[1], results[0], rtol=1e-5, atol=1e-6)
