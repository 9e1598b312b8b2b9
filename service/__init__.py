"""The HTTP side: FastAPI app, model registry and prediction. Never imports TensorFlow on its own."""
