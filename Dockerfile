# syntax=docker/dockerfile:1
# Pet classifier service. Build: docker build -t pet-classifier .
# The default torch wheel carries its CUDA libraries, so one image serves CPU and GPU hosts.
# For a smaller CPU-only image: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ARG TORCH_INDEX_URL=https://pypi.org/simple
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY requirements.txt /tmp/requirements.txt
# torch first, from the chosen index; the rest (already satisfied torch included) from PyPI.
RUN grep -E '^(torch|torchvision)==' /tmp/requirements.txt > /tmp/torch.txt \
    && pip install --index-url "${TORCH_INDEX_URL}" -r /tmp/torch.txt \
    && pip install -r /tmp/requirements.txt
# The project itself (packages app and models) as a wheel, installed in the runtime stage: a code change then
# rebuilds a layer of kilobytes instead of copying the 6 GB virtual environment again.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app/ app/
COPY models/ models/
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="pet-classifier" \
      org.opencontainers.image.description="Fine-tuned ResNet-50 pet classifier served with micro-batching"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PORT=5000 \
    MODEL_PATH=/models/pet_classifier.pt \
    TORCH_HOME=/cache/torch \
    MPLCONFIGDIR=/tmp/matplotlib
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /srv/app --shell /usr/sbin/nologin app \
    && mkdir -p /models /data /cache/torch \
    && chown app:app /models /cache/torch
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /wheels /tmp/wheels
RUN pip install --no-cache-dir --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels
WORKDIR /srv/app
COPY --chown=app:app scripts/ scripts/
COPY --chown=app:app gunicorn.conf.py ./
USER 10001:10001
EXPOSE 5000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('PORT', '5000'), timeout=4)"]
CMD ["gunicorn", "-c", "gunicorn.conf.py", "app:create_app()"]
