# imgenc worker / producer image. GPU: run on a host with the NVIDIA container toolkit;
# TensorFlow's pip wheel brings its CUDA libraries with the [and-cuda] extra.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    TF_CPP_MIN_LOG_LEVEL=3 \
    KERAS_HOME=/models

RUN useradd --create-home --uid 1000 imgenc && mkdir -p /models /images /out \
    && chown imgenc /models /images /out

WORKDIR /app
COPY pyproject.toml README.md ./
COPY encoder ./encoder
COPY jobs ./jobs
COPY producer ./producer
COPY worker ./worker
COPY imgenc ./imgenc
ARG TF_EXTRA=and-cuda
RUN pip install "tensorflow[${TF_EXTRA}]>=2.16,<2.22" && pip install ".[flower]"

USER imgenc
# One worker process per GPU: TensorFlow is not fork-safe, the model loads in the child.
CMD ["celery", "-A", "worker", "worker", "--loglevel=INFO", "--concurrency=1"]
