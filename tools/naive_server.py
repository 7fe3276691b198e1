"""The seed pattern, kept as the benchmark's baseline: a plain Flask app doing one fp32 forward pass per request.

What the Flask and PyTorch tutorials write: load the model at start-up, then per request open the image with PIL,
apply the eval transform and run the model in the request's own thread, on DEVICE (default auto: the GPU if there
is one). No batching, no queue, no metrics.
python -m scripts.benchmark starts it under gunicorn like the service (gthread, same threads and TORCH_THREADS):

    MODEL_PATH=models/pet_classifier.pt gunicorn -w 1 --threads 16 'tools.naive_server:create_app()'  # repo root
"""

from __future__ import annotations

import io
import os

import torch
from flask import Flask, jsonify, request
from PIL import Image

from models.bundle import load_model
from models.paths import DEFAULT_BUNDLE_PATH
from models.runtime import resolve_device
from models.transforms import eval_transform


def create_app() -> Flask:
    """Load MODEL_PATH once; POST /predict takes a raw image body (or multipart `image`) and answers JSON."""
    torch.set_num_threads(int(os.environ.get("TORCH_THREADS") or os.cpu_count() or 1))
    device = resolve_device(os.environ.get("DEVICE") or "auto")
    model, bundle = load_model(os.environ.get("MODEL_PATH", DEFAULT_BUNDLE_PATH), device)
    transform = eval_transform(bundle.preprocess)
    app = Flask(__name__)

    @app.post("/predict")
    def predict():
        data = request.files["image"].read() if "image" in request.files else request.get_data()
        image = Image.open(io.BytesIO(data)).convert("RGB")
        with torch.inference_mode():
            probs = torch.softmax(model(transform(image).unsqueeze(0).to(device)), dim=1)[0].tolist()
        best = max(range(len(probs)), key=probs.__getitem__)
        return jsonify(
            predicted_class=bundle.class_names[best],
            confidence=probs[best],
            all_probabilities=dict(zip(bundle.class_names, probs)),
        )

    @app.get("/readyz")
    def readyz():
        return {"ready": True}

    return app
