"""Serving: one path for every protocol, decode -> micro-batch -> run -> rank.

- `decode`: request bodies (image files, base64, nested lists) -> a float32 batch of raw 0..255 RGB;
- `cache`: models loaded once and kept in an LRU, each with its `batching.MicroBatcher`;
- `runners`: LiteRT over `model.tflite` (Keras only as a fallback);
- `encode`: probabilities -> ranked predictions.
"""
